"""`python -m bench memory SNAPSHOT [--quant nf4] [--device cuda]`: load one Qwen3 snapshot folder with kovlm's
loader and report its parameter count, weight bytes, load time and peak memory (streaming load, NF4 per tensor)."""
import resource
import time

import torch

from qwen3 import Qwen3, load_qwen3


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_memory(args) -> dict:
    rss_before, start = peak_rss_mib(), time.time()
    model = load_qwen3(args.path, quant=args.quant, device=args.device)
    seconds, rss_peak = time.time() - start, peak_rss_mib()
    with torch.device("meta"):
        parameters = sum(p.numel() for p in Qwen3(model.config).parameters())
    in_memory = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    result = {"parameters": parameters, "quant": args.quant, "weights_mib": in_memory, "load_seconds": seconds,
              "peak_rss_mib": rss_peak, "rss_before_mib": rss_before}
    print(f"{parameters:,} parameters ({parameters * 2 / 2**20:,.0f} MiB in bf16), quant={args.quant}: "
          f"{in_memory:,.0f} MiB of weights (NF4 block scales not counted), loaded in {seconds:.1f} s")
    print(f"peak RSS {rss_peak:,.0f} MiB ({rss_before:,.0f} MiB before loading: Python, torch, bitsandbytes)")
    if str(args.device).startswith("cuda"):
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        print(f"peak CUDA memory allocated {result['peak_cuda_mib']:,.0f} MiB")
    return result
