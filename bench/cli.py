"""Side-by-side benchmarks: kovlm against the transformers + PEFT + bitsandbytes stack, with ratios.

    python -m bench --preset cpu-small        # = python -m bench model --preset cpu-small; qwen3-8b on a GPU
    python -m bench model [--preset cpu-small|cpu-small-moe|qwen3-8b] [--quant nf4|int8]
                          [--tasks train,generate,loss,vision,memory] [--quick] [--json PATH]
    python -m bench memory [SNAPSHOT [--quant nf4|int8] [--device cuda]]
    python -m bench profile [--preset cpu-small|qwen3-8b] [--layers N] [--quick] [--json PATH]
    python -m bench grid-estimate RESULTS_JSON [--videos 500] [--val-videos 50]
    python -m bench adapters [--tokens 1024] [--repeats 7] [--dtype bf16] [--dropout 0.05] [--quick] [--json PATH]
    python -m bench adapters --norms [--repeats 7] [--threads 1] [--quick] [--json PATH]
    python -m bench probe [--projector cabstractor] [--attribute colour] [--cut stage1,readout] [--json PATH]
    python -m bench reduction [--layers 2] [--keep 1152] [--method merge+divprune] [--json PATH]
    python -m bench pruning [--tokens 4608] [--keep 1152] [--threads 1] [--json PATH]
    python -m bench loading SNAPSHOT [--quant nf4|int8] [--layers 2] [--full] [--json PATH]
    python -m bench rehearse [--layers 36] [--device cpu|cuda] [--dtype auto|bf16|fp32] [--keep DIR] [--json PATH]

`model` writes random weights with the preset's Qwen3 / CLIP shapes once to a temporary snapshot folder, so both
stacks load the same files the normal way, then measures, each in its own process (peak memory is per process):
a stage-2 training step (LoRA and DoRA, resampler and per-patch shapes), batched greedy generation, one caption-loss
computation (label-only vs full logits, T ≈ 4700) and two epochs of the vision side (feature cache vs re-encoding).
Before timing, every reference process checks that its per-label losses (dropout off) agree with ours.
`adapters` compares one adapted NF4 linear at Qwen3-8B's layer shapes (with --norms: what holding DoRA's norm
saves). `probe` (bench/probe.py) is not a comparison: it trains linear heads at cuts inside a projector on the
embedded default's cached features, to see where an attribute is lost. `pruning` (bench/pruning.py) times DivPrune
against one CLIP-L frame. `loading` (bench/loading.py) times reading, quantizing and placing a snapshot's linear
weights from a cold page cache. `rehearse` (bench/rehearse.py) runs the user's commands (train, evaluate, caption,
export) as subprocesses on random snapshots of CLIP-L/336 and Qwen3-8B at their published sizes, with each command's
exit status, time and peak memory.

Each subcommand is one function taking the parsed arguments and returning a JSON-ready dict. transformers and PEFT
are test-only references of kovlm: only this benchmark (and the tests) import them.
Timings on a shared machine are noisy: `adapters` runs each method once per round, round-robin, and gives the
median and the fastest round; `model` gives medians and records the load average.
"""
import argparse
import importlib.metadata
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bench import grid, loading, probe
from bench import pruning as pruning_bench
from bench import reduction, rehearse
from bench.adapters import bench_adapters
from bench.memory import bench_memory
from bench.profile import bench_profile
from bench.snapshots import PRESETS, preset_for
from bench.stacks import METHODS, SHAPES, STACKS
from bench.table import model_rows, print_model_table
from bench.workers import DTYPES, WORKERS, measure_one

# cli.py is the command line and the worker processes; the parts live beside it: adapters.py (the adapters
# subcommand), snapshots.py (presets, random snapshot folders), stacks.py (ours and the reference, the parity
# check), workers.py (one measurement each), table.py (rows, ratios, targets), memory.py (the LM's weights, one
# snapshot's load), step_memory.py (where a training step's memory goes: --tasks memory, not run by default).
TASKS = ("train", "generate", "loss", "vision", "memory")
# generation runs: (name in the results, stack, variant); ours' decode step as a CUDA graph (on a GPU) first
GENERATE_RUNS = (("ours", "ours", "graphs"), ("ours-eager", "ours", "eager"), ("ours-merged", "ours", "merged"),
                 ("reference", "reference", "graphs"))


