"""bitsandbytes' 4-bit NormalFloat and 8-bit (LLM.int8) layers as kovlm uses them, and the one place for their quirks.

NF4 (Dettmers et al. 2023, QLoRA, arXiv 2305.14314) stores each weight as a 4-bit index into 16 normal-quantile
levels, with one scale per block of 64 weights (themselves quantized: "double quantization"). Two quirks of
bitsandbytes >= 0.49 on CPUs with AVX512-BF16 are handled here and nowhere else:
- at a 4-bit layer's first no-grad eval forward, bitsandbytes repacks the weight in place into a bf16 inference
  layout that `dequantize_4bit` cannot read, that rounds through bf16, and whose later backward passes give wrong
  gradients. `keep_one_layout` turns that off on every 4-bit layer kovlm builds or wraps (and the benchmark's
  reference stack, so both run the same kernels).
- at import, bitsandbytes tries to fetch an optional kernel from a model hub and logs a warning when it cannot,
  which on an offline machine is always. kovlm never uses that kernel, so the warning is silenced; this has to
  happen before bitsandbytes is first imported, hence at this module's import.
- on the CPU, bitsandbytes quantizes with its generic torch kernel: the whole tensor in fp32, then `bucketize` over
  it; that is nearly all the time of loading a quantized LM (results/README.md, "Loading the LM, step by step").
  `quantize_nf4` computes the same bits a cache-sized chunk at a time, with 15 comparisons instead of `bucketize`,
  and builds the same Params4bit and QuantState (the double quantization of the block scales is bitsandbytes' own
  call). On a GPU bitsandbytes' CUDA kernel quantizes, as before. tests/test_nf4.py holds both to the same bytes.

int8 (Dettmers et al. 2022, LLM.int8(), arXiv 2208.07339) stores each weight row as int8 with one fp32 scale, its
absmax / 127 (8 bits + 32 / in_features per weight). A forward quantizes the activations per row as well, except
the feature columns holding a value above the outlier threshold (6.0, the paper's §3.2), which are multiplied in
fp16 against the dequantized weight columns. Its quirks, handled here:
- quantization happens when an `Int8Params` on the CPU is moved `.to(device)` (the CPU included), through fp16;
- the row scales live on the weight (`weight.SCB`) until the layer's first forward, then on `layer.state.SCB`;
- on the CPU a training-mode forward does not run LLM.int8: it dequantizes the weight and multiplies in the input's
  dtype (bitsandbytes' MatMul8bitFp, "no fast int8 kernel on the CPU"); an eval-mode forward runs LLM.int8. On a
  GPU both run LLM.int8. So on the CPU, train and eval forwards of one int8 model differ by the int8 rounding of
  the activations;
- the layer has no compute dtype (it computes in its input's); kovlm records the one it was loaded for, as
  Linear4bit has one, so a merge knows which dtype to produce;
- every LLM.int8 forward on non-fp16 inputs logs "inputs will be cast ... to float16" (once per layer per decode
  step: thousands of lines in one evaluation); that one message is dropped, here at import like the kernel-hub
  warning, since it is the method itself, said above;
- a backend may lack a path (an int8 op not written for a device): `check_int8_runs` says so in one line.
"""
import logging
from functools import cache

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes.autograd._functions").addFilter(
    lambda record: not str(record.msg).startswith("MatMul8bitLt: inputs will be cast"))

import bitsandbytes as bnb  # noqa: E402  (after the logger is quieted)
import torch  # noqa: E402

from infra.errors import UserError

INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold: activation columns above it are multiplied in fp16
QUANTIZATIONS = ("nf4", "int8")  # what load_qwen3(quant=...) accepts besides None (weights in the compute dtype)


def keep_one_layout(layer: bnb.nn.Linear4bit) -> bnb.nn.Linear4bit:
    """No in-place CPU repacking: one weight format, exact compute, right gradients (see the module docstring)."""
    layer.support_avx512bf16_for_cpu = False
    return layer


NF4_BLOCK = 64  # weights per absmax block (bitsandbytes' default, as qwen3.py and transformers load NF4)
CHUNK = 1 << 17  # weights quantized at a time on the CPU: fp32 working copy and codes stay in the core's cache


def quantize_nf4(weight: torch.Tensor, device, module=None) -> bnb.nn.Params4bit:
    """(out, in) weight -> bitsandbytes' NF4 Params4bit with double-quantized statistics on `device`, as
    `Params4bit(weight, compress_statistics=True, quant_type="nf4").to(device)` gives it; on the CPU by
    nf4_codes (module docstring), elsewhere (or for a size not in whole blocks) by bitsandbytes itself."""
    weight = weight.contiguous()
    if torch.device(device).type != "cpu" or weight.device.type != "cpu" or weight.numel() % NF4_BLOCK:
        return bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                 module=module).to(device)
    packed, absmax = nf4_codes(weight)
    offset = absmax.mean()
    scales, scales_state = bnb.functional.quantize_blockwise(absmax - offset, blocksize=256)
    state = bnb.functional.QuantState(absmax=scales, shape=weight.shape, dtype=weight.dtype, blocksize=NF4_BLOCK,
                                      code=bnb.functional.get_4bit_type("nf4", device=weight.device),
                                      quant_type="nf4", offset=offset, state2=scales_state)
    if module is not None:
        module.quant_state = state  # as Params4bit's own quantization leaves it
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=NF4_BLOCK,
                             compress_statistics=True, quant_type="nf4", module=module, bnb_quantized=True)


