"""`python -m bench grid-estimate RESULTS_JSON`: the experiment plan's E1-E8 grid on one GPU, projected from a model
benchmark's measured step and generation times (`python -m bench model --preset qwen3-8b --json RESULTS_JSON`).

E1-E8 are {linear, mlp, cabstractor, perceiver} x {LoRA, DoRA} (experiments.py). Each runs stage 1 (projector only,
the LLM frozen; gradients still flow back through it: costed as a LoRA step, an upper bound) and stage 2
(projector + adapters), and validates after every epoch: greedy captions of the val split (and its loss, costed
as a third of a training step: forward only). linear and mlp feed 8 x 576 visual tokens (the per-patch shape),
cabstractor and perceiver 64 (the resampler shape). The frozen tower's features are computed once for every video
and cached (not costed here: one CLIP-L pass per frame, seconds for 550 videos on such a GPU).
"""
import json
import math
from pathlib import Path

GRID = [(projector, method) for projector in ("linear", "mlp", "cabstractor", "perceiver")
        for method in ("lora", "dora")]
SHAPE_OF = {"linear": "per-patch", "mlp": "per-patch", "cabstractor": "resampler", "perceiver": "resampler"}
GRID_TARGET_HOURS = 3.0  # on one H100-class GPU (the plan budgets 15-20 h on an A100)


def step_seconds(results: dict, shape: str, method: str) -> tuple[float, int]:
    """Ours' median training step at a shape and the videos it covers (the benchmark's batch)."""
    try:
        run = results["results"]["train"][shape][method]["ours"]
    except KeyError as missing:
        raise ValueError(f"the benchmark results lack train/{shape}/{method}/ours ({missing}); run "
                         f"`python -m bench model --preset qwen3-8b --tasks train,generate --json FILE`") from None
    return run["median_s"], run["batch"]


def captions_per_second(results: dict, method: str, variant: str) -> float:
    """Ours' measured captions/s for the method; LoRA's when only LoRA's generation was measured and the run is
    ours-merged (merged weights cost the same whichever adapters were folded in)."""
    generate = results["results"].get("generate", {})
    if variant == "ours-merged" and variant not in generate.get(method, {}):
        method = "lora"
    try:
        return generate[method][variant]["captions_per_s"]
    except KeyError as missing:
        raise ValueError(f"the benchmark results lack generate/{method}/{variant} ({missing}); run the model "
                         f"benchmark with --tasks generate") from None


def experiment_hours(results, projector, method, args, variant) -> dict:
    """One experiment's stage 1, stage 2 and validation hours."""
    shape = SHAPE_OF[projector]
    lora_step, batch = step_seconds(results, shape, "lora")
    method_step, _ = step_seconds(results, shape, method)
    steps = math.ceil(args.videos / batch)  # per epoch
    stage1 = args.stage1_epochs * steps * lora_step
    stage2 = args.stage2_epochs * steps * method_step
    epochs = args.stage1_epochs + args.stage2_epochs
    generation = args.val_videos / captions_per_second(results, method, variant)
    val_loss = math.ceil(args.val_videos / batch) * method_step / 3
    validation = epochs * (generation + val_loss)
    return {"experiment": projector + " + " + method, "stage1_h": stage1 / 3600, "stage2_h": stage2 / 3600,
            "validation_h": validation / 3600, "total_h": (stage1 + stage2 + validation) / 3600}


def merged_results(paths: list[Path]) -> dict:
    """One results dict from several model benchmark JSON files (e.g. train and generate run apart): their
    `results` merged task by task, the first file's device and preset."""
    merged = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        merged = {**data, **merged, "results": {**data.get("results", {}), **merged.get("results", {})}}
    return merged


def grid_estimate(args) -> dict:
    results = merged_results(args.results)
    layers = results.get("preset", {}).get("layers")
    rows = [experiment_hours(results, projector, method, args, args.generation) | {"name": f"E{i}"}
            for i, (projector, method) in enumerate(GRID, start=1)]
    total = sum(row["total_h"] for row in rows)
    print(f"E1-E8 on {results.get('device', 'the measured device')} ({results.get('preset', {}).get('name')}; "
          f"{args.videos} videos, {args.stage1_epochs} + {args.stage2_epochs} epochs, {args.val_videos} val videos "
          f"captioned after every epoch, generation run: {args.generation})")
    print("| exp | experiment | stage 1 (h) | stage 2 (h) | validation (h) | total (h) |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['name']} | {row['experiment']} | {row['stage1_h']:.2f} | {row['stage2_h']:.2f} | "
              f"{row['validation_h']:.2f} | {row['total_h']:.2f} |")
    judged = "quick" not in str(results.get("preset", {}).get("name")) and layers == 36
    verdict = ("met" if total <= GRID_TARGET_HOURS else "MISSED") if judged else "not judged: not the 36-layer model"
    print(f"grid: {total:.2f} h (target <= {GRID_TARGET_HOURS} h: {verdict})")
    if layers and layers != 36:
        print(f"note: measured with {layers} of Qwen3-8B's 36 layers or at toy sizes: hours for that model only")
    return {"source": [str(path) for path in args.results], "assumptions": {k: getattr(args, k) for k in (
        "videos", "val_videos", "stage1_epochs", "stage2_epochs", "generation")}, "rows": rows, "total_h": total,
        "target_h": GRID_TARGET_HOURS, "verdict": verdict}


def add_parser(commands) -> None:
    grid = commands.add_parser("grid-estimate", help="the E1-E8 grid's hours on one GPU, from a model benchmark JSON")
    grid.add_argument("results", nargs="+", type=Path,
                      help="`python -m bench model --json` files, together with train and generate measured")
    grid.add_argument("--videos", type=int, default=500, help="training videos (the plan's 500)")
    grid.add_argument("--val-videos", type=int, default=50, help="validation videos captioned after every epoch")
    grid.add_argument("--stage1-epochs", type=int, default=2)
    grid.add_argument("--stage2-epochs", type=int, default=5)
    grid.add_argument("--generation", choices=["ours", "ours-merged", "ours-eager"], default="ours",
                      help="which of ours' measured generation runs validation uses")
    grid.add_argument("--json", type=Path, help="also write the estimate to this JSON file")
    grid.set_defaults(run=grid_estimate)