# ---- the parent: one worker process per measurement, then the table ---------------------------------------------
def run_worker(args, task: str, **options) -> dict:
    """One measurement in a process of its own (peak RSS is per process and only grows), its result back as JSON;
    with --inline, in this process (the quick test's speed; its memory figures then mean nothing).

    On the CPU it is forked from a fork server that imported this module once (torch and bitsandbytes take ~10 s on
    a busy 2-core machine) and never computes, so no thread pool is forked mid-use. On a GPU it is spawned, a fresh
    interpreter: no CUDA state is ever forked."""
    flags = ["--task", task, "--preset", args.preset, "--root", str(args.root), "--dtype", args.dtype]
    flags += (["--quick"] if args.quick else []) + (["--threads", str(args.threads)] if args.threads else [])
    flags += (["--layers", str(args.layers)] if args.layers else []) + ["--quant", args.quant]
    for key, value in options.items():
        flags += [f"--{key.replace('_', '-')}", str(value)] if value is not None else []
    if args.inline:
        return measure_one(build_parser().parse_args(["_one", *flags]))
    print(f"bench: {task} {' '.join(str(v) for v in options.values() if v is not None and len(str(v)) < 12)}",
          flush=True)
    context = multiprocessing.get_context("spawn" if torch.cuda.is_available() else "forkserver")
    context.set_forkserver_preload([__name__])
    receiver, sender = context.Pipe(duplex=False)
    log = Path(args.root) / "workers.log"
    process = context.Process(target=worker_process, args=(flags, sender, log))
    process.start()
    sender.close()
    try:
        result = json.loads(receiver.recv())
    except EOFError:
        result = {"error": f"the process died (exit code {process.join() or process.exitcode})"}
    process.join()
    if "error" in result:
        raise SystemExit(f"bench: `python -m bench _one {' '.join(flags)}` failed: {result['error']}\n"
                         f"the end of its output:\n{log.read_text()[-3000:]}")
    brief = {key: value for key, value in result.items() if not isinstance(value, list)}
    print(f"bench:   {json.dumps(brief)[:400]}", flush=True)  # each result as it comes: a long run cut short keeps them
    return result


def worker_process(flags: list[str], sender, log: Path) -> None:
    """The body of a worker process: its output goes to `log`, its result or error through the pipe."""
    with open(log, "a") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            result = measure_one(build_parser().parse_args(["_one", *flags]))
        except BaseException as error:  # the parity check's SystemExit too
            traceback.print_exc()
            result = {"error": f"{type(error).__name__}: {error}"}
        sys.stdout.flush()
        sender.send(json.dumps(result))


def run_measurements(args, tasks: list[str]) -> dict:
    """Ours first, then the reference stacks given ours' per-label losses: each checks that its own agree before
    it times anything."""
    run_worker(args, "snapshot")
    results, root = {}, Path(args.root)
    if "train" in tasks:
        results["train"] = {shape: {method: {} for method in args.methods} for shape in args.shapes}
        for shape in args.shapes:  # ours' LoRA and DoRA back to back: their ratio's target is the tightest
            for stack in args.stacks:
                for method in args.methods:
                    expect = root / f"expect-train-{shape}-{method}.json"
                    results["train"][shape][method][stack] = run_stack(args, "train", stack, expect, method=method,
                                                                       shape=shape)
    if "memory" in tasks:  # where a training step's memory goes, each stack profiled alike (bench/step_memory.py)
        results["memory"] = {shape: {method: {stack: run_stack(args, "memory", stack, root / f"expect-train-{shape}-"
                                                               f"{method}.json", method=method, shape=shape)
                                              for stack in args.stacks} for method in args.methods}
                             for shape in args.shapes}
    if "generate" in tasks:
        results["generate"] = {}
        for method in args.methods:  # ours (CUDA graphs on a GPU) first: the others' captions are compared with it
            expect = root / f"expect-generate-{method}.json"
            results["generate"][method] = {
                name: run_stack(args, "generate", stack, expect, method=method, variant=variant)
                for name, stack, variant in GENERATE_RUNS if stack in args.stacks and name in args.generate_runs}
    if "loss" in tasks:
        results["loss"] = {variant: run_worker(args, "loss", variant=variant)
                           for variant in ("label-only", "full-logits")}
    if "vision" in tasks:
        results["vision"] = run_worker(args, "vision")
    return results


