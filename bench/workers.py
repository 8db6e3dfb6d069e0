"""The model benchmark's measurements, one per process (`python -m bench _one --task ...`): how each is taken.

train: a stage-2 training step (forward + backward + AdamW step, bf16 autocast). memory: where that step's
memory goes (bench/step_memory.py). generate: batched greedy captions. loss: one caption-loss computation,
label-only vs full logits. vision: two epochs of the vision side, feature cache vs re-encoding. Each reports medians
of timed repeats and the peak memory of its own process.
"""
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from bench.snapshots import Preset, preset_for, write_snapshots
from bench.stacks import batch_ids, build_stack, caption_loss, captions_of, check_gradients, check_label_losses, \
    features_of, full_logits_loss, label_losses, ours_llm, reference_embeds, stack_modules, stage2_vlm
from bench.step_memory import malloc_stats, profile_step, resident_by_mapping, resident_tensors, saved_by_module
from data import read_frames, read_manifest
from demo.synth import synth_dataset
from features import CachedFeatureDataset, feature_cache_for, fill_feature_cache
from lora import after_optimizer_step
from vision import load_vision
from vlm import IGNORE_INDEX, VLM, VLMConfig
from vlm import caption_loss as label_only_loss
from vlm import merged_for_eval

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, no sparsity


# ---- clocks, peak memory, FLOPs --------------------------------------------------------------------------------
def now(device) -> float:
    """The wall clock once the device's queued work is done."""
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
    weights N (a MoE's active ones), 6 C V per supervised token for the lm_head (it runs at the caption positions
    only), and 12 L nh hs T per token for attention (QK^T and AV, forward and backward, causal mask not discounted)."""
    p = preset
    attention = p.hidden_size * p.head_dim * (2 * p.heads + 2 * p.kv_heads)  # q, o, k, v
    mlp = p.experts_per_token * p.expert_intermediate if p.experts else p.intermediate_size  # a MoE's active experts
    n_layers = p.layers * (attention + 3 * p.hidden_size * mlp)
    tokens = batch * length
    return (6 * n_layers * tokens + 6 * p.hidden_size * p.vocab_size * label_tokens
            + 12 * p.layers * p.heads * p.head_dim * length * tokens)


def card_peak_flops(device) -> float | None:
    """The GPU's dense bf16 peak from PEAK_BF16_FLOPS, None on the CPU or an unlisted card (no MFU then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


