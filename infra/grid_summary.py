"""The experiment grid's finished runs, read and compared: one row per run folder (its test result, budget, machine
and wall time), the check that runs differ only where the grid lets them, the LoRA-vs-DoRA table, the advice in
recommendation.txt, and the summary folder experiments.py writes (all_results.csv, lora_vs_dora.csv,
across_seeds.csv, recommendation.txt, the plots, report.html).

A run folder is train.py's --output-dir: config.json, logs/ (final_metrics.json, train_summary.json,
training_log.csv, on the demo demo_table.json), checkpoints/ and samples/ (infra/checkpoint.py writes them).
"""
import csv
import hashlib
import io
import json
import os
import statistics
from pathlib import Path

import torch

from infra.checkpoint import RESUMABLE_CHANGES, STATE_FILE, atomic_write_text, holds_a_run
from infra.errors import UserError
from report import SummarySection, render_summary

BERTSCORE_COLUMNS = ["bertscore_p", "bertscore_r", "bertscore_f1"]
# The summary's columns in order; a column no run has (seed, BERTScore, the demo's all_four) is left out.
COLUMNS = ["experiment", "projector", "peft", "seed", "meteor", "meteor_coco", "cider_d", "bleu4", "chrf",
           *BERTSCORE_COLUMNS, "all_four", "budget", "trainable_parameters", "median_step_seconds", "train_seconds",
           "peak_memory_gib", "machine", "wall_seconds", "run_dir"]
QUALITY = ["meteor", "meteor_coco", "cider_d", "bertscore_f1", "all_four"]  # lora_vs_dora.csv's, where every run has it
SPREAD_HEADING = "each pair over its seeds, mean (lowest-highest run)"
BERTSCORE_OFF = "BERTScore not computed: add --bertscore-model DIR (a BERT snapshot folder) to score each run with it"
LOSS_SPREAD = "last_epoch_loss_std"  # the sample standard deviation of the step losses in a run's last epoch
MERGEABLE = ("mergeability: LoRA and DoRA both fold into the base's linears (python export.py ckpt.pt --output DIR), "
             "so once merged neither costs anything at generation")
# config.json's options that differ between the grid's runs by design: the experiment, where files are (paths differ
# between machines: the bases and the test split are compared by content instead), what may change on resumption,
# and how a step is cut into micro-batches (compared as videos per step: accumulation changes only the speed).
NOT_COMPARED = {"projector", "peft", "output_dir", "cache_dir", "demo_dir", "clip", "llm", "train_manifest",
                "val_manifest", "test_manifest", "batch_size", "grad_accum", *RESUMABLE_CHANGES}
# the full demo's per-projector defaults (demo.PROJECTOR_DEFAULTS)
DEMO_PER_PROJECTOR = {"stage1_epochs", "stage2_epochs", "token_reduction", "visual_tokens"}


