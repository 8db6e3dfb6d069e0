"""Where the time of loading a Qwen3 snapshot goes: reading its bytes, quantizing them, and the loader's own work.

    python -m bench loading SNAPSHOT [--quant nf4|int8] [--layers 2] [--threads N] [--full] [--json PATH]

Quantized loading spends nearly all its time on the decoder layers' linear weights (what --quant stores; the
embeddings and the head stay on their memory maps, read only when used). For each of them in the first --layers
layers, every step from a cold page cache (the snapshot's files evicted with posix_fadvise(DONTNEED) before it):
  read      its bytes from the file into memory (os.preadv): what the disk allows
  kernel    bitsandbytes' own quantization of the tensor in memory (quantize_4bit with double-quantized
            statistics; int8: int8_vectorwise_quant of its fp16 copy)
  placed    qwen3.load_tensor on the tensor in memory: kovlm's quantization (on the CPU, NF4 by nf4.quantize_nf4:
            the same bytes as the kernel's) and what the loader adds around it
  loader    the tensor as load_qwen3 takes it: mapped (infra.snapshot.map_tensor), then load_tensor: all of it
The rates (weights per second) are extrapolated to the model's linear weights; --full also loads the whole snapshot
with load_qwen3 from a cold cache and sets its time beside the extrapolation.
"""
import argparse
import os
import time
from pathlib import Path

import torch

from bench.pruning import describe_cpu
from bench.standalone import run_alone
from infra import snapshot
from moe import parameter_counts
from nf4 import bnb
from qwen3 import Qwen3, Qwen3Config, load_qwen3, load_tensor, swap_quantized_linears

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def evict(files: list[Path]) -> None:
    """Drop the files' clean, unmapped pages from the page cache: the next read comes from the disk."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def linear_entries(folder: Path, model: Qwen3, layers: int) -> list[tuple[str, Path, int, dict]]:
    """(name, file, data start, header entry) of each quantized linear weight in the first `layers` layers."""
    quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    wanted = {f"model.layers.{i}.{name}.weight" for i in range(layers)
              for name, module in model.model.layers[i].named_modules() if isinstance(module, quantized)}
    found = []
    for file in snapshot.weight_files(folder):
        data_start, entries = snapshot.read_header(file)
        found += [(key, file, data_start, entry) for key, entry in entries.items() if key in wanted]
    if len(found) != len(wanted):
        raise SystemExit(f"bench loading: {folder} holds {len(found)} of the {len(wanted)} linear weights of its "
                         f"first {layers} layers (the hub's per-expert layout is read; a fused one is not)")
    return found


def kernel(tensor: torch.Tensor, quant: str) -> None:
    if quant == "int8":
        bnb.functional.int8_vectorwise_quant(tensor.half())
    else:
        bnb.functional.quantize_4bit(tensor, quant_type="nf4", compress_statistics=True)


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def timed_steps(model: Qwen3, entries: list, quant: str, dtype: torch.dtype) -> tuple[dict, int, int]:
    """({step: seconds summed over `entries`}, weights, bytes): each tensor read, quantized by bitsandbytes, placed
    by load_tensor from memory, then mapped and placed as the loader does, every step from a cold page cache."""
    files = sorted({file for _, file, _, _ in entries})
    seconds = {step: 0.0 for step in ("read", "kernel", "placed", "loader")}
    weights = bytes_read = 0
    for name, file, data_start, entry in entries:
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        evict(files)
        fd = os.open(file, os.O_RDONLY)
        try:
            seconds["read"] += timed(lambda: os.preadv(fd, [buffer], data_start + begin))
        finally:
            os.close(fd)
        tensor = torch.frombuffer(buffer, dtype=snapshot.SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        seconds["kernel"] += timed(lambda: kernel(tensor.to(dtype), quant))
        seconds["placed"] += timed(lambda: load_tensor(model, name, tensor, dtype=dtype, device="cpu"))
        evict(files)
        seconds["loader"] += timed(lambda: load_tensor(model, name, snapshot.map_tensor(file, data_start, entry),
                                                       dtype=dtype, device="cpu"))
        weights += torch.Size(entry["shape"]).numel()
        bytes_read += end - begin
    return seconds, weights, bytes_read


def bench_loading(args) -> dict:
    folder, dtype = Path(args.snapshot), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    d = snapshot.read_config(folder)
    with torch.device("meta"):
        model = Qwen3(Qwen3Config.from_hf(d))
    swap_quantized_linears(model, args.quant, dtype)
    seconds, weights, bytes_read = timed_steps(model, linear_entries(folder, model, args.layers), args.quant, dtype)
    total = parameter_counts(d)["linear_weights"]
    rates = {step: weights / s for step, s in seconds.items()}
    command = getattr(args, "command_line", None) or "python -m bench " + " ".join(args.argv)
    result = {"command": command, "snapshot": str(folder), "quant": args.quant, "dtype": args.dtype,
              "layers_measured": args.layers, "weights_measured": weights, "linear_weights": total,
              "threads": torch.get_num_threads(), "cpu": describe_cpu(), "seconds": seconds,
              "weights_per_s": rates, "read_gb_per_s": bytes_read / seconds["read"] / 1e9,
              "extrapolated_s": {step: total / rate for step, rate in rates.items()},
              "load_average": os.getloadavg()}
    print(f"{args.layers} layers, {weights / 1e6:.0f} M linear weights, {args.quant}, {torch.get_num_threads()} "
          f"threads; extrapolated to the model's {total / 1e9:.2f} B:")
    print("| step | M weights/s | seconds for the model | share of loader |\n|---|---:|---:|---:|")
    for step, rate in rates.items():
        print(f"| {step} | {rate / 1e6:.1f} | {total / rate:.0f} | {seconds[step] / seconds['loader']:.2f} |")
    print(f"read: {result['read_gb_per_s']:.2f} GB/s from a cold page cache")
    if args.full:
        evict(snapshot.weight_files(folder))
        start = time.perf_counter()
        load_qwen3(folder, quant=args.quant, dtype=dtype)
        result["full_load_s"] = time.perf_counter() - start
        print(f"load_qwen3, whole snapshot, cold: {result['full_load_s']:.0f} s (extrapolated loader: "
              f"{result['extrapolated_s']['loader']:.0f} s)")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("snapshot", help="a Qwen3 snapshot folder (bench rehearse --keep writes Qwen3-8B's)")
    parser.add_argument("--quant", choices=["nf4", "int8"], default="nf4")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="the loader's dtype")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers whose linear weights are measured")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--full", action="store_true", help="also load the whole snapshot with load_qwen3, cold")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")


def add_parser(commands) -> None:
    """The `loading` subcommand, for bench/cli.py's build_parser."""
    parser = commands.add_parser("loading", help="where loading a snapshot's time goes: read, quantize, the rest")
    add_arguments(parser)
    parser.set_defaults(run=bench_loading)


if __name__ == "__main__":
    run_alone("bench.loading", __doc__.splitlines()[0], add_arguments, bench_loading)
