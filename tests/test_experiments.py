"""experiments.py on tiny bases and on finished runs' files: the run, the summary files, the LoRA-vs-DoRA table and
recommendation, the skip, --only, --list, --summarize over several folders, refused mismatches and duplicates,
options checked before any run, a failed run as one line."""
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import experiments
from infra import grid_summary


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def refusal(argv: list[str]) -> str:
    """The one line experiments.py ends with when it refuses `argv`."""
    with pytest.raises(SystemExit) as refused:
        experiments.main(argv)
    return str(refused.value.code)


def test_grid_runs_summarises_and_skips_finished_runs(tiny_bases, tiny_manifest, tmp_path, monkeypatch, capsys):
    clip, llm = tiny_bases
    monkeypatch.setattr(experiments, "GRID", [("perceiver", "lora"), ("perceiver", "dora")])
    flags = ["--runs", str(tmp_path / "runs"), "--summary", str(tmp_path / "summary"),
             # passed through to train.py:
             "--clip", str(clip), "--llm", str(llm), "--train-manifest", str(tiny_manifest),
             "--cache-dir", str(tmp_path / "cache"), "--stage1-epochs", "1", "--stage2-epochs", "1",
             "--batch-size", "4", "--grad-accum", "1", "--lora-r", "4", "--num-frames", "3", "--num-queries", "4",
             "--max-new-tokens", "4", "--num-workers", "0", "--dtype", "fp32"]
    rows = experiments.main(flags)
    assert [(r["experiment"], r["projector"], r["peft"]) for r in rows] == [("E1", "perceiver", "lora"),
                                                                          ("E2", "perceiver", "dora")]
    summary, runs = tmp_path / "summary", [Path(r["run_dir"]) for r in rows]
    saved = read_csv(summary / "all_results.csv")
    assert [float(r["meteor"]) for r in saved] == pytest.approx([r["meteor"] for r in rows])
    assert all(int(r["trainable_parameters"]) > 0 and float(r["median_step_seconds"]) > 0 for r in saved)
    assert [r["budget"].split(" steps")[0] for r in saved] == ["1 + 1 epochs, 6"] * 2  # 3 windows of 4 a stage
    assert all(0 < float(r["train_seconds"]) and r["budget"].endswith(" min") for r in saved)
    # the machine and the wall time come from train_summary.json
    train_summaries = [read_json(run / "logs" / "train_summary.json") for run in runs]
    assert [r["machine"] for r in saved] == [s["machine"] for s in train_summaries] and "CPU" in saved[0]["machine"]
    assert [float(r["wall_seconds"]) for r in saved] == [s["wall_seconds"] for s in train_summaries]
    assert all(s["wall_seconds"] >= s["train_seconds"] for s in train_summaries)
    # each run's output went to the screen and to its console.log
    shown = capsys.readouterr().out
    for run in runs:
        kept = (run / "logs" / "console.log").read_text()
        assert "stage 2:" in kept and kept.splitlines()[1] in shown
    assert "best METEOR: E" in shown and "perceiver: " in shown

    # the LoRA-vs-DoRA table: its numbers are the runs' own
    pair, = read_csv(summary / "lora_vs_dora.csv")
    finals = [read_json(run / "logs" / "final_metrics.json")["metrics"] for run in runs]
    for key in ("meteor", "meteor_coco", "cider_d"):
        lora, dora = (final[key]["value"] for final in finals)
        assert (float(pair[f"{key}_lora"]), float(pair[f"{key}_dora"])) == pytest.approx((lora, dora))
        assert float(pair[f"{key}_dora_minus_lora"]) == pytest.approx(dora - lora)
    for key in ("peak_memory_gib", "median_step_seconds"):
        lora, dora = (s[key] for s in train_summaries)
        assert float(pair[f"{key}_dora_over_lora"]) == pytest.approx(dora / lora)
    for run, peft in zip(runs, ("lora", "dora")):
        steps = [r for r in read_csv(run / "logs" / "training_log.csv") if r["loss"]]
        last_epoch = [float(r["loss"]) for r in steps if r["stage"] == "2" and r["epoch"] == "1"]
        assert len(last_epoch) == 3
        assert float(pair[f"last_epoch_loss_std_{peft}"]) == pytest.approx(statistics.stdev(last_epoch))
    advice = (summary / "recommendation.txt").read_text()
    assert "perceiver: " in advice and "best METEOR per step-second: E" in advice
    page = (summary / "report.html").read_text()
    assert "<h2>LoRA vs DoRA</h2>" in page and page.count('<tr class="compared">') == 1

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished experiment ran again")
    monkeypatch.setattr(experiments, "run_logged", must_not_run)
    assert [r["meteor"] for r in experiments.main(flags)] == [r["meteor"] for r in rows]


