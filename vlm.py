"""The assembled video-captioning model: frozen vision tower → trainable projector → Qwen3 (NF4 base + LoRA / DoRA).

    frames (B, F, 3, S, S) ──tower layer -2, patches only──▶ (B, F, P, Dv) ──projector──▶ (B, N, C)
        ──token reduction (none by default; pruning.py: DivPrune, adjacent-frame merging)──▶ (B, K, C)
        ──spliced at the <|video_pad|> slots of the chat prompt──▶ inputs_embeds (B, T, C) ──Qwen3──▶ hidden (B, T, C)
        ──lm_head at caption positions only──▶ cross-entropy on the caption tokens and the closing <|im_end|>

The prompt (Qwen3 chat format, thinking disabled) is built by `ChatTemplate`, identical at train and eval time:
    <|im_start|>user\n<|vision_start|>{N x <|video_pad|>}<|vision_end|>{instruction}<|im_end|>\n
    <|im_start|>assistant\n<think>\n\n</think>\n\n{caption}<|im_end|>

The tower is whatever vision.load_vision finds in the folder (CLIP, SigLIP / SigLIP 2, DINOv2, DINOv3); it hands
over patch tokens only (no CLS, no registers), and its width Dv and grid (P = grid x grid) size the projector.

Shapes: B batch, F frames, P patches per frame, Dv vision width, N visual tokens, K of them kept (N without a
reduction), T sequence, C LLM width, V vocab, L supervised (label) positions in the batch.
"""
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer

from decode import Decoder
from infra.errors import UserError
from lora import AdapterConfig, adapter_state_dict, apply_adapters, held_dora_norms, load_adapter_state_dict, \
    merged_copy
from moe import load_balancing_loss
from projectors import ProjectorConfig, projector_from_config, tokens_per_frame
from pruning import MERGE_THRESHOLD, REDUCTIONS, reduce_tokens
from qwen3 import load_qwen3
from sampling import next_token
from vision import load_vision

DEFAULT_INSTRUCTION = "이 영상을 한국어로 한 문장으로 설명하세요."  # "Describe this video in one Korean sentence."
IGNORE_INDEX = -100
LOSS_CHUNK_ELEMENTS = 1 << 23  # caption_loss forms at most this many logits at once (32 MiB in fp32)
STOP_CHECK_EVERY = 8  # generate: tokens between the host's checks that every row has finished (each check waits)


@dataclass
class VLMConfig:
    """What it takes to rebuild the model; saved in every checkpoint."""
    clip_path: str                           # the vision tower's folder (CLIP, SigLIP, DINO: the name predates them)
    llm_path: str
    projector: dict                          # ProjectorConfig fields except the widths, which the bases decide
    adapter: dict | None = None              # AdapterConfig fields, None in stage 1 / without PEFT
    quant: str | None = "nf4"
    vision_layer: int = -2                   # hidden_states index; LLaVA's choice: the penultimate layer
    num_frames: int = 8
    instruction: str = DEFAULT_INSTRUCTION
    token_reduction: str = "none"            # pruning.REDUCTIONS; checkpoints written before it load as "none"
    visual_tokens: int | None = None         # K, the visual tokens kept per video with a reduction
    merge_threshold: float = MERGE_THRESHOLD  # merge+divprune: adjacent-frame tokens this similar merge first
    base_identity: dict = field(default_factory=dict)  # the bases' identity (base_identity), filled by build_vlm


