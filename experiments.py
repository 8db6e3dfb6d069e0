"""The experiment plan's grid: E1-E8 = {linear, mlp, cabstractor, perceiver} x {lora, dora}, one train.py run each.

    python experiments.py                                     # the grid on the embedded demo
    python experiments.py --clip CLIP --llm QWEN3 --train-manifest m.jsonl --batch-size 8
    python experiments.py --with-crossattn                    # also E9-E10: the plan's cross-attention abstractor
    python experiments.py --seeds 42,7,1                      # each pair three times: its mean and range

Options other than the grid's own are passed through to every train.py run. A run whose logs/final_metrics.json
exists is skipped, so an interrupted grid continues where it stopped; that file must be the run's own test result
(train.py writes it; evaluate.py run by hand writes under RUN/eval/, which is never read here). Writes
summary/all_results.csv, summary/comparison_plots.png, summary/learning_curves.png and summary/report.html (the
table, the plots, links to each run's report.html), and prints a recommendation: the best METEOR, and the best
METEOR per unit of cost. With --bertscore-model DIR each run's test predictions are also scored with BERTScore
(P / R / F1 columns and a plot); without it those columns are absent and the summary says how to add them.
On the embedded demo each run's share of test captions with all four attributes right is a column too.

One run is one draw: two runs of one pair that differ only in their seed can fall several points apart. With
--seeds each pair is trained once per seed (run folders E{n}_P_M_seed{S}; on the demo every run uses the first seed's
assets), and the summary adds each pair's mean with its lowest and highest run (summary/across_seeds.csv), so a gap
between two pairs can be read against the spread within one.
"""
import argparse
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from checkpoint import atomic_write_text
from errors import user_errors
from report import render_summary

GRID = [(projector, peft) for projector in ("linear", "mlp", "cabstractor", "perceiver") for peft in ("lora", "dora")]
EXTRA = [("crossattn", "lora"), ("crossattn", "dora")]
BERTSCORE_COLUMNS = ["bertscore_p", "bertscore_r", "bertscore_f1"]
# The summary's columns in order; a column no run has (seed, BERTScore, the demo's all_four) is left out.
COLUMNS = ["experiment", "projector", "peft", "seed", "meteor", "meteor_coco", "cider_d", "bleu4", "chrf",
           *BERTSCORE_COLUMNS, "all_four", "budget", "trainable_parameters", "median_step_seconds", "train_seconds",
           "peak_memory_gib", "run_dir"]
SPREAD_HEADING = "each pair over its seeds, mean (lowest-highest run)"
BERTSCORE_OFF = "BERTScore not computed: add --bertscore-model DIR (a BERT snapshot folder) to score each run with it"


def run_experiment(name: str, projector: str, peft: str, runs: Path, passthrough: list[str],
                   seed: int | None = None, demo_seed: int | None = None) -> Path:
    """train.py for one pair (and one seed, on the demo's assets of demo_seed), unless it finished before."""
    seeding = [] if seed is None else ["--seed", str(seed), "--demo-seed", str(demo_seed)]
    run_dir = runs / (f"{name}_{projector}_{peft}" + ("" if seed is None else f"_seed{seed}"))
    if (run_dir / "logs" / "final_metrics.json").exists():
        print(f"{name} {projector} + {peft}: finished before, skipped ({run_dir})")
        return run_dir
    command = [sys.executable, str(Path(__file__).with_name("train.py")), "--projector", projector, "--peft", peft,
               "--output-dir", str(run_dir), *seeding, *passthrough]
    print(f"{name} {projector} + {peft}: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)
    return run_dir


def result_row(name: str, projector: str, peft: str, run_dir: Path, bertscore: dict | None = None,
               seed: int | None = None) -> dict:
    """The run's own test result (train.py's logs/final_metrics.json, refused when it is not the test split), its
    training summary, with `bertscore` ({"model", "layer"}) the BERTScore of its test predictions, and on the demo
    the share of test captions naming all four attributes right (logs/demo_table.json)."""
    final = run_dir / "logs" / "final_metrics.json"
    result = json.loads(final.read_text())
    if result.get("split") != "test" or result.get("manifest"):
        raise ValueError(f"{final}: holds an evaluation of {result.get('manifest') or result.get('split')!r}, not "
                         f"the run's test split; rerun the experiment or evaluate the test split into that folder")
    metrics = result["metrics"]
    if bertscore and "bertscore_f1" not in metrics:
        metrics = metrics | bertscore_metrics(run_dir / "samples" / "predictions.json", bertscore)
    summary = json.loads((run_dir / "logs" / "train_summary.json").read_text())
    demo_table = run_dir / "logs" / "demo_table.json"
    return {"experiment": name, "projector": projector, "peft": peft, "run_dir": str(run_dir),
            **({} if seed is None else {"seed": seed}),
            **({"all_four": json.loads(demo_table.read_text())["model"]["all four"]} if demo_table.exists() else {}),
            **{key: metrics[key]["value"] for key in ("meteor", "meteor_coco", "cider_d", "bleu4", "chrf")},
            **{key: metrics[key]["value"] for key in BERTSCORE_COLUMNS if key in metrics},
            "budget": budget(json.loads((run_dir / "config.json").read_text()), summary),
            **{key: summary.get(key) for key in ("trainable_parameters", "median_step_seconds", "train_seconds",
                                                 "peak_memory_gib")}}


def budget(config: dict, summary: dict) -> str:
    """What a run was given: epochs per stage, optimizer steps and videos per step, and the minutes they took."""
    videos = config["batch_size"] * config["grad_accum"] * summary.get("processes", 1)
    minutes = f", {summary['train_seconds'] / 60:.1f} min" if summary.get("train_seconds") is not None else ""
    return (f"{config['stage1_epochs']} + {config['stage2_epochs']} epochs, {summary['steps']} steps of {videos} "
            f"videos{minutes}")


def bertscore_metrics(predictions_file: Path, bertscore: dict) -> dict:
    from metrics import score_captions
    predictions = json.loads(predictions_file.read_text())
    metrics, _ = score_captions([p["prediction"] for p in predictions], [p["references"] for p in predictions],
                                bertscore_model=bertscore["model"], bertscore_layer=bertscore["layer"])
    return {key: metrics[key] for key in BERTSCORE_COLUMNS}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['experiment']}\n{r['projector']}\n{r['peft']}" + (f"\nseed {r['seed']}" if "seed" in r else "")
              for r in rows]
    panels = [("meteor", "test METEOR"), ("median_step_seconds", "median step time (s), stage 2"),
              ("peak_memory_gib", "peak memory (GiB)")]
    panels += [("bertscore_f1", "test BERTScore F1")] if all("bertscore_f1" in r for r in rows) else []
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    for axis, (key, title) in zip(axes, panels):
        axis.bar(labels, [r[key] for r in rows], color=["tab:blue" if r["peft"] == "lora" else "tab:orange"
                                                        for r in rows])
        axis.set_title(title)
        axis.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_label(row: dict) -> str:
    return f"{row['experiment']} {row['projector']} + {row['peft']}" + (f" seed {row['seed']}" if "seed" in row else "")


