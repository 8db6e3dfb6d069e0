"""evaluate.py end to end on a tiny trained checkpoint: the files, the strings, a refused mismatch, torchrun == one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_tiny_clip
from evaluate import evaluate_checkpoint
from distributed import setup_distributed
from train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tiny_bases, tiny_manifest, tmp_path_factory):
    clip, llm = tiny_bases
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(clip=str(clip), llm=str(llm), train_manifest=str(tiny_manifest), output_dir=str(out),
                      cache_dir=str(out / "cache"), projector="crossattn", peft="lora", stage1_epochs=1,
                      stage2_epochs=1, batch_size=4, grad_accum=1, lora_r=4, num_frames=3, num_queries=4,
                      max_new_tokens=5, num_workers=0, dtype="fp32")
    assert train(cfg, setup_distributed())
    return out / "checkpoints" / "best_model.pt"


def test_evaluate_writes_predictions_and_metrics(trained, tmp_path):
    results = evaluate_checkpoint(trained, split="val", batch_size=3, max_new_tokens=5, output_dir=tmp_path,
                                  decoding={"repetition_penalty": 1.2, "no_repeat_ngram_size": 2})
    predictions = json.loads((tmp_path / "samples" / "predictions.json").read_text())
    assert [p["id"] for p in predictions] == ["v12", "v13", "v14", "v15"]  # the val split, in manifest order
    assert all(isinstance(p["prediction"], str) and len(p["references"]) == 2 for p in predictions)
    metrics = json.loads((tmp_path / "logs" / "final_metrics.json").read_text())
    assert set(metrics["metrics"]) == {"meteor", "meteor_coco", "cider_d", "bleu4", "chrf"}
    assert all(m["reference"] for m in metrics["metrics"].values())
    assert metrics["decoding"]["repetition_penalty"] == 1.2 and metrics["speed"]["captions_per_s"] > 0
    assert metrics["metrics"]["meteor"]["value"] == results["metrics"]["meteor"]["value"]


def run_evaluate(*args, **env):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **env))


def test_a_checkpoint_on_another_tower_is_refused_in_one_line(trained, tmp_path):
    other = save_tiny_clip(tmp_path / "other_clip", full=False, hidden_size=32, image_size=28, patch_size=7, seed=5)
    result = run_evaluate("evaluate.py", str(trained), "--clip", str(other), "--output-dir", str(tmp_path))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint does not match the model: base_identity.clip: checkpoint has ")
    assert "Traceback" not in result.stderr


def test_not_a_checkpoint_is_refused_in_one_line(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    result = run_evaluate("evaluate.py", str(tmp_path / "notes.pt"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "not a readable kovlm checkpoint" in result.stderr.strip().splitlines()[-1]


def test_three_processes_give_the_single_process_results(trained, tmp_path):
    """4 videos over 3 ranks: one rank repeats a video to keep the batches even; the gather drops the repeat."""
    single = evaluate_checkpoint(trained, split="test", batch_size=3, max_new_tokens=5, output_dir=tmp_path / "one",
                                 show=False)
    result = run_evaluate("-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-port", "29531",
                          "evaluate.py", str(trained), "--batch-size", "1", "--max-new-tokens", "5",
                          "--output-dir", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads((tmp_path / "two" / "samples" / "predictions.json").read_text())
    assert [p["id"] for p in predictions] == [p["id"] for p in single["predictions"]]  # no repeats
    assert [p["prediction"] for p in predictions] == [p["prediction"] for p in single["predictions"]]
    metrics = json.loads((tmp_path / "two" / "logs" / "final_metrics.json").read_text())["metrics"]
    assert metrics["meteor"]["value"] == pytest.approx(single["metrics"]["meteor"]["value"], abs=1e-12)
