"""experiments.py on a one-pair grid of tiny bases: the run, the summary files, the recommendation, the skip."""
import csv
import json
import subprocess
import sys
from pathlib import Path

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
    assert [r["budget"].split(" steps")[0] for r in saved] == ["1 + 1 epochs, 6"] * 2  # 3 windows of 4 a stage
    assert all(0 < float(r["train_seconds"]) and r["budget"].endswith(" min") for r in saved)
    assert (tmp_path / "summary" / "comparison_plots.png").stat().st_size > 0
    assert "best METEOR: E" in capsys.readouterr().out

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished experiment ran again")
    monkeypatch.setattr(subprocess, "run", must_not_run)
    assert [r["meteor"] for r in experiments.main(flags)] == [r["meteor"] for r in rows]


def fake_run(run_dir, meteor: float, *, split: str = "test", all_four: float | None = None) -> None:
    """A finished run's files as train.py leaves them (so the grid skips training and only summarises); with
    all_four, the demo's table too."""
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "samples").mkdir()
    names = ("meteor", "meteor_coco", "cider_d", "bleu4", "chrf")
    (run_dir / "logs" / "final_metrics.json").write_text(json.dumps(
        {"split": split, "manifest": None, "metrics": {n: {"value": meteor, "reference": n} for n in names}}))
    (run_dir / "logs" / "train_summary.json").write_text(json.dumps(
        {"trainable_parameters": 10, "steps": 480, "median_step_seconds": 0.5, "train_seconds": 300.0,
         "peak_memory_gib": 1.0}))
    (run_dir / "config.json").write_text(json.dumps(
        {"stage1_epochs": 2, "stage2_epochs": 4, "batch_size": 16, "grad_accum": 2}))
    (run_dir / "logs" / "training_log.csv").write_text(
        "step,epoch,stage,loss,lr,grad_norm,step_seconds,tokens_per_s,val_loss,val_meteor\n"
        "1,1,1,2.0,0.001,1.0,0.5,10,,\n1,1,1,,,,,,1.9,0.1\n2,2,1,1.0,0.001,1.0,0.5,10,,\n2,2,1,,,,,,1.5,0.3\n")
    (run_dir / "samples" / "predictions.json").write_text("[]")
    if all_four is not None:
        (run_dir / "logs" / "demo_table.json").write_text(json.dumps({"model": {"all four": all_four}}))


def test_summary_page_csv_and_plots_from_finished_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiments, "GRID", [("perceiver", "lora"), ("linear", "dora")])
    fake_run(tmp_path / "runs" / "E1_perceiver_lora", 0.4)
    fake_run(tmp_path / "runs" / "E2_linear_dora", 0.6)
    rows = experiments.main(["--runs", str(tmp_path / "runs"), "--summary", str(tmp_path / "summary")])
    assert [r["meteor"] for r in rows] == [0.4, 0.6]
    page = (tmp_path / "summary" / "report.html").read_text()
    assert page.count('<tr class="run">') == 2 and page.count('src="data:image/png;base64,') == 2
    assert 'href="../runs/E1_perceiver_lora/samples/report.html"' in page
    assert "--bertscore-model" in page and "bertscore" not in (tmp_path / "summary" / "all_results.csv").read_text()
    assert (tmp_path / "summary" / "learning_curves.png").stat().st_size > 0
    shown = capsys.readouterr().out
    assert "best METEOR: E2" in shown and shown.count("2 + 4 epochs, 480 steps of 32 videos, 5.0 min") == 2


def test_an_evaluation_of_another_split_is_not_taken_for_the_test_result(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "GRID", [("perceiver", "lora")])
    fake_run(tmp_path / "runs" / "E1_perceiver_lora", 0.4, split="val")
    with pytest.raises(SystemExit, match="not the run's test split"):
        experiments.main(["--runs", str(tmp_path / "runs"), "--summary", str(tmp_path / "summary")])


def test_help_shows_defaults():
    import os
    shown = subprocess.run([sys.executable, "experiments.py", "--help"], cwd=Path(__file__).resolve().parents[1],
                           capture_output=True, text=True, env=dict(os.environ, COLUMNS="200")).stdout
    assert "(default: runs)" in shown and "(default: 9)" in shown


def test_seeds_train_each_pair_per_seed_and_recommend_by_the_mean(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiments, "GRID", [("perceiver", "lora"), ("linear", "dora")])
    runs = tmp_path / "runs"
    fake_run(runs / "E1_perceiver_lora_seed42", 0.4, all_four=0.9)
    fake_run(runs / "E1_perceiver_lora_seed7", 0.5, all_four=0.8)
    fake_run(runs / "E2_linear_dora_seed42", 0.6, all_four=0.3)
    commands = []

    def train(command, check):  # E2's seed-7 run is missing: the grid trains it
        commands.append(command)
        fake_run(Path(command[command.index("--output-dir") + 1]), 0.2, all_four=0.1)
    monkeypatch.setattr(subprocess, "run", train)
    rows = experiments.main(["--runs", str(runs), "--summary", str(tmp_path / "summary"), "--seeds", "42,7",
                             "--stage2-epochs", "6"])
    assert [(r["experiment"], r["seed"], r["meteor"], r["all_four"]) for r in rows] == [
        ("E1", 42, 0.4, 0.9), ("E1", 7, 0.5, 0.8), ("E2", 42, 0.6, 0.3), ("E2", 7, 0.2, 0.1)]
    assert len(commands) == 1 and commands[0][commands[0].index("--projector"):] == [
        "--projector", "linear", "--peft", "dora", "--output-dir", str(runs / "E2_linear_dora_seed7"),
        "--seed", "7", "--demo-seed", "42", "--stage2-epochs", "6"]
    with open(tmp_path / "summary" / "across_seeds.csv") as f:
        pairs = list(csv.DictReader(f))
    assert [(p["experiment"], p["seeds"]) for p in pairs] == [("E1", "42 7"), ("E2", "42 7")]
    assert [float(p["meteor"]) for p in pairs] == pytest.approx([0.45, 0.4])
    assert [(float(p["all_four_min"]), float(p["all_four_max"])) for p in pairs] == [(0.8, 0.9), (0.1, 0.3)]
    with open(tmp_path / "summary" / "all_results.csv") as f:
        assert list(csv.DictReader(f))[3]["seed"] == "7"
    shown = capsys.readouterr().out
    # the single best run is E2 seed 42 (0.6); the best pair on average is E1
    assert "best METEOR: E1" in shown and "all four right 0.200 (0.100-0.300)" in shown
    assert "E1 perceiver + lora seed 7" in (tmp_path / "summary" / "report.html").read_text()


@pytest.mark.parametrize("flag", ["--seed=3", "--demo-seed"])
def test_seeds_refuse_a_seed_of_their_own(tmp_path, monkeypatch, capsys, flag):
    """Also: --seed is passed through, never taken for an abbreviation of --seeds."""
    def must_not_train(*args, **kwargs):
        raise AssertionError("the grid started training")
    monkeypatch.setattr(subprocess, "run", must_not_train)
    with pytest.raises(SystemExit):
        experiments.main(["--runs", str(tmp_path), "--seeds", "42,7", flag, "3"])
    assert "drop those options" in capsys.readouterr().err
