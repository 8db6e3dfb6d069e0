"""`python -m bench rehearse`: the user's commands at real size, each measured as a process of its own.

    python -m bench rehearse [--layers 36] [--clip-layers 24] [--device cpu|cuda] [--dtype auto|bf16|fp32]
                             [--new-tokens 16] [--keep DIR] [--json PATH]

Writes random-weight snapshot folders with the published configs of openai/clip-vit-large-patch14-336 (the full
CLIPModel checkpoint, one fp32 model.safetensors, and its preprocessor_config.json) and Qwen/Qwen3-8B (bf16 shards
of up to 4 GB with an index, tokenizer.json with Qwen3's special tokens at their ids), tensor by tensor
(snapshots.write_clip_l_336 / write_qwen3_8b); then 4 short synthetic Korean-captioned videos and their JSONL
manifest; then runs, as subprocesses from the repository root, what README.md tells a user to type:

    train            train.py, perceiver + DoRA, 1 + 1 epochs, batch 1 (its end-of-training test evaluation too)
    train-per-patch  train.py, linear projector (8 x 576 = 4,608 visual tokens), --max-steps 1
    evaluate         evaluate.py best_model.pt --split test
    caption          caption.py best_model.pt VIDEOS
    export           export.py best_model.pt --output DIR
    caption-export   caption.py DIR VIDEOS

For each: exit status, wall time, peak RSS, the LM's load, step times and GPU memory (see measure_command).
Writes results/rehearsal_<device>.json (results/rehearsal_<device>_<N>layers.json for a shallower run) and prints
a table. --keep DIR keeps the snapshot folders (a second run reuses them) and each run's outputs, in DIR/run-DATE.
"""
import argparse
import csv
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.processes import SAMPLE_SECONDS, run_measured
from bench.pruning import describe_cpu
from bench.snapshots import QWEN3_8B, write_clip_l_336, write_qwen3_8b

REPO = Path(__file__).resolve().parents[1]
WRITER_VERSION = 1  # in each snapshot folder's marker: bump it when the writers change
COMMAND_NAMES = ("train", "train-per-patch", "evaluate", "caption", "export", "caption-export")
VIDEOS = [({"colour": "red", "shape": "circle", "motion": "right", "background": "black"}, "train"),
          ({"colour": "blue", "shape": "square", "motion": "left", "background": "white"}, "train"),
          ({"colour": "yellow", "shape": "triangle", "motion": "up", "background": "gray"}, "val"),
          ({"colour": "green", "shape": "star", "motion": "down", "background": "skyblue"}, "test")]


# ---- the inputs: snapshots, videos, manifest ---------------------------------------------------------------------
def cached_folder(folder: Path, spec: dict, write) -> Path:
    """`folder` written by write(temporary folder) -> dict under a temporary name and renamed when complete; a
    folder whose marker matches `spec` is reused (an interrupted write is never mistaken for a finished one)."""
    marker = folder / "rehearsal.json"
    if marker.is_file() and json.loads(marker.read_text())["spec"] == spec:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    temporary = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    started = time.perf_counter()
    written = write(temporary)
    (temporary / "rehearsal.json").write_text(json.dumps(
        {"spec": spec, "written": written, "seconds": round(time.perf_counter() - started, 1)}, indent=1))
    os.replace(temporary, folder)
    return folder


def prepare_snapshots(root: Path, layers: int, clip_layers: int, llm_overrides: dict | None = None) -> dict[str, Path]:
    """The random CLIP-L/336 and Qwen3-8B folders under root, written once per (layers, clip_layers, overrides of
    Qwen3-8B's config.json: the CI test's narrower LM)."""
    root.mkdir(parents=True, exist_ok=True)
    clip = cached_folder(root / f"clip-vit-large-patch14-336-{clip_layers}layers",
                         {"version": WRITER_VERSION, "vision_layers": clip_layers},
                         lambda folder: write_clip_l_336(folder, clip_layers))
    cut = "".join(f"-{key}{value}" for key, value in sorted((llm_overrides or {}).items()))
    llm = cached_folder(root / f"Qwen3-8B-{layers}layers{cut}",
                        {"version": WRITER_VERSION, "layers": layers, "overrides": llm_overrides or {}},
                        lambda folder: write_qwen3_8b(folder, layers, overrides=llm_overrides))
    return {"clip": clip, "llm": llm}