def nf4_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU NF4 kernel, a chunk at a time: per block of 64 weights its absmax, each weight divided by
    it (clamped to [-1, 1]) and coded as the number of NF4 decision bounds (the midpoints of the 16 levels) below
    it, which is what `bucketize` returns; two codes a byte, the first in the high half. Counted as 15 minus the
    bounds it is not above, so a NaN (a block of zeros when denormals are flushed: 0 x inf) codes 15, as
    `bucketize` sorts it last. Returns the packed codes (numel / 2, 1) uint8 and the absmax (numel / 64,) fp32."""
    flat = weight.reshape(-1)
    n = flat.numel()
    bounds = nf4_bounds()
    packed, absmax = torch.empty(n // 2, 1, dtype=torch.uint8), torch.empty(n // NF4_BLOCK)
    codes = torch.empty(min(n, CHUNK), dtype=torch.uint8)
    for start in range(0, n, CHUNK):
        x = flat[start:start + CHUNK].to(torch.float32, copy=True)  # (m,) scaled in place
        m = x.numel()
        blocks = x.view(-1, NF4_BLOCK)  # (m / 64, 64)
        block_max = blocks.abs().amax(dim=1)  # (m / 64,)
        absmax[start // NF4_BLOCK:(start + m) // NF4_BLOCK] = block_max
        blocks.mul_((1.0 / block_max.clamp(min=1e-38))[:, None]).clamp_(-1, 1)
        code = codes[:m]  # the bounds each weight is not above: 15 - its code
        torch.le(x, bounds[0], out=code)
        for bound in bounds[1:]:
            code.add_(x <= bound)
        pairs = packed[start // 2:(start + m) // 2, 0]  # 255 - (16 a + b) = 16 (15 - a) + (15 - b)
        torch.bitwise_or(code[0::2] << 4, code[1::2], out=pairs).bitwise_not_()
    return packed, absmax


@cache
def nf4_bounds() -> list[float]:
    """The 15 decision bounds between NF4's 16 levels, as bitsandbytes' kernel compares with them (fp32)."""
    levels = bnb.functional.get_4bit_type("nf4", device="cpu")  # (16,) sorted
    return ((levels[1:] + levels[:-1]) / 2).tolist()


def empty_nf4_linear(in_features: int, out_features: int, *, bias: bool, compute_dtype: torch.dtype):
    """A bitsandbytes Linear4bit on the meta device, its weight to be assigned (and quantized) while loading."""
    with torch.device("meta"):
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4")
    return keep_one_layout(layer)


def empty_int8_linear(in_features: int, out_features: int, *, bias: bool, compute_dtype: torch.dtype):
    """A bitsandbytes Linear8bitLt on the meta device (no fp16 copy of the weight kept: has_fp16_weights=False),
    its weight to be assigned (and quantized) while loading; `compute_dtype` recorded on it (module docstring)."""
    with torch.device("meta"):
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias, has_fp16_weights=False,
                                    threshold=INT8_THRESHOLD)
    layer.compute_dtype = compute_dtype
    return layer


def quantize_int8(weight: torch.Tensor, device) -> bnb.nn.Int8Params:
    """(out, in) floating weight -> int8 rows with their scales, on `device` (moving a CPU Int8Params quantizes)."""
    return bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False).to(device)


def int8_row_scales(layer: bnb.nn.Linear8bitLt) -> torch.Tensor:
    """(out,) fp32 absmax of each weight row, wherever bitsandbytes keeps it now (module docstring)."""
    scales = getattr(layer.weight, "SCB", None)
    scales = layer.state.SCB if scales is None else scales
    if scales is None:
        raise ValueError("a Linear8bitLt weight must be quantized (moved to its device) before it is read")
    return scales


def dequantize_int8(layer: bnb.nn.Linear8bitLt) -> torch.Tensor:
    """(out, in) fp32: each int8 row times its absmax / 127 (bitsandbytes' own op, as PEFT dequantizes)."""
    return bnb.functional.int8_vectorwise_dequant(layer.weight.data, int8_row_scales(layer))  # (out, in)


def check_int8_runs(device, dtype: torch.dtype) -> None:
    """One tiny Linear8bitLt forward and backward in training mode and a forward in eval mode on `device`: a path
    this bitsandbytes build lacks becomes one line (a ValueError) before a model is loaded."""
    device = torch.device(device)
    try:
        with torch.inference_mode(False), torch.enable_grad():  # a caller's no_grad must not skip the backward
            layer = empty_int8_linear(64, 8, bias=False, compute_dtype=dtype)
            layer.weight = quantize_int8(torch.randn(8, 64), device)
            x = torch.randn(2, 64, device=device, dtype=dtype, requires_grad=True)
            layer.train()(x).sum().backward()
            with torch.no_grad():
                layer.eval()(x)
    except (NotImplementedError, RuntimeError, AttributeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"--quant int8: bitsandbytes {bnb.__version__} has no int8 path on {device.type} "
                         f"for {str(dtype).removeprefix('torch.')} ({reason}); use --quant nf4 or none") from None
