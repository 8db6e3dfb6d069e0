"""nf4.py: the one place for bitsandbytes' CPU quirks. A 4-bit layer kovlm builds keeps one weight layout through
an eval forward (no in-place repacking), so dequantize_4bit still reads it and gradients stay right afterwards;
importing the stack prints no warning about a kernel hub. int8 layers: where their scales live, no log line per
LLM.int8 forward, one line when bitsandbytes lacks an int8 path."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nf4 import CHUNK, bnb, empty_nf4_linear, nf4_bounds, quantize_nf4

ROOT = Path(__file__).resolve().parents[1]


def quantized(layer, weight):
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=layer).to("cpu")
    return layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(96, 64), (1024, 520), (3, 10)])  # one chunk; 4 chunks and a part; not whole blocks
def test_quantize_nf4_gives_the_bytes_and_state_bitsandbytes_gives(dtype, shape):
    """quantize_nf4 (a chunk at a time, 15 comparisons) equals Params4bit(...).to("cpu") (bitsandbytes' kernel,
    bucketize) exactly: the packed codes, the double-quantized block scales and their state, the dequantized weight
    and a forward; with an all-zero block, an outlier and weights exactly on a decision bound, in every float dtype.
    The input is left as it was."""
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds
    assert nf4_bounds() == _get_4bit_quantize_bounds("nf4", torch.device("cpu"))[0].tolist()
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    if weight.numel() >= 256:
        weight.view(-1)[:64] = 0  # a block of zeros: absmax 0
        weight.view(-1)[64:128] = torch.tensor(nf4_bounds()[:8] * 8)  # bounds, and 1.0 below as the block's max
        weight.view(-1)[127] = weight.view(-1)[200] = 1.0  # an outlier in the next block as well
    weight = weight.to(dtype)
    before = weight.clone()
    layer = empty_nf4_linear(shape[1], shape[0], bias=False, compute_dtype=dtype)
    ours = quantize_nf4(weight, "cpu", layer)
    reference = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=True,
                                  quant_type="nf4").to("cpu")
    assert torch.equal(weight, before) and CHUNK % 64 == 0
    assert ours.data.shape == reference.data.shape and torch.equal(ours.data, reference.data)
    mine, theirs = ours.quant_state, reference.quant_state
    assert layer.quant_state is mine and (mine.shape, mine.dtype, mine.blocksize, mine.quant_type) == \
        (theirs.shape, theirs.dtype, theirs.blocksize, theirs.quant_type)
    for a, b in [(mine.absmax, theirs.absmax), (mine.offset, theirs.offset), (mine.code, theirs.code),
                 (mine.state2.absmax, theirs.state2.absmax), (mine.state2.code, theirs.state2.code)]:
        assert torch.equal(a, b)
    dequantized = bnb.functional.dequantize_4bit(ours.data, mine)
    assert torch.equal(dequantized, bnb.functional.dequantize_4bit(reference.data, theirs))
    layer.weight = ours
    x = torch.randn(2, shape[1], generator=torch.Generator().manual_seed(1)).to(dtype)
    torch.testing.assert_close(layer(x), x @ dequantized.T, rtol=0, atol=0)


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


def test_int8_layers_quantize_row_wise_and_a_missing_path_is_one_line(monkeypatch, caplog):
    """int8: one int8 row and one fp32 absmax per output row, read from the weight before the first forward and
    from the layer's state after it; a bitsandbytes build without an int8 path for the device is refused in one
    line (a ValueError, which the commands print as `error: ...`) before any model is loaded."""
    from nf4 import check_int8_runs, dequantize_int8, empty_int8_linear, int8_row_scales, quantize_int8
    from qwen3 import load_qwen3
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    layer = empty_int8_linear(64, 16, bias=False, compute_dtype=torch.float32)
    layer.weight = quantize_int8(weight, "cpu")
    scales = int8_row_scales(layer).clone()
    assert layer.weight.dtype == torch.int8 and torch.equal(scales, weight.abs().amax(dim=1).half().float())
    torch.testing.assert_close(dequantize_int8(layer), weight, rtol=0, atol=scales.max().item() / 127)
    layer(torch.randn(2, 64))  # the first forward moves the scales to layer.state
    assert layer.weight.SCB is None and torch.equal(int8_row_scales(layer), scales)
    with torch.no_grad(), caplog.at_level("WARNING"):
        layer.eval()(torch.randn(2, 64))  # LLM.int8 on fp32 inputs: bitsandbytes would log a cast to fp16
    assert not [r for r in caplog.records if "inputs will be cast" in r.getMessage()]

    def missing(*args, **kwargs):
        raise NotImplementedError("int8 matmul is not implemented for the cpu backend\nmore detail")
    monkeypatch.setattr(bnb, "matmul", missing)
    with pytest.raises(ValueError) as refused:
        load_qwen3(ROOT / "no-such-folder", quant="int8", dtype=torch.float32)
    assert str(refused.value) == ("--quant int8: bitsandbytes " + bnb.__version__ + " has no int8 path on cpu for "
                                  "float32 (int8 matmul is not implemented for the cpu backend); use --quant nf4 or "
                                  "none")
    with pytest.raises(ValueError, match="no int8 path on cpu for bfloat16"):
        check_int8_runs("cpu", torch.bfloat16)
