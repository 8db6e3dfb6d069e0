"""Memory of the language model, two ways.

`python -m bench memory [--json PATH]`: for Qwen3-0.6B, 1.7B, 4B, 8B, 14B, 32B and Qwen3-30B-A3B, each stored in NF4,
int8 or bf16, the weights' memory and an estimated training peak with the perceiver and with a per-patch projector
(mlp): COMPUTED from the published configs (moe.parameter_counts and the formula in `training_peak`), not measured.
`python -m bench memory SNAPSHOT [--quant nf4|int8] [--device cuda] [--json PATH]`: load one snapshot folder with
kovlm's loader and MEASURE its parameter count, the bytes its weights take (quantization scales included) beside
`weight_bytes`' computed figure, the load time and peak memory (streaming load, quantized per tensor). The table
sets such measurements of Qwen3-8B on the CPU (MEASURED_FILES, when they are there) beside its computed rows.

Weights: the decoder layers' linear weights (attention, dense MLPs, experts: what --quant stores) at
    nf4   4 bits + one uint8 absmax per block of 64 + one fp32 scale per 256 blocks (bitsandbytes' double
          quantization, as qwen3.py loads it): 4.127 bits a weight
    int8  8 bits + one fp32 absmax per output row (LLM.int8 with has_fp16_weights=False: no fp16 copy)
    bf16  16 bits
and everything else (embeddings, an untied head, norms, routers) in bf16.
"""
import json
import os
import resource
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from bench.pruning import describe_cpu
from clip import CLIPConfig, CLIPVision
from infra import snapshot
from moe import MoeConfig, is_moe_layer, parameter_counts
from nf4 import bnb, int8_row_scales
from projectors import ProjectorConfig, projector_from_config
from qwen3 import Qwen3, load_qwen3

GiB = 2**30
DENSE = {  # the published config.json of each size: hidden, layers, heads, KV heads, MLP width, tied embeddings
    "Qwen3-0.6B": (1024, 28, 16, 8, 3072, True), "Qwen3-1.7B": (2048, 28, 16, 8, 6144, True),
    "Qwen3-4B": (2560, 36, 32, 8, 9728, True), "Qwen3-8B": (4096, 36, 32, 8, 12288, False),
    "Qwen3-14B": (5120, 40, 40, 8, 17408, False), "Qwen3-32B": (5120, 64, 64, 8, 25600, False)}
QWEN3_30B_A3B = dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, num_hidden_layers=48,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                     num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                     decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)
QUANTS = ("nf4", "int8", "bf16")
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
GPUS = ((24, "24 GB (RTX 4090, L4, A10)"), (40, "A100 40GB"), (48, "48 GB (L40S, A6000)"), (80, "A100 / H100 80GB"),
        (141, "H200"))
CUDA_CONTEXT_GIB = 1.0  # the CUDA context and allocator slack a process needs besides its tensors
RESULTS = Path(__file__).resolve().parent.parent / "results"
# Qwen3-8B measured on the CPU: its load per quantization (python -m bench memory SNAPSHOT --quant Q --json FILE) and
# the 36-layer rehearsal's training run (python -m bench rehearse)
MEASURED_FILES = {"nf4": "bench_memory_qwen3-8b_nf4_cpu.json", "int8": "bench_memory_qwen3-8b_int8_cpu.json",
                  "rehearsal": "rehearsal_cpu.json"}


def published_config(name: str) -> dict:
    if name == "Qwen3-30B-A3B":
        return dict(QWEN3_30B_A3B)
    hidden, layers, heads, kv_heads, mlp, tied = DENSE[name]
    return dict(model_type="qwen3", vocab_size=151936, hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=128, intermediate_size=mlp,
                tie_word_embeddings=tied)


@dataclass
class RunShape:
    """What one training step holds, at train.py's defaults (a CLIP ViT-L/14-336 tower, 8 frames, batch 4, DoRA
    r = 16); prompt and caption lengths are typical, not limits."""
    batch_size: int = 4
    frames: int = 8
    patches: int = 576  # (336 / 14)^2
    vision_dim: int = 1024
    prompt_tokens: int = 30  # the chat template and the instruction around the visual tokens
    caption_tokens: int = 40  # a Korean caption and <|im_end|>
    r: int = 16


