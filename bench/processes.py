"""One command line run as a child process and measured from outside: exit status, wall time, peak RSS, RSS over
time, when it had given files open, GPU memory, and its output stamped with the time (bench/rehearse.py's runs).

Peak RSS: the command is started by LAUNCHER, a bare Python process (~10 MiB) that forks and execs it and reports
os.wait4's rusage of it. Its ru_maxrss is the kernel's high-water mark of the command's resident set over its whole
life (with the children it waited for, such as DataLoader workers: the largest of them, not a sum), so no sampling
can miss a short peak and nothing runs inside the command. Linux carries ru_maxrss across exec, so a command forked
straight from this process (torch imported: ~0.5 GiB) would report at least this process's RSS; forked from the
launcher, at least ~10 MiB. RUSAGE_CHILDREN would mix all the children; /usr/bin/time -v gives the same figure but
is not on every machine. Everything else is read from /proc/<pid> of the command every SAMPLE_SECONDS.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SAMPLE_SECONDS = 0.25
# argv: REPORT_FILE COMMAND...; writes {"pid"} when the command started, {"exit_status", "maxrss_kib"} when it ended
LAUNCHER = """
import json, os, sys
report, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)  # not found, not executable
with open(report, "w") as out:
    out.write(json.dumps({"pid": pid}) + "\\n")
    out.flush()
    _, status, usage = os.wait4(pid, 0)
    out.write(json.dumps({"exit_status": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}) + "\\n")
"""


def read_status_kib(pid: int, key: str) -> int | None:
    """A kiB field of /proc/<pid>/status (VmRSS, VmHWM), None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def files_in_use(pid: int) -> set[str]:
    """Paths the process has mapped (safetensors' safe_open maps its file) or open."""
    paths = set()
    try:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                paths.add(parts[5])
        for fd in os.listdir(f"/proc/{pid}/fd"):
            paths.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return paths


def gpu_memory_mib(pid: int) -> int | None:
    """The process's GPU memory as nvidia-smi reports it (CUDA context + PyTorch's reserved pool), when present."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    used = [int(row.split(",")[1]) for row in out.splitlines() if row.split(",")[0].strip() == str(pid)]
    return max(used) if used else None


def intervals(times: list[float], gap: float) -> list[list[float]]:
    """Sample times grouped into [first, last] runs with no gap wider than `gap`."""
    runs = []
    for t in times:
        if runs and t - runs[-1][1] <= gap:
            runs[-1][1] = t
        else:
            runs.append([t, t])
    return [[round(a, 2), round(b, 2)] for a, b in runs]


def sample_process(pid: int, watched: set[str], cuda: bool, stop: threading.Event, record: dict) -> None:
    """Every SAMPLE_SECONDS until stopped: the RSS, whether a watched file is mapped or open (which ones), and on a
    GPU (every 2 s) the memory nvidia-smi sees."""
    started, last_gpu = time.perf_counter(), -2.0
    while not stop.is_set():
        now = time.perf_counter() - started
        rss = read_status_kib(pid, "VmRSS")
        if rss is not None:
            record["rss"].append((now, rss))
        if seen := watched & files_in_use(pid):
            record["watched_seen"].append(now)
            record["watched_files"] |= seen
        if cuda and now - last_gpu >= 2:
            last_gpu, used = now, gpu_memory_mib(pid)
            record["gpu_mib"] = max(record["gpu_mib"] or 0, used or 0) or None
        stop.wait(SAMPLE_SECONDS)


def read_output(stream, log: Path, lines: list, echo: str | None) -> None:
    """The child's stdout and stderr, line by line (a carriage return, as tqdm writes, ends a line too), each
    stamped with the seconds since the start into `log`; echoed after the prefix `echo` (bars every 10 s at most)."""
    started, last_bar, pending = time.perf_counter(), -10.0, b""
    with open(log, "w") as out:
        while chunk := os.read(stream.fileno(), 65536):
            pending += chunk
            *complete, pending = re.split(rb"[\r\n]", pending)
            for raw in complete:
                text, now = raw.decode(errors="replace").rstrip(), time.perf_counter() - started
                if not text:
                    continue
                lines.append((now, text))
                out.write(f"[{now:8.1f} s] {text}\n")
                out.flush()
                bar = "%|" in text
                if echo and (not bar or now - last_bar >= 10):
                    print(f"{echo} {text}", flush=True)
                    last_bar = now if bar else last_bar


def launch(argv: list[str], report: Path, **popen) -> tuple[subprocess.Popen, int]:
    """Start argv under LAUNCHER in a session of its own; (the launcher, the command's pid)."""
    report.unlink(missing_ok=True)
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(report), *argv], start_new_session=True, **popen)
    while not report.is_file() or not report.read_text().endswith("\n"):
        if launcher.poll() is not None:
            raise RuntimeError(f"the launcher of {argv[:2]} ended with {launcher.returncode} before the command began")
        time.sleep(0.01)
    return launcher, json.loads(report.read_text().splitlines()[0])["pid"]


def run_measured(argv: list[str], *, cwd, env: dict, log: Path, watched: set[str] = frozenset(), cuda: bool = False,
                 echo: str | None = None, timeout: float | None = None) -> dict:
    """Run argv to its end (killed with its process group after `timeout` seconds) and measure it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    record, lines, stop = {"rss": [], "watched_seen": [], "watched_files": set(), "gpu_mib": None}, [], \
        threading.Event()
    started, report = time.perf_counter(), log.with_suffix(".rusage.json")
    launcher, pid = launch(argv, report, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    threads = [threading.Thread(target=read_output, args=(launcher.stdout, log, lines, echo)),
               threading.Thread(target=sample_process, args=(pid, set(watched), cuda, stop, record))]
    for thread in threads:
        thread.start()
    try:
        launcher.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    wall = time.perf_counter() - started
    stop.set()
    for thread in threads:
        thread.join()
    launcher.stdout.close()
    ended = [json.loads(line) for line in report.read_text().splitlines()[1:]]  # none when killed
    every = max(1, len(record["rss"]) // 300)
    return {"exit_status": ended[0]["exit_status"] if ended else launcher.returncode,
            "timed_out": not ended and bool(timeout) and wall >= timeout, "wall_s": round(wall, 1),
            "first_output_s": round(lines[0][0], 1) if lines else None,
            "peak_rss_gib": round(ended[0]["maxrss_kib"] / 2**20, 3) if ended else None, "rss": record["rss"],
            "rss_timeline_mib": [[round(t, 1), kib // 1024] for t, kib in record["rss"][::every]],
            "watched_open_s": intervals(record["watched_seen"], gap=2 * SAMPLE_SECONDS + 0.5),
            "watched_files_seen": sorted(record["watched_files"]), "gpu_used_max_mib": record["gpu_mib"],
            "lines": lines}