class ChatTemplate:
    """Token ids of the chat prompt around the video slot and the caption; one tokenizer call per caption."""

    def __init__(self, tokenizer: Tokenizer, instruction: str):
        self.tokenizer = tokenizer
        self.im_end_id = self.token_id("<|im_end|>")
        self.end_of_text_id = self.token_id("<|endoftext|>")
        self.video_pad_id = self.token_id("<|video_pad|>")
        has_vision_markers = tokenizer.token_to_id("<|vision_start|>") is not None
        video_open, video_close = ("<|vision_start|>", "<|vision_end|>") if has_vision_markers else ("", "")
        self.before_video = self.encode(f"<|im_start|>user\n{video_open}")
        self.after_video = self.encode(f"{video_close}{instruction}<|im_end|>\n<|im_start|>assistant\n"
                                       "<think>\n\n</think>\n\n")

    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise UserError(f"the tokenizer has no {token} token; kovlm needs Qwen3's tokenizer.json (chat tokens)")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def prompt_ids(self, num_visual: int) -> list[int]:
        return self.before_video + [self.video_pad_id] * num_visual + self.after_video

    def caption_ids(self, caption: str) -> list[int]:
        if not caption.strip():
            raise UserError("empty caption: every training caption needs text")
        return self.encode(caption.strip()) + [self.im_end_id]

    def decode(self, ids: list[int]) -> str:
        """Caption text up to the first <|im_end|> / <|endoftext|>, without special tokens or a <think> block."""
        for stop in (self.im_end_id, self.end_of_text_id):
            if stop in ids:
                ids = ids[:ids.index(stop)]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if "</think>" in text:
            text = text.split("</think>", 1)[1]
        return text.replace("<think>", "").strip()