def fake_run(run_dir, meteor: float, *, split: str = "test", all_four: float | None = None, config: dict = (),
             bases: str = "a", tested: str = "v", summary: dict = (), losses=(2.0, 1.5, 1.0, 0.8, 0.9)) -> Path:
    """A finished run's files as train.py leaves them (so the grid skips training and only summarises): `meteor`
    sets every metric (METEOR (COCO) its half, CIDEr-D its triple); with all_four, the demo's table too; `config`,
    `bases`, `tested` (the test videos' id prefix) and `summary` change what the run records."""
    run_dir = Path(run_dir)
    for folder in ("logs", "samples", "checkpoints"):
        (run_dir / folder).mkdir(parents=True, exist_ok=True)
    values = {"meteor": meteor, "meteor_coco": meteor / 2, "cider_d": meteor * 3, "bleu4": meteor, "chrf": meteor}
    (run_dir / "logs" / "final_metrics.json").write_text(json.dumps(
        {"split": split, "manifest": None, "decoding": {"do_sample": False},
         "metrics": {n: {"value": v, "reference": n} for n, v in values.items()}}))
    (run_dir / "logs" / "train_summary.json").write_text(json.dumps(
        {"trainable_parameters": 10, "steps": 480, "median_step_seconds": 0.5, "train_seconds": 300.0,
         "peak_memory_gib": 1.0, **dict(summary)}))
    (run_dir / "config.json").write_text(json.dumps(
        {"stage1_epochs": 2, "stage2_epochs": 4, "batch_size": 16, "grad_accum": 2, "seed": 42, "lora_r": 16,
         "output_dir": str(run_dir), **dict(config)}))
    steps = [(1, 1, losses[0]), (1, 1, losses[1])] + [(2, 1, loss) for loss in losses[2:]]
    (run_dir / "logs" / "training_log.csv").write_text(
        "step,epoch,stage,loss,lr,grad_norm,step_seconds,tokens_per_s,val_loss,val_meteor\n"
        + "".join(f"{n},{epoch},{stage},{loss},0.001,1.0,0.5,10,,\n" for n, (stage, epoch, loss) in enumerate(steps, 1))
        + f"{len(steps)},1,2,,,,,,1.5,0.3\n")
    (run_dir / "samples" / "predictions.json").write_text(json.dumps(
        [{"id": f"{tested}{i}", "prediction": "원", "references": ["빨간 원"]} for i in range(3)]))
    torch.save({"format": "kovlm-model-1", "vlm_config": {"base_identity": {"clip": f"clip-{bases}", "llm": "llm"}}},
               run_dir / "checkpoints" / "best_model.pt")
    if all_four is not None:
        (run_dir / "logs" / "demo_table.json").write_text(json.dumps({"model": {"all four": all_four}}))
    return run_dir