# ---- one run's numbers -----------------------------------------------------------------------------------------------
def run_state(run_dir: Path) -> tuple[str, str]:
    """(kind, words): 'done'; 'resumable' (a saved training state: the step the log reached and the state's step);
    'stale' (a log but no saved state: it starts anew); 'new'."""
    if (run_dir / "logs" / "final_metrics.json").exists():
        return "done", "done"
    if not holds_a_run(run_dir):
        return "new", "not started"
    steps = [row["step"] for row in loss_log(run_dir)] if (run_dir / "logs" / "training_log.csv").exists() else []
    reached = f"interrupted at step {steps[-1] if steps else 0}"
    state = run_dir / "checkpoints" / STATE_FILE
    if not state.exists():
        return "stale", f"{reached}, before its first saved training state: starts anew"
    saved = torch.load(state, map_location="cpu", weights_only=True, mmap=True)  # mmap: no weights read
    return "resumable", f"{reached}, resumable from step {saved['global_step']}"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def result_row(experiment, run_dir: Path, bertscore: dict | None = None) -> dict:
    """The row of `experiment` (an experiments.Experiment: name, projector, peft, seed) from its run folder: the
    run's own test result (train.py's logs/final_metrics.json, refused when it is not the test split), its training
    summary (budget, machine, wall time: "unknown" where an older run did not record them), with `bertscore`
    ({"model", "layer"}) the BERTScore of its test predictions, and on the demo the share of test captions naming all
    four attributes right (logs/demo_table.json)."""
    final = run_dir / "logs" / "final_metrics.json"
    result = read_json(final)
    if result.get("split") != "test" or result.get("manifest"):
        raise UserError(f"{final}: holds an evaluation of {result.get('manifest') or result.get('split')!r}, not "
                         f"the run's test split; rerun the experiment or evaluate the test split into that folder")
    metrics = result["metrics"]
    if bertscore and "bertscore_f1" not in metrics:
        metrics = metrics | bertscore_metrics(run_dir / "samples" / "predictions.json", bertscore)
    summary = read_json(run_dir / "logs" / "train_summary.json")
    demo_table = run_dir / "logs" / "demo_table.json"
    return {"experiment": experiment.name, "projector": experiment.projector, "peft": experiment.peft,
            "run_dir": str(run_dir), **({} if experiment.seed is None else {"seed": experiment.seed}),
            **({"all_four": read_json(demo_table)["model"]["all four"]} if demo_table.exists() else {}),
            **{key: metrics[key]["value"] for key in ("meteor", "meteor_coco", "cider_d", "bleu4", "chrf")},
            **{key: metrics[key]["value"] for key in BERTSCORE_COLUMNS if key in metrics},
            "budget": budget(read_json(run_dir / "config.json"), summary),
            **{key: summary.get(key) for key in ("trainable_parameters", "median_step_seconds", "train_seconds",
                                                 "peak_memory_gib")},
            **{key: "unknown" if summary.get(key) is None else summary[key] for key in ("machine", "wall_seconds")}}


def videos_per_step(config: dict, summary: dict) -> int:
    return config["batch_size"] * config["grad_accum"] * summary.get("processes", 1)


def budget(config: dict, summary: dict) -> str:
    """What a run was given: epochs per stage, optimizer steps and videos per step, and the minutes they took."""
    videos = videos_per_step(config, summary)
    minutes = f", {summary['train_seconds'] / 60:.1f} min" if summary.get("train_seconds") is not None else ""
    return (f"{config['stage1_epochs']} + {config['stage2_epochs']} epochs, {summary['steps']} steps of {videos} "
            f"videos{minutes}")


def bertscore_metrics(predictions_file: Path, bertscore: dict) -> dict:
    from metrics import score_captions
    predictions = read_json(predictions_file)
    metrics, _ = score_captions([p["prediction"] for p in predictions], [p["references"] for p in predictions],
                                bertscore_model=bertscore["model"], bertscore_layer=bertscore["layer"])
    return {key: metrics[key] for key in BERTSCORE_COLUMNS}


def loss_log(run_dir: Path) -> list[dict]:
    with open(run_dir / "logs" / "training_log.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["loss"]]  # optimizer steps (validation rows have no loss)


def last_epoch_loss_std(row: dict) -> float | None:
    """The sample standard deviation of the step losses in the run's last epoch (of its last stage): how much the
    loss still jumps from step to step where training ends; None with fewer than two steps there."""
    steps = loss_log(Path(row["run_dir"]))
    last = [float(r["loss"]) for r in steps if (r["stage"], r["epoch"]) == (steps[-1]["stage"], steps[-1]["epoch"])]
    return statistics.stdev(last) if len(last) > 1 else None


# ---- comparable runs -------------------------------------------------------------------------------------------------
def run_identity(row: dict) -> dict:
    """What the grid holds equal, as the run's folder records it: the bases' fingerprints (the model checkpoint's
    base_identity, memory-mapped: no weights read), the test split (its videos' ids and references), the decoding,
    videos per optimizer step, and config.json's options but NOT_COMPARED (and the seed of a --seeds run). A value
    the folder does not hold (a run copied without its checkpoints or samples) is None."""
    run_dir = Path(row["run_dir"])
    config = read_json(run_dir / "config.json")
    bases = None
    for name in ("best_model.pt", "final_model.pt"):
        if (run_dir / "checkpoints" / name).is_file():
            checkpoint = torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True, mmap=True)
            bases = checkpoint["vlm_config"].get("base_identity") or None
            break
    tested = None
    if (run_dir / "samples" / "predictions.json").is_file():
        videos = sorted(json.dumps([p.get("id"), p.get("references")], ensure_ascii=False)
                        for p in read_json(run_dir / "samples" / "predictions.json"))
        tested = hashlib.sha256("\n".join(videos).encode()).hexdigest()[:16]
    return {"bases": bases, "test split": tested,
            "decoding": read_json(run_dir / "logs" / "final_metrics.json").get("decoding"),
            "videos per step": videos_per_step(config, read_json(run_dir / "logs" / "train_summary.json")),
            **{key: value for key, value in config.items()
               if key not in NOT_COMPARED and not (key == "seed" and "seed" in row)}}


