"""The assembled video-captioning model: frozen CLIP → trainable projector → Qwen3 (NF4 base + LoRA / DoRA).

    frames (B, F, 3, S, S) ──CLIP layer -2, drop CLS──▶ (B, F, P, Dv) ──projector──▶ (B, N, C)
        ──spliced at the <|video_pad|> slots of the chat prompt──▶ inputs_embeds (B, T, C) ──Qwen3──▶ hidden (B, T, C)
        ──lm_head at caption positions only──▶ cross-entropy on the caption tokens and the closing <|im_end|>

The prompt (Qwen3 chat format, thinking disabled) is built by `ChatTemplate`, identical at train and eval time:
    <|im_start|>user\n<|vision_start|>{N x <|video_pad|>}<|vision_end|>{instruction}<|im_end|>\n
    <|im_start|>assistant\n<think>\n\n</think>\n\n{caption}<|im_end|>

Shapes: B batch, F frames, P patches per frame, Dv vision width, N visual tokens, T sequence, C LLM width,
V vocab, L supervised (label) positions in the batch.
"""
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer

from clip import load_clip_vision
from lora import AdapterConfig, adapter_state_dict, apply_adapters, load_adapter_state_dict
from projectors import PROJECTOR_OPTIONS, build_projector
from qwen3 import load_qwen3
from sampling import next_token

DEFAULT_INSTRUCTION = "이 영상을 한국어로 한 문장으로 설명하세요."  # "Describe this video in one Korean sentence."
IGNORE_INDEX = -100