def across_seeds(rows: list[dict]) -> list[dict]:
    """Each pair's mean over its seeds, with its lowest and highest run, for METEOR, all_four and the step time."""
    pairs = {}
    for row in rows:
        pairs.setdefault(row["experiment"], []).append(row)
    summaries = []
    for runs in pairs.values():
        summary = {key: runs[0][key] for key in ("experiment", "projector", "peft")}
        summary["seeds"] = " ".join(str(r["seed"]) for r in runs)
        for key in ("meteor", "all_four", "median_step_seconds"):
            if key in runs[0]:
                values = [r[key] for r in runs]
                summary |= {key: sum(values) / len(values), f"{key}_min": min(values), f"{key}_max": max(values)}
        summaries.append(summary)
    return summaries


def spread_lines(pairs: list[dict]) -> list[str]:
    """A line per pair: 'mean (lowest-highest)' of METEOR and, on the demo, all four right."""
    def spread(pair, key):
        return f"{pair[key]:.3f} ({pair[key + '_min']:.3f}-{pair[key + '_max']:.3f})"
    return [f"{p['experiment']} {p['projector']} + {p['peft']}, seeds {p['seeds']}: METEOR {spread(p, 'meteor')}"
            + (f", all four right {spread(p, 'all_four')}" if "all_four" in p else "") for p in pairs]


def recommend(rows: list[dict]) -> str:
    """The best METEOR, and the best METEOR per second of training step (the cost a user pays every epoch); given
    across_seeds' pairs, the best mean."""
    best = max(rows, key=lambda r: r["meteor"])
    per_cost = max(rows, key=lambda r: r["meteor"] / max(r["median_step_seconds"], 1e-9))
    return (f"best METEOR: {best['experiment']} ({best['projector']} + {best['peft']}), {best['meteor']:.4f}\n"
            f"best METEOR per step-second: {per_cost['experiment']} ({per_cost['projector']} + {per_cost['peft']}), "
            f"{per_cost['meteor']:.4f} at {per_cost['median_step_seconds']:.3f} s/step")