class VLM(nn.Module):
    def __init__(self, vision: nn.Module, projector: nn.Module, llm: nn.Module, tokenizer: Tokenizer,
                 config: VLMConfig):
        super().__init__()
        self.vision, self.projector, self.llm, self.config = vision, projector, llm, config
        self.template = ChatTemplate(tokenizer, config.instruction)
        self.decode_with_cuda_graphs = True  # on a GPU; False decodes eagerly (the same tokens, for comparisons)

    # ---- vision side ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_video(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen tower features of the chosen layer, patch tokens only: (B, F, 3, S, S) -> (B, F, P, Dv)."""
        B, F_ = pixel_values.shape[:2]
        pixels = pixel_values.flatten(0, 1).to(next(self.vision.parameters()).dtype)  # (B*F, 3, S, S)
        patches = self.vision(pixels, layer=self.config.vision_layer)  # (B*F, P, Dv): CLS / registers dropped
        return patches.unflatten(0, (B, F_))  # (B, F, P, Dv)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The visual tokens the LM reads: the projector's N, reduced to K per video when the config names a
        reduction (pruning.reduce_tokens; merging per frame for the per-patch projectors, whose tokens come frame
        after frame). The tokens are chosen on the projector's output, the very tokens the LM reads, so every
        projector can use it; DivPrune's distance matrix there costs 2·N²·C FLOPs, at N = 4,608 and C = 4,096 about
        a tenth of one Qwen3-8B decoder layer's forward over the same tokens. Training, validation, evaluate.py
        and caption.py all come here, so a checkpoint is always read with the reduction it was trained with."""
        visual = self.projector(features)  # (B, F, P, Dv) -> (B, N, C)
        if self.config.token_reduction == "none":
            return visual
        frames = features.shape[1] if tokens_per_frame(self.projector.config.name) else None
        reduced, _ = reduce_tokens(visual, self.config.token_reduction, self.config.visual_tokens, frames=frames,
                                   threshold=self.config.merge_threshold)
        return reduced  # (B, K, C), in their original order

    def num_visual_tokens(self, frames: int, patches: int) -> int:
        """K: the visual tokens of one video that reach the LM (its prompt has this many <|video_pad|> slots)."""
        produced = self.projector.config.output_tokens(frames, patches)
        if self.config.token_reduction == "none":
            return produced
        if self.config.token_reduction == "merge" and self.config.visual_tokens < patches:
            raise UserError(f"--token-reduction merge keeps at least one token per patch position ({patches}); "
                             f"--visual-tokens {self.config.visual_tokens} needs merge+divprune")
        return min(produced, self.config.visual_tokens)

    # ---- training ------------------------------------------------------------------------------------------------
    def tokenize_batch(self, captions: list[str], num_visual: int) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, T), right-padded, and labels (B, T): IGNORE_INDEX except on the caption and <|im_end|>."""
        prompt = self.template.prompt_ids(num_visual)
        rows = [self.template.caption_ids(c) for c in captions]
        T = len(prompt) + max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), self.template.end_of_text_id)
        labels = torch.full((len(rows), T), IGNORE_INDEX)
        for b, caption in enumerate(rows):
            end = len(prompt) + len(caption)
            input_ids[b, :end] = torch.tensor(prompt + caption)
            labels[b, len(prompt):end] = torch.tensor(caption)
        return input_ids, labels

    def count_label_tokens(self, captions: list[str]) -> int:
        """Supervised tokens of these captions: the loss normaliser of an accumulation window is their sum."""
        return sum(len(self.template.caption_ids(c)) for c in captions)

    def forward(self, features: torch.Tensor, captions: list[str], num_label_tokens: int | None = None,
                router_aux_coef: float = 0.0):
        """Summed caption cross-entropy / num_label_tokens (default: this batch's own count; torchtune's
        normalisation, so one batch of 8 equals 8 accumulated batches of 1). Right padding needs no attention mask:
        with causal attention, padding after a caption never reaches it. The labels stay on the host, so the
        supervised positions are found there: no device synchronisation inside the step. With router_aux_coef (a
        Qwen3-MoE LM), plus that times the router's load-balancing loss (router_balance_loss)."""
        visual = self.project(features)  # (B, N, C)
        input_ids, labels = self.tokenize_batch(captions, visual.shape[1])  # (B, T) each, on the host
        embeds = splice_visual_tokens(self.llm.model.embed_tokens, input_ids.to(visual.device, non_blocking=True),
                                      visual, self.template.video_pad_id)  # (B, T, C)
        router_logits = [] if router_aux_coef else None  # each MoE layer's (B * T, E), filled by the forward
        hidden = self.llm.hidden_states(inputs_embeds=embeds, router_logits=router_logits)  # (B, T, C)
        loss = caption_loss(self.llm, hidden, labels, num_label_tokens)
        if router_logits:
            real = input_ids != self.template.end_of_text_id  # (B, T): the padding is <|endoftext|>
            loss = loss + router_aux_coef * router_balance_loss(self.llm, router_logits, real, labels,
                                                                num_label_tokens)
        return loss

    # ---- generation ----------------------------------------------------------------------------------------------
    def prompt_ids(self, batch_size: int, num_visual: int) -> torch.Tensor:
        """(B, T) prompt ids: one instruction for every row, so the rows are equal and need no padding."""
        return torch.tensor([self.template.prompt_ids(num_visual)] * batch_size)  # (B, T)

    def decoder_for(self, batch_size: int, max_len: int) -> Decoder:
        """The decoder of the last generate call when its shapes and parameters still match, else a new one (on
        a GPU its step is captured as a CUDA graph once, then replayed for every token of every batch)."""
        decoder = getattr(self, "_decoder", None)
        if decoder is None or not decoder.matches(batch_size, max_len):
            decoder = Decoder(self.llm, batch_size, max_len, cuda_graphs=self.decode_with_cuda_graphs)
            self._decoder = decoder
        return decoder

    @torch.no_grad()
    def generate(self, features: torch.Tensor, *, max_new_tokens: int = 64, **sampling) -> list[str]:
        """Batched captions: prefill the prompts once, then decode one token at a time with a static KV cache
        (decode.py) and DoRA's norms held (lora.held_dora_norms), each row stopping at <|im_end|> or <|endoftext|>.
        Greedy by default; `sampling` goes to sampling.next_token (do_sample, temperature, top_p,
        repetition_penalty, no_repeat_ngram_size, generator). The host asks whether every row has finished only
        every STOP_CHECK_EVERY tokens (each ask waits for the device); rows that finished earlier only append
        <|endoftext|>, which decode() drops."""
        visual = self.project(features)  # (B, N, C)
        B = visual.shape[0]
        input_ids = self.prompt_ids(B, visual.shape[1]).to(visual.device)  # (B, T)
        T = input_ids.shape[1]
        decoder = self.decoder_for(B, T + max_new_tokens)
        embeds = splice_visual_tokens(self.llm.model.embed_tokens, input_ids, visual, self.template.video_pad_id)
        generated = torch.full((B, max_new_tokens), self.template.end_of_text_id, device=visual.device)  # (B, n)
        finished = torch.zeros(B, dtype=torch.bool, device=visual.device)
        with held_dora_norms(self.llm, embeds.dtype):  # the adapters do not change while generating
            logits = decoder.prefill(embeds)  # (B, V)
            for i in range(max_new_tokens):
                token = next_token(logits, generated[:, :i], **sampling)  # (B,)
                token = torch.where(finished, self.template.end_of_text_id, token)
                generated[:, i] = token
                finished |= (token == self.template.im_end_id) | (token == self.template.end_of_text_id)
                last = i == max_new_tokens - 1
                if last or ((i + 1) % STOP_CHECK_EVERY == 0 and bool(finished.all())):
                    break  # no decoder forward after the last token
                logits = decoder.step(token)  # (B, V): the token into the cache's next slot
        return [self.template.decode(row) for row in generated.tolist()]

    # ---- what a checkpoint holds ---------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Projector and adapter weights only: a checkpoint never holds the frozen bases."""
        state = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        if self.config.adapter is not None:
            state |= {f"llm.{k}": v for k, v in adapter_state_dict(self.llm).items()}
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        projector = {k.removeprefix("projector."): v for k, v in state.items() if k.startswith("projector.")}
        adapters = {k.removeprefix("llm."): v for k, v in state.items() if k.startswith("llm.")}
        unknown = set(state) - {f"projector.{k}" for k in projector} - {f"llm.{k}" for k in adapters}
        if unknown:
            raise UserError(f"unexpected keys in the trainable state: {sorted(unknown)[:5]}")
        self.projector.load_state_dict(projector, strict=True)
        if self.config.adapter is not None:
            load_adapter_state_dict(self.llm, adapters)
        elif adapters:
            raise UserError("the state holds adapter weights but this model has no adapters")

    def add_adapters(self, adapter: AdapterConfig) -> list[str]:
        """Stage 2: wrap the LLM's target linears with LoRA / DoRA (the LLM's base weights stay frozen); the model
        gets a new config naming them (the one it was built with is not changed)."""
        self.config = replace(self.config, adapter=asdict(adapter))
        return apply_adapters(self.llm, method=adapter.method, r=adapter.r, alpha=adapter.alpha,
                              dropout=adapter.dropout, targets=tuple(adapter.targets))


