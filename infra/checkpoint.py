"""What a run keeps on disk: model checkpoints, the resumable training state, the training log, and the run
folder's lock.

Every file is written to a temporary name unique to its writer (pid + random), fsynced and renamed (atomic on
POSIX), so a crash or a full disk mid-save leaves the previous file loadable and a reader never sees a partial file.
A run folder belongs to one run: a second writer is refused while the first holds the lock, and a folder that
already holds a run is continued (--resume auto) or moved aside (--start-over), never overwritten. Everything is loaded with `torch.load(..., weights_only=True)`: tensors, numbers, strings,
lists and dicts only, never pickled code. A checkpoint holds only trainable weights (projector + adapters), the
configs that rebuild the model, and the bases' identity (vlm.base_identity: the tower's model_type and
snapshot.fingerprint of each base; the older forms of checkpoints written before are still accepted, see
base_identity_today), never the frozen bases.
"""
import csv
import errno
import fcntl
import hashlib
import io
import json
import os
import platform
import random
import resource
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from clip import CLIPConfig, vision_key
from infra import snapshot
from infra.errors import UserError
from infra.paths import temporary_name  # writer-unique, within the file system's name limit

MODEL_FORMAT = "kovlm-model-1"
STATE_FORMAT = "kovlm-training-state-1"
STATE_FILE = "training_state.pt"
# Options that may change between an interrupted run and its resumption without changing the result.
RESUMABLE_CHANGES = {"resume", "start_over", "max_steps", "num_workers", "eval_batch_size", "save_every",
                     "output_dir"}
LOCK_FILE = "run.lock"


