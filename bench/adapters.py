"""`python -m bench adapters`: one adapted NF4 linear at Qwen3-8B's layer shapes, our LoRA / DoRA against PEFT's.

Both hold the same frozen bitsandbytes Linear4bit and the same A, B (and DoRA magnitude); one training step
(forward + backward under autocast) of each is timed. The machine is shared and noisy, so every method runs once
per round, round-robin, and the table gives the median and the fastest round. Before timing, one eval-mode forward
of each pair is compared (max |ours - PEFT| / max |PEFT|).
"""
import platform
import statistics

import torch
import torch.nn as nn

from bench.workers import DTYPES, now
from nf4 import bnb, keep_one_layout
from lora import LoRALinear

ADAPTER_SHAPES = [(4096, 4096), (4096, 12288)]  # Qwen3-8B: q/o_proj, gate/up_proj (down_proj is 12288 -> 4096)
QUICK_SHAPES = [(256, 256), (256, 768)]
ADAPTER_TARGETS = [("ours DoRA / ours LoRA", "<=", 1.15), ("PEFT DoRA / ours DoRA", ">=", 1.5),
                   ("ours LoRA / PEFT LoRA", "<=", 1.0)]  # (ratio name prefix, op, bound)


def nf4_linear(in_features: int, out_features: int, compute_dtype: torch.dtype, device, seed: int = 0) -> nn.Module:
    """A frozen NF4 Linear4bit as qwen3.load_qwen3 builds them (double-quantized statistics), random weights."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) * in_features ** -0.5  # (out, in)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
    keep_one_layout(layer)  # one weight layout for both stacks (nf4.py)
    return layer.to(device)  # Params4bit.to quantizes


class OneLinearModel(nn.Module):
    """The smallest model PEFT can wrap: one linear named `proj`."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.proj = linear
        self.is_loaded_in_4bit = True  # routes PEFT to its bitsandbytes Linear4bit layer, as for QLoRA

    def forward(self, x):
        return self.proj(x)