def write_videos(folder: Path) -> Path:
    """4 videos of 2 s (16 frames at 8 fps, 64 x 64: a shape moving over a background) and manifest.jsonl with two
    Korean captions each (synth.py's grammar) and their splits: 2 train, 1 val, 1 test."""
    from demo.synth import CAPTION_TEMPLATES, caption_choices, make_caption, render_video, write_video
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    lines = []
    for k, (attributes, split) in enumerate(VIDEOS):
        video = write_video(render_video(attributes, np.random.default_rng(k), 64, 16), folder / "videos" / f"v{k}.mp4")
        words = {slot: choices[0] for slot, choices in caption_choices(attributes).items()}
        captions = [make_caption(template, words) for template in CAPTION_TEMPLATES[:2]]
        lines.append(json.dumps({"id": f"v{k}", "video": f"videos/{video.name}", "captions": captions, "split": split},
                                ensure_ascii=False))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"


# ---- the commands ------------------------------------------------------------------------------------------------
@dataclass
class Command:
    name: str
    argv: list[str]               # as typed: "python" (run as this interpreter), the script, its options
    lm_folder: Path               # the LM snapshot this command reads (its *.safetensors mark the load)
    needs: list[Path] = field(default_factory=list)     # inputs an earlier command writes
    outputs: list[str] = field(default_factory=list)    # glob patterns (from the work folder) that must match
    run_dir: Path | None = None   # a train.py run folder: its logs/training_log.csv gives the step times


def user_commands(work: Path, clip: Path, llm: Path, manifest: Path, dtype: str = "auto",
                  new_tokens: int = 16) -> list[Command]:
    """README.md's commands on the rehearsal's inputs, every output in a fresh folder under `work`."""
    runs, cache, videos = work / "runs", work / "cache", manifest.parent / "videos"
    base = ["--clip", str(clip), "--llm", str(llm), "--train-manifest", str(manifest), "--stage1-epochs", "1",
            "--stage2-epochs", "1", "--batch-size", "1", "--grad-accum", "1", "--max-new-tokens", str(new_tokens),
            "--cache-dir", str(cache)] + ([] if dtype == "auto" else ["--dtype", dtype])
    best, export = runs / "perceiver_dora" / "checkpoints" / "best_model.pt", work / "export"
    tokens = ["--max-new-tokens", str(new_tokens)]
    return [
        Command("train", ["python", "train.py", *base, "--projector", "perceiver", "--peft", "dora", "--output-dir",
                          str(runs / "perceiver_dora")], llm,
                outputs=["runs/perceiver_dora/checkpoints/best_model.pt", "runs/perceiver_dora/checkpoints/"
                         "final_model.pt", "runs/perceiver_dora/**/predictions.json"], run_dir=runs / "perceiver_dora"),
        Command("train-per-patch", ["python", "train.py", *base, "--projector", "linear", "--peft", "dora",
                                    "--max-steps", "1", "--output-dir", str(runs / "linear_dora")], llm,
                outputs=["runs/linear_dora/checkpoints/training_state.pt"], run_dir=runs / "linear_dora"),
        Command("evaluate", ["python", "evaluate.py", str(best), "--split", "test", "--output-dir", str(work / "eval"),
                             *tokens], llm, needs=[best], outputs=["eval/**/predictions.json"]),
        Command("caption", ["python", "caption.py", str(best), str(videos), "--output",
                            str(work / "captions" / "captions.jsonl"), *tokens], llm, needs=[best],
                outputs=["captions/captions.jsonl"]),
        Command("export", ["python", "export.py", str(best), "--output", str(export)], llm, needs=[best],
                outputs=["export/config.json", "export/model.safetensors.index.json", "export/kovlm.json"]),
        Command("caption-export", ["python", "caption.py", str(export), str(videos), "--output",
                                   str(work / "captions-export" / "captions.jsonl"), *tokens], export,
                needs=[export / "kovlm.json"], outputs=["captions-export/captions.jsonl"]),
    ]


# ---- one command, measured ---------------------------------------------------------------------------------------
def step_times(run_dir: Path | None) -> dict | None:
    """Median step seconds and tokens/s per stage from a run's logs/training_log.csv."""
    log = run_dir / "logs" / "training_log.csv" if run_dir else None
    if not log or not log.is_file():
        return None
    rows = [row for row in csv.DictReader(log.open()) if row.get("step_seconds")]
    stages = sorted({row["stage"] for row in rows})
    return {f"stage{stage}": {"steps": len(of), "median_s": round(statistics.median(float(r["step_seconds"])
                                                                                      for r in of), 2),
                              "tokens_per_s": round(statistics.median(float(r["tokens_per_s"]) for r in of), 3)}
            for stage in stages for of in [[r for r in rows if r["stage"] == stage]]}