def splice_visual_tokens(embed_tokens: nn.Module, input_ids: torch.Tensor, visual: torch.Tensor,
                         video_pad_id: int) -> torch.Tensor:
    """Token embeddings (B, T, C) with the N visual embeddings of each row written, in order, over its
    <|video_pad|> slots. masked_scatter needs no host read (no count of the slots is taken, unlike transformers'
    size check); a row with other than N slots is the template's bug, caught by the tests."""
    embeds = embed_tokens(input_ids)  # (B, T, C)
    slots = (input_ids == video_pad_id).unsqueeze(-1)  # (B, T, 1)
    return embeds.masked_scatter(slots, visual.to(embeds.dtype))  # (B, T, C)


def label_hidden(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states at the L supervised positions (L, C) and their targets (L,). Position t predicts token
    t + 1. With labels on the host (as tokenize_batch makes them) the positions are found there and sent ahead, so
    nothing waits for the device; labels on the device work too, at the cost of one synchronisation."""
    B, T = labels.shape
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)  # (L,) each
    flat = (rows * T + cols).to(hidden.device, non_blocking=True)  # (L,): indices into (B * T) positions
    targets = labels[rows, cols + 1].to(hidden.device, non_blocking=True)  # (L,)
    return hidden.reshape(B * T, -1).index_select(0, flat), targets  # (B * T, C) -> (L, C), (L,)


def label_logits(llm, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lm_head at the L supervised positions only: logits (L, V) and their targets (L,)."""
    picked, targets = label_hidden(hidden, labels)  # (L, C), (L,)
    return llm.logits_from_hidden(picked), targets  # (L, V), (L,)


def caption_loss(llm, hidden: torch.Tensor, labels: torch.Tensor, num_label_tokens: int | None = None):
    """Summed cross-entropy over the supervised positions of hidden (B, T, C) / num_label_tokens (default: their
    count here). The logits are made only there (L x V, not B x T x V), upcast to fp32 for the softmax, and
    LOSS_CHUNK_ELEMENTS at a time (HeadCrossEntropy); a trainable head takes the plain formula."""
    picked, targets = label_hidden(hidden, labels)  # (L, C), (L,)
    weight = llm.head_weight  # (V, C)
    if weight.requires_grad:
        loss_sum = F.cross_entropy(llm.logits_from_hidden(picked).float(), targets, reduction="sum")
    else:
        chunk_rows = max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0])
        loss_sum = HeadCrossEntropy.apply(picked.to(weight.dtype), weight, targets, chunk_rows)
    return loss_sum / (num_label_tokens or targets.numel())