def plot_learning_curves(rows: list[dict], path: Path) -> None:
    """Every run's training loss and validation METEOR against the optimizer step, overlaid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (loss_axis, meteor_axis) = plt.subplots(1, 2, figsize=(14, 4.5))
    for r in rows:
        with open(Path(r["run_dir"]) / "logs" / "training_log.csv", newline="") as f:
            log = list(csv.DictReader(f))
        label = run_label(r)
        steps = [(int(x["step"]), float(x["loss"])) for x in log if x["loss"]]
        val = [(int(x["step"]), float(x["val_meteor"])) for x in log if x["val_meteor"]]
        loss_axis.plot([s for s, _ in steps], [v for _, v in steps], label=label)
        meteor_axis.plot([s for s, _ in val], [v for _, v in val], "o-", label=label)
    loss_axis.set(title="training loss", xlabel="step", yscale="log")
    meteor_axis.set(title="validation METEOR", xlabel="step")
    meteor_axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def csv_text(rows: list[dict], columns: list[str]) -> str:
    table = io.StringIO()
    writer = csv.DictWriter(table, columns)
    writer.writeheader()
    writer.writerows(rows)
    return table.getvalue()


def write_summary(rows: list[dict], summary: Path, bertscore: bool, pairs: list[dict] | None = None) -> None:
    """all_results.csv (and across_seeds.csv with `pairs`), the two figures and report.html, each written atomically."""
    summary.mkdir(parents=True, exist_ok=True)
    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    atomic_write_text(summary / "all_results.csv", csv_text(rows, columns))
    notes = [] if bertscore else [BERTSCORE_OFF]
    if pairs:
        atomic_write_text(summary / "across_seeds.csv", csv_text(pairs, list(pairs[0])))
        notes = [f"{SPREAD_HEADING}:", *spread_lines(pairs), *notes]
    plot(rows, summary / "comparison_plots.png")
    plot_learning_curves(rows, summary / "learning_curves.png")
    links = {run_label(r): os.path.relpath(Path(r["run_dir"]) / "samples" / "report.html", summary) for r in rows}
    page = render_summary("kovlm experiments", rows, [c for c in columns if c != "run_dir"],
                          {"comparison": summary / "comparison_plots.png",
                           "learning curves": summary / "learning_curves.png"}, links, notes=notes)
    atomic_write_text(summary / "report.html", page)


def print_summary(rows: list[dict], pairs: list[dict] | None, bertscore: bool) -> None:
    """Each run's line (its seed and, on the demo, all four right where known), each pair's spread, the advice."""
    seeded, demo = pairs is not None, all("all_four" in r for r in rows)
    print(f"\n{'exp':<4} {'projector':<12} {'peft':<5}" + (f" {'seed':>5}" if seeded else "")
          + f" {'METEOR':>7} {'CIDEr-D':>8}" + (f" {'all four':>8}" if demo else "")
          + f" {'params':>12} {'s/step':>7}  budget")
    for r in rows:
        print(f"{r['experiment']:<4} {r['projector']:<12} {r['peft']:<5}" + (f" {r['seed']:>5}" if seeded else "")
              + f" {r['meteor']:>7.4f} {r['cider_d']:>8.4f}" + (f" {r['all_four']:>8.3f}" if demo else "")
              + f" {r['trainable_parameters']:>12,} {r['median_step_seconds']:>7.3f}  {r['budget']}")
    if seeded:
        print(f"\n{SPREAD_HEADING}; a gap between two pairs that is not wider than these ranges is a draw:\n  "
              + "\n  ".join(spread_lines(pairs)))
    print("\n" + recommend(pairs or rows) + ("" if bertscore else "\n" + BERTSCORE_OFF))


def seed_list(text: str) -> list[int]:
    return [int(seed) for seed in text.split(",")]


def main(argv: list[str] | None = None) -> list[dict]:
    # allow_abbrev off: a train.py option passed through must never be read as one of ours (--seed as --seeds)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--runs", default="runs", help="folder of the experiments' run folders")
    parser.add_argument("--summary", default="summary", help="folder of all_results.csv, the plots and report.html")
    parser.add_argument("--with-crossattn", action="store_true", help="also run the cross-attention abstractor")
    parser.add_argument("--bertscore-model", help="a BERT snapshot folder: adds BERTScore P/R/F1 of each run")
    parser.add_argument("--bertscore-layer", type=int, default=9, help="BERT layer whose embeddings BERTScore uses")
    parser.add_argument("--seeds", type=seed_list, help="train each pair once per seed, e.g. 42,7,1 (on the demo, "
                        "all on the first seed's assets), and report each pair's mean and range")
    args, passthrough = parser.parse_known_args(argv)
    if args.seeds and {"--seed", "--demo-seed"} & {flag.split("=")[0] for flag in passthrough}:
        parser.error("--seeds sets each run's --seed and --demo-seed; drop those options")
    bertscore = {"model": args.bertscore_model, "layer": args.bertscore_layer} if args.bertscore_model else None
    grid = GRID + (EXTRA if args.with_crossattn else [])
    demo_seed = args.seeds[0] if args.seeds else None  # every seed trains on the first seed's demo assets
    with user_errors():
        rows = []
        for number, (projector, peft) in enumerate(grid, start=1):
            name = f"E{number}"
            for seed in args.seeds or [None]:
                run_dir = run_experiment(name, projector, peft, Path(args.runs), passthrough, seed, demo_seed)
                rows.append(result_row(name, projector, peft, run_dir, bertscore, seed))
        pairs = across_seeds(rows) if args.seeds else None
        write_summary(rows, Path(args.summary), bertscore is not None, pairs)
    print_summary(rows, pairs, bertscore is not None)
    print(f"summary: {Path(args.summary) / 'report.html'}")
    return rows


if __name__ == "__main__":
    main()
