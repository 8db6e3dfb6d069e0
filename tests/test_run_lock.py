"""The run folder's lock (checkpoint.RunLock): a refused command leaves run.lock as it was, byte for byte, so the next
command has nothing to take over; a run that ends cleanly empties it; a killed run's pid is still taken over."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict:
    """Every file under `folder`: its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def finished_run(out: Path) -> Path:
    lock = checkpoint.claim_run_folder(out, resume=None, start_over=False)
    checkpoint.atomic_save({"format": checkpoint.STATE_FORMAT}, out / "checkpoints" / checkpoint.STATE_FILE)
    lock.release()
    return out


def test_a_refused_rerun_changes_nothing_and_the_next_command_takes_nothing_over(tmp_path, capsys):
    out = finished_run(tmp_path / "run")
    before = snapshot(out)
    with pytest.raises(ValueError, match="already holds a run"):
        checkpoint.claim_run_folder(out, resume=None, start_over=False)
    assert snapshot(out) == before  # run.lock included: not rewritten with the refused pid
    capsys.readouterr()
    checkpoint.claim_run_folder(out, resume="auto", start_over=False).release()
    assert "taking it over" not in capsys.readouterr().out


def test_a_refused_process_leaves_the_holders_pid(tmp_path):
    out = tmp_path / "run"
    lock = checkpoint.claim_run_folder(out, resume=None, start_over=False)
    before = snapshot(out)
    refused = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from infra import checkpoint; "
                              "checkpoint.claim_run_folder(sys.argv[2], resume=None, start_over=False)",
                              str(ROOT), str(out)], capture_output=True, text=True)
    assert refused.returncode != 0 and f"in use by another run (pid {os.getpid()})" in refused.stderr
    assert snapshot(out) == before
    lock.release()


def test_a_clean_end_empties_the_lock_and_a_killed_run_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    checkpoint.claim_run_folder(out, resume=None, start_over=False).release()
    assert (out / checkpoint.LOCK_FILE).read_text() == ""
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    (out / checkpoint.LOCK_FILE).write_text(str(killed.pid))  # what a kill -9 leaves
    capsys.readouterr()
    checkpoint.claim_run_folder(out, resume=None, start_over=False).release()
    assert f"left by pid {killed.pid}, which is no longer running; taking it over" in capsys.readouterr().out
