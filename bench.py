"""Side-by-side benchmarks: kovlm against the transformers + PEFT + bitsandbytes stack, with ratios.

    python bench.py --preset cpu-small        # = python bench.py model --preset cpu-small; qwen3-8b on a GPU
    python bench.py model [--preset cpu-small|qwen3-8b] [--tasks train,generate,loss,vision] [--quick] [--json PATH]
    python bench.py adapters [--tokens 1024] [--repeats 7] [--dtype bf16] [--dropout 0.05] [--quick] [--json PATH]

`model` writes random weights with the preset's Qwen3 / CLIP shapes once to a temporary snapshot folder, so both
stacks load the same files the normal way, then measures, each in its own process (peak memory is per process):
a stage-2 training step (LoRA and DoRA, resampler and per-patch shapes), batched greedy generation, one caption-loss
computation (label-only vs full logits, T ≈ 4700) and two epochs of the vision side (feature cache vs re-encoding).
Before timing, every reference process checks that its per-label losses (dropout off) agree with ours.
`adapters` compares one adapted NF4 linear at Qwen3-8B's layer shapes.

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
import random
import statistics
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import asdict
from functools import partial
from pathlib import Path

import bitsandbytes as bnb
import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer

from bench_adapters import DTYPES, bench_adapters
from bench_snapshots import CAPTION_TEXTS, PRESETS, Preset, preset_for, write_snapshots
from clip import load_clip_vision
from data import preprocess, read_frames, read_manifest, synth_dataset
from features import CachedFeatureDataset, FeatureCache, fill_feature_cache
from lora import QWEN3_LINEARS, LoRALinear, apply_adapters, dequantized_weight
from projectors import build_projector
from qwen3 import load_qwen3
from vlm import IGNORE_INDEX, VLM, VLMConfig

LABEL_LOSS_TOLERANCE = 0.05  # mean |per-label loss - ours'| in nats: the kbit-prepared reference's fp32 norms and
# embeddings move it by ~0.006 at cpu-small, the seeded adapters by ~0.3-0.5 (both in the table)


SHAPES = {"resampler": "perceiver", "per-patch": "mlp"}  # shape -> the projector that makes it
TASKS = ("train", "generate", "loss", "vision")
METHODS = ("lora", "dora")
METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA"}
STEP_TARGETS = {"lora": ("<=", 0.8), "dora": ("<=", 0.5)}  # ours / the best reference, median step time
ADAPTER = dict(r=16, alpha=32, dropout=0.05)  # the project's stage-2 adapters, on all 7 linears of every layer


# ---- what each stack runs: the same batch, the same weights, the same adapters ------------------------------------
def seeded_adapter(name: str, base: nn.Module, dora: bool) -> dict[str, torch.Tensor]:
    """A (r, in), B (out, r) and DoRA's magnitude (out,) of the adapter on linear `name`, drawn from the name alone,
    so both stacks hold the same adapters. B is far from zero and m off ||W||, so they change the loss and the
    parity check below tests them."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    tensors = {"A": torch.randn(ADAPTER["r"], base.in_features, generator=g) * base.in_features ** -0.5,
               "B": torch.randn(base.out_features, ADAPTER["r"], generator=g) * 0.5}
    if dora:
        row_norm = dequantized_weight(base).norm(dim=1).cpu()  # (out,)
        tensors["magnitude"] = row_norm * torch.empty(base.out_features).uniform_(0.5, 1.5, generator=g)
    return tensors


def ours_llm(folders, device, method: str | None) -> nn.Module:
    """kovlm's Qwen3: NF4 base with double-quantized statistics, bf16 weights, per-layer activation checkpointing."""
    llm = load_qwen3(folders["llm"], quant="nf4", dtype=torch.bfloat16, device=device)
    llm.gradient_checkpointing = True
    if method:
        apply_adapters(llm, method=method, **ADAPTER)
        with torch.no_grad():
            for name, module in llm.named_modules():
                if isinstance(module, LoRALinear):
                    tensors = seeded_adapter(name, module.base, module.dora)
                    module.lora_A.copy_(tensors["A"])
                    module.lora_B.copy_(tensors["B"])
                    if module.dora:
                        module.magnitude.copy_(tensors["magnitude"])
    return llm