def peft_adapter(base: nn.Module, ours: LoRALinear, dropout: float) -> nn.Module:
    """PEFT's LoRA / DoRA on the same base, holding the same A, B (and magnitude) as `ours`."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=ours.r, lora_alpha=ours.r * ours.scaling, target_modules=["proj"], use_dora=ours.dora,
                        lora_dropout=dropout)
    model = get_peft_model(OneLinearModel(base), config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
        if ours.dora:
            layer.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    return model


def training_step_seconds(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> float:
    """One forward + backward of one micro-batch under autocast, timed; gradients are cleared outside the timing."""
    for p in [x, *module.parameters()]:
        p.grad = None
    start = now(x.device)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        y = module(x)  # (T, out)
    y.backward(grad_out.to(y.dtype))  # PEFT's DoRA returns fp32 under autocast, ours the compute dtype
    return now(x.device) - start


def max_relative_difference(ours: nn.Module, reference: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> float:
    """max |ours - reference| / max |reference| of one eval-mode forward (dropout off, so both are exact DoRA)."""
    ours.eval()
    reference.eval()
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        a, b = ours(x).float(), reference(x).float()
    ours.train()
    reference.train()
    return ((a - b).abs().max() / b.abs().max()).item()


def bench_adapter_shape(in_features: int, out_features: int, args) -> dict:
    """One table row: the parity check, then args.warmup + args.repeats round-robin rounds of every method."""
    dtype, device = DTYPES[args.dtype], torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = nf4_linear(in_features, out_features, dtype, device)
    lora = LoRALinear(base, args.r, 2 * args.r, dropout=args.dropout)  # on the base's device
    dora = LoRALinear(base, args.r, 2 * args.r, dropout=args.dropout, dora=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B away from zero, so DoRA's m / ||W + sBA|| is not 1
        for layer in (lora, dora):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g).to(device) * 1e-3)
    peft_lora, peft_dora = peft_adapter(base, lora, args.dropout), peft_adapter(base, dora, args.dropout)
    x = torch.randn(args.tokens, in_features, generator=g).to(device, dtype).requires_grad_()  # (T, in)
    grad_out = torch.randn(args.tokens, out_features, generator=g).to(device, dtype)  # (T, out)
    probe = x.detach()[: min(args.tokens, 256)]  # parity first: the timing rounds below step our DoRA's weights
    differences = {"LoRA": max_relative_difference(lora, peft_lora, probe, dtype),
                   "DoRA": max_relative_difference(dora, peft_dora, probe, dtype)}
    # an optimizer step between micro-batches makes DoRA's cached norm stale: the next forward recomputes it
    optimizer = torch.optim.SGD([p for p in dora.parameters() if p.requires_grad], lr=1e-6)
    times = {name: [] for name in ("ours LoRA", "ours DoRA first", "ours DoRA reuse", "PEFT LoRA", "PEFT DoRA")}
    for round_index in range(args.warmup + args.repeats):  # round-robin, so machine load hits every method alike
        measured = {"ours LoRA": training_step_seconds(lora, x, grad_out, dtype)}
        optimizer.step()
        measured["ours DoRA first"] = training_step_seconds(dora, x, grad_out, dtype)  # recomputes the norm
        measured["ours DoRA reuse"] = training_step_seconds(dora, x, grad_out, dtype)  # next micro-batch
        measured["PEFT LoRA"] = training_step_seconds(peft_lora, x, grad_out, dtype)
        measured["PEFT DoRA"] = training_step_seconds(peft_dora, x, grad_out, dtype)
        if round_index >= args.warmup:
            for name, seconds in measured.items():
                times[name].append(seconds)
    ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
    ms_min = {name: 1000 * min(values) for name, values in times.items()}  # the least disturbed run of each
    return {"shape": f"{in_features}x{out_features}", "ms": ms, "ms_min": ms_min,
            "ratios": adapter_ratios(ms), "ratios_of_min": adapter_ratios(ms_min),
            "max_relative_difference": differences}


def adapter_ratios(ms: dict) -> dict:
    return {"ours DoRA / ours LoRA (first)": ms["ours DoRA first"] / ms["ours LoRA"],
            "ours DoRA / ours LoRA (reuse)": ms["ours DoRA reuse"] / ms["ours LoRA"],
            "PEFT DoRA / ours DoRA (first)": ms["PEFT DoRA"] / ms["ours DoRA first"],
            "PEFT DoRA / ours DoRA (reuse)": ms["PEFT DoRA"] / ms["ours DoRA reuse"],
            "ours LoRA / PEFT LoRA": ms["ours LoRA"] / ms["PEFT LoRA"]}


def print_adapter_table(result: dict) -> None:
    setup = result["setup"]
    print(f"\nadapters: one training step (forward + backward) of one NF4 linear, {setup['tokens']} tokens, "
          f"{setup['dtype']} compute, r={setup['r']}, dropout {setup['dropout']}, median of {setup['repeats']} "
          f"({setup['threads']} threads, torch {setup['torch']}, peft {setup['peft']}, bitsandbytes "
          f"{setup['bitsandbytes']})")
    names = list(result["rows"][0]["ms"])
    print(f"| shape | {' | '.join(f'{name} (ms)' for name in names)} |")
    print("|---" * (len(names) + 1) + "|")
    for row in result["rows"]:
        print(f"| {row['shape']} | " + " | ".join(f"{row['ms'][n]:.0f} ({row['ms_min'][n]:.0f})" for n in names) + " |")
    print("(median (fastest) of the timed rounds)")
    print("\n| shape | ratio | of medians | of fastest | target |\n|---|---|---|---|---|")
    for row in result["rows"]:
        for ratio_name, value in row["ratios"].items():
            op, bound = next((op, bound) for prefix, op, bound in ADAPTER_TARGETS if ratio_name.startswith(prefix))
            met = value <= bound if op == "<=" else value >= bound
            verdict = "(toy sizes, not judged)" if setup["quick"] else "met" if met else "MISSED"
            print(f"| {row['shape']} | {ratio_name} | {value:.2f}x | {row['ratios_of_min'][ratio_name]:.2f}x | "
                  f"{op} {bound} {verdict} |")
    for row in result["rows"]:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in row["max_relative_difference"].items())
        print(f"{row['shape']}: max |ours - PEFT| / max |PEFT|, one eval forward: {diffs}")


def bench_adapters(args) -> dict:
    """Our LoRA / DoRA against PEFT's on bitsandbytes NF4 linears at Qwen3-8B's layer shapes."""
    import peft
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens, args.repeats, args.warmup = 64, 1, 0
    torch.manual_seed(0)
    setup = {"quick": args.quick, "tokens": args.tokens, "dtype": args.dtype, "r": args.r, "dropout": args.dropout,
             "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
             "peft": peft.__version__, "bitsandbytes": bnb.__version__,
             "device": torch.cuda.get_device_name() if torch.cuda.is_available() else
             platform.processor() or platform.machine()}
    shapes = QUICK_SHAPES if args.quick else ADAPTER_SHAPES
    result = {"setup": setup, "rows": [bench_adapter_shape(i, o, args) for i, o in shapes]}
    print_adapter_table(result)
    return result