def linear_rows(d: dict) -> int:
    """Output rows of every decoder-layer linear: LLM.int8 keeps one fp32 scale per row."""
    C, nh, nkv, hs = d["hidden_size"], d["num_attention_heads"], d["num_key_value_heads"], d.get("head_dim", 128)
    moe = MoeConfig.from_hf(d) if d["model_type"] == "qwen3_moe" else None
    rows = 0
    for i in range(d["num_hidden_layers"]):
        rows += nh * hs + 2 * nkv * hs + C  # q, k, v, o
        rows += moe.num_experts * (2 * moe.moe_intermediate_size + C) if is_moe_layer(i, moe) else \
            2 * d["intermediate_size"] + C  # gate, up, down
    return rows


def weight_bytes(d: dict, quant: str) -> float:
    counts = parameter_counts(d)
    linear, rest = counts["linear_weights"], counts["embeddings"] + counts["routers"] + counts["norms_and_biases"]
    stored = {"nf4": linear * NF4_BITS / 8, "int8": linear + 4 * linear_rows(d), "bf16": 2 * linear}[quant]
    return stored + 2 * rest


def adapter_parameters(d: dict, r: int) -> int:
    """DoRA at rank r on train.py's default targets: all seven linears of a dense model, the four attention
    projections of an MoE; r (in + out) + out (the magnitude) each."""
    C, nh, nkv, hs, I = (d["hidden_size"], d["num_attention_heads"], d["num_key_value_heads"], d.get("head_dim", 128),
                         d["intermediate_size"])
    shapes = [(C, nh * hs), (C, nkv * hs), (C, nkv * hs), (nh * hs, C)]
    shapes += [] if d["model_type"] == "qwen3_moe" else [(C, I), (C, I), (I, C)]
    return d["num_hidden_layers"] * sum(r * (n_in + n_out) + n_out for n_in, n_out in shapes)


@lru_cache
def projector_parameters(name: str, vision_dim: int, llm_dim: int, frames: int) -> int:
    with torch.device("meta"):
        projector = projector_from_config(ProjectorConfig(name, vision_dim, llm_dim, num_frames=frames))
    return sum(p.numel() for p in projector.parameters())


@lru_cache
def clip_large_336_parameters() -> int:
    """CLIP ViT-L/14-336's vision tower, the default --clip (303.5 M)."""
    with torch.device("meta"):
        tower = CLIPVision(CLIPConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                      num_attention_heads=16, image_size=336, patch_size=14))
    return sum(p.numel() for p in tower.parameters())


def layer_activations_per_token(d: dict, moe_layer: bool) -> int:
    """Elements one decoder layer keeps for its backward per token, in bf16 (fp32 ones count twice): both
    RMSNorms' inputs and outputs, with their fp32 internals (6C); q, k, v before and after QK-norm and RoPE
    (2 (nh + 2 nkv) hs); the attention output and o_proj's input (2 nh hs); the adapters' dropped inputs (q, k, v,
    o; a dense model's gate, up, down too); then the dense MLP's gate, up, silu and product (4I), or the MoE
    block's fp32 router logits (2E) and, for each of the k experts a token goes to, its gathered input and
    weighted output (2C) and four expert-wide tensors."""
    C, nh, nkv, hs = d["hidden_size"], d["num_attention_heads"], d["num_key_value_heads"], d.get("head_dim", 128)
    attention = 6 * C + 2 * (nh + 2 * nkv) * hs + 2 * nh * hs + 3 * C + nh * hs
    if not moe_layer:
        return attention + 4 * d["intermediate_size"] + 2 * C + d["intermediate_size"]
    moe = MoeConfig.from_hf(d)
    return attention + 2 * moe.num_experts + moe.num_experts_per_tok * (2 * C + 4 * moe.moe_intermediate_size)