def reference_llm(folders, device, method: str, *, training: bool, prepared: bool) -> nn.Module:
    """transformers + bitsandbytes + PEFT, set up as their users do (the QLoRA recipe). prepared=True runs PEFT's
    prepare_model_for_kbit_training (every non-4-bit weight upcast to fp32, its activation checkpointing);
    prepared=False is the tuned form: weights stay bf16, non-reentrant activation checkpointing."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, Qwen3ForCausalLM
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = Qwen3ForCausalLM.from_pretrained(folders["llm"], quantization_config=quantization, dtype=torch.bfloat16,
                                             attn_implementation="sdpa", device_map={"": device})
    if training and prepared:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    elif training:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.config.use_cache = not training
    config = LoraConfig(r=ADAPTER["r"], lora_alpha=ADAPTER["alpha"], lora_dropout=ADAPTER["dropout"],
                        target_modules=list(QWEN3_LINEARS), use_dora=method == "dora", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False  # as ours: no CPU repacking that breaks later gradients
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                tensors = seeded_adapter(name.removeprefix("base_model.model."), module.get_base_layer(),
                                         method == "dora")
                module.lora_A["default"].weight.copy_(tensors["A"])
                module.lora_B["default"].weight.copy_(tensors["B"])
                if method == "dora":
                    module.lora_magnitude_vector["default"].weight.copy_(tensors["magnitude"])
    return model


def bench_vlm(preset: Preset, folders, device, shape: str, llm) -> VLM:
    """A VLM without its tower (stage 2 reads cached features): the prompt, the seeded projector, `llm`. The
    reference stack uses one with llm=None for the same prompt, token ids and projector output."""
    name = SHAPES[shape]
    torch.manual_seed(0)
    projector = build_projector(name, preset.vision_hidden, preset.hidden_size,
                                **({"num_queries": preset.queries} if name == "perceiver" else {})).to(device)
    config = VLMConfig(clip_path=str(folders["clip"]), llm_path=str(folders["llm"]), projector={"name": name},
                       num_frames=preset.frames)
    return VLM(None, projector, llm, Tokenizer.from_file(str(folders["llm"] / "tokenizer.json")), config)


def captions_of(vlm: VLM, count: int, tokens: int) -> list[str]:
    """`count` Korean captions of about `tokens` supervised tokens each (caption + <|im_end|>), seeded."""
    words = " ".join(CAPTION_TEXTS).split()
    rng = random.Random(0)
    captions = []
    for _ in range(count):
        caption = rng.choice(words)
        while len(vlm.template.caption_ids(caption)) < tokens:
            caption += " " + rng.choice(words)
        captions.append(caption)
    return captions


def features_of(preset: Preset, batch: int, patches: int, device) -> torch.Tensor:
    """Seeded frame features (B, F, P, Dv) in the feature cache's fp16."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, preset.frames, patches, preset.vision_hidden, generator=g).half().to(device)


def reference_embeds(model, vlm: VLM, features, input_ids) -> torch.Tensor:
    """The reference's inputs_embeds: its own token embeddings with the projector's output at the video slots."""
    visual = vlm.project(features)  # (B, N, C)
    embeds = model.get_input_embeddings()(input_ids)  # (B, T, C)
    slots = (input_ids == vlm.template.video_pad_id).unsqueeze(-1)  # (B, T, 1)
    return embeds.masked_scatter(slots, visual.to(embeds.dtype))  # (B, T, C)