def run_stack(args, task: str, stack: str, expect: Path, **options) -> dict:
    """One stack's measurement: ours writes its per-label losses to `expect`, a reference stack is checked
    against them there. Generation: the first run writes its captions beside them and each later one reports the
    fraction of rows equal to them (greedy_equal); eager decoding must equal the CUDA-graph step's exactly, and in
    fp32 so must the reference's."""
    first = stack == "ours" and options.get("variant") in (None, "graphs", "label-only")
    result = run_worker(args, task, stack=stack, **options, expect=None if stack == "ours" else expect)
    losses, captions = result.pop("label_losses"), result.pop("captions", None)
    if first:
        expect.write_text(json.dumps(losses))
    if captions is None:
        return result
    captions_file = expect.with_suffix(".captions.json")
    if first:
        captions_file.write_text(json.dumps(captions, ensure_ascii=False))
        return result
    ours = json.loads(captions_file.read_text())
    result["greedy_equal"] = sum(a == b for a, b in zip(captions, ours)) / len(ours)
    exact = options.get("variant") == "eager" or (stack != "ours" and args.dtype == "fp32")
    if exact and result["greedy_equal"] < 1:
        raise SystemExit(f"bench: {stack} {options.get('variant')} generation: greedy captions differ from ours "
                         f"in {1 - result['greedy_equal']:.0%} of the rows; they must be equal here")
    return result


def worker_results(results: dict) -> list[dict]:
    """Every worker's result dict inside the nested results."""
    if "load_average" in results:
        return [results]
    return [found for value in results.values() if isinstance(value, dict) for found in worker_results(value)]


def describe_device(device, threads: int | None) -> str:
    """The GPU's name, or the CPU's model, its cores and the torch threads used."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"CPU {model}, {os.cpu_count()} cores, {threads or torch.get_num_threads()} torch threads"


def bench_model(args) -> dict:
    """kovlm against transformers + PEFT + bitsandbytes on the preset's random Qwen3 / CLIP, with ratios."""
    preset = preset_for(args.preset, args.quick, args.layers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.preset == "qwen3-8b" and not args.quick and device.type != "cuda":
        raise SystemExit("bench: the qwen3-8b preset needs a CUDA GPU (16 GB of weights, hours on a CPU); "
                         "use --preset cpu-small here")
    load_start, started = os.getloadavg(), time.time()
    with tempfile.TemporaryDirectory(prefix="kovlm-bench-") as temporary:
        args.root = Path(args.snapshot_dir or temporary)
        args.root.mkdir(parents=True, exist_ok=True)
        results = run_measurements(args, args.tasks)
    if args.quant != "nf4":
        preset = replace(preset, name=f"{preset.name}, {args.quant}")  # the table's preset column names it
    rows = model_rows(preset, results, device)
    print_model_table(rows, judged=not args.quick)
    loads = sorted(value["load_average"][0] for value in worker_results(results))
    print(f"{describe_device(device, args.threads)}; 1-minute load average at the end of each measurement "
          f"{loads[0]:.1f} to {loads[-1]:.1f}; {time.time() - started:.0f} s")
    memory = "CUDA max_memory_allocated" if device.type == "cuda" else \
        "peak RSS (VmHWM, reset before the timed repeats) of the measurement's own process"
    versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "peft", "bitsandbytes")}
    return {"command": "python -m bench " + " ".join(args.argv), "device": describe_device(device, args.threads),
            "versions": versions | {"python": platform.python_version()}, "preset": asdict(preset),
            "quant": args.quant, "dtype": args.dtype, "memory": memory,
            "isolation": "inline (one process)" if args.inline else "one process per measurement",
            "load_average": {"start": load_start, "end": os.getloadavg()}, "seconds": round(time.time() - started),
            "rows": rows, "results": results}