def training_peak(d: dict, quant: str, projector: str, shape: RunShape = RunShape()) -> dict[str, float]:
    """An estimate of a stage-2 step's peak, in GiB by part (computed, never measured here):
    weights    the LM as stored (weight_bytes) and the CLIP-L vision tower in bf16 (resident: build_vlm loads it)
    trainable  projector and adapters in fp32, with their gradients and AdamW's two moments (16 bytes each)
    activations  B x T tokens, T = prompt + visual tokens + caption: without checkpointing (the perceiver's 64
               tokens; train.py's auto) every layer's kept tensors (layer_activations_per_token); with it (per-patch
               projectors, 4608 visual tokens) each layer's input and one layer's tensors at a time (the recompute)
    head       logits at the supervised positions only (bf16, their fp32 copy and its gradient)
    transient  the largest decoder linear dequantized to bf16 (a quantized base does so per layer in forward and
               backward)
    Not included: the CUDA context and allocator slack (see CUDA_CONTEXT_GIB), the optimizer step's temporaries,
    fragmentation; the vision tower's own activations (features come from the cache). results/README.md
    ("Model sizes and quantizations") sets the estimate beside a measured peak."""
    C, L, V = d["hidden_size"], d["num_hidden_layers"], d["vocab_size"]
    moe = MoeConfig.from_hf(d) if d["model_type"] == "qwen3_moe" else None
    visual = 64 if projector == "perceiver" else shape.frames * shape.patches
    tokens = shape.batch_size * (shape.prompt_tokens + visual + shape.caption_tokens)  # B x T
    per_layer = [layer_activations_per_token(d, is_moe_layer(i, moe)) for i in range(L)]
    if projector == "perceiver":  # gradient checkpointing off (auto)
        activations = 2 * tokens * sum(per_layer)
    else:  # on: layer inputs kept, one layer recomputed at a time
        activations = 2 * tokens * (L * C + max(per_layer))
    trained = projector_parameters(projector, shape.vision_dim, C, shape.frames) + adapter_parameters(d, shape.r)
    dense_mlp = any(not is_moe_layer(i, moe) for i in range(L))
    largest = max(C * d["num_attention_heads"] * d.get("head_dim", 128), C * d["intermediate_size"] * dense_mlp,
                  C * (moe.moe_intermediate_size if moe else 0))
    parts = {"weights": weight_bytes(d, quant) + 2 * clip_large_336_parameters(),
             "trainable": 16 * trained,
             "activations": activations,
             "head": shape.batch_size * shape.caption_tokens * V * (2 + 4 + 4),
             "transient": 2 * largest if quant != "bf16" else 0}
    return {name: value / GiB for name, value in parts.items()} | {"total": sum(parts.values()) / GiB}


def smallest_gpu(peak_gib: float) -> str:
    for memory, name in GPUS:
        if peak_gib + CUDA_CONTEXT_GIB <= memory:
            return name
    return "more than one GPU"


def memory_table(args) -> dict:
    """The sizes x quantizations table (markdown), every figure computed."""
    rows = []
    for name in [*DENSE, "Qwen3-30B-A3B"]:
        d = published_config(name)
        for quant in QUANTS:
            perceiver, per_patch = training_peak(d, quant, "perceiver"), training_peak(d, quant, "mlp")
            rows.append({"model": name, "parameters": sum(parameter_counts(d).values()), "quant": quant,
                         "weights_gib": weight_bytes(d, quant) / GiB, "perceiver": perceiver, "per_patch": per_patch,
                         "fits_perceiver": smallest_gpu(perceiver["total"]),
                         "fits_per_patch": smallest_gpu(per_patch["total"])})
    print("| model | parameters | quant | LM weights | training peak, perceiver (fits) | training peak, "
          "per-patch mlp (fits) |")
    print("|---|---:|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['model']} | {row['parameters'] / 1e9:.2f} B | {row['quant']} | {row['weights_gib']:.1f} GiB | "
              f"{row['perceiver']['total']:.1f} GiB ({row['fits_perceiver']}) | "
              f"{row['per_patch']['total']:.1f} GiB ({row['fits_per_patch']}) |")
    shape = RunShape()
    print(f"\nAll figures COMPUTED from the published configs, not measured (bench/memory.py: weight_bytes, "
          f"training_peak). Weights: quantized decoder linears at {NF4_BITS:.3f} bits (nf4) or 8 bits + an fp32 "
          f"scale per row (int8), everything else bf16. Training peak: a stage-2 DoRA step (r {shape.r}, default "
          f"targets) at batch {shape.batch_size}, {shape.frames} frames, bf16 compute: the LM and the CLIP-L tower's "
          f"weights, fp32 projector + adapters with gradients and AdamW moments, activations (perceiver: 64 visual "
          f"tokens, no checkpointing; mlp: {shape.frames * shape.patches} visual tokens, checkpointing per layer), "
          f"label-only logits, one dequantized linear. Not included: the CUDA context (fits: peak + "
          f"{CUDA_CONTEXT_GIB:.0f} GiB <= the GPU's memory), allocator fragmentation.")
    return {"computed": True, "shape": shape.__dict__, "rows": rows, "measured": measured_beside()}