def batch_ids(vlm: VLM, features: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels (B, T) of this batch, as VLM.forward builds them, on the features' device."""
    visual_tokens = vlm.projector.config.output_tokens(*features.shape[1:3])
    return tuple(t.to(features.device) for t in vlm.tokenize_batch(captions, visual_tokens))


def reference_caption_loss(model, vlm: VLM, features, captions) -> torch.Tensor:
    """transformers' loss on our batch: full logits (B, T, V), labels -100 off the caption (its ForCausalLMLoss)."""
    input_ids, labels = batch_ids(vlm, features, captions)
    return model(inputs_embeds=reference_embeds(model, vlm, features, input_ids), labels=labels).loss


def label_losses_ours(vlm: VLM, features, captions) -> torch.Tensor:
    """Cross-entropy at each supervised position (L,): VLM.forward before its sum."""
    input_ids, labels = batch_ids(vlm, features, captions)
    hidden = vlm.llm.hidden_states(inputs_embeds=vlm.splice_visual_tokens(input_ids, vlm.project(features)))
    return label_only_loss(vlm.llm, hidden, labels, per_label=True)


def label_losses_reference(model, vlm: VLM, features, captions) -> torch.Tensor:
    """Cross-entropy at each supervised position (L,), from transformers' logits (B, T, V)."""
    input_ids, labels = batch_ids(vlm, features, captions)
    logits = model(inputs_embeds=reference_embeds(model, vlm, features, input_ids)).logits  # (B, T, V)
    targets = labels[:, 1:]  # position t predicts token t + 1
    supervised = targets != IGNORE_INDEX  # (B, T-1)
    return F.cross_entropy(logits[:, :-1][supervised].float(), targets[supervised], reduction="none")  # (L,)


def parity(args, label_losses, modules: list[nn.Module], llm: nn.Module | None = None) -> dict:
    """The per-label losses with dropout off (eval mode, no autograd). A reference stack compares them with ours
    (args.expect) and refuses to be timed when they differ by more than LABEL_LOSS_TOLERANCE on average. Ours also
    measures how far its adapters move them (B = 0 and DoRA's m = ||W|| give the base linear): the check must tell
    a stack with our adapters from one without."""
    losses = eval_losses(label_losses, modules)
    result = {"loss": losses.mean().item(), "label_losses": losses.tolist()}
    if args.expect:
        difference = (losses - torch.tensor(json.loads(Path(args.expect).read_text()))).abs()  # (L,)
        if difference.mean() > LABEL_LOSS_TOLERANCE:
            raise SystemExit(f"bench: {args.stack} {args.method} ({args.task}, {args.shape}): the per-label losses "
                             f"differ from ours by {difference.mean():.4f} on average > {LABEL_LOSS_TOLERANCE}: the "
                             f"stacks do not compute the same thing, so nothing is timed")
        result |= {"mean_difference": difference.mean().item(), "max_difference": difference.max().item()}
    if llm is not None:
        adapters = [m for m in llm.modules() if isinstance(m, LoRALinear)]
        saved = [{name: p.clone() for name, p in m.named_parameters(recurse=False)} for m in adapters]
        with torch.no_grad():
            for m in adapters:
                m.lora_B.zero_()
                if m.dora:
                    m.magnitude.copy_(m.weight_sq_norm.sqrt())
            result["adapter_effect"] = (eval_losses(label_losses, modules) - losses).abs().mean().item()
            for m, parameters in zip(adapters, saved):
                for name, p in m.named_parameters(recurse=False):
                    p.copy_(parameters[name])
    return result


def eval_losses(label_losses, modules: list[nn.Module]) -> torch.Tensor:
    for module in modules:
        module.eval()
    with torch.no_grad():
        losses = label_losses().float().cpu()
    for module in modules:
        module.train()
    return losses


# ---- measuring: clocks and peak memory --------------------------------------------------------------------------
def now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def reset_peak_memory(device) -> None:
    """CUDA: reset max_memory_allocated. CPU: reset the process's peak resident set (VmHWM), which Linux allows by
    writing 5 to /proc/self/clear_refs; from here on VmHWM is the peak of what follows (weights included)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as error:
        raise SystemExit(f"bench: cannot reset the peak RSS through /proc/self/clear_refs ({error}); the CPU "
                         f"memory figures need Linux") from error


def memory_mib(device, peak: bool) -> float:
    """Peak (or current) CUDA memory allocated, or the process's peak (or current) resident set, in MiB."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**20
    field_name = "VmHWM:" if peak else "VmRSS:"
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field_name))
    return int(line.split()[1]) / 1024  # kB


def timed_repeats(preset: Preset, device, run, repeats: int, warmup: int | None = None) -> dict:
    """`warmup` (default preset.warmup) untimed calls of run(), then `repeats` timed ones; peak memory over the
    timed ones."""
    for _ in range(preset.warmup if warmup is None else warmup):
        run()
    before = memory_mib(device, peak=False)
    reset_peak_memory(device)
    seconds = []
    for _ in range(repeats):
        start = now(device)
        run()
        seconds.append(now(device) - start)
    return {"seconds": seconds, "median_s": statistics.median(seconds), "peak_mib": memory_mib(device, peak=True),
            "resident_before_mib": before}


def model_flops(preset: Preset, batch: int, length: int, label_tokens: int) -> float:
    """Model FLOPs of one training step (PaLM, arXiv 2204.02311, appendix B): 6 N per token for the decoder-layer
    weights N, 6 C V per supervised token for the lm_head (it runs at the caption positions only), and
    12 L nh hs T per token for attention (QK^T and AV, forward and backward, causal mask not discounted)."""
    p = preset
    attention = p.hidden_size * p.head_dim * (2 * p.heads + 2 * p.kv_heads)  # q, o, k, v
    n_layers = p.layers * (attention + 3 * p.hidden_size * p.intermediate_size)
    tokens = batch * length
    return (6 * n_layers * tokens + 6 * p.hidden_size * p.vocab_size * label_tokens
            + 12 * p.layers * p.heads * p.head_dim * length * tokens)


PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, no sparsity


def card_peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


