"""What a run keeps on disk: atomic writes with writer-unique temporary names (two writers and a reader never
collide or see a torn file), the run folder's lock, a full disk, and checkpoints that are refused in one line."""
import errno
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from infra import checkpoint
from infra.errors import describe
from vlm import describe_mismatch

ROOT = Path(__file__).resolve().parents[1]


def model_checkpoint(value: float, size: int = 1000) -> dict:
    return {"format": checkpoint.MODEL_FORMAT, "trainable": {"w": torch.full((size,), value)}}


def test_a_crash_during_a_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "model.pt"
    checkpoint.atomic_save(model_checkpoint(1.0), path)

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError):
        checkpoint.atomic_save(model_checkpoint(0.0), path)
    assert torch.equal(checkpoint.load_checkpoint(path)["trainable"]["w"], torch.ones(1000))
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]


def test_temporary_names_are_unique_to_each_writer(tmp_path):
    names = {checkpoint.temporary_name(tmp_path / "x.pt") for _ in range(100)}
    assert len(names) == 100 and all(str(os.getpid()) in n.name for n in names)


STRESS = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {root!r})
    from infra import checkpoint
    role, path, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    failures = done = 0
    end = time.time() + seconds
    while time.time() < end:
        try:
            if role == "reader":
                value = checkpoint.load_checkpoint(path)["trainable"]["w"]
                assert value.numel() == 200_000 and bool((value == value[0]).all()), "torn"
            else:
                checkpoint.atomic_save({{"format": checkpoint.MODEL_FORMAT,
                                        "trainable": {{"w": torch.full((200_000,), float(role))}}}}, path)
            done += 1
        except Exception as error:
            failures += 1
            print(type(error).__name__, error, file=sys.stderr)
    print(done, failures)
