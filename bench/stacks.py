"""The two stacks the model benchmark compares, on the same batch, the same weights and the same adapters.

Ours: kovlm's Qwen3 or Qwen3-MoE (NF4 with double-quantized statistics, or int8) with our LoRA / DoRA inside a
VLM. The reference: transformers' Qwen3ForCausalLM / Qwen3MoeForCausalLM + bitsandbytes (the same quantization) +
PEFT, set up as their users do, fed the same inputs_embeds (its own token embeddings with our projector's output at
the video slots). Both hold adapters drawn from each linear's name, on all seven linears of a dense Qwen3 and on the
attention projections of a Qwen3-MoE (its default: experts frozen), and before anything is timed the reference's
per-label losses (dropout off) must agree with ours.

transformers + bitsandbytes quantize nn.Linear modules only; Qwen3-MoE's experts are 3-D parameters there, so they
stay in bf16 (memory the reference's users pay). `same_expert_numbers` gives them the values ours computes with
(each expert linear quantized as ours loads it, then dequantized), so both stacks compute the same function.
"""
import json
import random
import zlib
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer

from bench.snapshots import CAPTION_TEXTS, Preset
from lora import ATTENTION_LINEARS, QWEN3_LINEARS, LoRALinear, apply_adapters, dequantized_weight
from nf4 import bnb, keep_one_layout, quantize_int8, quantize_nf4
from projectors import build_projector
from qwen3 import load_qwen3
from vlm import VLM, VLMConfig, label_logits, splice_visual_tokens

SHAPES = {"resampler": "perceiver", "per-patch": "mlp"}  # training shape -> the projector that makes it
METHODS = ("lora", "dora", "dora-d0")  # dora-d0: DoRA with adapter dropout 0 (PEFT's DoRA takes another path
# with dropout: it runs the base twice), so both of PEFT's paths are timed
# ours: kovlm; reference: transformers + PEFT as the QLoRA recipe sets them up (prepare_model_for_kbit_training
# while training); tuned: the same libraries in their fastest form (bf16 weights, non-reentrant checkpointing)
STACKS = ("ours", "reference", "tuned")
ADAPTER = dict(r=16, alpha=32, dropout=0.05)  # the project's stage-2 adapters, on all 7 linears of every layer
GRADIENT_TOLERANCE = 0.1  # ||adapter gradients - ours'|| / ||ours'||, dropout off: bf16 compute and the kbit-prepared
# reference's fp32 norms move them by a few percent; a reference without our adapters' values is off by ~1
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


def is_moe(folders) -> bool:
    """Whether the snapshot's LM is a Qwen3-MoE."""
    return json.loads((Path(folders["llm"]) / "config.json").read_text())["model_type"] == "qwen3_moe"


def adapter_options(method: str, moe: bool = False) -> dict:
    """apply_adapters' options for a benchmark method name: ADAPTER, DoRA for dora*, no dropout for dora-d0; the
    attention projections only on a Qwen3-MoE (train.py's default there)."""
    return ADAPTER | {"method": method.removesuffix("-d0"), "targets": ATTENTION_LINEARS if moe else QWEN3_LINEARS} \
        | ({"dropout": 0.0} if method.endswith("-d0") else {})


def ours_llm(folders, device, method: str | None, dtype=torch.bfloat16, quant: str = "nf4") -> nn.Module:
    """kovlm's Qwen3: an NF4 (double-quantized statistics) or int8 base, bf16 weights, per-layer activation
    checkpointing."""
    llm = load_qwen3(folders["llm"], quant=quant, dtype=dtype, device=device)
    llm.gradient_checkpointing = True
    if method:
        apply_adapters(llm, **adapter_options(method, is_moe(folders)))
        with torch.no_grad():
            for name, module in llm.named_modules():
                if isinstance(module, LoRALinear):
                    copy_seeded_adapter(name, module.base, module.lora_A, module.lora_B,
                                        module.magnitude if module.dora else None)
    return llm