def router_balance_loss(llm, router_logits: list[torch.Tensor], real: torch.Tensor, labels: torch.Tensor,
                        num_label_tokens: int | None) -> torch.Tensor:
    """moe.load_balancing_loss over this batch's real tokens (B, T) (not the <|endoftext|> padding), weighted by the
    batch's share of the window's supervised tokens: the shares of a window's micro-batches (and ranks) sum to 1,
    so the window adds the coefficient times their token-weighted mean, whatever the accumulation."""
    share = 1.0 if num_label_tokens is None else int((labels != IGNORE_INDEX).sum()) / num_label_tokens
    return share * load_balancing_loss(router_logits, llm.config.moe.num_experts_per_tok, real)


class HeadCrossEntropy(torch.autograd.Function):
    """sum_l cross_entropy(hidden_l @ weight^T, target_l) over hidden (L, C) and a frozen head weight (V, C), chunk_rows
    rows at a time, hidden's gradient formed in the same pass: no (L, V) tensor outlives its chunk, and backward
    only scales the (L, C) gradient (Liger Kernel's fused linear cross-entropy, arXiv 2410.10989, §3.3). The
    numbers are F.cross_entropy(logits.float(), targets, reduction="sum")'s, whose autograd would hold the (L, V)
    logits, their fp32 copy, the log-softmax and its gradient at once; here a chunk's (R, V) fp32 buffer serves as
    logits, softmax and gradient in turn."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # (L, C)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows, target = slice(start, start + chunk_rows), targets[start:start + chunk_rows]  # (R,)
            logits = F.linear(hidden[rows], weight).float()  # (R, C) @ (C, V) -> (R, V), upcast for the softmax
            target_logit = logits.gather(1, target[:, None]).squeeze(1)  # (R,)
            top = logits.amax(dim=-1, keepdim=True)  # (R, 1): log-softmax's shift, as F.log_softmax takes it
            exp_sum = logits.sub_(top).exp_().sum(dim=-1)  # (R,); logits now hold exp(logits - top), in place
            total += (top.squeeze(1) + exp_sum.log() - target_logit).sum()  # -log softmax at the targets
            if grad is not None:
                probs = logits.div_(exp_sum[:, None])  # (R, V): softmax, in place
                probs[torch.arange(len(target), device=probs.device), target] -= 1  # d loss / d logits
                grad[rows] = probs.to(weight.dtype) @ weight  # (R, V) @ (V, C) -> (R, C), in the head's dtype
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad, = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None  # (L, C)


def merged_for_eval(model: VLM, merge: str = "auto") -> tuple[VLM, str]:
    """The model to generate with, and why: with merge "yes" (or "auto" when the device has room for it) a VLM
    sharing the tower, projector and template, whose LLM has every adapter folded into a dense bf16 copy of its
    base (lora.merged_copy: plain GEMMs, no 4-bit dequantization per token); "no" (or too little room) the model
    itself. The merged copy holds the decoder layers' weights in bf16: 13.2 GiB at Qwen3-8B."""
    if merge not in ("auto", "yes", "no"):
        raise UserError(f"merge={merge!r}: use auto, yes or no")
    if merge == "no":
        return model, "not merged (--merge-for-eval no)"
    needed = dense_layer_bytes(model.llm)
    free = free_memory_bytes(model.llm.model.embed_tokens.weight.device)
    if merge == "auto" and free < 1.25 * needed:
        return model, f"not merged: {needed / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free"
    merged = VLM(model.vision, model.projector, merged_copy(model.llm), model.template.tokenizer, model.config)
    merged.decode_with_cuda_graphs = model.decode_with_cuda_graphs
    return merged.eval(), f"merged into a bf16 copy ({needed / 2**30:.1f} GiB)"


def dense_layer_bytes(llm) -> int:
    """Bytes of the decoder layers' linears in bf16 (what merged_copy allocates); Linear4bit is an nn.Linear."""
    return sum(2 * m.in_features * m.out_features for m in llm.model.layers.modules() if isinstance(m, nn.Linear))