# ---- the workers: one measurement each, in its own process (bench.py _one ...) ---------------------------------
def train_worker(args, preset: Preset, folders, device) -> dict:
    """Median time, tokens/s and peak memory of a stage-2 step: forward + backward + AdamW step, bf16 autocast."""
    batch = preset.short_batch if args.shape == "resampler" else preset.long_batch
    ours = args.stack == "ours"
    vlm = bench_vlm(preset, folders, device, args.shape, ours_llm(folders, device, args.method) if ours else None)
    if not ours:
        model = reference_llm(folders, device, args.method, training=True, prepared=args.stack == "reference")
    modules = [vlm] if ours else [vlm, model]
    features = features_of(preset, batch, preset.patches, device)
    captions = captions_of(vlm, batch, preset.caption_tokens)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def label_losses():
        with autocast:
            return label_losses_ours(vlm, features, captions) if ours else \
                label_losses_reference(model, vlm, features, captions)
    checked = parity(args, label_losses, modules, vlm.llm if ours else None)
    optimizer = torch.optim.AdamW([p for m in modules for p in m.parameters() if p.requires_grad], lr=1e-5)

    def step():
        with autocast:
            loss = vlm(features, captions) if ours else reference_caption_loss(model, vlm, features, captions)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = timed_repeats(preset, device, step, preset.step_repeats)
    input_ids, labels = batch_ids(vlm, features, captions)
    label_tokens = int((labels != IGNORE_INDEX).sum())
    flops = model_flops(preset, batch, input_ids.shape[1], label_tokens)
    peak = card_peak_flops(device)
    return {**checked, **measured, "batch": batch, "length": input_ids.shape[1], "label_tokens": label_tokens,
            "tokens_per_s": input_ids.numel() / measured["median_s"], "model_flops": flops,
            "mfu": flops / measured["median_s"] / peak if peak else None}


def generate_worker(args, preset: Preset, folders, device) -> dict:
    """Batched greedy captions, exactly preset.new_tokens each: captions/s, time to first token, peak memory. The
    models are those a user evaluates with: ours from load_qwen3 + adapters, the reference a PEFT model (unmerged:
    merging into a 4-bit base would re-quantize it), both without autocast, as evaluate.py runs."""
    ours = args.stack == "ours"
    vlm = bench_vlm(preset, folders, device, "resampler", ours_llm(folders, device, args.method) if ours else None)
    if not ours:
        model = reference_llm(folders, device, args.method, training=False, prepared=False)
    modules = [vlm] if ours else [vlm, model]
    check_features = features_of(preset, preset.short_batch, preset.patches, device)
    captions = captions_of(vlm, preset.short_batch, preset.caption_tokens)
    checked = parity(args, lambda: label_losses_ours(vlm, check_features, captions) if ours else
                     label_losses_reference(model, vlm, check_features, captions), modules, vlm.llm if ours else None)
    for module in modules:
        module.eval()
    features = features_of(preset, preset.generate_batch, preset.patches, device)
    if ours:
        # no stop token: random weights would end rows at random places; both stacks decode new_tokens exactly
        vlm.template.im_end_id = vlm.template.end_of_text_id = -1
        generate = lambda n: vlm.generate(features, max_new_tokens=n)
    else:
        def generate(n):
            input_ids, mask = (t.to(device) for t in vlm.prompt_batch(preset.queries, None, len(features)))
            out = model.generate(inputs_embeds=reference_embeds(model, vlm, features, input_ids),
                                 attention_mask=mask, max_new_tokens=n, do_sample=False)
            if out.shape[1] != n:
                raise SystemExit(f"bench: transformers generated {out.shape[1]} tokens, not {n}")
    with torch.no_grad():
        first = timed_repeats(preset, device, lambda: generate(1), preset.repeats)
        full = timed_repeats(preset, device, lambda: generate(preset.new_tokens), preset.repeats, warmup=0)
    return {**checked, "captions_per_s": preset.generate_batch / full["median_s"],
            "first_token_s": first["median_s"], "peak_mib": full["peak_mib"], "seconds": full["seconds"],
            "decode_step_s": (full["median_s"] - first["median_s"]) / max(1, preset.new_tokens - 1)}


def label_only_loss(llm, hidden: torch.Tensor, labels: torch.Tensor, per_label: bool = False) -> torch.Tensor:
    """vlm.VLM.forward after the decoder, line for line (tests/test_bench.py holds the two equal): the lm_head
    only at the L supervised positions, summed cross-entropy over their count (or each position's, per_label)."""
    targets = labels[:, 1:]  # position t predicts token t + 1
    supervised = targets != IGNORE_INDEX  # (B, T-1)
    logits = llm.logits_from_hidden(hidden[:, :-1][supervised])  # (L, C) -> (L, V)
    if per_label:
        return F.cross_entropy(logits.float(), targets[supervised], reduction="none")  # (L,)
    return F.cross_entropy(logits.float(), targets[supervised], reduction="sum") / int(supervised.sum())


