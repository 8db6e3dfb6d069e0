"""The two stacks the model benchmark compares, on the same batch, the same weights and the same adapters.

Ours: kovlm's Qwen3 (NF4, double-quantized statistics) with our LoRA / DoRA inside a VLM. The reference:
transformers' Qwen3ForCausalLM + bitsandbytes + PEFT, set up as their users do, fed the same inputs_embeds (its own
token embeddings with our projector's output at the video slots). Both hold adapters drawn from each linear's name,
and before anything is timed the reference's per-label losses (dropout off) must agree with ours.
"""
import json
import random
import zlib
from pathlib import Path

import bitsandbytes as bnb
import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer

from bench.snapshots import CAPTION_TEXTS, Preset
from lora import QWEN3_LINEARS, LoRALinear, apply_adapters, dequantized_weight
from projectors import build_projector
from qwen3 import load_qwen3
from vlm import IGNORE_INDEX, VLM, VLMConfig

SHAPES = {"resampler": "perceiver", "per-patch": "mlp"}  # training shape -> the projector that makes it
METHODS = ("lora", "dora")
# ours: kovlm; reference: transformers + PEFT as the QLoRA recipe sets them up (prepare_model_for_kbit_training
# while training); tuned: the same libraries in their fastest form (bf16 weights, non-reentrant checkpointing)
STACKS = ("ours", "reference", "tuned")
ADAPTER = dict(r=16, alpha=32, dropout=0.05)  # the project's stage-2 adapters, on all 7 linears of every layer
LABEL_LOSS_TOLERANCE = 0.05  # mean |per-label loss - ours'| in nats: the kbit-prepared reference's fp32 norms and
# embeddings move it by ~0.006 at cpu-small, the seeded adapters by ~0.3-0.5 (both in the table)