def free_memory_bytes(device: torch.device) -> int:
    """Free memory on a GPU (cudaMemGetInfo), or the host's MemAvailable on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    line = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024


def load_tokenizer(llm_path) -> Tokenizer:
    """Qwen3's tokenizer.json from the LLM's snapshot folder (its chat tokens make the prompt)."""
    path = Path(llm_path) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the LLM folder must hold Qwen3's tokenizer.json")
    return Tokenizer.from_file(str(path))


def check_token_reduction(projector: str, method: str, visual_tokens: int | None, threshold: float) -> None:
    """A token reduction that cannot work on this projector, refused in one line before anything loads."""
    if method not in REDUCTIONS:
        raise UserError(f"--token-reduction {method!r}: choose one of {', '.join(REDUCTIONS)}")
    if method == "none":
        if visual_tokens is not None:
            raise UserError(f"--visual-tokens {visual_tokens} needs a --token-reduction (divprune, merge or "
                             "merge+divprune); without one every visual token is kept")
        return
    if visual_tokens is None or visual_tokens < 1:
        raise UserError(f"--token-reduction {method} needs --visual-tokens K >= 1, the tokens kept per video")
    if "merge" in method and not tokens_per_frame(projector):
        raise UserError(f"--token-reduction {method}: the {projector} projector's query tokens have no frames to "
                         "merge across; use divprune")
    if not -1 <= threshold <= 1:
        raise UserError(f"--merge-threshold {threshold}: a cosine similarity, in [-1, 1]")


def build_vlm(config: VLMConfig, *, device="cpu", dtype=torch.bfloat16, llm=None) -> VLM:
    """Load the frozen bases from their snapshot folders, build the projector (and adapters when configured).
    The model holds a completed copy of `config` (projector defaults, base fingerprints); `config` is unchanged.
    `llm`: a Qwen3 already built from config.llm_path (export's, on the meta device) instead of loading one."""
    check_token_reduction(config.projector["name"], config.token_reduction, config.visual_tokens,
                          config.merge_threshold)
    vision = load_vision(config.clip_path, dtype=dtype, device=device)
    check_vision_layer(config.vision_layer, vision, config.clip_path)
    prebuilt = llm is not None
    llm = llm if prebuilt else load_qwen3(config.llm_path, quant=config.quant, dtype=dtype, device=device)
    tokenizer = load_tokenizer(config.llm_path)
    requests = {"num_frames": config.num_frames} | {k: v for k, v in config.projector.items() if v is not None}
    projector_config = ProjectorConfig.requested(vision_dim=vision.config.hidden_size,
                                                 llm_dim=llm.config.hidden_size, **requests)
    projector = projector_from_config(projector_config).to(device)
    adapter = config.adapter
    config = replace(config, adapter=None, base_identity=base_identity(vision, llm),
                     projector={k: v for k, v in asdict(projector.config).items() if k not in ("vision_dim", "llm_dim")})
    model = VLM(vision, projector, llm, tokenizer, config)
    if adapter is not None:
        model.add_adapters(AdapterConfig(**adapter))
        if not prebuilt:  # a meta Qwen3 stays where it is
            model.to(device)
    return model


def check_vision_layer(layer: int, vision, path) -> None:
    """Refuse a layer the tower does not have before any video is encoded (hidden_states: embeddings + L blocks)."""
    num_states = vision.config.num_hidden_layers + 1
    if not -num_states <= layer < num_states:
        raise UserError(f"vision layer {layer} is out of range: the tower in {path} has {num_states - 1} layers, "
                         f"so hidden states {-num_states}..{num_states - 1} (--vision-layer)")


def base_identity(vision, llm) -> dict:
    """What a checkpoint records of its bases: the tower's family (config.json's model_type) and its weights as
    stored (snapshot.fingerprint), and the LLM's. A checkpoint loaded onto other bases is refused, naming the field
    (base_identity.vision.model_type first: a SigLIP checkpoint on a DINO tower says so)."""
    return {"vision": {"model_type": vision.config.model_type, "weights": vision.weights_fingerprint},
            "llm": llm.fingerprint}


def describe_mismatch(saved: dict, current: dict, prefix: str = "") -> str | None:
    """The first field where a saved config differs from the current one, as 'field: saved X, current Y'."""
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = describe_mismatch(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: checkpoint has {json.dumps(a, ensure_ascii=False)}, " \
                   f"this model has {json.dumps(b, ensure_ascii=False)}"
    return None
