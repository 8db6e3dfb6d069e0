"""DivPrune's cost at CLIP-L x 8 frames against one frame through a CLIP-L tower (issue 33: "well under a tower
forward of one frame").

    python -m bench.pruning [--tokens 4608] [--dim 1024] [--keep 1152] [--threads 1] [--json PATH]

Times `pruning.divprune` on random tokens (N = 8 frames x 576 patches, D = CLIP-L's width; its (N, N) distance
matrix alone as well) and one forward of a random-weight transformers CLIPVisionModel with ViT-L/14-336's config
(24 layers, width 1024, 577 tokens; 1 image, fp32, no grad): the medians of --rounds timed rounds, each run once
per round, in turn, after one untimed run of each DivPrune part (of the tower too with --warm-tower). On the CPU
with --threads torch threads; on a GPU when one is present.
`bench_pruning(args)` returns the JSON-ready dict and `add_parser(commands)` adds a `pruning` subcommand, for
bench/cli.py to call like its other parts (`python -m bench pruning` once it does).
"""
import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from bench.standalone import run_alone
from pruning import cosine_distances, divprune

# ViT-L/14-336 (openai/clip-vit-large-patch14-336, vision_config): the tower kovlm's real runs use
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


def round_robin_seconds(runs: dict, device: torch.device, rounds: int, warm: tuple[str, ...]) -> dict:
    """The `warm` runs once untimed, then `rounds` rounds of each run once, in turn (a shared machine's load drifts;
    all runs see the same drift): {name: {"wall": seconds per round, "cpu": this process's CPU seconds per round}},
    the GPU's queue drained around each run. With one thread on a busy machine the CPU seconds are the steadier."""
    for name in warm:
        runs[name]()
    times = {name: {"wall": [], "cpu": []} for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name]["wall"].append(time.perf_counter() - start)
            times[name]["cpu"].append(time.process_time() - start_cpu)
    return times


def describe_cpu() -> dict:
    """The CPU's model name and the vector / matrix extensions that decide fp32 GEMM speed."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = info.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return {"model": model, "cores": os.cpu_count(), "flags": [flag for flag in CPU_FLAGS if flag in flags]}


def clip_l_tower(device: torch.device) -> torch.nn.Module:
    """A random-weight transformers CLIPVisionModel with ViT-L/14-336's shapes, fp32, eval."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(**CLIP_L_336)).to(device).eval()


def bench_pruning(args) -> dict:
    """Median seconds of divprune (and of its distance matrix) and of one CLIP-L frame, and their ratio."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    load_start, started = os.getloadavg(), time.time()
    tokens = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(0)).to(device)
    build_start = time.perf_counter()
    tower = clip_l_tower(device)
    build_s = time.perf_counter() - build_start
    image = torch.randn(1, 3, CLIP_L_336["image_size"], CLIP_L_336["image_size"], device=device)
    with torch.no_grad():
        times = round_robin_seconds({"divprune": lambda: divprune(tokens, args.keep),
                                     "distance_matrix": lambda: cosine_distances(tokens[None]),
                                     "tower_frame": lambda: tower(pixel_values=image)}, device, args.rounds,
                                    warm=("divprune", "distance_matrix", "tower_frame") if args.warm_tower else
                                    ("divprune", "distance_matrix"))
    median = {name: {clock: statistics.median(values) for clock, values in clocks.items()}
              for name, clocks in times.items()}
    divprune_s, matrix_s, tower_s = (median[name]["wall"] for name in ("divprune", "distance_matrix", "tower_frame"))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else describe_cpu()["model"]
    result = {
        "command": getattr(args, "command_line", None) or "python -m bench " + " ".join(args.argv),
        "device": device_name, "cpu": describe_cpu(),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "shapes": {"tokens": args.tokens, "dim": args.dim, "keep": args.keep, "tower": CLIP_L_336,
                   "tower_input": "1 image, fp32, no grad"},
        "median_s": {name: {clock: round(value, 4) for clock, value in clocks.items()}
                     for name, clocks in median.items()},
        "rounds_s": {name: {clock: [round(t, 4) for t in values] for clock, values in clocks.items()}
                     for name, clocks in times.items()},
        "tower_build_s": round(build_s, 2), "tower_attention": tower.config._attn_implementation,
        "divprune_per_tower_frame": {clock: round(median["divprune"][clock] / median["tower_frame"][clock], 4)
                                     for clock in ("wall", "cpu")},
        "load_average": {"start": load_start, "end": os.getloadavg()}, "seconds": round(time.time() - started),
    }
    print(f"divprune N={args.tokens} D={args.dim} keep={args.keep}: {divprune_s:.3f} s wall "
          f"(distance matrix {matrix_s:.3f} s); one CLIP-L frame: {tower_s:.3f} s wall; ratio "
          f"{result['divprune_per_tower_frame']} on {device_name} ({result['threads']} threads)")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=4608, help="N: tokens into DivPrune (8 frames x 576 patches)")
    parser.add_argument("--dim", type=int, default=1024, help="D: token width (CLIP-L's)")
    parser.add_argument("--keep", type=int, default=1152, help="tokens DivPrune keeps (a quarter)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, each run once per round (medians)")
    parser.add_argument("--warm-tower", action="store_true", help="an untimed tower forward first (seconds on a CPU; "
                        "its first-call cost is small beside the forward)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")


def add_parser(commands) -> None:
    """The `pruning` subcommand, for bench/cli.py's build_parser."""
    parser = commands.add_parser("pruning", help="DivPrune at CLIP-L x 8 frames vs one CLIP-L frame's forward")
    add_arguments(parser)
    parser.set_defaults(run=bench_pruning)


if __name__ == "__main__":
    run_alone("bench.pruning", __doc__.splitlines()[0], add_arguments, bench_pruning)
