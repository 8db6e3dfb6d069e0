"""`python -m bench adapters`: one adapted NF4 linear at Qwen3-8B's layer shapes, our LoRA / DoRA against PEFT's.

Both hold the same frozen bitsandbytes Linear4bit and the same A, B (and DoRA magnitude); one training step
(forward + backward under autocast) of each is timed. The machine is shared and noisy, so every method runs once
per round, round-robin, and the table gives the median and the fastest round. Before timing, one eval-mode forward
of each pair is compared (max |ours - PEFT| / max |PEFT|).

`python -m bench adapters --norms` instead measures what holding DoRA's row norm saves (lora.held_dora_norms): on a
small NF4 Qwen3 with DoRA on all 7 targets, a greedy generation and a training window, each with the norm formed in
every forward and with it held for the whole generation / window, round-robin as above.
"""
import json
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from bench.snapshots import write_random_weights
from bench.workers import DTYPES, now
from decode import Decoder
from lora import LoRALinear, after_optimizer_step, apply_adapters, held_dora_norms
from nf4 import bnb, keep_one_layout
from qwen3 import Qwen3, Qwen3Config, load_qwen3

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
    probe = x.detach()[: min(args.tokens, 256)]  # the parity check's tokens
    differences = {"LoRA": max_relative_difference(lora, peft_lora, probe, dtype),
                   "DoRA": max_relative_difference(dora, peft_dora, probe, dtype)}
    times = {name: [] for name in ("ours LoRA", "ours DoRA", "PEFT LoRA", "PEFT DoRA")}
    for round_index in range(args.warmup + args.repeats):  # round-robin, so machine load hits every method alike
        measured = {"ours LoRA": training_step_seconds(lora, x, grad_out, dtype),
                    "ours DoRA": training_step_seconds(dora, x, grad_out, dtype)}  # the norm formed in the forward
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
    return {"ours DoRA / ours LoRA": ms["ours DoRA"] / ms["ours LoRA"],
            "PEFT DoRA / ours DoRA": ms["PEFT DoRA"] / ms["ours DoRA"],
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
    if args.norms:
        return bench_dora_norms(args, setup)
    shapes = QUICK_SHAPES if args.quick else ADAPTER_SHAPES
    result = {"setup": setup, "rows": [bench_adapter_shape(i, o, args) for i, o in shapes]}
    print_adapter_table(result)
    return result


# The norms case: a small Qwen3 whose decoder layers hold ~92% of a token's multiply-adds, as in Qwen3-8B (a tiny
# vocabulary: Qwen3's 151,936 would make the lm_head most of a decode step at this width).
NORMS_MODEL = Qwen3Config(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=64)
QUICK_NORMS_MODEL = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=32)
# (generation batch = train.py's eval_batch_size, prompt ~ 64 visual + 36 text tokens, new tokens), (micro-batch
# rows, tokens per row = the model benchmark's resampler shape, micro-batches per optimizer step)
NORMS_WORK = {"generation": (16, 100, 32), "window": (4, 182, 2)}
QUICK_NORMS_WORK = {"generation": (2, 8, 4), "window": (2, 8, 2)}


def small_dora_qwen3(folder: Path, config: Qwen3Config, dtype: torch.dtype, device, args) -> Qwen3:
    """A random Qwen3 snapshot written to `folder`, loaded in NF4, DoRA (r, dropout from args) on all 7 targets,
    B away from zero (else m / ||W + sBA|| = 1 and every norm is ||W||)."""
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in Qwen3(config).state_dict().items()}
    write_random_weights(folder, shapes, torch.bfloat16, "cpu")
    (folder / "config.json").write_text(json.dumps(asdict(config)))
    llm = load_qwen3(folder, quant="nf4", dtype=dtype, device=device)
    apply_adapters(llm, method="dora", r=args.r, alpha=2 * args.r, dropout=args.dropout)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in llm.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g).to(device) * 1e-3)
    return llm


def clock(device) -> float:
    """On a GPU the wall clock once the queued work is done; on the CPU this process's CPU time, which other
    processes sharing the cores do not inflate (with --threads 1, the time the work takes on one core)."""
    return now(device) if device.type == "cuda" else time.process_time()


def generation_seconds(decoder: Decoder, embeds: torch.Tensor, new_tokens: int, hold: bool) -> tuple[float, list]:
    """Prefill + greedy decode steps, the norms held for the call or not: seconds, and every step's logits."""
    start = clock(embeds.device)
    with torch.no_grad(), held_dora_norms(decoder.llm, embeds.dtype) if hold else nullcontext():
        steps = [decoder.prefill(embeds)]  # (B, V) each
        for _ in range(new_tokens - 1):
            steps.append(decoder.step(steps[-1].argmax(-1)))
    return clock(embeds.device) - start, steps