def reported_figures(lines: list, run_dir: Path | None) -> dict:
    """What the command itself printed about memory and the LM's load (None where it printed nothing)."""
    text = "\n".join(line for _, line in lines)
    memory = re.findall(r"peak (GPU memory|RSS) ([\d.]+) GiB", text)
    load = re.findall(r"(?im)^.*\b(?:qwen3|llm|lm)\b.*\bload\w*\b.*?\b([\d.]+) ?s\b.*$", text)
    bar = re.findall(r"(?im)^.*\b(?:qwen3|llm|lm)\b.*100%\|.*\[(?:(\d+):)?(\d+):(\d+)<", text)
    summary = run_dir / "logs" / "train_summary.json" if run_dir else None
    figures = {"peak_memory_gib": float(memory[-1][1]) if memory else None,
               "peak_memory_kind": memory[-1][0] if memory else None,
               "lm_load_s": float(load[-1]) if load else
               (int(bar[-1][0] or 0) * 3600 + int(bar[-1][1]) * 60 + int(bar[-1][2])) if bar else None}
    if summary and summary.is_file():
        figures["train_summary_peak_gib"] = json.loads(summary.read_text()).get("peak_memory_gib")
    return figures


def measure_command(command: Command, work: Path, env: dict, cuda: bool, echo: bool = True,
                    timeout: float | None = None) -> dict:
    """Run one command from the repository root (processes.run_measured: peak RSS from os.wait4, the rest from
    /proc) and add what its files tell: `lm_files_open_s`, the intervals in which a weight file of the LM folder
    was mapped or open (reading and quantizing happen inside them; a second interval is a second read of the LM),
    the step times of a training run, and the figures the command printed itself."""
    missing = [str(path) for path in command.needs if not path.exists()]
    if missing:
        return {"name": command.name, "command": " ".join(command.argv), "skipped": f"needs {', '.join(missing)}"}
    lm_files = {str(path) for path in command.lm_folder.glob("model*.safetensors")}  # not projector.safetensors
    log = work / "logs" / f"{command.name}.log"
    run = run_measured([sys.executable, *command.argv[1:]], cwd=REPO, env=env, log=log, watched=lm_files, cuda=cuda,
                       echo=f"[{command.name}]" if echo else None, timeout=timeout)
    lines, rss, lm_open = run.pop("lines"), run.pop("rss"), run.pop("watched_open_s")
    after_read = next((kib for t, kib in rss if lm_open and t >= lm_open[0][1]), None)
    return {"name": command.name, "command": " ".join(command.argv)} | run | {
        "lm_files_open_s": lm_open, "lm_reads": len(lm_open),
        "rss_after_first_lm_read_gib": round(after_read / 2**20, 3) if after_read else None,
        "steps": step_times(command.run_dir), "reported": reported_figures(lines, command.run_dir),
        "outputs_missing": [pattern for pattern in command.outputs if not list(work.glob(pattern))],
        "log": str(log), "last_lines": [text for _, text in lines[-8:]]}