def test_summary_page_csv_and_plots_from_finished_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiments, "GRID", [("perceiver", "lora"), ("linear", "dora")])
    fake_run(tmp_path / "runs" / "E1_perceiver_lora", 0.4, summary={"machine": "NVIDIA H100", "wall_seconds": 320.5})
    fake_run(tmp_path / "runs" / "E2_linear_dora", 0.6)
    rows = experiments.main(["--runs", str(tmp_path / "runs"), "--summary", str(tmp_path / "summary")])
    assert [r["meteor"] for r in rows] == [0.4, 0.6]
    page = (tmp_path / "summary" / "report.html").read_text()
    assert page.count('<tr class="run">') == 2 and page.count('src="data:image/png;base64,') == 2
    assert 'href="../runs/E1_perceiver_lora/samples/report.html"' in page
    assert "--bertscore-model" in page and "bertscore" not in (tmp_path / "summary" / "all_results.csv").read_text()
    curves = (tmp_path / "summary" / "learning_curves.png").read_bytes()
    assert curves[:8] == b"\x89PNG\r\n\x1a\n" and len(curves) > 1000
    # an older run without a machine or wall time says so
    saved = read_csv(tmp_path / "summary" / "all_results.csv")
    assert [(r["machine"], r["wall_seconds"]) for r in saved] == [("NVIDIA H100", "320.5"), ("unknown", "unknown")]
    shown = capsys.readouterr().out
    assert "best METEOR: E2" in shown and shown.count("2 + 4 epochs, 480 steps of 32 videos, 5.0 min") == 2
    assert "machines: NVIDIA H100 (E1 perceiver + lora); unknown (E2 linear + dora)" in shown
    # no projector has both runs: no table (and none left from an earlier summary)
    assert not (tmp_path / "summary" / "lora_vs_dora.csv").exists()
    assert "no projector has both runs" in (tmp_path / "summary" / "recommendation.txt").read_text()


def test_an_evaluation_of_another_split_is_not_taken_for_the_test_result(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "GRID", [("perceiver", "lora")])
    fake_run(tmp_path / "runs" / "E1_perceiver_lora", 0.4, split="val")
    with pytest.raises(SystemExit, match="not the run's test split"):
        experiments.main(["--runs", str(tmp_path / "runs"), "--summary", str(tmp_path / "summary")])


def test_help_shows_defaults():
    shown = subprocess.run([sys.executable, "experiments.py", "--help"], cwd=Path(__file__).resolve().parents[1],
                           capture_output=True, text=True, env=dict(os.environ, COLUMNS="200")).stdout
    assert "(default: runs)" in shown and "(default: 9)" in shown


@pytest.fixture
def trains(monkeypatch):
    """experiments' runner replaced: each command is kept and leaves a finished run of METEOR 0.2 behind."""
    commands = []

    def train(command, log):
        commands.append(command)
        fake_run(command[command.index("--output-dir") + 1], 0.2, all_four=0.1)
        return 0
    monkeypatch.setattr(experiments, "run_logged", train)
    return commands


def test_seeds_train_each_pair_per_seed_and_recommend_by_the_mean(tmp_path, monkeypatch, capsys, trains):
    monkeypatch.setattr(experiments, "GRID", [("perceiver", "lora"), ("linear", "dora")])
    runs = tmp_path / "runs"
    fake_run(runs / "E1_perceiver_lora_seed42", 0.4, all_four=0.9, config={"seed": 42})
    fake_run(runs / "E1_perceiver_lora_seed7", 0.5, all_four=0.8, config={"seed": 7})
    fake_run(runs / "E2_linear_dora_seed42", 0.6, all_four=0.3, config={"seed": 42})
    # E2's seed-7 run is missing: the grid trains it
    rows = experiments.main(["--runs", str(runs), "--summary", str(tmp_path / "summary"), "--seeds", "42,7",
                             "--stage2-epochs", "6"])
    assert [(r["experiment"], r["seed"], r["meteor"], r["all_four"]) for r in rows] == [
        ("E1", 42, 0.4, 0.9), ("E1", 7, 0.5, 0.8), ("E2", 42, 0.6, 0.3), ("E2", 7, 0.2, 0.1)]
    assert len(trains) == 1 and trains[0][trains[0].index("--projector"):] == [
        "--projector", "linear", "--peft", "dora", "--output-dir", str(runs / "E2_linear_dora_seed7"),
        "--seed", "7", "--demo-seed", "42", "--stage2-epochs", "6"]
    pairs = read_csv(tmp_path / "summary" / "across_seeds.csv")
    assert [(p["experiment"], p["seeds"]) for p in pairs] == [("E1", "42 7"), ("E2", "42 7")]
    assert [float(p["meteor"]) for p in pairs] == pytest.approx([0.45, 0.4])
    assert [(float(p["all_four_min"]), float(p["all_four_max"])) for p in pairs] == [(0.8, 0.9), (0.1, 0.3)]
    assert read_csv(tmp_path / "summary" / "all_results.csv")[3]["seed"] == "7"
    shown = capsys.readouterr().out
    # the single best run is E2 seed 42 (0.6); the best pair on average is E1
    assert "best METEOR: E1" in shown and "all four right 0.200 (0.100-0.300)" in shown
    assert "E1 perceiver + lora seed 7" in (tmp_path / "summary" / "report.html").read_text()


