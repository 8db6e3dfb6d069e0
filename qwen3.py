"""The Qwen3 decoder (Qwen3-8B and its smaller siblings) in plain PyTorch, loaded from a Hugging Face snapshot.

Same numbers as transformers' `Qwen3ForCausalLM` (reference: transformers/models/qwen3/modeling_qwen3.py, v5.24;
the model: "Qwen3 Technical Report", arXiv 2505.09388, §2). A Qwen3 layer is a pre-norm Llama-style block:
RMSNorm, grouped-query attention (GQA, arXiv 2305.13245) with RoPE, SwiGLU MLP. Against Qwen2 it drops the QKV bias
and adds QK-Norm, an RMSNorm over each head's query and key before RoPE (q_norm / k_norm), for stable training.

Qwen3-MoE (Qwen3-30B-A3B, transformers' `Qwen3MoeForCausalLM`) is the same decoder in which some layers (moe.py's
`is_moe_layer`) hold a router and many small SwiGLU experts (moe.Qwen3MoeBlock) in place of the dense MLP; a
`qwen3_moe` config.json sets `Qwen3Config.moe`, and everything else here is shared.

`load_qwen3` builds the model on the meta device (no memory), then reads the checkpoint one tensor at a time; with
quant="nf4" each decoder-layer linear (the experts' too) is quantized to 4-bit NormalFloat (QLoRA, arXiv 2305.14314)
as soon as it is read, so the whole model never sits in memory in bf16; quant="int8" does the same with LLM.int8
(arXiv 2208.07339; nf4.py has both formats and their quirks). Routers stay in the compute dtype.

The KV cache lives here, beside the attention that writes it (as in gpt-fast's model.py): buffers of a fixed length,
one write path (`KVCache.update`). Generation (prefill, the static-shape decode step, its CUDA graph) is decode.py's,
which calls `hidden_states` and `run_layers`, the part of the forward the two share.

Shape legend: B batch, T positions in this forward, S key positions (cached + T), C hidden_size, nh query heads,
nkv key/value heads, hs head_dim, I intermediate_size, V vocab_size.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from infra import snapshot
from infra.errors import UserError
from moe import MoeConfig, Qwen3MoeBlock, is_moe_layer, split_fused_experts
from nf4 import QUANTIZATIONS, bnb, check_int8_runs, empty_int8_linear, empty_nf4_linear, quantize_int8, quantize_nf4


@dataclass
class Qwen3Config:
    """Defaults are Qwen/Qwen3-8B's config.json."""
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128  # its own field: nh * hs need not be C (Qwen3-0.6B: 16 heads * 128 = 2048, C = 1024)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    moe: MoeConfig | None = None  # Qwen3-MoE's expert layers; None for a dense Qwen3

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}; GQA needs whole query groups")

    @classmethod
    def from_hf(cls, d: dict) -> "Qwen3Config":
        """Read a Hugging Face Qwen3 config.json dict; refuse, by name, every feature this decoder does not have."""
        refusals = {"model_type": d.get("model_type", "qwen3") not in ("qwen3", "qwen3_moe"),
                    "hidden_act": d.get("hidden_act", "silu") != "silu",
                    "use_sliding_window": bool(d.get("use_sliding_window", False)),
                    "layer_types": any(t != "full_attention" for t in d.get("layer_types") or [])}
        for key, refused in refusals.items():
            if refused:
                raise UserError(f"config.json: {key}={d[key]!r} is not supported; this is a Qwen3 decoder with "
                                 f"SiLU MLPs and full attention in every layer")
        # transformers 5 writes rope_parameters={"rope_theta", "rope_type"}; 4.x wrote rope_theta + rope_scaling.
        rope = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise UserError(f"config.json: RoPE type {rope_type!r} (e.g. YaRN context extension) is not supported; "
                             f"only the default RoPE of the released Qwen3 checkpoints is")
        theta = rope.get("rope_theta", d.get("rope_theta"))
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "rms_norm_eps", "max_position_embeddings")
        missing = [key for key in required if key not in d] + (["rope_theta"] if theta is None else [])
        if missing:
            raise UserError(f"config.json lacks {', '.join(missing)}; is this a Qwen3 config?")
        return cls(**{key: d[key] for key in required}, rope_theta=float(theta),
                   head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                   attention_bias=bool(d.get("attention_bias", False)),
                   moe=MoeConfig.from_hf(d) if d.get("model_type") == "qwen3_moe" else None)