def reference_llm(folders, device, method: str, *, training: bool, prepared: bool, dtype=torch.bfloat16,
                  quant: str = "nf4") -> nn.Module:
    """transformers + bitsandbytes + PEFT, set up as their users do (the QLoRA recipe). prepared=True runs PEFT's
    prepare_model_for_kbit_training (every non-quantized weight upcast to fp32, its activation checkpointing);
    prepared=False is the tuned form: weights stay bf16, non-reentrant activation checkpointing."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, Qwen3ForCausalLM, Qwen3MoeForCausalLM
    quantization = BitsAndBytesConfig(load_in_8bit=True) if quant == "int8" else \
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    model_class = Qwen3MoeForCausalLM if is_moe(folders) else Qwen3ForCausalLM
    model = model_class.from_pretrained(folders["llm"], quantization_config=quantization, dtype=dtype,
                                        attn_implementation="sdpa", device_map={"": device})
    same_expert_numbers(model, quant)
    if training and prepared:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    elif training:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = not training
    options = adapter_options(method, is_moe(folders))
    config = LoraConfig(r=options["r"], lora_alpha=options["alpha"], lora_dropout=options["dropout"],
                        target_modules=list(options["targets"]), use_dora=options["method"] == "dora",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                keep_one_layout(module)  # as ours: no CPU repacking that breaks later gradients (nf4.py)
            if isinstance(module, bnb.nn.Linear8bitLt):
                module.register_forward_pre_hook(keep_int8_scales)
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                copy_seeded_adapter(name.removeprefix("base_model.model."), module.get_base_layer(),
                                    module.lora_A["default"].weight, module.lora_B["default"].weight,
                                    module.lora_magnitude_vector["default"].weight if config.use_dora else None)
    return model


def keep_int8_scales(layer: bnb.nn.Linear8bitLt, inputs) -> None:
    """A forward pre-hook that lets PEFT's 8-bit DoRA train on the CPU: its forward leaves `weight.CB` set again
    (without `weight.SCB`), so bitsandbytes' next forward moves a None scale into the layer's state and fails
    (bitsandbytes 0.50, PEFT 0.21). The state already holds both; the stray copy is dropped."""
    if getattr(layer.weight, "CB", None) is not None and getattr(layer.weight, "SCB", None) is None \
            and layer.state.SCB is not None:
        layer.weight.CB = None


def same_expert_numbers(model: nn.Module, quant: str) -> None:
    """Each expert of a transformers Qwen3-MoE (bf16 3-D parameters, which bitsandbytes leaves alone) set to the
    numbers ours computes with: its gate, up and down matrices each quantized as ours loads them (qwen3.load_tensor),
    then dequantized. Held in bf16 still, as the reference's users hold them."""
    def quantized_and_back(weight: torch.Tensor) -> torch.Tensor:  # (out, in)
        if quant == "int8":
            int8 = quantize_int8(weight, weight.device)
            return bnb.functional.int8_vectorwise_dequant(int8.data, int8.SCB).to(weight.dtype)
        nf4 = quantize_nf4(weight, weight.device)
        return bnb.functional.dequantize_4bit(nf4.data, nf4.quant_state).to(weight.dtype)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ != "Qwen3MoeExperts":
                continue
            for e in range(module.num_experts):  # gate_up_proj (E, 2I, C): gate rows, then up rows; down (E, C, I)
                gate, up = module.gate_up_proj[e].chunk(2)
                module.gate_up_proj[e] = torch.cat([quantized_and_back(gate), quantized_and_back(up)])
                module.down_proj[e] = quantized_and_back(module.down_proj[e])


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