def test_seeds_draw_lora_against_dora_within_their_ranges(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiments, "GRID", [("perceiver", "lora"), ("perceiver", "dora")])
    runs = tmp_path / "runs"
    for name, seed, meteor in [("E1_perceiver_lora", 42, 0.4), ("E1_perceiver_lora", 7, 0.6),
                               ("E2_perceiver_dora", 42, 0.5), ("E2_perceiver_dora", 7, 0.7)]:
        fake_run(runs / f"{name}_seed{seed}", meteor, config={"seed": seed})
    experiments.main(["--summarize", str(runs), "--summary", str(tmp_path / "summary")])
    pair, = read_csv(tmp_path / "summary" / "lora_vs_dora.csv")
    assert pair["runs_per_side"] == "2" and float(pair["meteor_dora_minus_lora"]) == pytest.approx(0.1)
    assert "perceiver: a draw within the seeds' METEOR ranges" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--seed=3", "--demo-seed"])
def test_seeds_refuse_a_seed_of_their_own(tmp_path, capsys, trains, flag):
    """Also: --seed is passed through, never taken for an abbreviation of --seeds."""
    with pytest.raises(SystemExit):
        experiments.main(["--runs", str(tmp_path), "--seeds", "42,7", flag, "3"])
    assert "drop those options" in capsys.readouterr().err and trains == []


# ---- --only, --list ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("only, expected", [
    ("E2,E9", [("linear", "dora", "E2"), ("crossattn", "lora", "E9")]),
    ("E3-E4", [("mlp", "lora", "E3"), ("mlp", "dora", "E4")]),
    ("e8", [("perceiver", "dora", "E8")]),  # a job array's task: --only E$SLURM_ARRAY_TASK_ID
])
def test_only_runs_exactly_the_named_experiments(tmp_path, trains, only, expected):
    rows = experiments.main(["--runs", str(tmp_path / "runs"), "--summary", str(tmp_path / "summary"),
                             "--only", only])
    ran = [(c[c.index("--projector") + 1], c[c.index("--peft") + 1], Path(c[c.index("--output-dir") + 1]).name)
           for c in trains]
    assert ran == [(projector, peft, f"{name}_{projector}_{peft}") for projector, peft, name in expected]
    assert [r["experiment"] for r in rows] == [name for _, _, name in expected]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(folder for _, _, folder in ran)


@pytest.mark.parametrize("only", ["E11", "E", "E4-E2", "linear"])
def test_only_refuses_a_name_the_grid_does_not_have(tmp_path, trains, only):
    assert "the grid's experiments are E1-E10" in refusal(["--runs", str(tmp_path), "--only", only])
    assert trains == []


