"""What a token reduction saves at real size: a stage-2 training step and a prefill at Qwen3-8B's shapes with the
per-patch projector, all 4,608 visual tokens (8 frames x 576 patches of CLIP-L/14-336) against the K kept.

    python -m bench.reduction [--layers 2] [--keep 1152] [--method merge+divprune] [--json PATH]
    python -m bench.reduction --quick               # toy sizes: every code path once, in seconds

The random Qwen3 (the preset's widths, its first --layers decoder layers: per-layer costs stay, in less time) is
written once as a snapshot folder (bench/snapshots.py) and loaded as train.py loads it: NF4 base, LoRA r 16 on the
7 linears, activation checkpointing per layer; the projector is the MLP (LLaVA-1.5's, the bench's per-patch shape)
on seeded random features of the feature cache's fp16. For each setting, K = 4,608 (no reduction) and --keep:
- train: forward + backward + AdamW of preset.long_batch video(s) with a caption of preset.caption_tokens, bf16
  autocast (fp32 with --dtype fp32), as train.py's step;
- prefill: VLM.generate with one new token on --prefill-batch videos (bf16 weights, no autocast, as evaluate.py):
  projection, reduction, one pass over the prompt filling the KV cache, the first token;
- project: the projector and the reduction alone (what the reduction itself costs; DivPrune runs on the projector's
  output, C = 4,096 wide). Random features are worst-case for merging: no adjacent pair reaches the threshold, so
  DivPrune chooses among all 4,608.
Each figure is the median of timed repeats after warm-up (bench.workers.timed_repeats) with the peak memory over
them: CUDA's max_memory_allocated on a GPU, the process's peak resident set on the CPU (weights included; reset
between measurements through /proc/self/clear_refs). `bench_reduction(args)` returns the JSON-ready dict and
`add_parser(commands)` adds a `reduction` subcommand for bench/cli.py's build_parser.
"""
import argparse
import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bench.pruning import describe_cpu
from bench.snapshots import preset_for, write_snapshots
from bench.stacks import captions_of, features_of, ours_llm, stage2_vlm
from bench.standalone import run_alone
from bench.workers import model_flops, timed_repeats
from lora import after_optimizer_step
from pruning import REDUCTIONS
from vlm import IGNORE_INDEX

DEFAULT_LAYERS = 2  # of Qwen3-8B's 36: the per-layer costs, in minutes on a CPU


def measure_setting(vlm, preset, device, features, prefill_features, captions, autocast, repeats: int,
                    warmup: int) -> dict:
    """The three measurements of the module docstring for vlm's current token reduction."""
    optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-5)
    vlm.train()

    def train_step():
        with autocast:
            loss = vlm(features, captions)
        loss.backward()
        optimizer.step()
        after_optimizer_step(vlm.llm)
        optimizer.zero_grad(set_to_none=True)
    train = timed_repeats(preset, device, train_step, repeats, warmup)
    vlm.eval()
    with torch.no_grad():
        prefill = timed_repeats(preset, device, lambda: vlm.generate(prefill_features, max_new_tokens=1), repeats,
                                warmup)
        project = timed_repeats(preset, device, lambda: vlm.project(prefill_features), repeats, warmup)
    visual = vlm.num_visual_tokens(preset.frames, preset.patches)
    input_ids, labels = vlm.tokenize_batch(captions, visual)
    flops = model_flops(preset, len(captions), input_ids.shape[1], int((labels != IGNORE_INDEX).sum()))
    return {"visual_tokens": visual, "train_length": input_ids.shape[1], "prefill_length":
            len(vlm.template.prompt_ids(visual)), "train_step": train, "prefill": prefill, "project": project,
            "train_model_flops": flops}