class Qwen3RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) in fp32, cast back, then scaled by the weight: HF's order, bit for bit in bf16."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Qwen3RotaryEmbedding(nn.Module):
    """RoPE (RoFormer, arXiv 2104.09864) angles: position * theta^(-2i/hs), in HF's half-split layout."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        hs = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float) / hs))  # (hs/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, 1) * (hs/2,) -> (B, T, hs/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of hs: HF pairs dim i with i + hs/2, not adjacent dims."""
    x1, x2 = x.chunk(2, dim=-1)  # (..., hs/2) each
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, T, hs) -> (B, 1, T, hs), shared by all heads
    return x * cos + rotate_half(x) * sin  # (B, n, T, hs)


class KVCache:
    """Keys and values of every layer in buffers allocated once, (B, nkv, S_max, hs) each (gpt-fast's KVCache).

    Slots [0, length) are filled. A forward first claims its slots (`claim`, the one place `length` grows); each
    layer then writes its keys and values there (`update`, the one write path) and attends to the slots its mask
    covers. The slots are a device tensor, so a decode step of static shapes can be captured as a CUDA graph."""

    def __init__(self, num_layers: int, batch_size: int, kv_heads: int, max_len: int, head_dim: int, *, dtype,
                 device):
        shape = (batch_size, kv_heads, max_len, head_dim)  # (B, nkv, S_max, hs)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots = torch.arange(max_len, device=device)  # (S_max,): every slot's index
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0

    def claim(self, batch_size: int, count: int) -> torch.Tensor:
        """The next `count` slots, for a forward of batch_size rows: their indices (count,) on the device."""
        start, end = self.length, self.length + count
        if end > self.max_len or batch_size != self.batch_size:
            raise ValueError(f"KV cache is (batch {self.batch_size}, max_len {self.max_len}) with {start} filled; "
                             f"cannot add {count} positions of batch {batch_size}: make a larger new_kv_cache")
        self.length = end
        return self.slots[start:end]  # (count,)

    def update(self, layer_idx: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, nkv, T, hs) at `slots` (T,); return this layer's whole buffers (B, nkv, S_max, hs)."""
        self.keys[layer_idx].index_copy_(2, slots, k)  # (B, nkv, S_max, hs), along the slot dimension
        self.values[layer_idx].index_copy_(2, slots, v)
        return self.keys[layer_idx], self.values[layer_idx]

    def reset(self) -> None:
        """Empty again (the buffers are overwritten by the next forwards)."""
        self.length = 0


class Qwen3Attention(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        C, nh, nkv, hs, bias = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                                config.head_dim, config.attention_bias)
        self.layer_idx, self.head_dim = layer_idx, hs
        self.q_proj = nn.Linear(C, nh * hs, bias=bias)
        self.k_proj = nn.Linear(C, nkv * hs, bias=bias)
        self.v_proj = nn.Linear(C, nkv * hs, bias=bias)
        self.o_proj = nn.Linear(nh * hs, C, bias=bias)
        self.q_norm = Qwen3RMSNorm(hs, config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(hs, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache=None, slots=None):
        B, T, _ = x.shape
        hs = self.head_dim
        q = self.q_norm(self.q_proj(x).view(B, T, -1, hs)).transpose(1, 2)  # (B, T, nh, hs) -> (B, nh, T, hs)
        k = self.k_norm(self.k_proj(x).view(B, T, -1, hs)).transpose(1, 2)  # (B, T, nkv, hs) -> (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, -1, hs).transpose(1, 2)  # (B, T, nkv, hs) -> (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # per-head norm first, then RoPE, as HF
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, slots, k, v)  # (B, nkv, S_max, hs) each
            # The keys to read are the slots the mask covers; no mask (is_causal) means this forward filled [0, T).
            S = T if mask is None else mask.shape[-1]
            k, v = k[:, :, :S], v[:, :, :S]  # (B, nkv, S, hs) each
        # enable_gqa lets each group of nh / nkv query heads read one key/value head: no repeat_kv copies.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=True)  # (B, nh, T, hs) @ (B, nkv, S, hs) -> (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, nh, hs) -> (B, T, nh * hs) -> (B, T, C)