def interrupt(run_dir: Path, *, reached: int, saved: int | None) -> None:
    """A run stopped at step `reached`, with (saved given) a training state of step `saved`."""
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "logs" / "training_log.csv").write_text(
        "step,epoch,stage,loss,lr,grad_norm,step_seconds,tokens_per_s,val_loss,val_meteor\n"
        + "".join(f"{n},1,1,1.0,0.001,1.0,0.5,10,,\n" for n in range(1, reached + 1)))
    if saved is not None:
        (run_dir / "checkpoints").mkdir()
        torch.save({"format": "kovlm-training-state-1", "global_step": saved, "stage": 1},
                   run_dir / "checkpoints" / "training_state.pt")


def test_list_shows_each_command_and_state(tmp_path, capsys, trains):
    runs = tmp_path / "runs"
    fake_run(runs / "E1_linear_lora", 0.4)
    interrupt(runs / "E2_linear_dora", reached=130, saved=120)
    interrupt(runs / "E3_mlp_lora", reached=7, saved=None)
    assert experiments.main(["--runs", str(runs), "--list", "--stage2-epochs", "3"]) == [] and trains == []
    shown = capsys.readouterr().out
    assert "E1 linear + lora: done\n" in shown
    assert "E2 linear + dora: interrupted at step 130, resumable from step 120\n" in shown
    assert "E3 mlp + lora: interrupted at step 7, before its first saved training state: starts anew" in shown
    assert "E4 mlp + dora: not started\n" in shown
    assert "E10 crossattn + dora: not started  [with --with-crossattn or --only]" in shown
    assert (f"python train.py --projector cabstractor --peft dora --output-dir {runs / 'E6_cabstractor_dora'} "
            f"--stage2-epochs 3") in shown


def test_interrupted_runs_resume_or_start_anew(tmp_path, trains, capsys):
    runs = tmp_path / "runs"
    interrupt(runs / "E1_linear_lora", reached=130, saved=120)
    interrupt(runs / "E2_linear_dora", reached=7, saved=None)
    experiments.main(["--runs", str(runs), "--summary", str(tmp_path / "summary"), "--only", "E1,E2"])
    assert trains[0][-2:] == ["--resume", "auto"] and "--resume" not in trains[1]
    moved, = [p for p in runs.iterdir() if p.name.startswith("E2_linear_dora.old-")]
    assert (moved / "logs" / "training_log.csv").exists()  # moved aside, never deleted


# ---- --summarize -------------------------------------------------------------------------------------------------
def test_summarize_two_folders_equals_one_folder(tmp_path, capsys, trains):
    meteors = {"E1_linear_lora": 0.31, "E2_linear_dora": 0.33, "E7_perceiver_lora": 0.52, "E8_perceiver_dora": 0.5}
    for folder, meteor in meteors.items():  # person A has E1 and E2, person B E7 and E8; one machine has all four
        owner = "a" if folder < "E3" else "b"
        step_seconds = 0.5 if "lora" in folder else 0.6
        fake_run(tmp_path / owner / folder, meteor, summary={"machine": owner, "median_step_seconds": step_seconds})
        fake_run(tmp_path / "all" / folder, meteor, summary={"machine": owner, "median_step_seconds": step_seconds})
    interrupt(tmp_path / "b" / "E5_cabstractor_lora", reached=12, saved=10)
    for name, folders in (("two", ["a", "b"]), ("one", ["all"])):
        experiments.main(["--summarize", *[str(tmp_path / f) for f in folders], "--summary", str(tmp_path / name)])
    assert trains == []
    for file in ("all_results.csv", "lora_vs_dora.csv"):
        two, one = (read_csv(tmp_path / name / file) for name in ("two", "one"))
        assert [{k: v for k, v in r.items() if k != "run_dir"} for r in two] == \
               [{k: v for k, v in r.items() if k != "run_dir"} for r in one]
    advice = [(tmp_path / name / "recommendation.txt").read_text() for name in ("two", "one")]
    assert advice[0] == advice[1]
    assert [r["projector"] for r in read_csv(tmp_path / "two" / "lora_vs_dora.csv")] == ["linear", "perceiver"]
    shown = capsys.readouterr().out
    assert "missing: E3 mlp + lora, E4 mlp + dora, E6 cabstractor + dora" in shown
    assert f"unfinished, not in the summary: E5 cabstractor + lora ({tmp_path / 'b' / 'E5_cabstractor_lora'}: " \
           f"interrupted at step 12, resumable from step 10)" in shown
    assert "machines: a (E1 linear + lora, E2 linear + dora); b (E7 perceiver + lora, E8 perceiver + dora)" in shown
    assert "perceiver: LoRA scores the higher METEOR (DoRA 0.5000 vs LoRA 0.5200, -0.0200); DoRA takes 1.20x LoRA's " \
           "step time and 1.00x its peak memory; last-epoch loss std" in shown
    assert "best METEOR: E7" in shown and "best METEOR per step-second: E7" in shown
    assert "missing: E3" in (tmp_path / "two" / "report.html").read_text()


