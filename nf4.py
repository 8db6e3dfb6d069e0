"""bitsandbytes' 4-bit NormalFloat layers as kovlm uses them, and the one place for their CPU quirks.

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
"""
import logging

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import bitsandbytes as bnb  # noqa: E402  (after the logger is quieted)
import torch  # noqa: E402


def keep_one_layout(layer: bnb.nn.Linear4bit) -> bnb.nn.Linear4bit:
    """No in-place CPU repacking: one weight format, exact compute, right gradients (see the module docstring)."""
    layer.support_avx512bf16_for_cpu = False
    return layer


def empty_nf4_linear(in_features: int, out_features: int, *, bias: bool, compute_dtype: torch.dtype):
    """A bitsandbytes Linear4bit on the meta device, its weight to be assigned (and quantized) while loading."""
    with torch.device("meta"):
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4")
    return keep_one_layout(layer)
