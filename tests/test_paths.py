"""paths.py: why a path is not a readable file, output files and folders refused before anything is written (a run's
own files by any spelling, existing files without --overwrite, over-long names, folders where a file is wanted), and
temporary names within the file system's limit."""
import os
from pathlib import Path

import pytest

from infra.errors import UserError
from infra.paths import NAME_MAX, check_output_file, check_output_folder, check_snapshot_files, file_problem, \
    temporary_name


def test_file_problems_name_loops_pipes_folders_and_missing_files(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    (tmp_path / "file").write_text("x")
    assert file_problem(tmp_path / "loop") == "a symbolic link loop (the link leads back to itself)"
    assert file_problem(tmp_path / "pipe") == "a named pipe (FIFO), not a regular file"
    assert file_problem(tmp_path / "dangling") == f"a broken symbolic link (to {tmp_path / 'gone'})"
    assert file_problem(tmp_path / "missing") == "no such file or folder"
    assert file_problem(tmp_path) == "a folder, not a file"
    assert file_problem(tmp_path / "file") is None


@pytest.fixture
def run(tmp_path):
    """A training run's folder as train.py leaves it."""
    run = tmp_path / "runs" / "x"
    for name in ("checkpoints/best_model.pt", "samples/predictions.json", "samples/report.html",
                 "logs/final_metrics.json", "config.json", "run.lock"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(name)
    return run


def test_a_runs_own_files_are_refused_by_every_spelling_even_with_overwrite(run, tmp_path, monkeypatch):
    (tmp_path / "link").symlink_to(run)
    monkeypatch.chdir(run / "logs")
    spellings = [run / "samples" / "predictions.json", run / "samples" / ".." / "samples" / "report.html",
                 tmp_path / "link" / "logs" / "final_metrics.json", Path("final_metrics.json"),
                 Path("../config.json"), run / "checkpoints" / "new.pt", run / "samples" / "captions.jsonl"]
    for spelling in spellings:
        with pytest.raises(UserError, match=f"belongs to the training run in {run}"):
            check_output_file(spelling, overwrite=True)
    with pytest.raises(UserError, match="belongs to the training run"):
        check_output_folder(tmp_path / "link", overwrite=True)
    assert check_output_file(run / "eval" / "test-n5" / "predictions.json", overwrite=False)  # evaluations: allowed
    assert check_output_file(run / "captions.jsonl", overwrite=False)


def test_the_run_of_the_checkpoint_in_use_is_protected_without_markers(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # only a checkpoint: no run.lock, no config.json
    with pytest.raises(UserError, match="belongs to the training run"):
        check_output_file(run / "samples" / "predictions.json", overwrite=True, runs=[run])


def test_existing_outputs_need_overwrite_and_targets_must_be_writable(tmp_path):
    (tmp_path / "old.jsonl").write_text("kept")
    with pytest.raises(UserError, match="old.jsonl exists; add --overwrite to replace it"):
        check_output_file(tmp_path / "old.jsonl", overwrite=False)
    assert check_output_file(tmp_path / "old.jsonl", overwrite=True) == tmp_path / "old.jsonl"
    with pytest.raises(UserError, match="is a folder; give a file name"):
        check_output_file(tmp_path, overwrite=True)
    with pytest.raises(UserError, match="old.jsonl is a file .*where a folder is needed"):
        check_output_file(tmp_path / "old.jsonl" / "new.jsonl", overwrite=False)
    with pytest.raises(UserError, match=f"is {NAME_MAX + 1} bytes, over the file system's {NAME_MAX}"):
        check_output_file(tmp_path / ("a" * (NAME_MAX + 1)), overwrite=False)
    with pytest.raises(UserError, match="exists and is not empty; add --overwrite"):
        check_output_folder(tmp_path, overwrite=False)
    with pytest.raises(UserError, match="is a file; give a folder"):
        check_output_folder(tmp_path / "old.jsonl", overwrite=True)
    assert (tmp_path / "old.jsonl").read_text() == "kept"  # nothing written by any check


@pytest.mark.skipif(os.geteuid() == 0 or not Path("/proc/self").is_dir(), reason="root writes anywhere")
def test_a_folder_nobody_can_write_to_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(UserError, match="cannot write in"):
        check_output_file(locked / "out.jsonl", overwrite=False)


def test_temporary_names_stay_within_the_name_limit(tmp_path):
    for name in ("a" * 250 + ".json", "가" * 83 + ".jsonl", "x.pt"):  # 255, 254 and 4 bytes
        temporary = temporary_name(tmp_path / name)
        assert len(temporary.name.encode()) <= NAME_MAX and temporary.parent == tmp_path
        temporary.write_text("fits")  # the file system takes it
    assert len({temporary_name(tmp_path / "x.pt") for _ in range(50)}) == 50


def test_a_truncated_safetensors_file_is_named_before_loading(tmp_path):
    import torch
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(64, 64)}, tmp_path / "model.safetensors")
    check_snapshot_files(tmp_path, "--llm")
    whole = (tmp_path / "model.safetensors").read_bytes()
    for cut in (4, 100, len(whole) // 2):
        (tmp_path / "model.safetensors").write_bytes(whole[:cut])
        with pytest.raises(UserError, match=f"{tmp_path / 'model.safetensors'}: .*truncated"):
            check_snapshot_files(tmp_path, "--llm")