# ---- the workers ------------------------------------------------------------------------------------------------
def training_setup(args, preset: Preset, folders, device) -> dict:
    """The stage-2 training step both train and memory measure: the stack, its batch, the checks before anything
    is measured (per-label losses, then adapter gradients, against ours), the AdamW optimizer and the step
    (forward + backward + optimizer step, bf16 autocast)."""
    batch = preset.short_batch if args.shape == "resampler" else preset.long_batch
    vlm, reference = build_stack(args, preset, folders, device, args.shape, training=True)
    modules = stack_modules(vlm, reference)
    features = features_of(preset, batch, preset.patches, device)
    captions = captions_of(vlm, batch, preset.caption_tokens)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def per_label_losses():
        with autocast:
            return label_losses(vlm, reference, features, captions)
    checked = check_label_losses(args, per_label_losses, vlm, reference)
    labels_only = args.stack == "tuned"  # the tuned reference keeps logits only from the captions on

    def loss_of_batch():
        with autocast:
            return caption_loss(vlm, reference, features, captions, labels_only=labels_only)
    checked |= check_gradients(args, loss_of_batch, vlm, reference)
    trainable = [p for m in modules for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def finish():
        optimizer.step()
        after_optimizer_step(vlm.llm if reference is None else reference)
        optimizer.zero_grad(set_to_none=True)

    def step():
        loss_of_batch().backward()
        finish()
    input_ids, labels = batch_ids(vlm, features, captions)
    return {"vlm": vlm, "reference": reference, "modules": modules, "checked": checked, "batch": batch,
            "input_ids": input_ids, "labels": labels, "loss_of_batch": loss_of_batch, "finish": finish,
            "step": step, "trainable": trainable, "optimizer": optimizer}


def train_worker(args, preset: Preset, folders, device) -> dict:
    """Median time, tokens/s and peak memory of a stage-2 step: forward + backward + AdamW step, bf16 autocast."""
    setup = training_setup(args, preset, folders, device)
    measured = timed_repeats(preset, device, setup["step"], preset.step_repeats)
    batch, input_ids, labels = setup["batch"], setup["input_ids"], setup["labels"]
    label_tokens = int((labels != IGNORE_INDEX).sum())
    flops = model_flops(preset, batch, input_ids.shape[1], label_tokens)
    peak = card_peak_flops(device)
    return {**setup["checked"], **measured, "batch": batch, "length": input_ids.shape[1],
            "label_tokens": label_tokens, "tokens_per_s": input_ids.numel() / measured["median_s"],
            "model_flops": flops, "mfu": flops / measured["median_s"] / peak if peak else None}


def memory_worker(args, preset: Preset, folders, device) -> dict:
    """Where a training step's memory goes (bench/step_memory.py): after the warm-up, one step's peak memory as
    train measures it, with what was resident before it (tensors by kind, the allocator's heap); then one more
    step under the allocation profiler and the saved-tensor hook: the tensor peak and what is live at it."""
    setup = training_setup(args, preset, folders, device)
    for _ in range(max(1, preset.warmup)):
        setup["step"]()
    heap_before = malloc_stats() if device.type == "cpu" else None
    mappings_before = resident_by_mapping() if device.type == "cpu" else None
    measured = timed_repeats(preset, device, setup["step"], 1, warmup=0)
    roots = {"ours": setup["vlm"]} if setup["reference"] is None else \
        {"projector": setup["vlm"].projector, "reference": setup["reference"]}
    profiled = profile_step(setup["loss_of_batch"], setup["finish"], roots, setup["trainable"], device)
    checkpointing_off(setup["vlm"], setup["reference"])  # every layer's saves, seen at once
    saved = saved_by_module(setup["loss_of_batch"], roots)
    return {"saved_without_checkpointing_mib": saved, **setup["checked"], "batch": setup["batch"],
            "length": setup["input_ids"].shape[1],
            "resident_before_mib": measured["resident_before_mib"], "peak_mib": measured["peak_mib"],
            "resident_tensors_mib": resident_tensors(setup["modules"], setup["optimizer"]),
            "mappings_before_mib": mappings_before,
            "heap_before": heap_before, "heap_after": malloc_stats() if device.type == "cpu" else None,
            **profiled}


def checkpointing_off(vlm, reference) -> None:
    """Per-layer activation checkpointing off, in ours or in the transformers model under PEFT."""
    if reference is None:
        vlm.llm.gradient_checkpointing = False
    else:
        reference.base_model.model.gradient_checkpointing_disable()


def generate_worker(args, preset: Preset, folders, device) -> dict:
    """Batched greedy captions, exactly preset.new_tokens each: captions/s, time to first token, peak memory. The
    models are those a user evaluates with: ours from load_qwen3 + adapters (args.variant: "graphs", the decode
    step as a CUDA graph on a GPU; "eager", without; "merged", adapters folded into a bf16 copy), the reference a
    PEFT model (unmerged: merging into a 4-bit base would re-quantize it), both without autocast, as evaluate.py
    runs. The captions come back for the parent to compare (greedy_equal); with --dtype fp32 (weights and compute
    in fp32) any difference from ours stops the run."""
    dtype = DTYPES[args.dtype]
    vlm, reference = build_stack(args, preset, folders, device, "resampler", training=False, dtype=dtype)
    check_features = features_of(preset, preset.short_batch, preset.patches, device)
    captions = captions_of(vlm, preset.short_batch, preset.caption_tokens)
    checked = check_label_losses(args, lambda: label_losses(vlm, reference, check_features, captions), vlm, reference)
    for module in stack_modules(vlm, reference):
        module.eval()
    features = features_of(preset, preset.generate_batch, preset.patches, device).to(dtype)
    # no stop token: random weights would end rows at random places; both stacks decode new_tokens exactly
    vlm.template.im_end_id = vlm.template.end_of_text_id = -1
    merge_note = None
    if reference is None:
        vlm.decode_with_cuda_graphs = args.variant != "eager"
        if args.variant == "merged":
            vlm, merge_note = merged_for_eval(vlm, "yes")

    def generate(n):
        if reference is None:
            return vlm.generate(features, max_new_tokens=n)
        input_ids = vlm.prompt_ids(len(features), preset.queries).to(device)  # (B, T), no padding
        out = reference.generate(inputs_embeds=reference_embeds(reference, vlm, features, input_ids),
                                 attention_mask=torch.ones_like(input_ids), max_new_tokens=n, do_sample=False)
        if out.shape[1] != n:
            raise SystemExit(f"bench: transformers generated {out.shape[1]} tokens, not {n}")
        return [vlm.template.decode(row) for row in out.tolist()]
    with torch.no_grad():
        texts = generate(preset.new_tokens)
        first = timed_repeats(preset, device, lambda: generate(1), preset.repeats)
        full = timed_repeats(preset, device, lambda: generate(preset.new_tokens), preset.repeats, warmup=0)
    result = {**checked, "captions_per_s": preset.generate_batch / full["median_s"], "captions": texts,
              "first_token_s": first["median_s"], "peak_mib": full["peak_mib"], "seconds": full["seconds"],
              "decode_step_s": (full["median_s"] - first["median_s"]) / max(1, preset.new_tokens - 1)}
    if merge_note:
        result["merge"] = merge_note
    return result


def loss_worker(args, preset: Preset, folders, device) -> dict:
    """One caption-loss computation from given final hidden states (B=1, T ≈ 4700, C) to the loss, label-only or
    full logits: forward only, then forward + backward; time and peak memory above the loaded model of each."""
    llm = ours_llm(folders, device, method=None, quant=args.quant)  # its lm_head (V, C) in bf16
    vlm = stage2_vlm(preset, folders, device, "per-patch", llm)
    input_ids, labels = vlm.tokenize_batch(captions_of(vlm, 1, preset.caption_tokens),
                                           preset.frames * preset.loss_patches)
    labels = labels.to(device)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(*input_ids.shape, preset.hidden_size, generator=g).to(device, torch.bfloat16)  # (1, T, C)
    loss_of = label_only_loss if args.variant == "label-only" else full_logits_loss
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    label_only = label_only_loss(llm, hidden, labels).item()
    full_logits = full_logits_loss(llm, hidden, labels).item() if args.variant == "full-logits" else label_only
    if abs(full_logits - label_only) > 1e-4 * abs(label_only):  # the same numbers: only where the lm_head runs differs
        raise SystemExit(f"bench: the full-logits loss {full_logits:.6f} differs from the label-only loss "
                         f"{label_only:.6f}")
    hidden.requires_grad_()  # stands for the decoder's output

    def forward():
        with torch.no_grad(), autocast:
            loss_of(llm, hidden, labels)

    def forward_backward():
        with autocast:
            loss = loss_of(llm, hidden, labels)
        loss.backward()
        hidden.grad = None
    result = {"length": input_ids.shape[1], "label_tokens": int((labels != IGNORE_INDEX).sum()),
              "loss": label_only}
    for mode, run in (("forward", forward), ("forward+backward", forward_backward)):
        # big buffers go back to the OS when freed, so the forward's peak does not leak into the next one's
        measured = timed_repeats(preset, device, run, preset.repeats)
        result[mode] = {**measured, "extra_mib": measured["peak_mib"] - measured["resident_before_mib"]}
    return result


def vision_worker(args, preset: Preset, folders, device) -> dict:
    """Two epochs over preset.videos videos: with the feature cache (the tower runs in epoch 1 only) and
    re-encoding every epoch (decode, preprocess, tower), as a pipeline without a cache does."""
    vision = load_vision(folders["clip"], dtype=torch.bfloat16, device=device)
    vlm = VLM(vision, None, None, Tokenizer.from_file(str(folders["llm"] / "tokenizer.json")),
              VLMConfig(clip_path=str(folders["clip"]), llm_path=str(folders["llm"]), projector={},
                        num_frames=preset.frames))
    frames_encoded = []
    vision.register_forward_hook(lambda module, inputs, output: frames_encoded.append(inputs[0].shape[0]))
    with tempfile.TemporaryDirectory(prefix="vision-", dir=args.root) as folder:  # an empty cache every run
        samples = read_manifest(synth_dataset(Path(folder) / "videos", preset.videos, num_val=0, num_test=0,
                                              size=64, frames=2 * preset.frames))
        cache = feature_cache_for(vlm, Path(folder) / "features")

        def re_encode():
            for start in range(0, len(samples), 8):
                batch = samples[start:start + 8]
                frames = [vision.preprocess(read_frames(s.video, preset.frames)) for s in batch]
                vlm.encode_video(torch.stack(frames).to(device))  # (B, F, 3, S, S) -> (B, F, P, Dv)

        def from_cache():
            fill_feature_cache(vlm, samples, cache, show_progress=False)
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
    """Write the preset's random snapshot folders under args.root (a worker too: the parent never loads a model)."""
    write_snapshots(preset, Path(args.root), device)
    return {}


WORKERS = {"snapshot": snapshot_worker, "train": train_worker, "memory": memory_worker, "generate": generate_worker,
           "loss": loss_worker, "vision": vision_worker}


def measure_one(args) -> dict:
    """One measurement, in this process (the parent runs each in a fresh one, so peak memory is its own)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random tiny weights hit denormal floats on the CPU (10x slower there)
    preset = preset_for(args.preset, args.quick, args.layers)
    folders = {"llm": Path(args.root) / "llm", "clip": Path(args.root) / "clip"}
    if args.stack != "ours" or args.variant == "full-logits":
        import peft  # noqa: F401  the reference's libraries belong to its baseline, as torch does to ours
        import transformers  # noqa: F401
    libraries = memory_mib(device, peak=False)  # CPU: Python, torch, bitsandbytes (+ transformers, peft) resident
    mappings = resident_by_mapping() if device.type == "cpu" else None  # the same, by kind of memory
    return {**WORKERS[args.task](args, preset, folders, device), "libraries_mib": libraries,
            "libraries_mappings_mib": mappings,
            "load_average": os.getloadavg()}
