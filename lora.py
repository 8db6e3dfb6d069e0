"""LoRA and DoRA adapters over frozen nn.Linear and bitsandbytes 4-bit (NF4) and 8-bit (LLM.int8) linears.

LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685.
DoRA: Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353 (row norm detached, §4.3).
Reference implementation for the numbers: PEFT 0.21 (peft/tuners/lora/{layer,bnb,variants,dora}.py).

One adapted linear of Qwen3-8B (q_proj: 4096 -> 4096, r = 16, s = alpha / r = 2), T tokens:

                                  x (T, 4096)
                 +---------------------+----------------------+
                 |                                            | dropout (adapter branch only)
     base: frozen W (4096, 4096), NF4                 A (16, 4096):  (T, 4096) -> (T, 16)
                 |  W x + b  (T, 4096)                B (4096, 16):  (T, 16) -> (T, 4096), times s
                 +---------------------+----------------------+
     LoRA:   y = W x + b + s B A x                                                     (T, 4096)
     DoRA:   y = m / ||W + sBA||_row * (W x + s B A x) + b,   m: magnitude (4096,)      (T, 4096)

     DoRA's row norm n, detached, formed in every forward from the same base pass, never from the (4096, 4096)
     W + sBA:
       [x; A] (T + 16, 4096) --base--> (T + 16, 4096): W x + b, and A W^T + b (16, 4096) -> W A^T (4096, 16)
       ||W + sBA||^2 = ||W||^2 + 2s rowsum(W A^T * B) + s^2 rowsum((B A A^T) * B)      (4096,)
       ||W||^2 (4096,) is a constant of the frozen base, computed once when the layer is wrapped.
     A's 16 rows cost what 16 more tokens cost: little beside a training micro-batch's hundreds of tokens, as
     much as a whole decode step at batch 16. So a generation forms the norm once and holds it (held_dora_norms);
     results/README.md ("DoRA's norm") has the measurement.

Backward is written out (AdaptedLinearFunction) so that it keeps x once, dropout's mask as booleans and the
r-wide s A x' (autograd would keep dropout's scaled mask and the dropped copy of x for every adapter), and no base
weight: results/README.md ("Training memory") has the bytes.

Shapes: T tokens (any leading dims), in / out features, r rank. Adapter weights are fp32; they compute in the
activations' dtype (as autocast would). The DoRA norm is formed in fp32 (only W A^T comes from the base pass, in
its compute dtype); PEFT forms it in the compute dtype. Over an 8-bit base, W A^T comes from the dequantized int8
weight instead of the base pass, since LLM.int8 would round A's rows to int8 like activations (see base_and_norm).
"""
import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from infra.errors import UserError
from nf4 import bnb, dequantize_int8, keep_one_layout

QWEN3_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_LINEARS = QWEN3_LINEARS[:4]  # Qwen3-MoE's default targets: its experts stay frozen unless named
QUANTIZED_LINEARS = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)  # the bitsandbytes bases LoRALinear wraps


@dataclass
class AdapterConfig:
    method: str = "lora"          # "lora" or "dora"
    r: int = 16
    alpha: float = 32             # scale s = alpha / r
    dropout: float = 0.05         # on the adapter branch's input only
    targets: tuple = QWEN3_LINEARS  # last component of the module names to adapt

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if self.method not in ("lora", "dora"):
            raise UserError(f"AdapterConfig.method={self.method!r}: use 'lora' or 'dora'")
        if self.r < 1 or not 0 <= self.dropout < 1 or not self.targets:
            raise UserError(f"AdapterConfig: need r >= 1, 0 <= dropout < 1 and some targets; got r={self.r}, "
                             f"dropout={self.dropout}, targets={self.targets}")