def window_seconds(llm: Qwen3, micro_batches: list, optimizer, dtype: torch.dtype, hold: bool) -> float:
    """Forward + backward of each micro-batch (bf16 autocast), the norms held for the window or not, then the
    optimizer step: what train.py does between two optimizer steps."""
    start = clock(micro_batches[0].device)
    with held_dora_norms(llm, dtype) if hold else nullcontext():
        for embeds in micro_batches:
            with torch.autocast(embeds.device.type, dtype=dtype, enabled=dtype != torch.float32):
                hidden = llm.hidden_states(inputs_embeds=embeds)  # (B, T, C)
            hidden.float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    after_optimizer_step(llm)
    return clock(micro_batches[0].device) - start


def bench_dora_norms(args, setup: dict) -> dict:
    """Generation and a training window with DoRA's norm formed in every forward vs held, round-robin."""
    dtype, device = DTYPES[args.dtype], torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config, work = (QUICK_NORMS_MODEL, QUICK_NORMS_WORK) if args.quick else (NORMS_MODEL, NORMS_WORK)
    with tempfile.TemporaryDirectory() as folder:
        llm = small_dora_qwen3(Path(folder), config, dtype, device, args)
    (B, T, new_tokens), (rows, tokens, count) = work["generation"], work["window"]
    g = torch.Generator().manual_seed(2)
    prompt = (torch.randn(B, T, config.hidden_size, generator=g) * 0.02).to(device, dtype)  # (B, T, C)
    micro_batches = [(torch.randn(rows, tokens, config.hidden_size, generator=g) * 0.02).to(device, dtype)
                     for _ in range(count)]
    optimizer = torch.optim.AdamW([p for p in llm.parameters() if p.requires_grad], lr=1e-5)
    decoders = {hold: Decoder(llm, B, T + new_tokens) for hold in (False, True)}  # a CUDA graph each, on a GPU
    times = {name: [] for name in ("generation formed", "generation held", "window formed", "window held")}
    for round_index in range(args.warmup + args.repeats):
        llm.eval()
        (formed, formed_logits), (held, held_logits) = (generation_seconds(decoders[hold], prompt, new_tokens, hold)
                                                        for hold in (False, True))
        llm.train()
        measured = {"generation formed": formed, "generation held": held,
                    "window formed": window_seconds(llm, micro_batches, optimizer, dtype, hold=False),
                    "window held": window_seconds(llm, micro_batches, optimizer, dtype, hold=True)}
        if round_index >= args.warmup:
            for name, seconds in measured.items():
                times[name].append(seconds)
    difference = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(held_logits, formed_logits))
    ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
    ms_min = {name: 1000 * min(values) for name, values in times.items()}
    rows_out = [{"workload": f"generation: B {B}, prompt {T}, {new_tokens} new tokens"
                             f"{', CUDA graphs' if device.type == 'cuda' else ', eager'}",
                 "ms": {"formed": ms["generation formed"], "held": ms["generation held"]},
                 "ms_min": {"formed": ms_min["generation formed"], "held": ms_min["generation held"]}},
                {"workload": f"training window: {count} micro-batches of {rows} x {tokens} tokens + AdamW step",
                 "ms": {"formed": ms["window formed"], "held": ms["window held"]},
                 "ms_min": {"formed": ms_min["window formed"], "held": ms_min["window held"]}}]
    model = {key: getattr(config, key) for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads", "num_key_value_heads", "vocab_size")}
    setup = {key: value for key, value in setup.items() if key != "tokens"} | {
        "model": model, "clock": "wall clock" if device.type == "cuda" else "process CPU time"}
    result = {"setup": setup, "rows": rows_out,
              "max_relative_logit_difference_held_vs_formed": difference}
    print_norms_table(result)
    return result


def print_norms_table(result: dict) -> None:
    setup, model = result["setup"], result["setup"]["model"]
    print(f"\nDoRA's row norm formed in every forward vs held (lora.held_dora_norms): NF4 Qwen3 (width "
          f"{model['hidden_size']}, {model['num_hidden_layers']} layers, vocab {model['vocab_size']}), DoRA "
          f"r={setup['r']} on all 7 targets, {setup['dtype']}, median (fastest) of {setup['repeats']} rounds, "
          f"{setup['threads']} threads, {setup['device']}, {setup['clock']}")
    print("| workload | formed (ms) | held (ms) | held / formed |\n|---|---|---|---|")
    for row in result["rows"]:
        ms, ms_min = row["ms"], row["ms_min"]
        print(f"| {row['workload']} | {ms['formed']:.0f} ({ms_min['formed']:.0f}) | {ms['held']:.0f} "
              f"({ms_min['held']:.0f}) | {ms['held'] / ms['formed']:.2f}x |")
    print(f"held vs formed, every generation step's logits: max |diff| / max |formed| "
          f"{result['max_relative_logit_difference_held_vs_formed']:.1e}")