def comma_list(choices):
    """An argparse type: a comma-separated subset of `choices`, refused by name otherwise."""
    def parse(text: str) -> list[str]:
        unknown = [item for item in text.split(",") if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: choose from {', '.join(choices)}")
        return text.split(",")
    return parse


def build_parser() -> argparse.ArgumentParser:
    """`adapters`, `model` (the default command) and the internal `_one` (one measurement, run by `model`)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)  # options every subcommand takes
    common.add_argument("--quick", action="store_true", help="toy sizes, one round: keeps the script working")
    common.add_argument("--json", type=Path, help="also write the results to this JSON file")
    common.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="compute dtype (autocast)")
    common.add_argument("--layers", type=int, help="keep the preset's first N decoder layers (same widths): the "
                        "per-layer costs in less time; the table names it")
    common.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core); on a shared "
                        "CPU use the cores that are free: threads waiting on a busy core stall every op")
    commands = parser.add_subparsers(dest="command", required=True)
    adapters = commands.add_parser("adapters", parents=[common],
                                   help="LoRA / DoRA training step: ours vs PEFT on NF4 linears")
    adapters.add_argument("--tokens", type=int, default=1024, help="tokens per micro-batch")
    adapters.add_argument("--repeats", type=int, default=7, help="timed rounds (the median is reported)")
    adapters.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    adapters.add_argument("--r", type=int, default=16, help="adapter rank (alpha = 2r, the project's s = 2)")
    adapters.add_argument("--dropout", type=float, default=0.05, help="adapter dropout (the project's default)")
    adapters.add_argument("--norms", action="store_true", help="instead: DoRA's norm formed in every forward vs "
                          "held (lora.held_dora_norms), in a generation and a training window of a small NF4 Qwen3")
    adapters.set_defaults(run=bench_adapters)
    model = commands.add_parser("model", parents=[common], help="training step, generation, loss, vision side: "
                                "ours vs transformers + PEFT + bitsandbytes (the default command)")
    model.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    model.add_argument("--quant", choices=["nf4", "int8"], default="nf4", help="the LM's quantization in both "
                       "stacks: NF4 with double-quantized statistics, or LLM.int8 (bitsandbytes' load_in_8bit)")
    model.add_argument("--tasks", type=comma_list(TASKS), default=list(TASKS[:-1]), help="a subset, comma-separated: "
                       + ",".join(TASKS) + " (default: all but memory)")
    model.add_argument("--shapes", type=comma_list(SHAPES), default=list(SHAPES),
                       help="training shapes, comma-separated: " + ",".join(SHAPES))
    model.add_argument("--methods", type=comma_list(METHODS), default=list(METHODS),
                       help="adapters, comma-separated: " + ",".join(METHODS))
    model.add_argument("--stacks", type=comma_list(STACKS), default=list(STACKS),
                       help="stacks, comma-separated, ours first: " + ",".join(STACKS))
    model.add_argument("--generate-runs", type=comma_list([name for name, _, _ in GENERATE_RUNS]),
                       default=[name for name, _, _ in GENERATE_RUNS],
                       help="generation runs, comma-separated, ours first: " + ",".join(n for n, _, _ in GENERATE_RUNS))
    model.add_argument("--snapshot-dir", type=Path, help="keep the random snapshot folders here and reuse them "
                                                          "(default: a temporary folder, removed at the end)")
    model.add_argument("--inline", action="store_true", help="run every measurement in this process (tests)")
    model.set_defaults(run=bench_model)
    profiler = commands.add_parser("profile", parents=[common], help="torch.profiler summary of ours' training "
                                   "step and decode step: top ops, kernel launches, synchronisations")
    profiler.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    profiler.add_argument("--snapshot-dir", type=Path, help="reuse (or keep) the random snapshot folders here")
    profiler.set_defaults(run=bench_profile)
    grid.add_parser(commands)
    probe.add_parser(commands)
    pruning_bench.add_parser(commands)
    reduction.add_parser(commands)
    rehearse.add_parser(commands)
    loading.add_parser(commands)
    memory = commands.add_parser("memory", help="Qwen3 0.6B-32B and 30B-A3B x nf4/int8/bf16: weights and the "
                                 "estimated training peak (computed); with a snapshot folder, its load measured")
    memory.add_argument("path", nargs="?", help="a Qwen3 snapshot folder to load and measure")
    memory.add_argument("--json", type=Path, help="also write the results to this JSON file")
    memory.add_argument("--quant", choices=["nf4", "int8"], default=None)
    memory.add_argument("--device", default="cpu")
    memory.set_defaults(run=bench_memory)
    one = commands.add_parser("_one", parents=[common], help="internal: one measurement, printed as JSON")
    one.add_argument("--task", choices=sorted(WORKERS), required=True)
    one.add_argument("--preset", choices=sorted(PRESETS), required=True)
    one.add_argument("--root", required=True, help="the folder holding llm/ and clip/")
    one.add_argument("--stack", choices=STACKS, default="ours")
    one.add_argument("--quant", choices=["nf4", "int8"], default="nf4")
    one.add_argument("--method", choices=METHODS, default="lora")
    one.add_argument("--shape", choices=sorted(SHAPES), default="resampler")
    one.add_argument("--variant", choices=["label-only", "full-logits", "graphs", "eager", "merged"],
                     default="label-only", help="loss: label-only or full-logits; generate: ours' decoding")
    one.add_argument("--expect", help="a JSON file of ours' per-label losses: refuse to time when this stack's differ")
    one.set_defaults(run=measure_one)
    return parser


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["model", *argv]  # `python -m bench --preset cpu-small` is `python -m bench model --preset cpu-small`
    args = build_parser().parse_args(argv)
    args.argv = argv
    if getattr(args, "stacks", ["ours"])[0] != "ours" or getattr(args, "generate_runs", ["ours"])[0] != "ours":
        raise SystemExit("bench: --stacks and --generate-runs must start with ours: the others are checked "
                         "against its losses and captions")
    if args.command == "model" and args.json is None:
        args.json = Path("bench_results.json")  # not a set_defaults: --json is one action shared by the subcommands
    result = args.run(args)
    if args.command == "_one":
        print(json.dumps(result))
    elif args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False))
        print(f"wrote {args.json}")
    return result