def atomic_write(path: Path, write) -> None:
    """write(f) into a temporary file, fsync, rename over `path`; on any failure the temporary file is removed
    and `path` keeps its previous content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as error:  # a write or close reports no file name: name the one being written
        temporary.unlink(missing_ok=True)
        if error.filename is not None or error.errno is None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from None
    except RuntimeError as error:  # torch.save's zip writer reports a short write as "unexpected pos"
        temporary.unlink(missing_ok=True)
        if "unexpected pos" not in str(error):
            raise
        full = shutil.disk_usage(path.parent).free < 64 * 2**20
        raise OSError(errno.ENOSPC if full else errno.EIO, "the file could not be written completely",
                      str(path)) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_checkpoint(path: str | Path, expected_format: str = MODEL_FORMAT) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's own message may advise weights_only=False, the unsafe path: never repeat it
        reason = "empty file" if path.stat().st_size == 0 else type(error).__name__
        raise UserError(f"{path}: not a readable kovlm checkpoint ({reason}; truncated, or another kind of file)") \
            from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") not in (MODEL_FORMAT, STATE_FORMAT):
        raise UserError(f"{path}: not a kovlm checkpoint (no '{expected_format}' format field)")
    return checkpoint


def save_model(path: Path, model, train_config, info: dict) -> None:
    atomic_save({"format": MODEL_FORMAT, "vlm_config": asdict(model.config), "train_config": asdict(train_config),
                 "trainable": model.trainable_state_dict(), "info": info}, path)


# ---- resumable training state ------------------------------------------------------------------------------------
def rng_states() -> dict:
    numpy_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()),
                                                  *numpy_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def save_training_state(out: Path, model, optimizer, train_config, position: dict) -> None:
    """Everything `--resume` needs to continue bit for bit: weights, optimizer, position in the data order, RNGs."""
    atomic_save({"format": STATE_FORMAT, "vlm_config": asdict(model.config), "train_config": asdict(train_config),
                 "trainable": model.trainable_state_dict(), "optimizer": optimizer.state_dict(),
                 "rng": rng_states(), **position}, Path(out) / "checkpoints" / STATE_FILE)


def load_training_state(resume: str, out: Path) -> dict:
    path = Path(out) / "checkpoints" / STATE_FILE if resume == "auto" else Path(resume)
    if resume == "auto" and not path.exists():
        raise FileNotFoundError(f"--resume auto: no {STATE_FILE} in {path.parent}; start without --resume")
    state = load_checkpoint(path, STATE_FORMAT)
    if state["format"] != STATE_FORMAT:
        raise UserError(f"{path} is a model checkpoint, not a training state; resume from {STATE_FILE}")
    return state


# Options that train.py had before the embedded default became its own caller (demo/), with the value that left a
# run outside the demo unaffected: a run saved then still resumes with train.py.
MOVED_TO_THE_DEMO = {"select_by": "meteor", "demo_dir": None, "demo_scale": None, "demo_heldout": None,
                     "demo_seed": None}


def check_same_run(state: dict, train_config) -> None:
    """Resuming with other settings would not continue the same run: refuse, naming the first differing option."""
    current = asdict(train_config)
    for key, saved in state["train_config"].items():
        if key not in current and key in MOVED_TO_THE_DEMO and MOVED_TO_THE_DEMO[key] in (None, saved):
            continue
        if key not in current:
            raise UserError(f"cannot resume: the saved run has an option this version does not know ({key!r}); "
                             "resume it with the version that started it")
        if key not in RESUMABLE_CHANGES and current.get(key) != saved:
            raise UserError(f"cannot resume: --{key.replace('_', '-')} was {saved!r} in the saved run, "
                             f"now {current.get(key)!r}")


def restore_training_state(state: dict, model, optimizer) -> None:
    model.load_trainable_state_dict(state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_states(state["rng"])


# ---- the bases' identity ----------------------------------------------------------------------------------------
CLIP_TYPES = ("clip", "clip_vision_model")  # config.json's model_type of a full CLIP and of its vision tower


def base_identity_today(saved: dict, current: dict, folders: dict) -> dict:
    """A checkpoint's `base_identity` as it is compared with the bases loaded now (`current`, vlm.base_identity;
    `folders`: {"vision": ..., "llm": ...}). Two older forms are read as today's, so checkpoints written before
    still load: (a) before the other towers, the tower was CLIP and recorded as "clip": its weights' fingerprint;
    that is read as {"vision": {"model_type": CLIP's, "weights": it}} (the CLIP type loaded now, full or vision-only,
    as the record did not tell them apart); (b) a fingerprint of the older form (another length) that
    `legacy_fingerprint` finds again in its folder is read as that folder's fingerprint today. Anything else is
    returned as saved, and a difference is refused by the caller."""
    today = dict(saved)
    now_vision = current.get("vision") or {}
    if "clip" in today and "vision" not in today:
        clip_type = now_vision.get("model_type") if now_vision.get("model_type") in CLIP_TYPES else "clip"
        today["vision"] = {"model_type": clip_type, "weights": today.pop("clip")}
    vision = today.get("vision")
    if isinstance(vision, dict) and now_vision.get("model_type") in CLIP_TYPES and \
            is_older_form(vision.get("weights"), now_vision["weights"], "clip", folders["vision"]):
        today["vision"] = vision | {"weights": now_vision["weights"]}
    if "llm" in today and "llm" in current and is_older_form(today["llm"], current["llm"], "llm", folders["llm"]):
        today["llm"] = current["llm"]
    return today


def is_older_form(recorded, fingerprint: str, base: str, folder) -> bool:
    """Whether `recorded` is the fingerprint of the older form (another length) of the base in `folder`."""
    return isinstance(recorded, str) and len(recorded) != len(fingerprint) and \
        recorded == legacy_fingerprint(base, Path(folder))


def legacy_fingerprint(base: str, folder: Path) -> str:
    """What checkpoints written before snapshot.fingerprint recorded, kept only so that they still load.
    "clip": 16 hex digits of sha256 over the tower's config and every vision tensor's name, shape, dtype and bytes.
    "llm": 64 hex digits of sha256 over config.json and each weight file's name, size and first MiB."""
    if base == "llm":
        digest = hashlib.sha256((folder / "config.json").read_bytes())
        for file in snapshot.weight_files(folder):
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
            with open(file, "rb") as handle:
                digest.update(handle.read(1 << 20))
        return digest.hexdigest()
    tensors = {}
    for name, tensor in snapshot.read_tensors(folder, vision_key):
        digest = hashlib.sha256(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        tensors[name] = digest.hexdigest()
    config = asdict(snapshot.read_config(folder, CLIPConfig.from_hf))
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(tensors):
        digest.update(f"{name}:{tensors[name]}".encode())
    return digest.hexdigest()[:16]


# ---- the run folder ---------------------------------------------------------------------------------------------
def holds_a_run(out: Path) -> bool:
    return (out / "checkpoints" / STATE_FILE).exists() or (out / "logs" / "training_log.csv").exists()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """run.lock in the run folder, held (flock) for the run's lifetime, with the holder's pid inside once the run is
    accepted (claim). The kernel drops the flock when its process dies, so a lock left by a killed run is taken over
    (with a note); a refused command never writes the file, and a run that releases it (at its end, or stopped by
    an error) empties it."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "?"
            self.file.close()
            raise UserError(f"{out} is in use by another run (pid {holder}); wait for it to finish or choose "
                             "another --output-dir") from None
        self.file.seek(0)
        self.previous, self.claimed = self.file.read().strip(), False

    def claim(self) -> "RunLock":
        """Write this process's pid: the run is accepted."""
        if self.previous.isdigit() and int(self.previous) != os.getpid() and not pid_alive(int(self.previous)):
            print(f"note: {self.path} was left by pid {self.previous}, which is no longer running; taking it over")
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        self.claimed = True
        return self

    def release(self) -> None:
        if not self.file.closed:
            if self.claimed:
                self.file.truncate(0)  # the next run finds no pid to take over
            self.file.close()  # closing drops the flock


def move_aside(out: Path) -> Path:
    """--start-over: the old run folder is renamed, never deleted."""
    aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    while aside.exists():
        aside = aside.with_name(aside.name + "-1")
    out.rename(aside)
    return aside


def claim_run_folder(out: Path, *, resume: str | None, start_over: bool) -> RunLock:
    """The run folder for this run, locked: refused when another run holds it, or when it holds a finished or
    interrupted run and neither --resume nor --start-over says what to do with it."""
    out = Path(out)
    lock = RunLock(out)
    if holds_a_run(out) and not resume:
        if not start_over:
            lock.release()
            raise UserError(f"{out} already holds a run ({STATE_FILE} / training_log.csv): continue it with "
                             "--resume auto, or start over with --start-over (the old folder is moved aside)")
        lock.release()
        print(f"--start-over: the previous run in {out} is now in {move_aside(out)}")
        lock = RunLock(out)
    check_writable(out)
    return lock.claim()


def write_config(out, config: dict) -> None:
    """config.json in the run folder: every option the run resolved, defaults included."""
    atomic_write_text(Path(out) / "config.json", json.dumps(config, indent=1, ensure_ascii=False))


def check_writable(out: Path, needed_bytes: int = 0) -> None:
    """The run folder accepts a file now (a probe written and removed), with `needed_bytes` free for checkpoints."""
    probe = temporary_name(out / "probe")
    try:
        probe.write_bytes(b"kovlm")
    finally:
        probe.unlink(missing_ok=True)
    free = shutil.disk_usage(out).free
    if free < needed_bytes:
        raise OSError(errno.ENOSPC, f"{free / 2**20:.0f} MiB free, the run's checkpoints need about "
                      f"{needed_bytes / 2**20:.0f} MiB", str(out))


# ---- the training log --------------------------------------------------------------------------------------------
LOG_COLUMNS = ["step", "epoch", "stage", "loss", "lr", "grad_norm", "step_seconds", "tokens_per_s", "val_loss",
               "val_meteor", "val_all_four"]


class TrainingLog:
    """logs/training_log.csv, one row per optimizer step and per validation. On resume, rows after the resumed
    step are dropped, so the log reads as one uninterrupted run."""

    def __init__(self, path: Path, *, enabled: bool, keep_until: int | None = None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        rows = self.rows() if keep_until is not None and self.path.exists() else []
        kept = [r for r in rows if int(r["step"]) <= keep_until] if rows else []
        atomic_write_text(self.path, csv_text(kept))

    def write(self, **row) -> None:
        """Append one row (a crash mid-append loses at most that row; resume drops the rows after its step)."""
        if self.enabled:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, LOG_COLUMNS).writerow(row)

    def rows(self) -> list[dict]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def write_summary(self, path: Path, model, device: torch.device, processes: int = 1) -> None:
        """logs/train_summary.json: parameters, median step time and tokens/s of the last stage, the seconds all the
        steps took (validation and evaluation not counted), peak memory, the processes that shared each step, the
        machine (GPU or CPU model), and the wall time since this process took the run folder (run.lock, beside
        logs/; a resumed run counts from its resumption) until training ended (the test evaluation not counted)."""
        from lora import parameter_counts
        rows = [r for r in self.rows() if r["step_seconds"]]
        last_stage = [r for r in rows if r["stage"] == rows[-1]["stage"]] if rows else []
        trainable, total = parameter_counts(model)
        summary = {"trainable_parameters": trainable, "total_parameters": total, "steps": len(rows),
                   "train_seconds": round(sum(float(r["step_seconds"]) for r in rows), 1),
                   "median_step_seconds": statistics.median(float(r["step_seconds"]) for r in last_stage)
                   if last_stage else None,
                   "median_tokens_per_s": statistics.median(float(r["tokens_per_s"]) for r in last_stage)
                   if last_stage else None,
                   "peak_memory_gib": peak_memory_gib(device), "device": str(device), "processes": processes}
        lock = Path(path).parent.parent / LOCK_FILE
        summary |= {"machine": machine_name(device),
                    "wall_seconds": round(time.time() - lock.stat().st_mtime, 1) if lock.exists() else None}
        atomic_write_text(path, json.dumps(summary, indent=1))

    def plot(self, path: Path) -> None:
        """logs/training_curves.png: training loss and learning rate per step, validation METEOR (and the share
        of captions naming every attribute right, when logged) per epoch."""
        if not self.enabled:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows = self.rows()
        steps = [(int(r["step"]), float(r["loss"]), float(r["lr"])) for r in rows if r["loss"]]
        val = [(int(r["step"]), float(r["val_loss"]), float(r["val_meteor"])) for r in rows if r["val_meteor"]]
        figure, axes = plt.subplots(1, 3, figsize=(15, 4))
        axes[0].plot([s for s, _, _ in steps], [l for _, l, _ in steps], label="train")
        axes[0].plot([s for s, _, _ in val], [l for _, l, _ in val], "o-", label="val")
        axes[0].set(title="caption loss", xlabel="step", yscale="log")
        axes[0].legend()
        axes[1].plot([s for s, _, _ in steps], [lr for _, _, lr in steps])
        axes[1].set(title="learning rate", xlabel="step")
        axes[2].plot([s for s, _, _ in val], [m for _, _, m in val], "o-", label="METEOR")
        all_four = [(int(r["step"]), float(r["val_all_four"])) for r in rows if r.get("val_all_four")]
        if all_four:  # --select-by attributes
            axes[2].plot([s for s, _ in all_four], [a for _, a in all_four], "s--", label="all attributes right")
            axes[2].legend()
        axes[2].set(title="validation", xlabel="step")
        figure.tight_layout()
        atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100))
        plt.close(figure)


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, LOG_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def machine_name(device: torch.device) -> str:
    """The GPU's model, or the CPU's (Linux: /proc/cpuinfo's model name) with its number of logical CPUs."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.exists() else []
    return f"{models[0] if models else platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"


def peak_memory_gib(device: torch.device) -> float:
    """CUDA's peak allocated memory on a GPU; the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def peak_memory(device: torch.device) -> str:
    kind = "peak GPU memory" if device.type == "cuda" else "peak RSS"
    return f"{kind} {peak_memory_gib(device):.2f} GiB"