def full_logits_loss(llm, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' Qwen3ForCausalLM: logits at every position (B, T, V), then its ForCausalLMLoss (upcast to
    fp32, shift, mean cross-entropy over the labelled positions)."""
    from transformers.loss.loss_utils import ForCausalLMLoss
    return ForCausalLMLoss(llm.logits_from_hidden(hidden), labels, llm.config.vocab_size)


def loss_worker(args, preset: Preset, folders, device) -> dict:
    """One caption-loss computation from given final hidden states (B=1, T ≈ 4700, C) to the loss, label-only or
    full logits: forward only, then forward + backward; time and peak memory above the loaded model of each."""
    llm = ours_llm(folders, device, method=None)  # its lm_head (V, C) in bf16
    vlm = bench_vlm(preset, folders, device, "per-patch", llm)
    input_ids, labels = vlm.tokenize_batch(captions_of(vlm, 1, preset.caption_tokens),
                                           preset.frames * preset.loss_patches)
    labels = labels.to(device)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(*input_ids.shape, preset.hidden_size, generator=g).to(device, torch.bfloat16)  # (1, T, C)
    loss_of = label_only_loss if args.variant == "label-only" else full_logits_loss
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    ours = label_only_loss(llm, hidden, labels).item()
    full = full_logits_loss(llm, hidden, labels).item() if args.variant == "full-logits" else ours
    if abs(full - ours) > 1e-4 * abs(ours):  # the same numbers: only where the lm_head runs differs
        raise SystemExit(f"bench: the full-logits loss {full:.6f} differs from the label-only loss {ours:.6f}")
    hidden.requires_grad_()  # stands for the decoder's output

    def forward():
        with torch.no_grad(), autocast:
            loss_of(llm, hidden, labels)

    def forward_backward():
        with autocast:
            loss = loss_of(llm, hidden, labels)
        loss.backward()
        hidden.grad = None
    result = {"length": input_ids.shape[1], "label_tokens": int((labels != IGNORE_INDEX).sum()), "loss": ours}
    for mode, run in (("forward", forward), ("forward+backward", forward_backward)):
        # big buffers go back to the OS when freed, so the forward's peak does not leak into the next one's
        measured = timed_repeats(preset, device, run, preset.repeats)
        result[mode] = {**measured, "extra_mib": measured["peak_mib"] - measured["resident_before_mib"]}
    return result


def vision_worker(args, preset: Preset, folders, device) -> dict:
    """Two epochs over preset.videos videos: with the feature cache (the tower runs in epoch 1 only) and
    re-encoding every epoch (decode, preprocess, tower), as a pipeline without a cache does."""
    vision = load_clip_vision(folders["clip"], dtype=torch.bfloat16, device=device)
    vlm = VLM(vision, None, None, Tokenizer.from_file(str(folders["llm"] / "tokenizer.json")),
              VLMConfig(clip_path=str(folders["clip"]), llm_path=str(folders["llm"]), projector={},
                        num_frames=preset.frames))
    frames_encoded = []
    vision.register_forward_hook(lambda module, inputs, output: frames_encoded.append(inputs[0].shape[0]))
    with tempfile.TemporaryDirectory(prefix="vision-", dir=args.root) as folder:  # an empty cache every run
        samples = read_manifest(synth_dataset(Path(folder) / "videos", preset.videos, num_val=0, num_test=0,
                                              size=64, frames=2 * preset.frames))
        cache = FeatureCache(Path(folder) / "features", tower=vision.fingerprint, num_frames=preset.frames,
                             image_size=preset.image_size, layer=vlm.config.vision_layer)

        def re_encode():
            for start in range(0, len(samples), 8):
                batch = samples[start:start + 8]
                frames = [preprocess(read_frames(s.video, preset.frames), preset.image_size) for s in batch]
                vlm.encode_video(torch.stack(frames).to(device))  # (B, F, 3, S, S) -> (B, F, P, Dv)

        def from_cache():
            fill_feature_cache(vlm, samples, cache, image_size=preset.image_size, show_progress=False)
            for item in CachedFeatureDataset(samples, cache):
                item["features"].to(device)
        result = {}
        for name, epoch in (("re-encode", re_encode), ("cache", from_cache)):
            result[name] = {"seconds": [], "tower_frames": []}
            for _ in range(2):
                frames_encoded.clear()
                start = now(device)
                epoch()
                result[name]["seconds"].append(now(device) - start)
                result[name]["tower_frames"].append(sum(frames_encoded))
    return result


def snapshot_worker(args, preset: Preset, folders, device) -> dict:
    write_snapshots(preset, Path(args.root), device)
    return {}


WORKERS = {"snapshot": snapshot_worker, "train": train_worker, "generate": generate_worker, "loss": loss_worker,
           "vision": vision_worker}


def bench_one(args) -> dict:
    """One measurement, in this process (the parent runs each in a fresh one, so peak memory is its own)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random tiny weights hit denormal floats on the CPU (10x slower there)
    preset = preset_for(args.preset, args.quick)
    folders = {"llm": Path(args.root) / "llm", "clip": Path(args.root) / "clip"}
    if args.stack != "ours" or args.variant == "full-logits":
        import peft  # noqa: F401  the reference's libraries belong to its baseline, as torch does to ours
        import transformers  # noqa: F401
    libraries = memory_mib(device, peak=False)  # CPU: Python, torch, bitsandbytes (+ transformers, peft) resident
    return {**WORKERS[args.task](args, preset, folders, device), "libraries_mib": libraries,
            "load_average": os.getloadavg()}