@pytest.mark.parametrize("change, key, value", [
    (dict(config={"stage2_epochs": 5}), "stage2_epochs", "5"),
    (dict(config={"batch_size": 32, "grad_accum": 2}), "videos per step", "64"),
    (dict(bases="b"), "bases", "{'clip': 'clip-b', 'llm': 'llm'}"),
    (dict(tested="w"), "test split", ""),
    (dict(config={"seed": 7}), "seed", "7"),
])
def test_summarize_refuses_runs_the_grid_does_not_hold_equal(tmp_path, change, key, value):
    fake_run(tmp_path / "a" / "E1_linear_lora", 0.3)
    fake_run(tmp_path / "b" / "E2_linear_dora", 0.4, **change)
    folders = ["--summarize", str(tmp_path / "a"), str(tmp_path / "b"), "--summary", str(tmp_path / "s")]
    message = refusal(folders)
    assert len(message.splitlines()) == 1 and "E1 linear + lora" in message
    assert f"E2 linear + dora ({tmp_path / 'b' / 'E2_linear_dora'}) has {key} {value}" in message
    assert not (tmp_path / "s").exists()
    experiments.main([*folders, "--accept-difference", key])  # compared when asked, the difference stated
    assert "compared although they differ (--accept-difference): E2 linear + dora" in \
        (tmp_path / "s" / "report.html").read_text()


def test_accumulation_and_the_demos_per_projector_epochs_are_comparable(tmp_path):
    """16 x 2 and 8 x 4 videos are one step of 32; on the demo the per-patch projectors have epochs of their own."""
    fake_run(tmp_path / "a" / "E1_linear_lora", 0.3, all_four=0.1, config={"stage1_epochs": 1, "stage2_epochs": 1})
    fake_run(tmp_path / "a" / "E2_linear_dora", 0.3, all_four=0.1, config={"stage1_epochs": 1, "stage2_epochs": 1,
                                                                           "batch_size": 8, "grad_accum": 4})
    fake_run(tmp_path / "b" / "E7_perceiver_lora", 0.4, all_four=0.9)
    rows = experiments.main(["--summarize", str(tmp_path / "a"), str(tmp_path / "b"), "--summary", str(tmp_path / "s")])
    assert [r["experiment"] for r in rows] == ["E1", "E2", "E7"]
    fake_run(tmp_path / "b" / "E8_perceiver_dora", 0.4, all_four=0.9, config={"stage2_epochs": 5})
    # within one projector the epochs must agree
    assert "E8 perceiver + dora" in refusal(["--summarize", str(tmp_path / "a"), str(tmp_path / "b")])


def test_every_per_projector_default_of_the_demo_is_compared_within_its_projector():
    import demo
    assert set().union(*demo.PROJECTOR_DEFAULTS.values()) <= grid_summary.DEMO_PER_PROJECTOR