def dequantized_weight(linear: nn.Linear) -> torch.Tensor:
    """The base weight (out, in) in fp32; a 4-bit or 8-bit one dequantized. Called when wrapping and merging (and,
    for an 8-bit base, by DoRA's norm: base_and_norm)."""
    if linear.weight.is_meta:
        return torch.empty(linear.out_features, linear.in_features, device="meta")
    if isinstance(linear, bnb.nn.Linear4bit):
        state = linear.weight.quant_state
        if state is None or getattr(state, "packing_format_for_cpu", False):
            raise ValueError("a Linear4bit weight must be quantized (moved to its device) and not yet repacked by "
                             "a CPU eval forward before LoRALinear wraps or merges it; wrap right after loading")
        return bnb.functional.dequantize_4bit(linear.weight.data, state).float()
    if isinstance(linear, bnb.nn.Linear8bitLt):
        return dequantize_int8(linear)
    return linear.weight.float()


class LoRALinear(nn.Module):
    """base(x) + s B A dropout(x) (LoRA) or its DoRA rescaling; the wrapped linear stays at `.base`, frozen.

    Dropout with DoRA. Here, as in torchtune's DoRALinear, dropout acts on the adapter branch only:
        y = m / n * (W x + s B A dropout(x)) + b,           n = ||W + sBA||_row (detached)
    one base pass per forward. PEFT 0.21 (lora/variants.py DoraLinearVariant.forward, lora/dora.py
    DoraLinearLayer.forward) dequantizes W and materialises W + sBA on every forward to take n; with dropout = 0
    or in eval mode it reuses base(x) - b, but in training with dropout > 0 it draws one mask, x' = dropout(x),
    and runs W a second time, on the dropped input: F.linear(x', W) with the dequantized W, and its backward:
        y = W x + b + (m / n - 1) * W x' + m / n * s B A x'
    Both are m / n * (W x + s B A x) + b when the dropout is the identity, and agree in expectation over the mask
    (both are linear in x'); tests/test_lora.py computes PEFT's form, for the parity tests.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, dora: bool = False):
        super().__init__()
        if type(base) is not nn.Linear and not isinstance(base, QUANTIZED_LINEARS):
            raise TypeError(f"LoRALinear wraps nn.Linear or bitsandbytes Linear4bit / Linear8bitLt, not "
                            f"{type(base).__name__}")
        if isinstance(base, bnb.nn.Linear4bit):
            keep_one_layout(base)  # no CPU repacking into a layout dequantize_4bit cannot read (nf4.py)
        self.base = base.requires_grad_(False)
        self.r, self.scaling, self.dora = r, alpha / r, dora
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))  # (out, r): zero, so y = base(x)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT, i.e. nn.Linear's default init
        if dora:
            weight_sq_norm = dequantized_weight(base).square().sum(dim=1)  # (out,)
            self.register_buffer("weight_sq_norm", weight_sq_norm, persistent=False)
            self.magnitude = nn.Parameter(weight_sq_norm.sqrt())  # (out,): ||W||_row, so m / n = 1 at init
            self.register_buffer("held_norm", torch.zeros_like(weight_sq_norm), persistent=False)  # (out,)
            self.norm_held = False  # True inside held_dora_norms: forwards read held_norm

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling}, dora={self.dora}"

    def lora_down(self, x: torch.Tensor) -> torch.Tensor:
        """s A x, computed in x's dtype (fp32 master weights cast down, as autocast does)."""
        return F.linear(x, self.lora_A.to(x.dtype)) * self.scaling  # (T, in) @ (in, r) -> (T, r); s where r-wide

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """s B A x, computed in x's dtype."""
        return F.linear(self.lora_down(x), self.lora_B.to(x.dtype))  # (T, r) @ (r, out) -> (T, out)

    def weight_norm(self, WAt: torch.Tensor) -> torch.Tensor:
        """||W + sBA||_row (out,) in fp32, detached (DoRA §4.3: a constant for backpropagation), from W A^T
        (out, r) instead of the (out, in) matrix W + sBA:
            ||W + sBA||^2 = ||W||^2 + 2s rowsum((W A^T) * B) + s^2 rowsum((B A A^T) * B)"""
        with torch.no_grad(), torch.autocast(WAt.device.type, enabled=False):  # autocast would run these in bf16
            A, B, s = self.lora_A.float(), self.lora_B.float(), self.scaling
            M = torch.addmm(WAt.float(), B, A @ A.T, beta=2 * s, alpha=s * s)  # (out, r) @ ((r, in) @ (in, r))
            sq = self.weight_sq_norm + (M * B).sum(dim=1)  # (out, r) * (out, r) -> (out,)
            return sq.clamp_min(0).sqrt()  # (out,); clamp: rounding may push an all-but-zero row below 0

    def base_and_norm(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """base(x) (T, out) and ||W + sBA||_row (out,): A's r rows ride along with the tokens through the one
        base pass, which gives W A^T."""
        if self.weight_sq_norm.is_meta:
            raise RuntimeError("DoRA adapters were applied on the meta device; apply them after loading the base")
        if isinstance(self.base, bnb.nn.Linear8bitLt):  # LLM.int8 would round A's rows to int8, as activations
            return self.base(x), self.weight_norm(self.int8_WAt(x.dtype))  # (T, out), (out,)
        rows = torch.cat([x.reshape(-1, x.shape[-1]), self.lora_A.detach().to(x.dtype)])  # (N + r, in)
        out = self.base(rows)  # (N + r, in) -> (N + r, out)
        WAt = self.without_bias(out[-self.r:].detach()).T  # (r, out) -> (out, r): W A^T
        return out[:-self.r].reshape(*x.shape[:-1], -1), self.weight_norm(WAt)  # (N, out) -> (T, out)

    def hold_weight_norm(self, dtype: torch.dtype) -> None:
        """The norm into held_norm (the same tensor every time), from one base pass of A's rows alone in the
        activations' dtype (a 4-bit base takes its compute dtype from its first input); forwards read it while
        norm_held is True (see held_dora_norms)."""
        with torch.no_grad():
            if isinstance(self.base, bnb.nn.Linear8bitLt):
                WAt = self.int8_WAt(dtype)  # (out, r)
            else:
                WAt = self.without_bias(self.base(self.lora_A.detach().to(dtype))).T  # (r, out) -> (out, r)
            self.held_norm.copy_(self.weight_norm(WAt))
        self.norm_held = True

    def int8_WAt(self, dtype: torch.dtype) -> torch.Tensor:
        """W A^T (out, r) of an 8-bit base from its dequantized weight in `dtype` (as bitsandbytes' own CPU training
        path multiplies): one (out, in) copy for the moment of the product, as PEFT makes for its norm."""
        W = dequantized_weight(self.base).to(dtype)  # (out, in)
        return F.linear(W, self.lora_A.detach().to(dtype))  # (out, in) @ (in, r) -> (out, r)

    def without_bias(self, base_out: torch.Tensor) -> torch.Tensor:
        bias = self.base.bias
        return base_out if bias is None else base_out - bias.to(base_out.dtype)  # (T, out): W x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        magnitude = self.magnitude if self.dora else None
        return AdaptedLinearFunction.apply(x, self.lora_A, self.lora_B, magnitude, self)  # (T, out)

    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear holding W + sBA (DoRA: m / ||W + sBA||_row * (W + sBA)), computed in fp32.

        A 4-bit or 8-bit base merges into its compute dtype (bf16 when it has none): W + sBA is not on the NF4 or
        int8 grid, and re-quantizing it would move every weight by up to half a quantization step."""
        base = self.base
        dtype = quantized_compute_dtype(base) if isinstance(base, QUANTIZED_LINEARS) else base.weight.dtype
        with torch.no_grad():
            weight = dequantized_weight(base) + self.scaling * (self.lora_B.float() @ self.lora_A.float())  # (out, in)
            if self.dora:
                weight = (self.magnitude.float() / weight.norm(dim=1)).unsqueeze(1) * weight  # (out, 1) * (out, in)
            merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                               device=weight.device, dtype=dtype)
            merged.weight.copy_(weight)
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        return merged.requires_grad_(False)


def quantized_compute_dtype(linear: nn.Module) -> torch.dtype:
    """A bitsandbytes linear's compute dtype, bf16 when it has none (nf4.empty_int8_linear records one)."""
    return getattr(linear, "compute_dtype", None) or torch.bfloat16


class AdaptedLinearFunction(torch.autograd.Function):
    """A LoRALinear's forward, and its backward written out, so that backward keeps only what it needs: the input
    x once (the base and the adapter read the same x; autograd would keep the adapter's dropped copy and dropout's
    scaled mask beside it, both in the activations' dtype), dropout's mask as booleans, the r-wide s A x', and no
    weight of the base (the 4-bit one is dequantized again in backward, as bitsandbytes' MatMul4Bit does).
    Backward forms x' = dropout(x) again from x and the mask. DoRA also keeps the (T, out) sum base(x) + s B A x',
    which m's gradient needs, as autograd does.
        LoRA: y = base(x) + s B A x'                        x' = dropout(x) = x * mask / (1 - p)
        DoRA: y = m / n * (base(x) + s B A x') + (1 - m / n) * b,   n = ||W + sBA||_row, detached (§4.3)
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, magnitude, layer: "LoRALinear"):
        p = layer.dropout.p if layer.training and isinstance(layer.dropout, nn.Dropout) else 0.0
        dropped, mask = torch.native_dropout(x, p, True) if p > 0 else (x, None)  # nn.Dropout's draw, as booleans
        down = layer.lora_down(dropped)  # (T, r)
        lora_out = F.linear(down, lora_B.to(dropped.dtype))  # (T, r) @ (r, out) -> (T, out): s B A x'
        ctx.layer, ctx.p = layer, p
        if not layer.dora:
            base_out = layer.base(x)  # (T, in) -> (T, out): the one base pass
            ctx.save_for_backward(x, mask, down, lora_A, lora_B)
            ctx.base_dtype = compute_dtype(layer.base, base_out)
            return base_out + lora_out.to(base_out.dtype)
        if not layer.norm_held:
            base_out, norm = layer.base_and_norm(x)  # (T, out), (out,)
        else:  # inside held_dora_norms (a generation): the norm formed once, on entering
            base_out, norm = layer.base(x), layer.held_norm  # (T, out), (out,)
        ctx.base_dtype = compute_dtype(layer.base, base_out)
        scale = magnitude / norm  # (out,): m / ||W + sBA||, 1 at init
        # m/n * (W x + s B A x) + b = m/n * (base(x) + s B A x) + (1 - m/n) * b: one (T, out) product, and
        # exactly base(x) when m/n = 1 (at init)
        combined = base_out + lora_out.to(base_out.dtype)  # (T, out)
        ctx.save_for_backward(x, mask, down, lora_A, lora_B, norm, scale, combined)
        out = scale.to(combined.dtype) * combined  # (out,) * (T, out)
        if layer.base.bias is None:
            return out
        return out + ((1 - scale) * layer.base.bias).to(out.dtype)  # (T, out) + (out,)

    @staticmethod
    def backward(ctx, grad_out):
        layer, (x, mask, down, lora_A, lora_B, *dora) = ctx.layer, ctx.saved_tensors
        grad_magnitude = None
        if layer.dora:
            norm, scale, combined = dora
            grad_scale = (grad_out * combined).flatten(0, -2).sum(0).float()  # (out,): d loss / d (m / n)
            if layer.base.bias is not None:
                grad_scale -= grad_out.flatten(0, -2).sum(0).float() * layer.base.bias.float()
            grad_magnitude = grad_scale / norm  # (out,): n is a constant (detached)
            grad_out = grad_out * scale.to(grad_out.dtype)  # (T, out): d loss / d (base(x) + s B A x')
        dt = down.dtype  # the adapter branch's compute dtype, as in forward
        A, B = lora_A.to(dt), lora_B.to(dt)
        g = grad_out.to(dt).flatten(0, -2)  # (N, out)
        grad_B = g.T @ down.flatten(0, -2)  # (out, N) @ (N, r) -> (out, r)
        grad_down = (g @ B) * layer.scaling  # (N, out) @ (out, r) -> (N, r): d loss / d (A x'), s where r-wide
        dropped = x if mask is None else torch.where(mask, x, 0).mul_(1 / (1 - ctx.p))  # x', as native_dropout
        grad_A = grad_down.T @ dropped.to(dt).flatten(0, -2)  # (r, N) @ (N, in) -> (r, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_dropped = (grad_down @ A).view_as(x)  # (N, r) @ (r, in) -> (T, in)
            if mask is not None:  # native_dropout_backward's grad * mask * scale
                grad_dropped = torch.where(mask, grad_dropped, 0).mul_(1 / (1 - ctx.p))
            grad_x = base_input_grad(layer.base, grad_out, ctx.base_dtype).to(x.dtype).add_(grad_dropped)
        return grad_x, grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype), grad_magnitude, None


def compute_dtype(base: nn.Module, base_out: torch.Tensor) -> torch.dtype:
    """The dtype the base multiplied in: a 4-bit base's compute dtype (it casts its output back to the input's),
    else its output's (autocast's choice, or the weight's)."""
    return (base.compute_dtype or base_out.dtype) if isinstance(base, bnb.nn.Linear4bit) else base_out.dtype