# ---- the parent: one worker process per measurement, then the table ---------------------------------------------
def run_worker(args, task: str, **options) -> dict:
    """One measurement in a process of its own (peak RSS is per process and only grows), its result back as JSON;
    with --inline, in this process (the quick test's speed; its memory figures then mean nothing).

    On the CPU it is forked from a fork server that imported this module once (torch and bitsandbytes take ~10 s on
    a busy 2-core machine) and never computes, so no thread pool is forked mid-use. On a GPU it is spawned, a fresh
    interpreter: no CUDA state is ever forked."""
    flags = ["--task", task, "--preset", args.preset, "--root", str(args.root), "--dtype", args.dtype]
    flags += (["--quick"] if args.quick else []) + (["--threads", str(args.threads)] if args.threads else [])
    for key, value in options.items():
        flags += [f"--{key.replace('_', '-')}", str(value)] if value is not None else []
    if args.inline:
        return bench_one(build_parser().parse_args(["_one", *flags]))
    print(f"bench: {task} {' '.join(str(v) for v in options.values() if v is not None and len(str(v)) < 12)}",
          flush=True)
    context = multiprocessing.get_context("spawn" if torch.cuda.is_available() else "forkserver")
    context.set_forkserver_preload([Path(__file__).stem])
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
        raise SystemExit(f"bench: `bench.py _one {' '.join(flags)}` failed: {result['error']}\n"
                         f"the end of its output:\n{log.read_text()[-3000:]}")
    return result


def worker_process(flags: list[str], sender, log: Path) -> None:
    """The body of a worker process: its output goes to `log`, its result or error through the pipe."""
    with open(log, "a") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            result = bench_one(build_parser().parse_args(["_one", *flags]))
        except BaseException as error:  # the parity check's SystemExit too
            traceback.print_exc()
            result = {"error": f"{type(error).__name__}: {error}"}
        sys.stdout.flush()
        sender.send(json.dumps(result))


def run_measurements(args, tasks: list[str]) -> dict:
    """Ours first, then the reference stacks given ours' per-label losses: each checks that its own agree before
    it times anything."""
    run_worker(args, "snapshot")
    results = {}
    if "train" in tasks:
        results["train"] = {shape: {method: {} for method in args.methods} for shape in args.shapes}
        for shape in args.shapes:  # ours' LoRA and DoRA back to back: their ratio's target is the tightest
            for stack in ("ours", "reference", "tuned"):
                for method in args.methods:
                    expect = Path(args.root) / f"expect-train-{shape}-{method}.json"
                    run = run_worker(args, "train", stack=stack, method=method, shape=shape,
                                     expect=None if stack == "ours" else expect)
                    losses = run.pop("label_losses")
                    if stack == "ours":
                        expect.write_text(json.dumps(losses))
                    results["train"][shape][method][stack] = run
    if "generate" in tasks:
        results["generate"] = {}
        for method in args.methods:
            expect = Path(args.root) / f"expect-generate-{method}.json"
            ours = run_worker(args, "generate", stack="ours", method=method)
            expect.write_text(json.dumps(ours.pop("label_losses")))
            reference = run_worker(args, "generate", stack="reference", method=method, expect=expect)
            reference.pop("label_losses")
            results["generate"][method] = {"ours": ours, "reference": reference}
    if "loss" in tasks:
        results["loss"] = {variant: run_worker(args, "loss", variant=variant)
                           for variant in ("label-only", "full-logits")}
    if "vision" in tasks:
        results["vision"] = run_worker(args, "vision")
    return results


def ratio_row(preset, shape, measure, values: dict, target: tuple | None = None, fmt="{:.0f}") -> dict:
    """A table row: ours, reference, tuned reference and ours / each. A target (op, value) is judged against
    the better of the two references, so a met target holds against the best the reference can do."""
    ours = values["ours"]
    ratios = {stack: ours / values[stack] for stack in ("reference", "tuned") if values.get(stack)}
    row = {"preset": preset, "shape": shape, "measure": measure,
           **{stack: values.get(stack) for stack in ("ours", "reference", "tuned")},
           "ours/reference": ratios.get("reference"), "ours/tuned": ratios.get("tuned"), "format": fmt}
    if target:
        op, bound = target
        judged = (max if op == "<=" else min)(ratios.values())
        row |= {"target": f"ours/best {op} {bound}", "verdict": verdict(judged <= bound if op == "<=" else
                                                                         judged >= bound)}
    return row


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def train_rows(preset: Preset, shape: str, methods: dict, device) -> list[dict]:
    first = next(iter(methods.values()))["ours"]
    label, rows = f"{shape}: B {first['batch']} x T {first['length']}", []
    row = partial(ratio_row, preset.name, label)
    for method, runs in methods.items():
        M, memory_target = METHOD_NAMES[method], ("<=", 0.6)
        rows += parity_rows(row, M, runs)
        rows.append(row(f"{M} step (ms)", {k: 1000 * v["median_s"] for k, v in runs.items()}, STEP_TARGETS[method]))
        rows.append(row(f"{M} tokens/s", {k: v["tokens_per_s"] for k, v in runs.items()}))
        peak = {k: v["peak_mib"] for k, v in runs.items()}
        rows.append(row(f"{M} peak memory (MiB)", peak, memory_target if device.type == "cuda" else None))
        if device.type == "cpu":  # what max_memory_allocated counts on a GPU: the tensors, not the libraries' code
            rows.append(row(f"{M} peak memory above the libraries (MiB)",
                            {k: peak[k] - v["libraries_mib"] for k, v in runs.items()}, memory_target))
        if device.type == "cuda" and method == "lora":
            rows.append(row("LoRA MFU (%)", {k: 100 * v["mfu"] for k, v in runs.items() if v["mfu"]}, fmt="{:.1f}"))
    if set(methods) != set(METHODS):
        return rows
    dora_over_lora = {k: methods["dora"][k]["median_s"] / methods["lora"][k]["median_s"] for k in methods["lora"]}
    return rows + [row("DoRA step / LoRA step", dora_over_lora, fmt="{:.2f}") |
                   {"target": "ours <= 1.15", "verdict": verdict(dora_over_lora["ours"] <= 1.15)}]


