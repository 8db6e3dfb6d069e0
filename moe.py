"""Qwen3-MoE's sparse feed-forward block (Qwen3-30B-A3B): a router and many small SwiGLU experts, in plain PyTorch.

Same numbers as transformers' `Qwen3MoeSparseMoeBlock` and `load_balancing_loss_func` (reference:
transformers/models/qwen3_moe/modeling_qwen3_moe.py, v5.25; the model: "Qwen3 Technical Report", arXiv 2505.09388,
§2). In a Qwen3-MoE decoder layer this block takes the place of the dense MLP (see `is_moe_layer`); attention, norms
and everything else are Qwen3's.

One MoE block of Qwen3-30B-A3B (C = 2048, E = 128 experts, k = 8 active, I = 768), N = B * T tokens:

                 x (N, 2048)
        gate: (N, 2048) @ (2048, 128) -> router logits (N, 128)
              softmax in fp32 -> top-8 -> weights w (N, 8), expert ids (N, 8) -> renormalise w to sum 1
        for each expert e that some token chose (a loop over experts, never over tokens):
              the n_e tokens routed to e   (n_e, 2048)   gathered with index_select
              SwiGLU_e: down(silu(gate(x)) * up(x))   (n_e, 2048) -> (n_e, 768) -> (n_e, 2048), times their w
              added back into their rows with index_add_
                 y (N, 2048): each token the w-weighted sum of its 8 experts' outputs

Each expert is three plain nn.Linear under the checkpoint's own names (`experts.{e}.gate_proj / up_proj / down_proj`),
so NF4 quantization (nf4.py) and LoRA / DoRA (lora.py) apply to experts exactly as to a dense MLP. The router's
weight is a bare parameter, not an nn.Linear, as transformers holds it: code that quantizes or adapts "every
nn.Linear" leaves the router in full precision and frozen.

Checkpoints: the hub's files store each expert on its own (`mlp.experts.{e}.gate_proj.weight`, ...), our layout;
transformers 5 fuses them in memory into `mlp.experts.gate_up_proj` (E, 2I, C) and `mlp.experts.down_proj` (E, C, I),
which `split_fused_experts` turns back into ours.

Shape legend: B batch, T positions, N = B * T tokens, C hidden_size, E num_experts, k num_experts_per_tok,
I moe_intermediate_size, n_e tokens routed to expert e, L MoE layers.
"""
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from infra.errors import UserError


@dataclass
class MoeConfig:
    """The MoE fields of a qwen3_moe config.json; defaults are Qwen/Qwen3-30B-A3B's."""
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to 1
    decoder_sparse_step: int = 1  # every step-th layer is MoE ...
    mlp_only_layers: tuple = ()  # ... except these, which keep a dense MLP of intermediate_size
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False  # transformers adds the load-balancing loss only when this is set

    def __post_init__(self):
        self.mlp_only_layers = tuple(self.mlp_only_layers)
        if not 1 <= self.num_experts_per_tok <= self.num_experts or self.decoder_sparse_step < 1:
            raise UserError(f"MoeConfig: need 1 <= num_experts_per_tok <= num_experts and decoder_sparse_step >= 1; "
                             f"got num_experts_per_tok={self.num_experts_per_tok}, num_experts={self.num_experts}, "
                             f"decoder_sparse_step={self.decoder_sparse_step}")

    @classmethod
    def from_hf(cls, d: dict) -> "MoeConfig":
        """Read a qwen3_moe config.json dict. The hub's files say `num_experts`; transformers 5 writes the same
        field as `num_local_experts`. Absent optional keys take transformers' defaults (norm_topk_prob: false)."""
        if d.get("model_type") != "qwen3_moe":
            raise UserError(f"config.json: model_type={d.get('model_type')!r}; MoeConfig reads qwen3_moe configs")
        if d.get("shared_expert_intermediate_size"):
            raise UserError("config.json: shared_expert_intermediate_size is set; Qwen3-MoE has no shared expert "
                             "(that is Qwen2-MoE), and this block has none")
        experts = d.get("num_experts", d.get("num_local_experts"))
        missing = (["num_experts"] if experts is None else []) + \
                  [key for key in ("num_experts_per_tok", "moe_intermediate_size") if key not in d]
        if missing:
            raise UserError(f"config.json lacks {', '.join(missing)}; is this a Qwen3-MoE config?")
        return cls(num_experts=experts, num_experts_per_tok=d["num_experts_per_tok"],
                   moe_intermediate_size=d["moe_intermediate_size"],
                   norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                   decoder_sparse_step=d.get("decoder_sparse_step", 1),
                   mlp_only_layers=d.get("mlp_only_layers") or (),
                   router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
                   output_router_logits=bool(d.get("output_router_logits", False)))