def measured_beside() -> list[dict]:
    """Qwen3-8B measured on the CPU (MEASURED_FILES that exist), each beside the computed figure for the same
    thing: the weights as loaded per quantization, and the rehearsal's training peak RSS beside training_peak at its
    shape (batch 1, perceiver, DoRA). Printed under the table; [] when none was measured here."""
    rows, d = [], published_config("Qwen3-8B")
    for quant in ("nf4", "int8"):
        file = RESULTS / MEASURED_FILES[quant]
        if file.exists():
            load = json.loads(file.read_text())
            rows.append({"what": f"Qwen3-8B {quant} weights as loaded (GiB)", "measured": load["weights_mib"] / 1024,
                         "computed": weight_bytes(d, quant) / GiB, "file": f"results/{file.name}",
                         "command": load["command"], "note": f"load {load['load_seconds']:.0f} s, peak RSS "
                         f"{load['peak_rss_mib'] / 1024:.2f} GiB, {load['device']['model']}"})
    file = RESULTS / MEASURED_FILES["rehearsal"]
    rehearsal = json.loads(file.read_text()) if file.exists() else {}
    train = next((row for row in rehearsal.get("rows", []) if row["name"] == "train"), None)
    if train and rehearsal["layers"]["llm"] == 36:
        computed = training_peak(d, "nf4", "perceiver", RunShape(batch_size=1))
        rows.append({"what": "Qwen3-8B nf4 training peak, perceiver + DoRA, batch 1 (GiB)",
                     "measured": train["peak_rss_gib"], "computed": computed["total"], "file": f"results/{file.name}",
                     "command": rehearsal["command"], "note": f"peak RSS of train.py, {rehearsal['dtype']} on "
                     f"the CPU; RSS also holds Python, torch, bitsandbytes and the tokenizer"})
    if rows:
        print("\nMeasured on the CPU (Qwen3-8B, 36 layers, random weights), beside the computed figure:\n")
        print("| what | measured | computed | from |\n|---|---:|---:|---|")
        for row in rows:
            print(f"| {row['what']} | {row['measured']:.2f} | {row['computed']:.2f} | {row['file']}: {row['note']} |")
    return rows


def stored_bytes(model: torch.nn.Module) -> int:
    """The bytes the model's weights take where they live: parameters and buffers, with each quantized linear's
    scales (NF4: the uint8 block absmax and their fp32 scales, as NF4_BITS counts them; int8: one fp32 scale per
    row). bitsandbytes' 16- and 256-entry code tables are left out, as in weight_bytes."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            scales = [state.absmax] + ([state.state2.absmax] if state.nested else [])
            total += sum(t.numel() * t.element_size() for t in scales)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            total += int8_row_scales(module).numel() * 4
    return total


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_memory(args) -> dict:
    """Without a snapshot folder the computed table; with one, its load measured."""
    if args.path is None:
        return memory_table(args)
    rss_before, start = peak_rss_mib(), time.time()
    model = load_qwen3(args.path, quant=args.quant, device=args.device)
    seconds, rss_peak = time.time() - start, peak_rss_mib()
    with torch.device("meta"):
        parameters = sum(p.numel() for p in Qwen3(model.config).parameters())
    in_memory = stored_bytes(model) / 2**20
    computed = weight_bytes(snapshot.read_config(Path(args.path)), args.quant or "bf16") / 2**20
    device = torch.device(args.device)
    result = {"command": "python -m bench " + " ".join(args.argv), "parameters": parameters, "quant": args.quant,
              "weights_mib": in_memory, "computed_weights_mib": computed, "load_seconds": seconds,
              "peak_rss_mib": rss_peak, "rss_before_mib": rss_before, "load_average": os.getloadavg(),
              "device": {"model": torch.cuda.get_device_name(device)} if device.type == "cuda" else describe_cpu()}
    print(f"{parameters:,} parameters ({parameters * 2 / 2**20:,.0f} MiB in bf16), quant={args.quant}: "
          f"{in_memory:,.0f} MiB of weights with their scales (computed: {computed:,.0f} MiB), loaded in "
          f"{seconds:.1f} s")
    print(f"peak RSS {rss_peak:,.0f} MiB ({rss_before:,.0f} MiB before loading: Python, torch, bitsandbytes)")
    if str(args.device).startswith("cuda"):
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        print(f"peak CUDA memory allocated {result['peak_cuda_mib']:,.0f} MiB")
    return result
