"""The experiment plan's grid: E1-E8 = {linear, mlp, cabstractor, perceiver} x {lora, dora}, one train.py run each.

    python experiments.py                                     # the grid on the embedded demo
    python experiments.py --clip CLIP --llm QWEN3 --train-manifest m.jsonl --batch-size 8
    python experiments.py --with-crossattn                    # also E9-E10: the plan's cross-attention abstractor

Options other than the grid's own are passed through to every train.py run. A run whose logs/final_metrics.json
exists is skipped, so an interrupted grid continues where it stopped. Writes summary/all_results.csv,
summary/comparison_plots.png, and prints a recommendation: the best METEOR, and the best METEOR per unit of cost.
"""
import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

GRID = [(projector, peft) for projector in ("linear", "mlp", "cabstractor", "perceiver") for peft in ("lora", "dora")]
EXTRA = [("crossattn", "lora"), ("crossattn", "dora")]
COLUMNS = ["experiment", "projector", "peft", "meteor", "meteor_coco", "cider_d", "bleu4", "chrf",
           "trainable_parameters", "median_step_seconds", "peak_memory_gib", "run_dir"]


def run_experiment(name: str, projector: str, peft: str, runs: Path, passthrough: list[str]) -> Path:
    run_dir = runs / f"{name}_{projector}_{peft}"
    if (run_dir / "logs" / "final_metrics.json").exists():
        print(f"{name} {projector} + {peft}: finished before, skipped ({run_dir})")
        return run_dir
    command = [sys.executable, str(Path(__file__).with_name("train.py")), "--projector", projector, "--peft", peft,
               "--output-dir", str(run_dir), *passthrough]
    print(f"{name} {projector} + {peft}: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)
    return run_dir


def result_row(name: str, projector: str, peft: str, run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "logs" / "final_metrics.json").read_text())["metrics"]
    summary = json.loads((run_dir / "logs" / "train_summary.json").read_text())
    return {"experiment": name, "projector": projector, "peft": peft, "run_dir": str(run_dir),
            **{key: metrics[key]["value"] for key in ("meteor", "meteor_coco", "cider_d", "bleu4", "chrf")},
            **{key: summary[key] for key in ("trainable_parameters", "median_step_seconds", "peak_memory_gib")}}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['experiment']}\n{r['projector']}\n{r['peft']}" for r in rows]
    figure, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    for axis, key, title in zip(axes, ("meteor", "median_step_seconds", "peak_memory_gib"),
                                ("test METEOR", "median step time (s), stage 2", "peak memory (GiB)")):
        axis.bar(labels, [r[key] for r in rows], color=["tab:blue" if r["peft"] == "lora" else "tab:orange"
                                                        for r in rows])
        axis.set_title(title)
        axis.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def recommend(rows: list[dict]) -> str:
    """The best METEOR, and the best METEOR per second of training step (the cost a user pays every epoch)."""
    best = max(rows, key=lambda r: r["meteor"])
    per_cost = max(rows, key=lambda r: r["meteor"] / max(r["median_step_seconds"], 1e-9))
    return (f"best METEOR: {best['experiment']} ({best['projector']} + {best['peft']}), {best['meteor']:.4f}\n"
            f"best METEOR per step-second: {per_cost['experiment']} ({per_cost['projector']} + {per_cost['peft']}), "
            f"{per_cost['meteor']:.4f} at {per_cost['median_step_seconds']:.3f} s/step")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs", help="folder of the experiments' run folders")
    parser.add_argument("--summary", default="summary", help="folder of all_results.csv and comparison_plots.png")
    parser.add_argument("--with-crossattn", action="store_true", help="also run the cross-attention abstractor")
    args, passthrough = parser.parse_known_args(argv)
    grid = GRID + (EXTRA if args.with_crossattn else [])
    rows = []
    for number, (projector, peft) in enumerate(grid, start=1):
        name = f"E{number}"
        run_dir = run_experiment(name, projector, peft, Path(args.runs), passthrough)
        rows.append(result_row(name, projector, peft, run_dir))
    summary = Path(args.summary)
    summary.mkdir(parents=True, exist_ok=True)
    with open(summary / "all_results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, summary / "comparison_plots.png")
    print(f"\n{'exp':<4} {'projector':<12} {'peft':<5} {'METEOR':>7} {'CIDEr-D':>8} {'params':>12} {'s/step':>7}")
    for r in rows:
        print(f"{r['experiment']:<4} {r['projector']:<12} {r['peft']:<5} {r['meteor']:>7.4f} {r['cider_d']:>8.4f} "
              f"{r['trainable_parameters']:>12,} {r['median_step_seconds']:>7.3f}")
    print("\n" + recommend(rows))
    return rows


if __name__ == "__main__":
    main()