def check_comparable(rows: list[dict], accepted: list[str] = ()) -> list[str]:
    """Refuse, in one line, runs that differ where the grid holds them equal: each run is compared with the first,
    and on the demo its projector's own options (DEMO_PER_PROJECTOR) with the first run of its projector. Returns
    notes naming the differences in `accepted` keys (--accept-difference) and what could not be compared (files
    the run folder lacks)."""
    identities = [run_identity(row) for row in rows]
    refused, stated = [], []
    for row, identity in zip(rows, identities):
        same_projector = next(i for i, r in enumerate(rows) if r["projector"] == row["projector"])
        for key, value in identity.items():
            first = same_projector if key in DEMO_PER_PROJECTOR and "all_four" in row else 0
            reference = identities[first].get(key)
            if value is not None and reference is not None and value != reference:
                (stated if key in accepted else refused).append(
                    f"{run_label(row)} ({row['run_dir']}) has {key} {value!r} where {run_label(rows[first])} "
                    f"({rows[first]['run_dir']}) has {reference!r}")
                if key not in accepted:
                    break
    if refused:
        raise UserError("runs that the grid compares must differ only in projector and PEFT: " + "; ".join(refused)
                         + ". Rerun those with the others' bases, data and options, summarize them apart, or name "
                           "the option in --accept-difference to compare them with the difference stated")
    unchecked = [f"{run_label(row)}'s {key}" for row, identity in zip(rows, identities)
                 for key in ("bases", "test split") if identity[key] is None]
    return ([f"compared although they differ (--accept-difference): {'; '.join(stated)}"] if stated else []) + (
        [f"not compared (no checkpoints/best_model.pt or samples/predictions.json in the run folder): "
         f"{', '.join(unchecked)}"] if unchecked else [])


# ---- the summary -----------------------------------------------------------------------------------------------------
def run_label(row: dict) -> str:
    return f"{row['experiment']} {row['projector']} + {row['peft']}" + (f" seed {row['seed']}" if "seed" in row else "")


def mean(rows: list[dict], key: str) -> float | None:
    values = [row[key] for row in rows]
    return None if any(not isinstance(v, (int, float)) for v in values) else sum(values) / len(values)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def lora_vs_dora(rows: list[dict]) -> list[dict]:
    """Per projector with both a LoRA and a DoRA run: each one's quality and DoRA - LoRA, peak memory and median
    step time and DoRA / LoRA, and the loss's spread over the last epoch; with --seeds each side's mean over its runs
    (and its METEOR range)."""
    table = []
    for projector in dict.fromkeys(row["projector"] for row in rows):
        lora, dora = ([r for r in rows if (r["projector"], r["peft"]) == (projector, peft)]
                      for peft in ("lora", "dora"))
        if not (lora and dora):
            continue
        pair = {"projector": projector, "lora": lora[0]["experiment"], "dora": dora[0]["experiment"]}
        pair |= {"runs_per_side": len(lora)} if len(lora) > 1 or len(dora) > 1 else {}
        for key in [k for k in QUALITY if all(k in r for r in lora + dora)]:
            pair |= {f"{key}_lora": mean(lora, key), f"{key}_dora": mean(dora, key)}
            pair[f"{key}_dora_minus_lora"] = pair[f"{key}_dora"] - pair[f"{key}_lora"]
        for peft, side in (("lora", lora), ("dora", dora)) if "runs_per_side" in pair else ():
            meteors = [r["meteor"] for r in side]
            pair |= {f"meteor_min_{peft}": min(meteors), f"meteor_max_{peft}": max(meteors)}
        for key in ("peak_memory_gib", "median_step_seconds"):
            pair |= {f"{key}_lora": mean(lora, key), f"{key}_dora": mean(dora, key)}
            pair[f"{key}_dora_over_lora"] = ratio(pair[f"{key}_dora"], pair[f"{key}_lora"])
        for peft, side in (("lora", lora), ("dora", dora)):
            spreads = [last_epoch_loss_std(r) for r in side]
            pair[f"{LOSS_SPREAD}_{peft}"] = None if None in spreads else sum(spreads) / len(spreads)
            pair[f"machine_{peft}"] = " / ".join(dict.fromkeys(str(r["machine"]) for r in side))
        table.append(pair)
    return table