def bench_reduction(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    preset = preset_for(args.preset, args.quick, args.layers or (None if args.quick else DEFAULT_LAYERS))
    repeats, warmup = args.repeats or preset.step_repeats, preset.warmup if args.warmup is None else args.warmup
    keep = args.keep if not args.quick else min(args.keep, preset.frames * preset.patches // 4)
    prefill_batch = args.prefill_batch or (preset.generate_batch if device.type == "cuda" else 1)
    started, load_start = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kovlm-reduction-") as temporary:
        folders = write_snapshots(preset, Path(args.snapshot_dir or temporary), device)
        vlm = stage2_vlm(preset, folders, device, "per-patch", ours_llm(folders, device, "lora"))
        features = features_of(preset, preset.long_batch, preset.patches, device)
        prefill_features = features_of(preset, prefill_batch, preset.patches, device)
        captions = captions_of(vlm, preset.long_batch, preset.caption_tokens)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
        settings = {}
        for method, tokens in ((args.method, keep), ("none", None)):
            vlm.config = replace(vlm.config, token_reduction=method, visual_tokens=tokens)
            name = "none" if method == "none" else f"{method} {tokens}"
            print(f"bench reduction: {name} ...", flush=True)
            settings[name] = measure_setting(vlm, preset, device, features, prefill_features, captions, autocast,
                                             repeats, warmup)
    reduced, full = settings.values()
    ratios = {part: {"time": round(full[part]["median_s"] / reduced[part]["median_s"], 2),
                     "peak_memory": round(full[part]["peak_mib"] / reduced[part]["peak_mib"], 2)}
              for part in ("train_step", "prefill")}
    command = getattr(args, "command_line", None) or "python -m bench " + " ".join(getattr(args, "argv", ["reduction"]))
    result = {"command": command,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else describe_cpu()["model"],
              "threads": torch.get_num_threads() if device.type == "cpu" else None, "preset": asdict(preset),
              "dtype": args.dtype, "long_batch": preset.long_batch, "prefill_batch": prefill_batch,
              "repeats": repeats, "warmup": warmup,
              "settings": settings, "all_over_reduced": ratios, "versions": {"torch": torch.__version__},
              "load_average": {"start": load_start, "end": os.getloadavg()}, "seconds": round(time.time() - started)}
    print_table(result)
    return result


def print_table(result: dict) -> None:
    print(f"\n{result['preset']['name']} on {result['device']}, per-patch projector (mlp), "
          f"{result['long_batch']} video per step, prefill of {result['prefill_batch']}")
    print(f"  {'visual tokens':<28}{'train step s':>13}{'peak MiB':>10}{'prefill s':>11}{'peak MiB':>10}"
          f"{'project s':>11}")
    for name, s in result["settings"].items():
        print(f"  {s['visual_tokens']:>5} ({name}){'':<{20 - len(name)}}{s['train_step']['median_s']:>13.3f}"
              f"{s['train_step']['peak_mib']:>10.0f}{s['prefill']['median_s']:>11.3f}{s['prefill']['peak_mib']:>10.0f}"
              f"{s['project']['median_s']:>11.3f}")
    print(f"  all tokens / reduced: {result['all_over_reduced']}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="qwen3-8b", choices=["qwen3-8b", "cpu-small"],
                        help="model shapes (bench/snapshots.py)")
    parser.add_argument("--layers", type=int, help=f"decoder layers kept of the preset's (default {DEFAULT_LAYERS} of "
                        "Qwen3-8B's 36; --quick: its 1)")
    parser.add_argument("--keep", type=int, default=1152, help="K, the visual tokens kept per video (a quarter; "
                        "--quick: at most a quarter of its tokens)")
    parser.add_argument("--method", default="merge+divprune", choices=[m for m in REDUCTIONS if m != "none"],
                        help="the reduction compared with none")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="the training step's autocast")
    parser.add_argument("--prefill-batch", type=int, help="videos per prefill (default: the preset's generate "
                        "batch on a GPU, 1 on the CPU)")
    parser.add_argument("--repeats", type=int, help="timed repeats of each measurement (default: the preset's)")
    parser.add_argument("--warmup", type=int, help="untimed runs first (default: the preset's)")
    parser.add_argument("--threads", type=int, help="torch threads on the CPU")
    parser.add_argument("--quick", action="store_true", help="toy sizes: every code path once, in seconds")
    parser.add_argument("--snapshot-dir", help="write (or reuse) the random snapshot here instead of a temporary "
                        "folder")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")


def add_parser(commands) -> None:
    """The `reduction` subcommand, for bench/cli.py's build_parser."""
    parser = commands.add_parser("reduction", help="training step and prefill at Qwen3-8B shapes, all 4,608 visual "
                                 "tokens vs a token reduction's K")
    add_arguments(parser)
    parser.set_defaults(run=bench_reduction)


if __name__ == "__main__":
    run_alone("bench.reduction", __doc__.splitlines()[0], add_arguments, bench_reduction)