def build_stack(args, preset: Preset, folders, device, shape: str, training: bool,
                dtype=torch.bfloat16) -> tuple[VLM, nn.Module | None]:
    """args.stack with args.method's adapters: ours is (VLM over our Qwen3, None); a reference stack is (VLM
    without an LLM, the PEFT model), the QLoRA recipe for "reference" while training, the tuned form for "tuned".
    `dtype`: the weights' and 4-bit compute dtype (fp32 for the exact greedy-token comparison)."""
    if args.stack == "ours":
        return stage2_vlm(preset, folders, device, shape, ours_llm(folders, device, args.method, dtype,
                                                                   args.quant)), None
    vlm = stage2_vlm(preset, folders, device, shape, None)
    return vlm, reference_llm(folders, device, args.method, training=training, prepared=args.stack == "reference",
                              dtype=dtype, quant=args.quant)


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
    """The reference's inputs_embeds: its own token embeddings with the projector's output at the video slots
    (vlm.splice_visual_tokens, the one splice)."""
    return splice_visual_tokens(model.get_input_embeddings(), input_ids, vlm.project(features),
                                vlm.template.video_pad_id)  # (B, T, C)


# ---- the caption loss, and the per-label losses the parity check compares ---------------------------------------
def caption_loss(vlm: VLM, reference, features, captions, labels_only: bool = False) -> torch.Tensor:
    """The loss a training step minimises: VLM.forward's for ours (reference None); for the reference,
    transformers' on our batch, labels -100 off the caption (its ForCausalLMLoss). labels_only (the tuned
    reference) passes logits_to_keep with the labels sliced to match, as a user who knows transformers would: the
    logits start one position before the first caption token instead of covering the whole (B, T, V)."""
    if reference is None:
        return vlm(features, captions)
    input_ids, labels = batch_ids(vlm, features, captions)
    embeds = reference_embeds(reference, vlm, features, input_ids)
    if not labels_only:
        return reference(inputs_embeds=embeds, labels=labels).loss
    keep = labels.shape[1] - first_label_position(vlm, features) + 1  # logits from the last prompt position on
    return reference(inputs_embeds=embeds, labels=labels[:, -keep:], logits_to_keep=keep).loss


def first_label_position(vlm: VLM, features) -> int:
    """Where every row's caption starts: the prompt's length (the same for all rows, on the host)."""
    return len(vlm.template.prompt_ids(vlm.projector.config.output_tokens(*features.shape[1:3])))


def label_losses(vlm: VLM, reference, features, captions) -> torch.Tensor:
    """Cross-entropy at each supervised position (L,): vlm.label_logits for ours (reference None), from
    transformers' logits (B, T, V) for the reference, both gathered by vlm.label_logits' positions."""
    input_ids, labels = batch_ids(vlm, features, captions)
    if reference is None:
        embeds = splice_visual_tokens(vlm.llm.model.embed_tokens, input_ids, vlm.project(features),
                                      vlm.template.video_pad_id)
        logits, targets = label_logits(vlm.llm, vlm.llm.hidden_states(inputs_embeds=embeds), labels)  # (L, V)
        return F.cross_entropy(logits.float(), targets, reduction="none")  # (L,)
    logits = reference(inputs_embeds=reference_embeds(reference, vlm, features, input_ids)).logits  # (B, T, V)
    logits, targets = label_logits(IdentityHead(), logits, labels)  # (L, V): the same positions as ours
    return F.cross_entropy(logits.float(), targets, reduction="none")  # (L,)