# ---- building the stacks ----------------------------------------------------------------------------------------
def copy_seeded_adapter(name: str, base: nn.Module, lora_A, lora_B, magnitude=None) -> None:
    """Fill A (r, in), B (out, r) and DoRA's magnitude (out,) of the adapter on linear `name` with tensors drawn
    from the name alone, so both stacks hold the same adapters. B is far from zero and m off ||W||, so they change
    the loss and the parity check tests them."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    lora_A.copy_(torch.randn(ADAPTER["r"], base.in_features, generator=g) * base.in_features ** -0.5)
    lora_B.copy_(torch.randn(base.out_features, ADAPTER["r"], generator=g) * 0.5)
    if magnitude is not None:
        row_norm = dequantized_weight(base).norm(dim=1).cpu()  # (out,)
        magnitude.copy_(row_norm * torch.empty(base.out_features).uniform_(0.5, 1.5, generator=g))


def ours_llm(folders, device, method: str | None) -> nn.Module:
    """kovlm's Qwen3: NF4 base with double-quantized statistics, bf16 weights, per-layer activation checkpointing."""
    llm = load_qwen3(folders["llm"], quant="nf4", dtype=torch.bfloat16, device=device)
    llm.gradient_checkpointing = True
    if method:
        apply_adapters(llm, method=method, **ADAPTER)
        with torch.no_grad():
            for name, module in llm.named_modules():
                if isinstance(module, LoRALinear):
                    copy_seeded_adapter(name, module.base, module.lora_A, module.lora_B,
                                        module.magnitude if module.dora else None)
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
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = not training
    config = LoraConfig(r=ADAPTER["r"], lora_alpha=ADAPTER["alpha"], lora_dropout=ADAPTER["dropout"],
                        target_modules=list(QWEN3_LINEARS), use_dora=method == "dora", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False  # as ours: no CPU repacking that breaks later gradients
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                copy_seeded_adapter(name.removeprefix("base_model.model."), module.get_base_layer(),
                                    module.lora_A["default"].weight, module.lora_B["default"].weight,
                                    module.lora_magnitude_vector["default"].weight if method == "dora" else None)
    return model


def stage2_vlm(preset: Preset, folders, device, shape: str, llm) -> VLM:
    """A VLM without its tower (stage 2 reads cached features): the prompt, the seeded projector, `llm`. The
    reference stack uses one with llm=None for the same prompt, token ids and projector output."""
    name = SHAPES[shape]
    torch.manual_seed(0)
    projector = build_projector(name, preset.vision_hidden, preset.hidden_size,
                                **({"num_queries": preset.queries} if name == "perceiver" else {})).to(device)
    config = VLMConfig(clip_path=str(folders["clip"]), llm_path=str(folders["llm"]), projector={"name": name},
                       num_frames=preset.frames)
    return VLM(None, projector, llm, Tokenizer.from_file(str(folders["llm"] / "tokenizer.json")), config)


def build_stack(args, preset: Preset, folders, device, shape: str, training: bool) -> tuple[VLM, nn.Module | None]:
    """args.stack with args.method's adapters: ours is (VLM over our Qwen3, None); a reference stack is (VLM
    without an LLM, the PEFT model), the QLoRA recipe for "reference" while training, the tuned form for "tuned"."""
    if args.stack == "ours":
        return stage2_vlm(preset, folders, device, shape, ours_llm(folders, device, args.method)), None
    vlm = stage2_vlm(preset, folders, device, shape, None)
    return vlm, reference_llm(folders, device, args.method, training=training, prepared=args.stack == "reference")


def stack_modules(vlm: VLM, reference) -> list[nn.Module]:
    """What a stack switches between train and eval mode and trains: the VLM (its projector and, for ours, the
    LLM), and for a reference stack the PEFT model too."""
    return [vlm] if reference is None else [vlm, reference]


# ---- the batch both stacks see ----------------------------------------------------------------------------------
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


def batch_ids(vlm: VLM, features: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels (B, T) of this batch, as VLM.forward builds them, on the features' device."""
    visual_tokens = vlm.projector.config.output_tokens(*features.shape[1:3])
    return tuple(t.to(features.device) for t in vlm.tokenize_batch(captions, visual_tokens))


def reference_embeds(model, vlm: VLM, features, input_ids) -> torch.Tensor:
    """The reference's inputs_embeds: its own token embeddings with the projector's output at the video slots."""
    visual = vlm.project(features)  # (B, N, C)
    embeds = model.get_input_embeddings()(input_ids)  # (B, T, C)
    slots = (input_ids == vlm.template.video_pad_id).unsqueeze(-1)  # (B, T, 1)
    return embeds.masked_scatter(slots, visual.to(embeds.dtype))  # (B, T, C)


# ---- the caption loss, and the per-label losses the parity check compares ---------------------------------------
def caption_loss(vlm: VLM, reference, features, captions) -> torch.Tensor:
    """The loss a training step minimises: VLM.forward's for ours (reference None); for the reference,
    transformers' on our batch: full logits (B, T, V), labels -100 off the caption (its ForCausalLMLoss)."""
    if reference is None:
        return vlm(features, captions)
    input_ids, labels = batch_ids(vlm, features, captions)
    return reference(inputs_embeds=reference_embeds(reference, vlm, features, input_ids), labels=labels).loss


def label_losses(vlm: VLM, reference, features, captions) -> torch.Tensor:
    """Cross-entropy at each supervised position (L,): VLM.forward before its sum for ours (reference None), from
    transformers' logits (B, T, V) for the reference."""
    input_ids, labels = batch_ids(vlm, features, captions)
    if reference is None:
        hidden = vlm.llm.hidden_states(inputs_embeds=vlm.splice_visual_tokens(input_ids, vlm.project(features)))
        return label_only_loss(vlm.llm, hidden, labels, per_label=True)
    logits = reference(inputs_embeds=reference_embeds(reference, vlm, features, input_ids)).logits  # (B, T, V)
    targets = labels[:, 1:]  # position t predicts token t + 1
    supervised = targets != IGNORE_INDEX  # (B, T-1)
    return F.cross_entropy(logits[:, :-1][supervised].float(), targets[supervised], reduction="none")  # (L,)


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


def check_label_losses(args, per_label_losses, vlm: VLM, reference=None) -> dict:
    """The per-label losses with dropout off (eval mode, no autograd). A reference stack compares them with ours
    (args.expect) and refuses to be timed when they differ by more than LABEL_LOSS_TOLERANCE on average. Ours
    (reference None) also measures how far its adapters move them: the check must tell a stack with our adapters
    from one without."""
    modules = stack_modules(vlm, reference)
    losses = eval_losses(per_label_losses, modules)
    result = {"loss": losses.mean().item(), "label_losses": losses.tolist()}
    if args.expect:
        difference = (losses - torch.tensor(json.loads(Path(args.expect).read_text()))).abs()  # (L,)
        if difference.mean() > LABEL_LOSS_TOLERANCE:
            raise SystemExit(f"bench: {args.stack} {args.method} ({args.task}, {args.shape}): the per-label losses "
                             f"differ from ours by {difference.mean():.4f} on average > {LABEL_LOSS_TOLERANCE}: the "
                             f"stacks do not compute the same thing, so nothing is timed")
        result |= {"mean_difference": difference.mean().item(), "max_difference": difference.max().item()}
    if reference is None:
        adapters_off = adapters_off_losses(per_label_losses, modules, vlm.llm)
        result["adapter_effect"] = (adapters_off - losses).abs().mean().item()
    return result


def adapters_off_losses(per_label_losses, modules: list[nn.Module], llm: nn.Module) -> torch.Tensor:
    """The per-label losses with every adapter of `llm` giving back its base linear (B = 0, DoRA's m = ||W||),
    then the adapters restored."""
    adapters = [m for m in llm.modules() if isinstance(m, LoRALinear)]
    saved = [{name: p.clone() for name, p in m.named_parameters(recurse=False)} for m in adapters]
    with torch.no_grad():
        for m in adapters:
            m.lora_B.zero_()
            if m.dora:
                m.magnitude.copy_(m.weight_sq_norm.sqrt())
        losses = eval_losses(per_label_losses, modules)
        for m, parameters in zip(adapters, saved):
            for name, p in m.named_parameters(recurse=False):
                p.copy_(parameters[name])
    return losses


def eval_losses(per_label_losses, modules: list[nn.Module]) -> torch.Tensor:
    """per_label_losses() in eval mode (dropout off) without autograd, as fp32 on the CPU; train mode after."""
    for module in modules:
        module.eval()
    with torch.no_grad():
        losses = per_label_losses().float().cpu()
    for module in modules:
        module.train()
    return losses