class Qwen3MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer, arXiv 2002.05202): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, I) -> (B, T, C)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.self_attn = Qwen3Attention(config, layer_idx)
        # Qwen3-MoE: the router and experts in the MLP's place in the layers moe.is_moe_layer names
        self.mlp = Qwen3MoeBlock(config.hidden_size, config.moe) if is_moe_layer(layer_idx, config.moe) \
            else Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache=None, slots=None):
        """-> x (B, T, C), and an MoE layer's router logits (B * T, E) (None for a dense MLP)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, slots)  # (B, T, C)
        if isinstance(self.mlp, Qwen3MoeBlock):
            y, router_logits = self.mlp(self.post_attention_layernorm(x))  # (B, T, C), (B * T, E)
            return x + y, router_logits
        return x + self.mlp(self.post_attention_layernorm(x)), None  # (B, T, C)


class Qwen3Model(nn.Module):
    """The decoder's modules under HF's names, so checkpoint keys map 1:1; the forward is Qwen3.hidden_states."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config)


def default_position_ids(attention_mask, past: int, T: int, device) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded row gets the positions it would have alone."""
    if attention_mask is None:
        return torch.arange(past, past + T, device=device)[None]  # (1, T)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, S) -> (B, T)


def build_attention_mask(attention_mask, past: int, T: int, device) -> torch.Tensor | None:
    """Boolean SDPA mask (B or 1, 1, T, S), True = may attend; None when SDPA's is_causal=True says it all."""
    if attention_mask is None and past == 0:
        return None
    query_slot = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
    key_slot = torch.arange(past + T, device=device)[None, :]  # (1, S)
    allowed = key_slot <= query_slot  # (T, S): causal over cache slots
    if attention_mask is not None:
        real_key = attention_mask.bool()[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
        # A pad query would see no key at all and softmax would give NaN; it attends to itself (garbage, finite).
        allowed = allowed & (real_key | (key_slot == query_slot))  # (B, 1, T, S)
    return allowed[None, None] if allowed.dim() == 2 else allowed  # (1, 1, T, S) or (B, 1, T, S)


class Qwen3(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        # Tied models (Qwen3-0.6B to 4B) read logits off the embedding matrix; Qwen3-8B has its own head.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self.gradient_checkpointing = False
        self.fingerprint = ""

    def hidden_states(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None,
                      kv_cache: KVCache | None = None, router_logits: list | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C) after model.norm; attention_mask (B, S) is 1 for real tokens, 0 for pads.
        A list given as router_logits receives each MoE layer's (B * T, E) (for moe.router_aux_loss)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, C)")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        past = 0 if kv_cache is None else kv_cache.length
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
            raise ValueError(f"attention_mask is {tuple(attention_mask.shape)}; it must be (B, cached + T) = "
                             f"({B}, {past + T}), covering the cached positions too")
        if self.gradient_checkpointing and torch.is_grad_enabled() and kv_cache is not None:
            raise ValueError("gradient checkpointing reruns layers in backward, which would write the KV cache "
                             "again; decode under torch.no_grad() or turn gradient_checkpointing off")
        slots = None if kv_cache is None else kv_cache.claim(B, T)  # (T,): past, ..., past + T - 1
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, past, T, x.device)  # (B or 1, T)
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)  # (B or 1, T, hs) each
        mask = build_attention_mask(attention_mask, past, T, x.device)
        return self.run_layers(x, cos, sin, mask, kv_cache, slots, router_logits)  # (B, T, C)

    def run_layers(self, x, cos, sin, mask, kv_cache=None, slots=None, router_logits=None) -> torch.Tensor:
        """The decoder layers and the final norm over embeddings x (B, T, C), with RoPE angles and an SDPA mask
        (None: causal) already made, writing keys and values at `slots` of kv_cache when given;
        decode.decode_one_token calls it with its own static-shape mask and slot."""
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer in self.model.layers:
            if checkpointing:  # keep only each layer's input; recompute its inside in backward
                x, layer_router_logits = checkpoint(layer, x, cos, sin, mask, kv_cache, slots, use_reentrant=False)
            else:
                x, layer_router_logits = layer(x, cos, sin, mask, kv_cache, slots)
            if router_logits is not None and layer_router_logits is not None:
                router_logits.append(layer_router_logits)
        return self.model.norm(x)  # (B, T, C)

    @property
    def head_weight(self) -> torch.Tensor:
        """The lm_head's (V, C) matrix: the embedding's when tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., V) in the head's own dtype: a (V, C) fp32 copy would cost 2.5 GB at Qwen3-8B size."""
        weight = self.head_weight  # (V, C)
        return F.linear(hidden.to(weight.dtype), weight)  # (..., C) @ (C, V) -> (..., V)

    def forward(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                    position_ids=position_ids, kv_cache=kv_cache)  # (B, T, C)
        return self.logits_from_hidden(hidden)  # (B, T, V)

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        embedding = self.model.embed_tokens.weight  # activations start here: its dtype and device are theirs
        c = self.config
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim,
                       dtype=embedding.dtype, device=embedding.device)