""")


def test_two_writers_and_a_reader_never_fail_or_see_a_torn_file(tmp_path):
    """Two processes save the same checkpoint over and over while a third loads it (3 s here; the README quotes a
    10 s run of the same script): no save fails, no load sees a partial or mixed file."""
    path = tmp_path / "state.pt"
    checkpoint.atomic_save({"format": checkpoint.MODEL_FORMAT, "trainable": {"w": torch.zeros(200_000)}}, path)
    script = tmp_path / "stress.py"
    script.write_text(STRESS.format(root=str(ROOT)))
    seconds = os.environ.get("KOVLM_STRESS_SECONDS", "3")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    processes = [subprocess.Popen([sys.executable, str(script), role, str(path), seconds], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for role in ("1", "2", "reader")]
    results = [p.communicate(timeout=120) for p in processes]
    counts = [tuple(map(int, out.split())) for out, _ in results]
    assert all(failures == 0 for _, failures in counts), [err for _, err in results]
    assert all(done > 0 for done, _ in counts)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder(tmp_path):
    lock = checkpoint.claim_run_folder(tmp_path / "run", resume=None, start_over=False)
    holder = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from infra import checkpoint; "
                             "checkpoint.claim_run_folder(sys.argv[2], resume=None, start_over=False)",
                             str(ROOT), str(tmp_path / "run")], capture_output=True, text=True)
    assert holder.returncode != 0
    assert f"{tmp_path / 'run'} is in use by another run (pid {os.getpid()})" in holder.stderr
    lock.release()
    checkpoint.claim_run_folder(tmp_path / "run", resume=None, start_over=False).release()  # free again


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / checkpoint.LOCK_FILE).write_text(str(dead.pid))
    lock = checkpoint.claim_run_folder(tmp_path / "run", resume=None, start_over=False)
    assert f"left by pid {dead.pid}, which is no longer running" in capsys.readouterr().out
    assert (tmp_path / "run" / checkpoint.LOCK_FILE).read_text() == str(os.getpid())
    lock.release()


def test_a_folder_holding_a_run_is_refused_or_moved_aside_never_overwritten(tmp_path):
    out = tmp_path / "run"
    checkpoint.atomic_save(model_checkpoint(3.0), out / "checkpoints" / checkpoint.STATE_FILE)
    before = (out / "checkpoints" / checkpoint.STATE_FILE).read_bytes()
    with pytest.raises(ValueError, match="already holds a run .* --resume auto, or start over with --start-over"):
        checkpoint.claim_run_folder(out, resume=None, start_over=False)
    assert (out / "checkpoints" / checkpoint.STATE_FILE).read_bytes() == before
    checkpoint.claim_run_folder(out, resume="auto", start_over=False).release()  # resuming is welcome
    checkpoint.claim_run_folder(out, resume=None, start_over=True).release()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / checkpoint.STATE_FILE).read_bytes() == before
    assert not checkpoint.holds_a_run(out)


@pytest.mark.parametrize("content", [b"", os.urandom(4096), b"PK\x03\x04" + os.urandom(100)])
def test_an_unreadable_checkpoint_is_one_line_that_never_suggests_unsafe_loading(tmp_path, content):
    path = tmp_path / "best_model.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as refused:
        checkpoint.load_checkpoint(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: not a readable kovlm checkpoint") and "\n" not in message
    assert "weights_only" not in message


def test_a_saved_option_this_version_does_not_know_is_refused_by_name():
    from train import TrainConfig
    state = {"train_config": {"projector": "perceiver", "frobnicate": 3}}
    with pytest.raises(ValueError, match="does not know \\('frobnicate'\\)"):
        checkpoint.check_same_run(state, TrainConfig())


def test_a_run_saved_before_the_demo_options_moved_out_of_train_still_resumes():
    from train import TrainConfig
    saved = asdict(TrainConfig()) | {"select_by": "meteor", "demo_dir": ".cache/demo", "demo_scale": "full",
                                     "demo_heldout": "combinations", "demo_seed": None}
    checkpoint.check_same_run({"train_config": saved}, TrainConfig())  # nothing differs that still matters
    with pytest.raises(ValueError, match="does not know \\('select_by'\\)"):  # a choice train.py no longer makes
        checkpoint.check_same_run({"train_config": saved | {"select_by": "attributes"}}, TrainConfig())


def test_the_training_log_keeps_rows_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "logs" / "training_log.csv"
    log = checkpoint.TrainingLog(path, enabled=True)
    for step in range(1, 6):
        log.write(step=step, epoch=1, stage=1, loss=1.0 / step)
    resumed = checkpoint.TrainingLog(path, enabled=True, keep_until=3)
    assert [int(r["step"]) for r in resumed.rows()] == [1, 2, 3]


def mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_a_full_disk_keeps_the_previous_state_loadable_and_says_the_disk_is_full(tmp_path):
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "2m"):
        pytest.skip("this machine does not allow mounting a tmpfs (needs root / CAP_SYS_ADMIN)")
    try:
        path = disk / "checkpoints" / checkpoint.STATE_FILE
        checkpoint.atomic_save(model_checkpoint(1.0, size=200_000), path)  # 0.8 MB of 2 MB
        with pytest.raises(OSError) as full:
            checkpoint.atomic_save(model_checkpoint(2.0, size=400_000), path)  # 1.6 MB more: no room
        assert "disk is full" in describe(full.value)
        assert torch.equal(checkpoint.load_checkpoint(path)["trainable"]["w"], torch.ones(200_000))
        assert [p.name for p in path.parent.iterdir()] == [checkpoint.STATE_FILE]
        with pytest.raises(OSError, match="checkpoints need about"):
            checkpoint.check_writable(disk, needed_bytes=10 * 2**20)
    finally:
        subprocess.run(["umount", str(disk)])


# ---- the bases' identity: checkpoints written before snapshot.fingerprint still load --------------------------------
FIXED_CLIP = {"model_type": "clip_vision_model", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 8, "patch_size": 4}
FIXED_QWEN3 = {"model_type": "qwen3", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
               "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32, "tie_word_embeddings": False}
# What load_clip_vision(...).weights_fingerprint and load_qwen3(...).fingerprint were for these two folders before
# snapshot.fingerprint (commit 64fcd01): the base identity a checkpoint of that time recorded.
OLDER_IDENTITY = {"clip": "1f0b31f65db8eb71", "llm": "20c0e729a9c9d1e44546d8b299ab5c69d110ffcc2441bf48094e1c400744386a"}


def write_fixed_snapshot(folder: Path, config: dict, model, shift: float = 0.0) -> Path:
    """A snapshot folder whose bytes do not depend on any random generator: each tensor holds (i % 7 - 3) / 4."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({name: ((torch.arange(t.numel()) % 7 - 3) / 4 + shift).reshape(t.shape)
               for name, t in model.state_dict().items()}, folder / "model.safetensors")
    return folder