@dataclass
class VLMConfig:
    """What it takes to rebuild the model; saved in every checkpoint."""
    clip_path: str
    llm_path: str
    projector: dict                          # ProjectorConfig fields except the widths, which the bases decide
    adapter: dict | None = None              # AdapterConfig fields, None in stage 1 / without PEFT
    quant: str | None = "nf4"
    vision_layer: int = -2                   # LLaVA's choice: the penultimate layer
    num_frames: int = 8
    instruction: str = DEFAULT_INSTRUCTION
    base_identity: dict = field(default_factory=dict)  # fingerprints of the bases, filled by build_vlm


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
            raise ValueError(f"the tokenizer has no {token} token; kovlm needs Qwen3's tokenizer.json (chat tokens)")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def prompt_ids(self, num_visual: int) -> list[int]:
        return self.before_video + [self.video_pad_id] * num_visual + self.after_video

    def caption_ids(self, caption: str) -> list[int]:
        if not caption.strip():
            raise ValueError("empty caption: every training caption needs text")
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

    # ---- vision side ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_video(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen CLIP features of the chosen layer without the CLS token: (B, F, 3, S, S) -> (B, F, P, Dv)."""
        B, F_ = pixel_values.shape[:2]
        pixels = pixel_values.flatten(0, 1).to(self.vision.embeddings.patch_embedding.weight.dtype)  # (B*F, 3, S, S)
        hidden = self.vision(pixels, layer=self.config.vision_layer)  # (B*F, 1+P, Dv)
        return hidden[:, 1:].unflatten(0, (B, F_))  # (B, F, P, Dv)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)  # (B, F, P, Dv) -> (B, N, C)

    def splice_visual_tokens(self, input_ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the N visual embeddings written, in order, over each row's <|video_pad|> slots."""
        embeds = self.llm.model.embed_tokens(input_ids)  # (B, T, C)
        slots = (input_ids == self.template.video_pad_id).unsqueeze(-1)  # (B, T, 1)
        return embeds.masked_scatter(slots, visual.to(embeds.dtype))  # (B, T, C)

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

    def forward(self, features: torch.Tensor, captions: list[str], num_label_tokens: int | None = None):
        """Summed caption cross-entropy / num_label_tokens (default: this batch's own count; torchtune's
        normalisation, so one batch of 8 equals 8 accumulated batches of 1). Right padding needs no attention mask:
        with causal attention, padding after a caption never reaches it."""
        visual = self.project(features)  # (B, N, C)
        input_ids, labels = self.tokenize_batch(captions, visual.shape[1])
        input_ids, labels = input_ids.to(visual.device), labels.to(visual.device)
        hidden = self.llm.hidden_states(inputs_embeds=self.splice_visual_tokens(input_ids, visual))  # (B, T, C)
        targets = labels[:, 1:]  # position t predicts token t + 1
        supervised = targets != IGNORE_INDEX  # (B, T-1)
        logits = self.llm.logits_from_hidden(hidden[:, :-1][supervised])  # (L, C) -> (L, V)
        loss_sum = F.cross_entropy(logits.float(), targets[supervised], reduction="sum")
        return loss_sum / (num_label_tokens or int(supervised.sum()))

    # ---- generation ----------------------------------------------------------------------------------------------
    def prompt_batch(self, num_visual: int, instructions: list[str] | None, batch_size: int):
        """Left-padded prompt ids (B, T) and attention mask (B, T); one instruction for all unless given per row."""
        if instructions is None:
            rows = [self.template.prompt_ids(num_visual)] * batch_size
        else:
            rows = [ChatTemplate(self.template.tokenizer, text).prompt_ids(num_visual) for text in instructions]
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), self.template.end_of_text_id)
        attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, T - len(row):] = torch.tensor(row)
            attention_mask[b, T - len(row):] = 1
        return input_ids, attention_mask

    @torch.no_grad()
    def generate(self, features: torch.Tensor, *, max_new_tokens: int = 64, instructions: list[str] | None = None,
                 **sampling) -> list[str]:
        """Batched captions: prefill the prompts once, then decode one token at a time with a KV cache, each row
        stopping at <|im_end|> or <|endoftext|>. Greedy by default; `sampling` goes to sampling.next_token
        (do_sample, temperature, top_p, repetition_penalty, no_repeat_ngram_size, generator)."""
        visual = self.project(features)  # (B, N, C)
        input_ids, attention_mask = (t.to(visual.device) for t in
                                     self.prompt_batch(visual.shape[1], instructions, visual.shape[0]))
        B, T = input_ids.shape
        cache = self.llm.new_kv_cache(B, T + max_new_tokens)
        embeds = self.splice_visual_tokens(input_ids, visual)  # (B, T, C)
        hidden = self.llm.hidden_states(inputs_embeds=embeds, attention_mask=attention_mask, kv_cache=cache)
        generated = torch.empty(B, 0, dtype=torch.long, device=visual.device)
        finished = torch.zeros(B, dtype=torch.bool, device=visual.device)
        for _ in range(max_new_tokens):
            logits = self.llm.logits_from_hidden(hidden[:, -1]).float()  # (B, V)
            token = next_token(logits, generated, **sampling)  # (B,)
            token = torch.where(finished, self.template.end_of_text_id, token)
            generated = torch.cat([generated, token[:, None]], dim=1)  # (B, t+1)
            finished |= (token == self.template.im_end_id) | (token == self.template.end_of_text_id)
            if finished.all():
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            hidden = self.llm.hidden_states(token[:, None], attention_mask=attention_mask, kv_cache=cache)
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
            raise KeyError(f"unexpected keys in the trainable state: {sorted(unknown)[:5]}")
        self.projector.load_state_dict(projector, strict=True)
        if self.config.adapter is not None:
            load_adapter_state_dict(self.llm, adapters)
        elif adapters:
            raise KeyError("the state holds adapter weights but this model has no adapters")

    def add_adapters(self, adapter: AdapterConfig) -> list[str]:
        """Stage 2: wrap the LLM's target linears with LoRA / DoRA (the LLM's base weights stay frozen)."""
        self.config.adapter = asdict(adapter)
        return apply_adapters(self.llm, method=adapter.method, r=adapter.r, alpha=adapter.alpha,
                              dropout=adapter.dropout, targets=tuple(adapter.targets))


def build_vlm(config: VLMConfig, *, device="cpu", dtype=torch.bfloat16, vision_dtype=None) -> VLM:
    """Load the frozen bases from their snapshot folders, build the projector (and adapters when configured)."""
    vision = load_clip_vision(config.clip_path, dtype=vision_dtype or dtype, device=device)
    llm = load_qwen3(config.llm_path, quant=config.quant, dtype=dtype, device=device)
    tokenizer_file = Path(config.llm_path) / "tokenizer.json"
    if not tokenizer_file.exists():
        raise FileNotFoundError(f"{tokenizer_file} not found: the LLM folder must hold Qwen3's tokenizer.json")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    name = config.projector["name"]
    used = PROJECTOR_OPTIONS[name]  # options the chosen projector reads (e.g. linear reads none)
    options = {k: v for k, v in config.projector.items() if k in used and v is not None}
    if "num_frames" in used:
        options.setdefault("num_frames", config.num_frames)
    projector = build_projector(name, vision.config.hidden_size, llm.config.hidden_size, **options).to(device)
    config.projector = {k: v for k, v in asdict(projector.config).items() if k not in ("vision_dim", "llm_dim")}
    config.base_identity = {"clip": vision.fingerprint, "llm": llm.fingerprint}
    model = VLM(vision, projector, llm, tokenizer, config)
    if config.adapter is not None:
        model.add_adapters(AdapterConfig(**config.adapter))
        model.to(device)
    return model


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