def test_summarize_names_the_same_experiment_found_twice(tmp_path):
    fake_run(tmp_path / "a" / "E1_linear_lora", 0.3)
    fake_run(tmp_path / "b" / "E1_linear_lora", 0.35)
    message = refusal(["--summarize", str(tmp_path / "a"), str(tmp_path / "b")])
    assert (f"the same experiment finished twice: E1 linear + lora in {tmp_path / 'a' / 'E1_linear_lora'} and "
            f"{tmp_path / 'b' / 'E1_linear_lora'}") in message
    # the same folder named twice is one folder
    experiments.main(["--summarize", str(tmp_path / "a"), str(tmp_path / "a"), "--summary", str(tmp_path / "s")])


def test_summarize_refuses_a_folder_the_grid_does_not_number_so(tmp_path):
    fake_run(tmp_path / "a" / "E3_linear_lora", 0.3)
    assert "not a run of the grid, whose E3 is mlp + lora" in refusal(["--summarize", str(tmp_path / "a")])


# ---- options and failures ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, refused", [
    (["--no-such-option", "3"], "unrecognized arguments: --no-such-option 3"),
    (["--batch-size", "many"], "argument --batch-size: invalid int value: 'many'"),
    (["--output-dir", "x"], "--output-dir: the grid sets these"),
])
def test_options_train_py_would_refuse_are_refused_before_any_run(tmp_path, trains, options, refused):
    message = refusal(["--runs", str(tmp_path / "runs"), *options])
    assert refused in message and len(message.splitlines()) == 1 and message.startswith("error: ")
    assert trains == [] and not (tmp_path / "runs").exists()


def test_the_demos_options_pass_on_the_demo_only(tmp_path, trains):
    """The demo's own options pass on the embedded default (the demo's parser takes them) and are refused beside
    --clip/--llm/--train-manifest (train.py's parser does not know them), before any run starts."""
    demo = ["--demo-scale", "ci", "--select-by=meteor"]
    experiments.main(["--runs", str(tmp_path / "runs"), "--summary", str(tmp_path / "s"), "--only", "E1", *demo])
    assert trains[0][-3:] == demo
    message = refusal(["--runs", str(tmp_path / "runs"), "--only", "E2", "--clip", "c", "--llm", "l",
                       "--train-manifest", "m.jsonl", *demo])
    assert "unrecognized arguments: --demo-scale ci --select-by=meteor" in message and len(trains) == 1


@pytest.mark.parametrize("options, refused", [
    (["--only", "E5", "--token-reduction", "merge", "--visual-tokens", "8"], "cabstractor projector's query tokens "
                                                                            "have no frames to merge across"),
    (["--only", "E1", "--visual-tokens", "8", "--token-reduction", "none"], "--visual-tokens 8 needs a"),
])
def test_a_token_reduction_a_projector_cannot_use_is_refused_before_any_run(tmp_path, trains, options, refused):
    message = refusal(["--runs", str(tmp_path / "runs"), *options])
    assert refused in message and len(message.splitlines()) == 1 and trains == []


def test_token_reduction_options_pass_through_to_each_run(tmp_path, trains):
    reduction = ["--token-reduction", "divprune", "--visual-tokens", "8"]
    experiments.main(["--runs", str(tmp_path / "runs"), "--summary", str(tmp_path / "s"), "--only", "E1,E7",
                      *reduction])
    assert [command[-4:] for command in trains] == [reduction] * 2