def number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


METEOR_SAME = 0.0005  # METEOR differences below this are the same score: the tables show three decimals


def conclusion(pair: dict) -> str:
    """The projector's verdict in one line: the higher METEOR (a draw when the seeds' ranges overlap, the same when
    they differ by less than METEOR_SAME), at what cost in step time and memory, and how steady each loss ended."""
    gap = pair["meteor_dora_minus_lora"]
    if "runs_per_side" in pair and pair["meteor_min_lora"] <= pair["meteor_max_dora"] \
            and pair["meteor_min_dora"] <= pair["meteor_max_lora"]:
        verdict = "a draw within the seeds' METEOR ranges"
    else:
        verdict = f"the same METEOR within {METEOR_SAME}" if abs(gap) < METEOR_SAME else \
            "DoRA scores the higher METEOR" if gap > 0 else "LoRA scores the higher METEOR"
    bertscore = (f", BERTScore F1 {pair['bertscore_f1_dora_minus_lora']:+.4f}" if "bertscore_f1_dora_minus_lora" in pair
                 else "")
    machines = "" if pair["machine_lora"] == pair["machine_dora"] else \
        f" (measured on different machines, DoRA on {pair['machine_dora']}, LoRA on {pair['machine_lora']})"
    return (f"{pair['projector']}: {verdict} (DoRA {pair['meteor_dora']:.4f} vs LoRA {pair['meteor_lora']:.4f}, "
            f"{gap:+.4f}{bertscore}); DoRA takes {number(pair['median_step_seconds_dora_over_lora'], 2)}x LoRA's step "
            f"time and {number(pair['peak_memory_gib_dora_over_lora'], 2)}x its peak memory{machines}; last-epoch "
            f"loss std DoRA {number(pair[LOSS_SPREAD + '_dora'])} vs LoRA {number(pair[LOSS_SPREAD + '_lora'])}")


def recommend(rows: list[dict]) -> str:
    """The best METEOR, and the best METEOR per second of training step (the cost a user pays every epoch); given
    across_seeds' pairs, the best mean."""
    best = max(rows, key=lambda r: r["meteor"])
    per_cost = max(rows, key=lambda r: r["meteor"] / max(r["median_step_seconds"], 1e-9))
    return (f"best METEOR: {best['experiment']} ({best['projector']} + {best['peft']}), {best['meteor']:.4f}\n"
            f"best METEOR per step-second: {per_cost['experiment']} ({per_cost['projector']} + {per_cost['peft']}), "
            f"{per_cost['meteor']:.4f} at {per_cost['median_step_seconds']:.3f} s/step")


def recommendation(comparison: list[dict], rows: list[dict], pairs: list[dict] | None) -> str:
    """recommendation.txt: LoRA vs DoRA per projector, mergeability, the best run (or pair, over seeds)."""
    lines = (["LoRA vs DoRA per projector (lora_vs_dora.csv; loss spread: the sample standard deviation of the "
              "last epoch's step losses):"] + [f"  {conclusion(pair)}" for pair in comparison] + [MERGEABLE]
             if comparison else ["LoRA vs DoRA: no projector has both runs"])
    caveat = [] if pairs else ["one run per pair: runs that differ only in their seed can fall several points apart "
                               "(--seeds 42,7,1 measures that spread)"]
    return "\n".join(lines + caveat + [recommend(pairs or rows)]) + "\n"


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