def fixed_bases(root: Path, clip_shift: float = 0.0) -> dict:
    from clip import CLIPConfig, CLIPVision
    from qwen3 import Qwen3, Qwen3Config
    return {"clip": write_fixed_snapshot(root / "clip", FIXED_CLIP, CLIPVision(CLIPConfig.from_hf(FIXED_CLIP)),
                                         clip_shift),
            "llm": write_fixed_snapshot(root / "llm", FIXED_QWEN3, Qwen3(Qwen3Config.from_hf(FIXED_QWEN3)))}


def test_the_older_fingerprints_are_read_as_todays_for_the_same_bases_only(tmp_path):
    bases = fixed_bases(tmp_path / "same")
    assert {base: checkpoint.legacy_fingerprint(base, folder) for base, folder in bases.items()} == OLDER_IDENTITY
    today, folders = identity_of(bases)
    assert checkpoint.base_identity_today(OLDER_IDENTITY, today, folders) == today
    assert checkpoint.base_identity_today(today, today, folders) == today
    other = fixed_bases(tmp_path / "other", clip_shift=0.5)  # another tower: its older fingerprint is not the saved one
    other_today, other_folders = identity_of(other)
    older_tower = {"model_type": "clip_vision_model", "weights": OLDER_IDENTITY["clip"]}
    assert checkpoint.base_identity_today(OLDER_IDENTITY, other_today, other_folders) == {**other_today,
                                                                                          "vision": older_tower}


def test_a_clip_checkpoint_of_before_the_other_towers_names_its_family_on_another_tower():
    older = {"clip": "1f0b31f65db8eb71", "llm": "l" * 32}
    siglip = {"vision": {"model_type": "siglip_vision_model", "weights": "w" * 32}, "llm": "l" * 32}
    today = checkpoint.base_identity_today(older, siglip, {"vision": "no/such/folder", "llm": "no/such/folder"})
    assert today == {"vision": {"model_type": "clip", "weights": "1f0b31f65db8eb71"}, "llm": "l" * 32}
    assert describe_mismatch({"base_identity": today}, {"base_identity": siglip}) == \
        'base_identity.vision.model_type: checkpoint has "clip", this model has "siglip_vision_model"'


def identity_of(bases: dict) -> tuple[dict, dict]:
    """vlm.base_identity of the fixed bases (a vision-only CLIP), and the folders base_identity_today reads."""
    from infra import snapshot
    identity = {"vision": {"model_type": "clip_vision_model", "weights": snapshot.fingerprint(bases["clip"])},
                "llm": snapshot.fingerprint(bases["llm"])}
    return identity, {"vision": bases["clip"], "llm": bases["llm"]}


def test_a_checkpoint_with_the_older_base_identity_is_rebuilt(tiny_bases):
    from dataclasses import asdict

    from evaluate import rebuild_model
    from vlm import VLMConfig, build_vlm
    clip, llm = tiny_bases
    model = build_vlm(VLMConfig(clip_path=str(clip), llm_path=str(llm), projector={"name": "linear"}),
                      dtype=torch.float32)
    older = {"clip": checkpoint.legacy_fingerprint("clip", clip), "llm": checkpoint.legacy_fingerprint("llm", llm)}
    before_other_towers = {"clip": model.vision.weights_fingerprint, "llm": model.llm.fingerprint}
    for recorded in (older, before_other_towers):
        saved = {"vlm_config": asdict(model.config) | {"base_identity": recorded},
                 "trainable": model.trainable_state_dict()}
        rebuilt = rebuild_model(saved, clip=None, llm=None, device="cpu", dtype=torch.float32)
        assert rebuilt.config.base_identity == model.config.base_identity != recorded