def test_a_failed_run_is_one_line_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    """The real runner on a stand-in train.py: linear fails with exit status 3, perceiver leaves a finished run."""
    template = fake_run(tmp_path / "template", 0.5)
    script = tmp_path / "train.py"
    script.write_text(
        "import shutil, sys\n"
        "out = sys.argv[sys.argv.index('--output-dir') + 1]\n"
        "print('training', sys.argv[sys.argv.index('--projector') + 1])\n"
        "if '--projector' in sys.argv and 'linear' in sys.argv:\n"
        "    print('Traceback (most recent call last): boom', file=sys.stderr)\n"
        "    sys.exit(3)\n"
        f"shutil.copytree({str(template)!r}, out, dirs_exist_ok=True)\n")
    monkeypatch.setattr(experiments, "TRAIN_SCRIPT", script)
    monkeypatch.setattr(experiments, "GRID", [("linear", "lora"), ("perceiver", "lora")])
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_:
        experiments.main(["--runs", str(runs), "--summary", str(tmp_path / "summary")])
    log = runs / "E1_linear_lora" / "logs" / "console.log"
    line = f"E1 linear + lora failed (exit status 3); its log: {log}"
    assert exit_.value.code == f"1 of the experiments have no test result:\n{line}"  # sys.exit(text): status 1
    shown = capsys.readouterr().out
    assert f"\n{line}\n" in shown and "training perceiver" in shown and "boom" in shown
    assert "boom" in log.read_text() and "training linear" in log.read_text()
    assert [r["experiment"] for r in read_csv(tmp_path / "summary" / "all_results.csv")] == ["E2"]
    assert f"no test result: {line}" in (tmp_path / "summary" / "report.html").read_text()


def test_a_run_copied_without_checkpoints_or_samples_is_summarized_with_a_note(tmp_path, capsys):
    fake_run(tmp_path / "a" / "E1_linear_lora", 0.3)
    copied = fake_run(tmp_path / "b" / "E2_linear_dora", 0.4, bases="b", tested="w")
    (copied / "checkpoints" / "best_model.pt").unlink()
    (copied / "samples" / "predictions.json").unlink()
    rows = experiments.main(["--summarize", str(tmp_path / "a"), str(tmp_path / "b"), "--summary", str(tmp_path / "s")])
    assert [r["experiment"] for r in rows] == ["E1", "E2"]
    assert "not compared (no checkpoints/best_model.pt or samples/predictions.json in the run folder): E2 linear + " \
           "dora's bases, E2 linear + dora's test split" in capsys.readouterr().out


def test_a_pair_split_between_two_machines_says_so(tmp_path, capsys):
    """The plan's split gives E3 to one person and E4 to another: their cost ratio is across machines."""
    fake_run(tmp_path / "a" / "E3_mlp_lora", 0.3, summary={"machine": "NVIDIA A100"})
    fake_run(tmp_path / "b" / "E4_mlp_dora", 0.4, summary={"machine": "NVIDIA H100"})
    experiments.main(["--summarize", str(tmp_path / "a"), str(tmp_path / "b"), "--summary", str(tmp_path / "s")])
    assert "peak memory (measured on different machines, DoRA on NVIDIA H100, LoRA on NVIDIA A100)" in \
        (tmp_path / "s" / "recommendation.txt").read_text()
    pair, = read_csv(tmp_path / "s" / "lora_vs_dora.csv")
    assert (pair["machine_lora"], pair["machine_dora"]) == ("NVIDIA A100", "NVIDIA H100")


@pytest.mark.parametrize("gap, verdict", [(0.00002, "the same METEOR within 0.0005"),
                                          (0.002, "DoRA scores the higher METEOR"),
                                          (-0.002, "LoRA scores the higher METEOR")])
def test_a_meteor_gap_below_the_shown_precision_is_called_the_same(gap, verdict):
    """One run per side: a difference the tables cannot show (three decimals) is not called a win."""
    pair = {"projector": "linear", "meteor_lora": 0.81, "meteor_dora": 0.81 + gap, "meteor_dora_minus_lora": gap,
            "machine_lora": "m", "machine_dora": "m", "median_step_seconds_dora_over_lora": 1.0,
            "peak_memory_gib_dora_over_lora": 1.1, f"{grid_summary.LOSS_SPREAD}_lora": 0.01,
            f"{grid_summary.LOSS_SPREAD}_dora": 0.01}
    assert grid_summary.conclusion(pair).startswith(f"linear: {verdict} (DoRA {0.81 + gap:.4f} vs LoRA 0.8100")