# ---- the whole rehearsal -----------------------------------------------------------------------------------------
def print_table(rows: list[dict]) -> None:
    print("| command | exit | wall (s) | first output (s) | LM files open (s) | peak RSS (GiB) | RSS after LM read "
          "(GiB) | GPU (MiB) | median step (s) |\n|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "skipped" in row:
            print(f"| {row['name']} | skipped: {row['skipped']} | | | | | | | |")
            continue
        opened = ", ".join(f"{b - a:.0f}" for a, b in row["lm_files_open_s"]) or "-"
        steps = ", ".join(f"{stage} {s['median_s']}" for stage, s in (row["steps"] or {}).items()) or "-"
        peak = "killed" if row["peak_rss_gib"] is None else f"{row['peak_rss_gib']:.2f}"
        print(f"| {row['name']} | {row['exit_status']} | {row['wall_s']:.0f} | {row['first_output_s']} | {opened} | "
              f"{peak} | {row['rss_after_first_lm_read_gib']} | {row['gpu_used_max_mib'] or '-'} | {steps} |")


def rehearse(root: Path, work: Path, *, layers: int, clip_layers: int, device: str, dtype: str = "auto",
             new_tokens: int = 16, commands=COMMAND_NAMES, echo: bool = True, timeout: float | None = None,
             llm_overrides: dict | None = None) -> dict:
    """Snapshots (under root, reused), videos and the commands' outputs (under work); every command measured."""
    started = time.perf_counter()
    folders = prepare_snapshots(root, layers, clip_layers, llm_overrides)
    manifest = write_videos(work / "data")
    env = os.environ | ({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})
    rows = []
    for command in user_commands(work, folders["clip"], folders["llm"], manifest, dtype, new_tokens):
        if command.name in commands:
            if echo:
                print(f"rehearse: {' '.join(command.argv)}", flush=True)
            rows.append(measure_command(command, work, env, cuda=device == "cuda", echo=echo, timeout=timeout))
    snapshots = {name: json.loads((folder / "rehearsal.json").read_text()) | {
        "folder": str(folder), "gib_on_disk": round(sum(f.stat().st_size for f in folder.iterdir()) / 2**30, 2)}
        for name, folder in folders.items()}
    return {"rows": rows, "snapshots": snapshots, "seconds": round(time.perf_counter() - started)}


def bench_rehearse(args) -> dict:
    """The rehearsal with the command line's options; the JSON-ready result (args.json defaults to results/)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench rehearse: --device cuda, but torch sees no CUDA GPU")
    suffix = "" if args.layers == QWEN3_8B["num_hidden_layers"] else f"_{args.layers}layers"
    args.json = args.json or REPO / "results" / f"rehearsal_{device}{suffix}.json"
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kovlm-rehearse-") as temporary:
        root = Path(args.keep or temporary)
        work = root / time.strftime("run-%Y%m%d-%H%M%S")
        result = rehearse(root, work, layers=args.layers, clip_layers=args.clip_layers, device=device,
                          dtype=args.dtype, new_tokens=args.new_tokens, commands=args.commands, timeout=args.timeout)
    print_table(result["rows"])
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    return {"command": "python -m bench " + " ".join(args.argv), "device": device, "gpu": gpu, "cpu": describe_cpu(),
            "memory": {"total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
            "versions": {"torch": torch.__version__, "python": platform.python_version(),
                         "bitsandbytes": _version("bitsandbytes")},
            "layers": {"llm": args.layers, "llm_published": QWEN3_8B["num_hidden_layers"], "clip": args.clip_layers,
                       "clip_published": 24}, "dtype": args.dtype, "new_tokens": args.new_tokens,
            "threads": os.environ.get("OMP_NUM_THREADS", f"torch's default ({os.cpu_count()} cores)"),
            "peak_rss": "os.wait4(pid) rusage ru_maxrss of each command's process (the kernel's high-water mark of "
                        "its resident set, the largest of it and its waited-for children)",
            "lm_load": "lm_files_open_s: intervals in which /proc/<pid>/maps or fd showed an LM weight file, sampled "
                       f"every {SAMPLE_SECONDS} s; reported.lm_load_s: the command's own printed figure, None when "
                       "it prints none",
            "kept": str(args.keep) if args.keep else None,
            "load_average": {"start": load_start, "end": os.getloadavg()}} | result


def _version(name: str) -> str | None:
    import importlib.metadata
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def command_names(text: str) -> list[str]:
    """An argparse type: a comma-separated subset of COMMAND_NAMES."""
    unknown = [name for name in text.split(",") if name not in COMMAND_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: choose from {', '.join(COMMAND_NAMES)}")
    return text.split(",")


def add_parser(commands) -> None:
    """The `rehearse` subcommand, for bench/cli.py's build_parser."""
    parser = commands.add_parser("rehearse", help="the user's commands on random CLIP-L/336 + Qwen3-8B snapshots, "
                                 "each a process of its own: exit status, wall time, peak RSS, LM load, step time")
    parser.add_argument("--layers", type=int, default=QWEN3_8B["num_hidden_layers"],
                        help="Qwen3-8B decoder layers written (36 published; fewer for a quicker run, same widths)")
    parser.add_argument("--clip-layers", type=int, default=24, help="CLIP-L vision layers written (24 published)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when torch sees a GPU; cpu hides "
                        "the GPUs from the commands (CUDA_VISIBLE_DEVICES=)")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="train.py's --dtype")
    parser.add_argument("--new-tokens", type=int, default=16, help="--max-new-tokens of train, evaluate and caption "
                        "(random weights never stop early: every caption is this long)")
    parser.add_argument("--commands", type=command_names, default=list(COMMAND_NAMES),
                        help="a subset, comma-separated (a command whose input is missing is skipped): "
                             + ",".join(COMMAND_NAMES))
    parser.add_argument("--keep", type=Path, help="keep the snapshot folders here (reused by the next run) and each "
                        "run's outputs in DIR/run-DATE (default: a temporary folder, removed at the end)")
    parser.add_argument("--timeout", type=float, help="seconds after which a command is killed (default: none)")
    parser.add_argument("--json", type=Path, help="default results/rehearsal_<device>.json "
                        "(rehearsal_<device>_<N>layers.json below 36 layers)")
    parser.set_defaults(run=bench_rehearse)