def base_input_grad(base: nn.Module, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """d loss / d x through the frozen base, grad_out @ W (T, out) @ (out, in) -> (T, in) in `dtype`; a 4-bit or
    8-bit W dequantized here and dropped after (bitsandbytes' MatMul4Bit and MatMul8bitLt backwards do the same)."""
    if isinstance(base, bnb.nn.Linear4bit):
        weight = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)  # (out, in)
    elif isinstance(base, bnb.nn.Linear8bitLt):
        weight = dequantize_int8(base).to(dtype)  # (out, in): int8 rows times their scales / 127
    else:
        weight = base.weight.to(dtype)  # (out, in)
    return grad_out.to(dtype) @ weight


def dense_linear(linear: nn.Module) -> nn.Linear:
    """A 4-bit or 8-bit linear as a plain nn.Linear in its compute dtype (bf16 when it has none); W dequantized
    once."""
    dtype = quantized_compute_dtype(linear)
    dense = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      device=linear.weight.device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(dequantized_weight(linear))
        if linear.bias is not None:
            dense.bias.copy_(linear.bias)
    return dense.requires_grad_(False)


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` for generation in which every LoRALinear is its merged_linear() and every other 4-bit or
    8-bit linear a dense one: plain GEMMs, no per-token dequantization. All other parameters and buffers are shared with
    `model`, not copied; `model` keeps its adapters and its 4-bit weights (so the copy costs the dense weights)."""
    int8_states = [t for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)
                   for t in (m.state.CB, m.state.SCB) if t is not None]  # where bitsandbytes keeps them (nf4.py)
    shared = {id(t): t for t in [*model.parameters(), *model.buffers(), *int8_states]}
    merged = copy.deepcopy(model, memo=shared)  # new module objects around the same tensors
    for name, module in list(merged.named_modules()):
        if isinstance(module, LoRALinear):
            _replace(merged, name, module.merged_linear())
    for name, module in list(merged.named_modules()):  # the quantized linears no adapter wraps
        if isinstance(module, QUANTIZED_LINEARS):
            _replace(merged, name, dense_linear(module))
    return merged.eval()


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def apply_adapters(model: nn.Module, config: AdapterConfig | None = None, **options) -> list[str]:
    """Wrap every linear whose name ends in one of the targets in a LoRALinear, in place; freeze all other
    parameters of `model`. Options are AdapterConfig's fields (pass a config or keywords). Returns the names."""
    if config is not None and options:
        raise TypeError("apply_adapters: pass an AdapterConfig or keyword options, not both")
    config = config or AdapterConfig(**options)
    names = [name for name, _ in model.named_modules() if name.rpartition(".")[2] in config.targets]
    unmatched = set(config.targets) - {name.rpartition(".")[2] for name in names}
    if unmatched:
        raise UserError(f"adapter targets {sorted(unmatched)} match no module of {type(model).__name__}; "
                         f"check AdapterConfig.targets against model.named_modules()")
    for name in names:
        module = model.get_submodule(name)
        if type(module) is not nn.Linear and not isinstance(module, QUANTIZED_LINEARS):
            raise TypeError(f"adapter target {name} is a {type(module).__name__} (adapters applied twice?); "
                            f"LoRALinear wraps nn.Linear or bitsandbytes Linear4bit / Linear8bitLt")
    model.requires_grad_(False)
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), config.r, config.alpha, config.dropout,
                                         dora=config.method == "dora"))
    return names


@contextmanager
def held_dora_norms(model: nn.Module, dtype: torch.dtype):
    """Inside, every DoRA layer of `model` reads its row norm, formed once on entering (activations in `dtype`),
    instead of forming it in every forward: for a generation, where the adapters do not change and a decode step
    of B tokens would otherwise pass A's r rows through every base as well (results/README.md, "DoRA's norm").
    Each layer writes the norm into the same tensor every time, so a decode step captured as a CUDA graph inside
    one generation reads the fresh norm in the next. Changing the adapters inside is refused (check_no_held_norms)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear) and m.dora]
    try:
        for layer in layers:
            layer.hold_weight_norm(dtype)
        yield
    finally:
        for layer in layers:
            layer.norm_held = False


def check_no_held_norms(model: nn.Module, change: str) -> None:
    """Refuse `change` to the adapters while held_dora_norms holds their norms: those would be stale."""
    if any(isinstance(m, LoRALinear) and m.dora and m.norm_held for m in model.modules()):
        raise RuntimeError(f"{change} inside held_dora_norms: the held DoRA norms would no longer match the "
                           f"adapters; leave the `with held_dora_norms(...)` block first")


def after_optimizer_step(model: nn.Module) -> None:
    """The training loop calls this right after every optimizer.step(). DoRA forms its norm in every training
    forward, so no norm outlives the step; this checks that the step did not change adapters whose norms
    held_dora_norms is holding. A no-op for LoRA and for a model without adapters."""
    check_no_held_norms(model, "an optimizer step")


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total). Convention: a 4-bit weight counts as its logical in x out parameters (bitsandbytes
    stores two per byte, so numel() would say half); shared (tied) parameters count once."""
    trainable = total = 0
    seen = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            four_bit = isinstance(module, bnb.nn.Linear4bit) and name == "weight"
            n = module.in_features * module.out_features if four_bit else p.numel()
            total += n
            trainable += n if p.requires_grad else 0
    return trainable, total


def parameter_report(model: nn.Module) -> str:
    trainable, total = parameter_counts(model)
    return (f"trainable {trainable:,} / total {total:,} parameters ({100 * trainable / max(total, 1):.3f}%; "
            f"4-bit weights counted as in x out)")


def _adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{name}.{p_name}": p for name, module in model.named_modules() if isinstance(module, LoRALinear)
            for p_name, p in module.named_parameters(recurse=False)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the adapter tensors only: '<module>.lora_A', '.lora_B' and (DoRA) '.magnitude'."""
    return {key: p.detach().clone() for key, p in _adapter_parameters(model).items()}


def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors in place; every key and shape is checked first."""
    check_no_held_norms(model, "loading adapter weights")
    params = _adapter_parameters(model)
    unknown, missing = sorted(set(state_dict) - set(params)), sorted(set(params) - set(state_dict))
    for keys, problem in ((unknown, "is not an adapter tensor of this model"), (missing, "is missing")):
        if keys:
            raise UserError(f"adapter state dict: key {keys[0]!r} {problem}" + (f" (and {len(keys) - 1} more)" if
                           len(keys) > 1 else "") + "; was it saved with another model, method or targets?")
    for key, p in params.items():
        if state_dict[key].shape != p.shape:
            raise UserError(f"adapter state dict: {key!r} has shape {tuple(state_dict[key].shape)}, the model "
                             f"expects {tuple(p.shape)}; was it saved with another rank r?")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(state_dict[key])


def merge_adapters(model: nn.Module) -> list[str]:
    """Replace every LoRALinear by its merged plain nn.Linear (see LoRALinear.merged_linear); returns the names.
    A model without LoRALinear (already merged, or never adapted) is refused."""
    names = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    if not names or names == [""]:
        raise ValueError("merge_adapters: no LoRALinear inside the model: its adapters were already merged "
                         "(merging twice is refused) or never applied; for a bare layer use .merged_linear()")
    for name in names:
        _replace(model, name, model.get_submodule(name).merged_linear())
    return names