class IdentityHead:
    """Stands for an LLM whose 'hidden states' are already logits (label_logits then only gathers)."""

    @staticmethod
    def logits_from_hidden(hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def full_logits_loss(llm, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' Qwen3ForCausalLM: logits at every position (B, T, V), then its ForCausalLMLoss (upcast to
    fp32, shift, mean cross-entropy over the labelled positions)."""
    from transformers.loss.loss_utils import ForCausalLMLoss
    return ForCausalLMLoss(llm.logits_from_hidden(hidden), labels, llm.config.vocab_size)


def check_label_losses(args, per_label_losses, vlm: VLM, reference=None) -> dict:
    """The per-label losses with dropout off (training mode, no autograd). A reference stack compares them with ours
    (args.expect) and refuses to be timed when they differ by more than LABEL_LOSS_TOLERANCE on average. Ours
    (reference None) also measures how far its adapters move them: the check must tell a stack with our adapters
    from one without."""
    modules = stack_modules(vlm, reference)
    losses = losses_without_dropout(per_label_losses, modules)
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


def check_gradients(args, loss_of_batch, vlm: VLM, reference=None) -> dict:
    """One backward in training mode with dropout off: every adapter's gradients (A, B, DoRA's magnitude) by linear
    name. Ours saves them beside the snapshot; a reference compares its own, ||g - g_ours|| / ||g_ours|| over all of
    them, and refuses to be timed above GRADIENT_TOLERANCE. The gradients are then cleared."""
    from safetensors.torch import load_file, save_file
    modules = stack_modules(vlm, reference)
    with without_dropout(modules):
        loss_of_batch().backward()
    gradients = adapter_gradients(vlm.llm if reference is None else reference)
    for module in modules:
        module.zero_grad(set_to_none=True)
    path = Path(args.root) / f"gradients-{args.task}-{args.shape}-{args.method}.safetensors"
    if reference is None:
        save_file(gradients, path)
        return {}
    ours = load_file(path)
    if set(ours) != set(gradients):
        raise SystemExit(f"bench: {args.stack} {args.method}: adapters on other linears than ours "
                         f"({sorted(set(ours) ^ set(gradients))[:3]})")
    difference = torch.stack([(gradients[k] - ours[k]).square().sum() for k in ours]).sum().sqrt()
    relative = (difference / torch.stack([g.square().sum() for g in ours.values()]).sum().sqrt()).item()
    if not relative <= GRADIENT_TOLERANCE:
        raise SystemExit(f"bench: {args.stack} {args.method} ({args.shape}): the adapters' gradients differ from "
                         f"ours by {relative:.4f} (relative) > {GRADIENT_TOLERANCE}: nothing is timed")
    return {"gradient_difference": relative}


def adapter_gradients(llm: nn.Module) -> dict[str, torch.Tensor]:
    """'<linear>.lora_A' / '.lora_B' / '.magnitude' -> fp32 gradient on the CPU, for ours and PEFT alike."""
    found = {}
    for name, module in llm.named_modules():
        name = name.removeprefix("base_model.model.")
        if isinstance(module, LoRALinear):
            parameters = {"lora_A": module.lora_A, "lora_B": module.lora_B} | \
                         ({"magnitude": module.magnitude} if module.dora else {})
        elif hasattr(module, "lora_A") and "default" in module.lora_A:
            parameters = {"lora_A": module.lora_A["default"].weight, "lora_B": module.lora_B["default"].weight}
            if "default" in module.lora_magnitude_vector:
                parameters["magnitude"] = module.lora_magnitude_vector["default"].weight
        else:
            continue
        found |= {f"{name}.{key}": p.grad.float().cpu().contiguous() for key, p in parameters.items()}
    return found


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
        losses = losses_without_dropout(per_label_losses, modules)
        for m, parameters in zip(adapters, saved):
            for name, p in m.named_parameters(recurse=False):
                p.copy_(parameters[name])
    return losses


def losses_without_dropout(per_label_losses, modules: list[nn.Module]) -> torch.Tensor:
    """per_label_losses() with dropout off (without_dropout) and without autograd, as fp32 on the CPU."""
    with without_dropout(modules), torch.no_grad():
        return per_label_losses().float().cpu()


@contextmanager
def without_dropout(modules: list[nn.Module]):
    """Inside, every nn.Dropout of `modules` (the adapters' in both stacks) has p = 0, and the modules stay in
    training mode: the timed step's computation without its randomness. (Not eval mode: on the CPU an int8 base
    runs LLM.int8 there instead of the dequantized weight the timed step multiplies with.)"""
    dropouts = [m for module in modules for m in module.modules() if isinstance(m, nn.Dropout)]
    rates = [dropout.p for dropout in dropouts]
    for module in modules:
        module.train()
    for dropout in dropouts:
        dropout.p = 0.0
    try:
        yield
    finally:
        for dropout, p in zip(dropouts, rates):
            dropout.p = p