def parity_rows(row, M: str, runs: dict) -> list[dict]:
    """The check before timing: mean loss (dropout off), the mean per-label |difference| from ours (must stay under
    the tolerance), and in ours' column how far the adapters move the per-label losses (must be well above)."""
    difference = {k: v.get("mean_difference") for k, v in runs.items()} | {"ours": runs["ours"]["adapter_effect"]}
    return [row(f"{M} loss, dropout off", {k: v["loss"] for k, v in runs.items()}, fmt="{:.4f}"),
            row(f"{M} per-label loss, mean abs. difference from ours (ours: adapters on vs off)", difference, fmt="{:.4f}") |
            {"ours/reference": None, "ours/tuned": None, "target": f"<= {LABEL_LOSS_TOLERANCE}",
             "verdict": verdict(all(d <= LABEL_LOSS_TOLERANCE for k, d in difference.items() if k != "ours"))}]


def generate_rows(preset: Preset, methods: dict) -> list[dict]:
    label, rows = f"generation: B {preset.generate_batch}, {preset.new_tokens} new tokens", []
    row = partial(ratio_row, preset.name, label)
    for method, runs in methods.items():
        M = METHOD_NAMES[method]
        rows += parity_rows(row, M, runs)
        rows.append(row(f"{M} captions/s", {k: v["captions_per_s"] for k, v in runs.items()}, (">=", 1.5), "{:.2f}"))
        rows.append(row(f"{M} time to first token (ms)", {k: 1000 * v["first_token_s"] for k, v in runs.items()}))
        rows.append(row(f"{M} decode step (ms), (all - first token) / (new tokens - 1)",
                        {k: 1000 * v["decode_step_s"] for k, v in runs.items()}, fmt="{:.1f}"))
        rows.append(row(f"{M} peak memory (MiB)", {k: v["peak_mib"] for k, v in runs.items()}))
    return rows


def loss_rows(preset: Preset, variants: dict) -> list[dict]:
    ours, full = variants["label-only"], variants["full-logits"]
    label = f"caption loss: T {ours['length']}, C {preset.hidden_size}, V {preset.vocab_size}, " \
            f"{ours['label_tokens']} labels"
    return [ratio_row(preset.name, label, measure, {"ours": pick(ours[mode]), "reference": pick(full[mode])})
            for mode in ("forward", "forward+backward")
            for measure, pick in ((f"{mode} (ms), label-only vs full logits", lambda r: 1000 * r["median_s"]),
                                  (f"{mode}: memory above the model (MiB)", lambda r: r["extra_mib"]))]


def vision_rows(preset: Preset, runs: dict) -> list[dict]:
    label = f"vision: {preset.videos} videos x {preset.frames} frames, 2 epochs"
    seconds = {"ours": sum(runs["cache"]["seconds"]), "reference": sum(runs["re-encode"]["seconds"])}
    frames = {"ours": runs["cache"]["tower_frames"], "reference": runs["re-encode"]["tower_frames"]}
    return [ratio_row(preset.name, label, "2 epochs (s), feature cache vs re-encoding", seconds, fmt="{:.2f}"),
            {"preset": preset.name, "shape": label, "measure": "frames through the tower, epoch 1 / epoch 2",
             **{k: " / ".join(map(str, v)) for k, v in frames.items()},
             "target": "epoch 2: 0", "verdict": verdict(frames["ours"][1] == 0)}]


def model_rows(preset: Preset, results: dict, device) -> list[dict]:
    rows = [row for shape, methods in results.get("train", {}).items()
            for row in train_rows(preset, shape, methods, device)]
    rows += generate_rows(preset, results["generate"]) if "generate" in results else []
    rows += loss_rows(preset, results["loss"]) if "loss" in results else []
    return rows + (vision_rows(preset, results["vision"]) if "vision" in results else [])