def is_moe_layer(index: int, config: MoeConfig | None) -> bool:
    """Whether decoder layer `index` (from 0) has the MoE block rather than the dense MLP (transformers'
    Qwen3MoeDecoderLayer rule); a dense model (config None) has none."""
    return (config is not None and index not in config.mlp_only_layers
            and (index + 1) % config.decoder_sparse_step == 0)


class SwiGLU(nn.Module):
    """SwiGLU feed-forward (Shazeer, arXiv 2002.05202): down(silu(gate(x)) * up(x)); one expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (n, C) -> (n, I) -> (n, C)


class Qwen3MoeRouter(nn.Module):
    """Top-k softmax routing: logits = x W^T, softmax in fp32, the k largest, renormalised when asked."""

    def __init__(self, hidden_size: int, config: MoeConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.num_experts, hidden_size))  # (E, C); a checkpoint fills it
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> router logits (N, E), weights (N, k) in x's dtype, expert ids (N, k)."""
        logits = F.linear(x, self.weight)  # (N, C) @ (C, E) -> (N, E)
        probs = logits.softmax(dim=-1, dtype=torch.float32)  # (N, E)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k) each
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), experts


class Qwen3MoeBlock(nn.Module):
    """The router (`gate`) and E SwiGLU experts (`experts.{e}`); forward returns (y, router logits)."""

    def __init__(self, hidden_size: int, config: MoeConfig):
        super().__init__()
        self.gate = Qwen3MoeRouter(hidden_size, config)
        self.experts = nn.ModuleList(SwiGLU(hidden_size, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> y (B, T, C) and the router logits (B * T, E), for the load-balancing loss."""
        B, T, C = x.shape
        tokens = x.reshape(B * T, C)  # (N, C)
        logits, weights, experts = self.gate(tokens)  # (N, E), (N, k), (N, k)
        y = torch.zeros_like(tokens)  # (N, C)
        # Sort the N * k (token, expert) slots by expert: each expert's tokens are then one contiguous run, and
        # one read of the per-expert counts to the host (not one per expert) tells where each run starts.
        slot_expert = experts.flatten()  # (N * k,)
        order = slot_expert.argsort(stable=True)  # (N * k,)
        slot_token = order // experts.shape[1]  # (N * k,): the token of each sorted slot
        slot_weight = weights.flatten()[order]  # (N * k,)
        counts = torch.bincount(slot_expert, minlength=len(self.experts)).tolist()  # (E,) n_e
        start = 0
        for expert, n in zip(self.experts, counts):
            if n == 0:  # an expert no token chose costs nothing
                continue
            rows = slot_token[start:start + n]  # (n_e,)
            out = expert(tokens.index_select(0, rows)) * slot_weight[start:start + n, None]  # (n_e, C)
            y.index_add_(0, rows, out.to(y.dtype))  # (N, C)
            start += n
        return y.view(B, T, C), logits


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (Fedus et al., arXiv 2101.03961, eqs. 4-6) as transformers computes it:
    E * sum_e f_e * P_e, where over all L layers' real tokens f_e is the share of tokens whose top-k holds e
    (so sum_e f_e = k) and P_e the mean router probability of e. Minimal (k) when routing is uniform.

    router_logits: one (N, E) tensor per MoE layer, N = B * T; attention_mask (B, T), 1 for tokens, 0 for pads."""
    E = router_logits[0].shape[-1]
    device = router_logits[0].device
    mask = (torch.ones(router_logits[0].shape[0], device=device) if attention_mask is None
            else attention_mask.reshape(-1).to(device=device, dtype=torch.float32))  # (N,)
    chosen_sum = torch.zeros(E, device=device)  # (E,): real tokens whose top-k holds e, over layers
    prob_sum = torch.zeros(E, device=device)  # (E,): router probability of e summed over real tokens and layers
    for logits in router_logits:  # one layer at a time: O(N * E) memory, whatever L
        probs = logits.float().softmax(dim=-1)  # (N, E)
        chosen = probs.topk(top_k, dim=-1).indices  # (N, k)
        chosen_sum = chosen_sum.scatter_add(0, chosen.flatten(), mask.repeat_interleave(top_k))  # (E,)
        prob_sum = prob_sum + (probs * mask[:, None]).sum(dim=0)  # (E,)
    rows = mask.sum() * len(router_logits)  # real tokens, counted once per layer
    return E * torch.sum((chosen_sum / rows) * (prob_sum / rows))


def router_aux_loss(router_logits: list[torch.Tensor], config: MoeConfig,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The term transformers' Qwen3MoeForCausalLM adds to the loss: router_aux_loss_coef * load_balancing_loss."""
    return config.router_aux_loss_coef * load_balancing_loss(router_logits, config.num_experts_per_tok,
                                                             attention_mask)


FUSED_EXPERTS = re.compile(r"(?P<prefix>(?:.*\.)?experts)\.(?P<kind>gate_up_proj|down_proj)")


def split_fused_experts(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """transformers 5's fused expert tensors -> ours, one (name, tensor) per expert linear; other names pass as is.

    `*.experts.gate_up_proj` (E, 2I, C): rows [0, I) of expert e are its gate_proj, rows [I, 2I) its up_proj
    (transformers' conversion_mapping concatenates gate then up; its forward chunks gate, up in that order).
    `*.experts.down_proj` (E, C, I): expert e's down_proj. The pieces are views: no copy is made here."""
    match = FUSED_EXPERTS.fullmatch(name)
    if match is None:
        return [(name, tensor)]
    prefix, kind = match["prefix"], match["kind"]
    if tensor.dim() != 3 or (kind == "gate_up_proj" and tensor.shape[1] % 2):
        raise UserError(f"{name}: shape {tuple(tensor.shape)} is not a fused expert tensor "
                         f"({'(E, 2I, C)' if kind == 'gate_up_proj' else '(E, C, I)'})")
    if kind == "down_proj":
        return [(f"{prefix}.{e}.down_proj.weight", tensor[e]) for e in range(tensor.shape[0])]  # (C, I) each
    gate, up = tensor.chunk(2, dim=1)  # (E, I, C) each
    return [(f"{prefix}.{e}.{proj}.weight", half[e]) for e in range(tensor.shape[0])
            for proj, half in (("gate_proj", gate), ("up_proj", up))]  # (I, C) each


def parameter_counts(d: dict) -> dict[str, int]:
    """Parameters of a Qwen3ForCausalLM or Qwen3MoeForCausalLM from its config.json dict, by arithmetic (no build),
    in the parts that quantization treats apart: `linear_weights`, the decoder layers' linear weight matrices
    (attention, dense MLPs, experts: what NF4 / int8 store in 4 / 8 bits), and what stays in full precision,
    `embeddings` (with the head, counted once when tied), `routers`, `norms_and_biases`."""
    C, V, L = d["hidden_size"], d["vocab_size"], d["num_hidden_layers"]
    nh, nkv = d["num_attention_heads"], d["num_key_value_heads"]
    hs = d.get("head_dim") or C // nh
    attention = C * nh * hs + 2 * C * nkv * hs + nh * hs * C  # q, k, v, o
    attention_bias = (nh * hs + 2 * nkv * hs + C) if d.get("attention_bias", False) else 0
    moe = MoeConfig.from_hf(d) if d.get("model_type") == "qwen3_moe" else None
    moe_layers = sum(is_moe_layer(i, moe) for i in range(L))
    experts = 0 if moe is None else moe.num_experts * 3 * C * moe.moe_intermediate_size
    return {"embeddings": V * C * (1 if d.get("tie_word_embeddings", False) else 2),
            "linear_weights": L * attention + moe_layers * experts + (L - moe_layers) * 3 * C * d["intermediate_size"],
            "routers": 0 if moe is None else moe_layers * moe.num_experts * C,
            "norms_and_biases": L * (2 * hs + 2 * C + attention_bias) + C}  # q/k_norm, 2 layer norms; final norm


def count_parameters(d: dict) -> int:
    """All parameters, as `sum(p.numel() for p in model.parameters())` counts them on transformers' model."""
    return sum(parameter_counts(d).values())
