"""experiments.py on a one-pair grid of tiny bases: the run, the summary files, the recommendation, the skip."""
import csv
import subprocess

import pytest

import experiments


def test_grid_runs_summarises_and_skips_finished_runs(tiny_bases, tiny_manifest, tmp_path, monkeypatch, capsys):
    clip, llm = tiny_bases
    monkeypatch.setattr(experiments, "GRID", [("perceiver", "lora"), ("linear", "dora")])
    flags = ["--runs", str(tmp_path / "runs"), "--summary", str(tmp_path / "summary"),
             # passed through to train.py:
             "--clip", str(clip), "--llm", str(llm), "--train-manifest", str(tiny_manifest),
             "--cache-dir", str(tmp_path / "cache"), "--stage1-epochs", "1", "--stage2-epochs", "1",
             "--batch-size", "4", "--grad-accum", "1", "--lora-r", "4", "--num-frames", "3", "--num-queries", "4",
             "--max-new-tokens", "4", "--num-workers", "0", "--dtype", "fp32"]
    rows = experiments.main(flags)
    assert [(r["experiment"], r["projector"], r["peft"]) for r in rows] == [("E1", "perceiver", "lora"),
                                                                          ("E2", "linear", "dora")]
    with open(tmp_path / "summary" / "all_results.csv") as f:
        saved = list(csv.DictReader(f))
    assert [float(r["meteor"]) for r in saved] == pytest.approx([r["meteor"] for r in rows])
    assert all(int(r["trainable_parameters"]) > 0 and float(r["median_step_seconds"]) > 0 for r in saved)
    assert (tmp_path / "summary" / "comparison_plots.png").stat().st_size > 0
    assert "best METEOR: E" in capsys.readouterr().out

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished experiment ran again")
    monkeypatch.setattr(subprocess, "run", must_not_run)
    assert [r["meteor"] for r in experiments.main(flags)] == [r["meteor"] for r in rows]
