"""nf4.py: the one place for bitsandbytes' CPU quirks. A 4-bit layer kovlm builds keeps one weight layout through
an eval forward (no in-place repacking), so dequantize_4bit still reads it and gradients stay right afterwards;
importing the stack prints no warning about a kernel hub."""
import subprocess
import sys
from pathlib import Path

import torch

from nf4 import bnb, empty_nf4_linear

ROOT = Path(__file__).resolve().parents[1]


def quantized(layer, weight):
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=layer).to("cpu")
    return layer


def test_an_eval_forward_leaves_the_weight_readable_and_gradients_unchanged():
    weight = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    layer = quantized(empty_nf4_linear(64, 128, bias=False, compute_dtype=torch.float32), weight)
    dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)  # (out, in)
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    before = x.grad.clone()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))  # where bitsandbytes would repack on an AVX512-BF16 CPU
    assert torch.equal(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state), dense)
    x.grad = None
    layer.train()
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, before)
    torch.testing.assert_close(before, dense.sum(0).expand(4, -1), rtol=1e-5, atol=1e-5)


def test_importing_the_stack_prints_no_kernel_hub_warning():
    result = subprocess.run([sys.executable, "-c", "import train"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "kernels-community" not in result.stderr, result.stderr