def swap_linears_to_nf4(model: Qwen3, compute_dtype: torch.dtype) -> None:
    """Every nn.Linear inside the decoder layers becomes an empty (meta) bitsandbytes Linear4bit. Embeddings,
    norms and lm_head stay in full precision, as transformers' BitsAndBytesConfig leaves them."""
    swap_quantized_linears(model, "nf4", compute_dtype)


def swap_quantized_linears(model: Qwen3, quant: str, compute_dtype: torch.dtype) -> None:
    """Every nn.Linear inside the decoder layers (attention, dense MLPs, experts) becomes an empty (meta)
    bitsandbytes Linear4bit (nf4) or Linear8bitLt (int8). Embeddings, norms, lm_head and the routers (a bare
    parameter, not an nn.Linear) stay in full precision, as transformers' BitsAndBytesConfig leaves them."""
    empty_linear = {"nf4": empty_nf4_linear, "int8": empty_int8_linear}[quant]
    for layer in model.model.layers:
        for name, linear in list(layer.named_modules()):
            if isinstance(linear, nn.Linear):
                layer.set_submodule(name, empty_linear(linear.in_features, linear.out_features,
                                                       bias=linear.bias is not None, compute_dtype=compute_dtype))


def load_qwen3(path, *, quant: str | None = None, dtype=torch.bfloat16, device="cpu") -> Qwen3:
    """Build Qwen3 or Qwen3-MoE from a Hugging Face snapshot folder; quant="nf4" or "int8" quantizes the
    decoder-layer linears while reading. Expert weights are read in the hub's per-expert layout or transformers
    5's fused one (moe.split_fused_experts).

    The returned model is in eval mode and frozen (requires_grad=False everywhere). A tied model's checkpoint may
    still carry lm_head.weight (older exports do): it is not loaded, but must equal the embedding."""
    if quant not in (None, *QUANTIZATIONS):
        raise UserError(f"quant={quant!r}: use None (weights in `dtype`), 'nf4' (4-bit NormalFloat) or 'int8' "
                         f"(LLM.int8)")
    if quant == "int8":
        check_int8_runs(device, dtype)  # a path bitsandbytes lacks here is one line now, not a crash later
    folder = Path(path).expanduser()
    config = Qwen3Config.from_hf(snapshot.read_config(folder))
    with torch.device("meta"):
        model = Qwen3(config)
    if quant is not None:
        swap_quantized_linears(model, quant, dtype)  # still (out, in) on the meta device: the key check is unchanged

    def qwen3_name(key: str) -> str | None:
        return None if config.tie_word_embeddings and key == "lm_head.weight" else key
    snapshot.load_into(model, folder, qwen3_name, dtype=dtype, device=device, place=load_tensor,
                       split=split_fused_experts if config.moe else None, progress=f"reading {folder.name}")
    if config.tie_word_embeddings:
        check_spare_head(model, folder)
    model.model.rotary_emb = Qwen3RotaryEmbedding(config).to(device)  # the one tensor not in the checkpoint
    model.fingerprint = snapshot.fingerprint(folder)
    return model.eval().requires_grad_(False)


def load_tensor(model: Qwen3, name: str, tensor: torch.Tensor, *, dtype, device) -> None:
    """Put one checkpoint tensor in place of its meta parameter; a Linear4bit or Linear8bitLt weight is quantized
    on the way."""
    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, bnb.nn.Linear4bit) and param_name == "weight":
        module.weight = quantize_nf4(tensor.to(dtype), device, module)
    elif isinstance(module, bnb.nn.Linear8bitLt) and param_name == "weight":
        module.weight = quantize_int8(tensor, device)  # from the values as stored, through fp16 (nf4.py)
    else:
        snapshot.assign(model, name, tensor, dtype=dtype, device=device)


def check_spare_head(model: Qwen3, folder: Path) -> None:
    """A tied checkpoint's leftover lm_head.weight, if any, must be the embedding it is tied to."""
    embedding = model.model.embed_tokens.weight
    for _, head in snapshot.read_tensors(folder, lambda key: key if key == "lm_head.weight" else None):
        if not torch.equal(head.to(device=embedding.device, dtype=embedding.dtype), embedding):
            raise UserError(f"{folder}: config.json says tie_word_embeddings=true but lm_head.weight differs from "
                             f"model.embed_tokens.weight; set tie_word_embeddings to false if the head is its own")