def write_summary(rows: list[dict], summary: Path, bertscore: bool, pairs: list[dict] | None = None,
                  comparison: list[dict] = (), advice: str = "", notes: list[str] = ()) -> None:
    """all_results.csv (and across_seeds.csv with `pairs`, lora_vs_dora.csv with a `comparison`),
    recommendation.txt, the two figures and report.html, each written atomically."""
    summary.mkdir(parents=True, exist_ok=True)
    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    atomic_write_text(summary / "all_results.csv", csv_text(rows, columns))
    notes = [*notes, *([] if bertscore else [BERTSCORE_OFF])]
    if pairs:
        atomic_write_text(summary / "across_seeds.csv", csv_text(pairs, list(pairs[0])))
        notes = [f"{SPREAD_HEADING}:", *spread_lines(pairs), *notes]
    if comparison:
        atomic_write_text(summary / "lora_vs_dora.csv", csv_text(comparison, list(dict.fromkeys(
            key for pair in comparison for key in pair))))
    else:
        (summary / "lora_vs_dora.csv").unlink(missing_ok=True)  # never a table left from an earlier summary
    atomic_write_text(summary / "recommendation.txt", advice)
    plot(rows, summary / "comparison_plots.png")
    plot_learning_curves(rows, summary / "learning_curves.png")
    links = {run_label(r): os.path.relpath(Path(r["run_dir"]) / "samples" / "report.html", summary) for r in rows}
    sections = [SummarySection("LoRA vs DoRA", comparison, list(dict.fromkeys(k for p in comparison for k in p)),
                               advice.splitlines())] if comparison else []
    page = render_summary("kovlm experiments", rows, [c for c in columns if c != "run_dir"],
                          {"comparison": summary / "comparison_plots.png",
                           "learning curves": summary / "learning_curves.png"}, links, notes=notes,
                          sections=sections)
    atomic_write_text(summary / "report.html", page)


def print_summary(rows: list[dict], pairs: list[dict] | None, advice: str, notes: list[str]) -> None:
    """Each run's line (its seed and, on the demo, all four right where known), the machines, each pair's spread,
    the advice, and what is missing."""
    seeded, demo = pairs is not None, all("all_four" in r for r in rows)
    print(f"\n{'exp':<4} {'projector':<12} {'peft':<5}" + (f" {'seed':>5}" if seeded else "")
          + f" {'METEOR':>7} {'CIDEr-D':>8}" + (f" {'all four':>8}" if demo else "")
          + f" {'params':>12} {'s/step':>7}  budget")
    for r in rows:
        print(f"{r['experiment']:<4} {r['projector']:<12} {r['peft']:<5}" + (f" {r['seed']:>5}" if seeded else "")
              + f" {r['meteor']:>7.4f} {r['cider_d']:>8.4f}" + (f" {r['all_four']:>8.3f}" if demo else "")
              + f" {r['trainable_parameters']:>12,} {r['median_step_seconds']:>7.3f}  {r['budget']}")
    machines = {}
    for r in rows:
        machines.setdefault(r["machine"], []).append(run_label(r))
    print("machines: " + "; ".join(f"{machine} ({', '.join(runs)})" for machine, runs in machines.items()))
    if seeded:
        print(f"\n{SPREAD_HEADING}; a gap between two pairs that is not wider than these ranges is a draw:\n  "
              + "\n  ".join(spread_lines(pairs)))
    print("\n" + advice + "\n".join(notes))


def summarize(rows: list[dict], summary: Path, bertscore: bool, notes: list[str], accepted: list[str] = ()) -> None:
    """The summary files and the printed table of runs the grid may compare (check_comparable)."""
    notes = check_comparable(rows, accepted) + notes
    pairs = across_seeds(rows) if any("seed" in r for r in rows) else None
    comparison = lora_vs_dora(rows)
    advice = recommendation(comparison, rows, pairs)
    write_summary(rows, summary, bertscore, pairs, comparison, advice, notes)
    print_summary(rows, pairs, advice + ("" if bertscore else BERTSCORE_OFF + "\n"), notes)
    print(f"summary: {summary / 'report.html'}")
