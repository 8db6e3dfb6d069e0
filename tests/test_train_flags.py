"""train.py's flags refused before anything is loaded or written: NaN / inf learning rates, --resume with
--start-over, a training set smaller than one optimizer step; and a refused rerun leaves the run folder as it was."""
import json
import math

import pytest

from infra import checkpoint
from infra.distributed import Distributed
from train import TrainConfig, check_config, train


def config(tiny_bases, manifest, out, **options) -> TrainConfig:
    clip, llm = tiny_bases
    return TrainConfig(clip=str(clip), llm=str(llm), train_manifest=str(manifest), output_dir=str(out),
                       cache_dir=str(out.parent / "cache"), projector="crossattn", num_queries=4, num_frames=3,
                       lora_r=4, num_workers=0, dtype="fp32", **options)


@pytest.mark.parametrize("name", ["stage1_lr", "stage2_lr", "weight_decay", "max_grad_norm"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_learning_rate_or_norm_that_is_not_finite_is_refused(tiny_bases, tiny_manifest, tmp_path, name, value):
    with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} must be a finite number, got {value}"):
        check_config(config(tiny_bases, tiny_manifest, tmp_path / "run", **{name: value}))


def test_resume_and_start_over_together_are_refused(tiny_bases, tiny_manifest, tmp_path):
    with pytest.raises(ValueError, match="--resume continues the run folder's run, --start-over moves it aside"):
        check_config(config(tiny_bases, tiny_manifest, tmp_path / "run", resume="auto", start_over=True))


def test_a_training_set_smaller_than_one_step_is_refused_before_anything_is_written(tiny_bases, tiny_manifest,
                                                                                   tmp_path):
    rows = [json.loads(line) for line in tiny_manifest.read_text().splitlines()]
    small = [r | {"video": str(tiny_manifest.parent / r["video"])} for r in rows[:3] + rows[12:14] + rows[16:18]]
    (tmp_path / "small.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in small))
    cfg = config(tiny_bases, tmp_path / "small.jsonl", tmp_path / "run", batch_size=4, grad_accum=2)
    with pytest.raises(ValueError, match=r"the train split has 3 samples, fewer than one optimizer step's 8 "
                                         r"\(--batch-size 4 x --grad-accum 2 x 1 processes\)"):
        train(cfg, Distributed())
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_a_refused_rerun_changes_nothing_on_disk(tiny_bases, tiny_manifest, tmp_path):
    out = tmp_path / "run"
    checkpoint.claim_run_folder(out, resume=None, start_over=False).release()
    checkpoint.atomic_save({"format": checkpoint.STATE_FORMAT}, out / "checkpoints" / checkpoint.STATE_FILE)
    checkpoint.write_config(out, {"seed": 42})
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}
    with pytest.raises(ValueError, match="already holds a run"):
        train(config(tiny_bases, tiny_manifest, out), Distributed())
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_a_truncated_weight_file_is_named_before_anything_loads(tiny_bases, tiny_manifest, tmp_path):
    import shutil
    clip, llm = tiny_bases
    copy = shutil.copytree(llm, tmp_path / "llm")
    shard = next(copy.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    cfg = config(tiny_bases, tiny_manifest, tmp_path / "run")
    cfg.llm = str(copy)
    with pytest.raises(ValueError, match=f"^{shard}: truncated"):
        train(cfg, Distributed())
    assert not (tmp_path / "run").exists()