def print_model_table(rows: list[dict], judged: bool) -> None:
    columns = ["preset", "shape", "measure", "ours", "reference", "tuned", "ours/reference", "ours/tuned", "target"]
    print("\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if value is None:
                cells.append("")
            elif column.startswith("ours/"):
                cells.append(f"{value:.2f}")
            elif column == "target":
                cells.append(f"{value}: {row['verdict'] if judged else '(toy sizes, not judged)'}")
            else:
                cells.append(row.get("format", "{}").format(value) if isinstance(value, float) else str(value))
        print("| " + " | ".join(cells) + " |")


def worker_results(results: dict) -> list[dict]:
    """Every worker's result dict inside the nested results."""
    if "load_average" in results:
        return [results]
    return [found for value in results.values() if isinstance(value, dict) for found in worker_results(value)]


def describe_device(device, threads: int | None) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"CPU {model}, {os.cpu_count()} cores, {threads or torch.get_num_threads()} torch threads"


def bench_model(args) -> dict:
    """kovlm against transformers + PEFT + bitsandbytes on the preset's random Qwen3 / CLIP, with ratios."""
    preset = preset_for(args.preset, args.quick)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preset.name == "qwen3-8b" and device.type != "cuda":
        raise SystemExit("bench: the qwen3-8b preset needs a CUDA GPU (16 GB of weights, hours on a CPU); "
                         "use --preset cpu-small here")
    load_start, started = os.getloadavg(), time.time()
    with tempfile.TemporaryDirectory(prefix="kovlm-bench-") as temporary:
        args.root = Path(args.snapshot_dir or temporary)
        args.root.mkdir(parents=True, exist_ok=True)
        results = run_measurements(args, args.tasks)
    rows = model_rows(preset, results, device)
    print_model_table(rows, judged=not args.quick)
    loads = sorted(value["load_average"][0] for value in worker_results(results))
    print(f"{describe_device(device, args.threads)}; 1-minute load average at the end of each measurement "
          f"{loads[0]:.1f} to {loads[-1]:.1f}; {time.time() - started:.0f} s")
    memory = "CUDA max_memory_allocated" if device.type == "cuda" else \
        "peak RSS (VmHWM, reset before the timed repeats) of the measurement's own process"
    versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "peft", "bitsandbytes")}
    return {"command": "python bench.py " + " ".join(args.argv), "device": describe_device(device, args.threads),
            "versions": versions | {"python": platform.python_version()}, "preset": asdict(preset),
            "dtype": args.dtype, "memory": memory,
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)  # options every subcommand takes
    common.add_argument("--quick", action="store_true", help="toy sizes, one round: keeps the script working")
    common.add_argument("--json", type=Path, help="also write the results to this JSON file")
    common.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="compute dtype (autocast)")
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
    adapters.set_defaults(run=bench_adapters)
    model = commands.add_parser("model", parents=[common], help="training step, generation, loss, vision side: "
                                "ours vs transformers + PEFT + bitsandbytes (the default command)")
    model.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    model.add_argument("--tasks", type=comma_list(TASKS), default=list(TASKS), help="a subset, comma-separated: "
                       + ",".join(TASKS))
    model.add_argument("--shapes", type=comma_list(SHAPES), default=list(SHAPES),
                       help="training shapes, comma-separated: " + ",".join(SHAPES))
    model.add_argument("--methods", type=comma_list(METHODS), default=list(METHODS),
                       help="adapters, comma-separated: " + ",".join(METHODS))
    model.add_argument("--snapshot-dir", type=Path, help="keep the random snapshot folders here and reuse them "
                                                          "(default: a temporary folder, removed at the end)")
    model.add_argument("--inline", action="store_true", help="run every measurement in this process (tests)")
    model.set_defaults(run=bench_model, json=Path("bench_results.json"))
    one = commands.add_parser("_one", parents=[common], help="internal: one measurement, printed as JSON")
    one.add_argument("--task", choices=sorted(WORKERS), required=True)
    one.add_argument("--preset", choices=sorted(PRESETS), required=True)
    one.add_argument("--root", required=True, help="the folder holding llm/ and clip/")
    one.add_argument("--stack", choices=["ours", "reference", "tuned"], default="ours")
    one.add_argument("--method", choices=METHODS, default="lora")
    one.add_argument("--shape", choices=sorted(SHAPES), default="resampler")
    one.add_argument("--variant", choices=["label-only", "full-logits"], default="label-only")
    one.add_argument("--expect", help="a JSON file of ours' per-label losses: refuse to time when this stack's differ")
    one.set_defaults(run=bench_one)
    return parser


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["model", *argv]  # `python bench.py --preset cpu-small` is `python bench.py model --preset cpu-small`
    args = build_parser().parse_args(argv)
    args.argv = argv
    result = args.run(args)
    if args.command == "_one":
        print(json.dumps(result))
    elif args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
