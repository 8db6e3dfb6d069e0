"""lora.py against PEFT 0.21 (the reference), on tiny layers and a tiny Qwen3, on the CPU.

Tolerances: parity with PEFT and DoRA outputs after the adapters change are relative to the reference's largest magnitude, 1e-4 in
fp32 (measured: ~2e-7); merged vs unmerged 1e-5 (fp32); "at init equals the base" and save/load are exact.
"""
import math

import bitsandbytes as bnb
import pytest
import torch
import torch.nn as nn
from conftest import save_tiny_qwen3
from peft import LoraConfig, get_peft_model

from infra.errors import UserError
from lora import AdapterConfig, LoRALinear, adapter_state_dict, after_optimizer_step, apply_adapters, \
    dequantized_weight, held_dora_norms, load_adapter_state_dict, merge_adapters, parameter_counts, parameter_report
from nf4 import empty_int8_linear, keep_one_layout, quantize_int8
from qwen3 import Qwen3, Qwen3Config, load_qwen3

IN, OUT, R, ALPHA = 64, 48, 4, 8
KINDS = [(kind, dora, bias) for kind in ("linear", "nf4", "int8") for dora in (False, True) for bias in (False, True)]


def assert_rel(actual, expected, tol, what=""):
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= tol * scale, f"{what}: max |diff| {err:.3g} > {tol} x max |reference| {scale:.3g}"


def make_base(kind, bias, seed=1, compute_dtype=torch.float32):
    """The same frozen linear every call for a seed: fp32 nn.Linear, NF4 Linear4bit quantized by .to('cpu'), or
    int8 Linear8bitLt (LLM.int8, threshold 6, no fp16 copy) as load_qwen3 builds it."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(OUT, IN, generator=g) * 0.1)
        if bias:
            linear.bias.copy_(torch.randn(OUT, generator=g))
    if kind == "linear":
        return linear
    if kind == "int8":
        int8 = empty_int8_linear(IN, OUT, bias=bias, compute_dtype=compute_dtype)
        int8.weight = quantize_int8(linear.weight.data.clone(), "cpu")
        if bias:
            int8.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        return int8
    nf4 = bnb.nn.Linear4bit(IN, OUT, bias=bias, compute_dtype=compute_dtype, quant_type="nf4")
    nf4.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    if bias:
        nf4.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    # LoRALinear turns off bitsandbytes' eval-time CPU repacking (nf4.keep_one_layout); PEFT's twin needs it off
    # too, or an eval forward would repack the weight into a layout PEFT's dequantization misreads.
    keep_one_layout(nf4)
    return nf4.to("cpu")


def randomize(layer, seed=2):
    """Adapters away from their init (B = 0 would hide every B-dependent term)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.2)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
        if layer.dora:
            layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=g))
    return layer


class Holder(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def peft_twin(ours, kind, bias, dropout=0.0, copy_adapters=True):
    """PEFT wrapping an identical base, holding our A, B (and magnitude); returns (peft model, PEFT's layer)."""
    holder = Holder(make_base(kind, bias))
    holder.is_loaded_in_4bit = kind == "nf4"  # routes PEFT to its bitsandbytes Linear4bit layer, as for QLoRA
    holder.is_loaded_in_8bit = kind == "int8"  # ... or to its Linear8bitLt layer
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], use_dora=ours.dora, lora_dropout=dropout)
    model = get_peft_model(holder, config)
    layer = model.base_model.model.proj
    if not copy_adapters:
        return model, layer
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
        if ours.dora:
            layer.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    return model, layer


def materialised_weight(layer):
    return dequantized_weight(layer.base) + layer.scaling * layer.lora_B @ layer.lora_A  # (out, in): W + sBA


def forward_like_peft(layer, x):
    """PEFT 0.21's arithmetic (lora/variants.py DoraLinearVariant.forward, lora/dora.py): with an active dropout,
    DoRA runs W a second time, on dropout(x); the same dropout mask as PEFT's for the same RNG state."""
    dropped = layer.dropout(x)
    lora_out = layer.lora_branch(dropped)  # (T, out)
    if not layer.dora:
        base_out = layer.base(x)  # (T, out)
        return base_out + lora_out.to(base_out.dtype)
    base_out, norm = layer.base_and_norm(x)  # (T, out), (out,)
    dropout_active = layer.training and isinstance(layer.dropout, nn.Dropout)
    wx = layer.without_bias(layer.base(dropped) if dropout_active else base_out)  # (T, out): W dropout(x)
    scale = layer.magnitude / norm  # (out,)
    dt = base_out.dtype
    return base_out + (scale - 1).to(dt) * wx + scale.to(dt) * lora_out.to(dt)  # PEFT's dora.py, line for line


def adapter_config_from_peft(d: dict) -> AdapterConfig:
    """A PEFT adapter_config.json dict as an AdapterConfig (the options whose math lora.py implements)."""
    return AdapterConfig(method="dora" if d.get("use_dora") else "lora", r=d["r"], alpha=d["lora_alpha"],
                         dropout=d.get("lora_dropout", 0.0), targets=tuple(d["target_modules"]))


def reference_dora(layer, x):
    """DoRA written out with the materialised W + sBA, for cache-freshness checks: m / ||W + sBA|| * (...) + b."""
    weight = materialised_weight(layer)  # (out, in)
    out = (layer.magnitude / weight.norm(dim=1)) * (x @ weight.T)  # (T, in) @ (in, out) -> (T, out)
    return out if layer.base.bias is None else out + layer.base.bias


@pytest.mark.parametrize("kind,dora,bias", KINDS)
def test_matches_peft_outputs_and_gradients(kind, dora, bias):
    torch.manual_seed(0)
    ours = randomize(LoRALinear(make_base(kind, bias), R, ALPHA, dora=dora))
    model, layer = peft_twin(ours, kind, bias)
    x, grad = torch.randn(3, 5, IN), torch.randn(3, 5, OUT)
    x_ours, x_peft = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_peft = ours(x_ours), model(x_peft)
    (y_ours * grad).sum().backward()
    (y_peft * grad).sum().backward()
    assert_rel(y_ours, y_peft, 1e-4, "output")
    assert_rel(x_ours.grad, x_peft.grad, 1e-4, "input gradient")
    assert_rel(ours.lora_A.grad, layer.lora_A["default"].weight.grad, 1e-4, "lora_A gradient")
    assert_rel(ours.lora_B.grad, layer.lora_B["default"].weight.grad, 1e-4, "lora_B gradient")
    if dora:
        assert_rel(ours.magnitude.grad, layer.lora_magnitude_vector["default"].weight.grad, 1e-4, "magnitude grad")


@pytest.mark.parametrize("kind,dora,bias", KINDS)
def test_init_equals_base_exactly_and_matches_peft_init(kind, dora, bias):
    torch.manual_seed(0)
    layer = LoRALinear(make_base(kind, bias), R, ALPHA, dora=dora)
    x = torch.randn(4, IN)
    assert torch.equal(layer(x), layer.base(x))
    bound = 1 / math.sqrt(IN)  # kaiming_uniform_(a=sqrt(5)) draws from U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # the std of U(-b, b)
    assert torch.count_nonzero(layer.lora_B) == 0
    if dora:
        _, peft_layer = peft_twin(layer, kind, bias, copy_adapters=False)  # PEFT's own init from the base
        assert_rel(layer.magnitude, peft_layer.lora_magnitude_vector["default"].weight, 1e-6, "magnitude init")


def test_nf4_base_in_bf16_compute_stays_close_to_peft():
    """bf16 compute: both sides round; ours forms the norm in fp32 (PEFT in bf16), so only ~1e-2 agreement."""
    torch.manual_seed(0)
    ours = randomize(LoRALinear(make_base("nf4", False, compute_dtype=torch.bfloat16), R, ALPHA, dora=True))
    model, _ = peft_twin(ours, "nf4", False)
    model.base_model.model.proj.base_layer.compute_dtype = torch.bfloat16
    x = torch.randn(6, IN, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ours, y_peft = ours(x), model(x)
    assert y_ours.dtype == torch.bfloat16
    assert_rel(y_ours.float(), y_peft.float(), 3e-2, "bf16 output")


def test_dora_norm_is_formed_in_fp32_under_autocast():
    """With a bf16 NF4 base, W A^T is the same bf16 pass with or without autocast; the rest of the norm must not
    drop to bf16 under autocast (it would differ by ~1e-3)."""
    layer = randomize(LoRALinear(make_base("nf4", False, compute_dtype=torch.bfloat16), R, ALPHA, dora=True))
    x = torch.randn(5, IN, dtype=torch.bfloat16)
    _, plain = layer.base_and_norm(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, autocast = layer.base_and_norm(x)
    assert plain.dtype == autocast.dtype == torch.float32
    assert torch.equal(autocast, plain)


@pytest.mark.parametrize("kind,dora,bias", KINDS)
def test_merged_equals_unmerged(kind, dora, bias):
    torch.manual_seed(0)
    layer = randomize(LoRALinear(make_base(kind, bias), R, ALPHA, dora=dora))
    merged = layer.merged_linear()
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    x = torch.randn(7, IN)
    assert_rel(merged(x), layer(x), 1e-5, "merged output")


@pytest.mark.parametrize("dora", [False, True])
def test_int8_eval_forward_runs_llm_int8_and_matches_peft(dora):
    """In eval mode on the CPU bitsandbytes runs LLM.int8 (int8 activations, outlier columns above 6 in fp16); in
    training mode it multiplies by the dequantized weight (nf4.py). Both sides run the same base; DoRA's norm comes
    from the dequantized weight on both, so they agree as in training mode."""
    torch.manual_seed(0)
    ours = randomize(LoRALinear(make_base("int8", True), R, ALPHA, dora=dora))
    model, _ = peft_twin(ours, "int8", True)
    x = torch.randn(5, IN)
    x[:, 3] = 8.0  # an outlier feature column, above the threshold
    with torch.no_grad():
        trained = ours(x)
        ours.eval()
        model.eval()
        y_ours, y_peft = ours(x), model(x)
    assert_rel(y_ours, y_peft, 1e-4, "eval output")
    assert (y_ours - trained).abs().max() > 1e-4  # LLM.int8's rounding of the activations shows


def test_int8_dora_norm_uses_the_dequantized_weight_and_holds_it():
    """LLM.int8 would round A's rows like activations; the norm takes W A^T from the dequantized int8 weight, so the
    base sees the tokens alone, and the held norm equals the formed one."""
    torch.manual_seed(0)
    layer = randomize(LoRALinear(make_base("int8", True), R, ALPHA, dora=True))
    calls = BaseCallCounter(layer.base)
    x = torch.randn(2, 5, IN)
    with torch.no_grad():
        _, formed = layer.base_and_norm(x)
        assert_rel(formed, materialised_weight(layer).norm(dim=1), 1e-6, "norm")
        with held_dora_norms(Holder(layer), x.dtype):
            assert_rel(layer.held_norm, formed, 1e-6, "held norm")
    assert calls.shapes == [(2, 5, IN)]


def test_int8_merges_into_its_compute_dtype():
    assert LoRALinear(make_base("int8", False), R, ALPHA).merged_linear().weight.dtype == torch.float32
    base = make_base("int8", False, compute_dtype=None)
    assert LoRALinear(base, R, ALPHA, dora=True).merged_linear().weight.dtype == torch.bfloat16


def test_nf4_merges_into_bf16_by_default():
    base = make_base("nf4", True, compute_dtype=None)
    assert LoRALinear(base, R, ALPHA, dora=True).merged_linear().weight.dtype == torch.bfloat16


def tiny_qwen3(seed=0):
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    return Qwen3(config)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_apply_adapters_on_qwen3_init_exact_merge_and_merge_twice(method):
    model = tiny_qwen3()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        base_logits = model(ids)
    names = apply_adapters(model, method=method, r=R, alpha=ALPHA, dropout=0.0)
    assert len(names) == 2 * 7 and "model.layers.1.mlp.down_proj" in names
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj.base"), nn.Linear)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model))
    with torch.no_grad():
        assert torch.equal(model(ids), base_logits)
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                randomize(layer)
        adapted = model(ids)
        assert merge_adapters(model) == names
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert_rel(model(ids), adapted, 1e-5, "merged logits")
    with pytest.raises(ValueError, match="already merged"):
        merge_adapters(model)


def test_dora_on_nf4_qwen3_with_gradient_checkpointing(tmp_path):
    """The loader's NF4 model, DoRA on all 7 targets: checkpointed gradients equal plain ones (the recomputed
    forward forms the norm again, with A's rows riding along)."""
    model = load_qwen3(save_tiny_qwen3(tmp_path / "qwen3"), quant="nf4", dtype=torch.float32).train()
    apply_adapters(model, method="dora", r=R, alpha=ALPHA, dropout=0.0)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert all(isinstance(layer.base, bnb.nn.Linear4bit) for layer in layers)
    for layer in layers:
        randomize(layer, seed=len(layer.lora_B))
    ids = torch.randint(0, 128, (2, 7))
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        for layer in layers:
            for p in layer.parameters():
                p.grad = None
        model(ids).logsumexp(-1).sum().backward()
        grads.append([p.grad for layer in layers for p in (layer.lora_A, layer.lora_B, layer.magnitude)])
    for plain, checkpointed in zip(*grads):
        assert_rel(checkpointed, plain, 1e-5, "checkpointed gradient")


def test_apply_adapters_refuses_unmatched_targets_and_applying_twice():
    model = tiny_qwen3()
    with pytest.raises(ValueError, match="qkv_proj"):
        apply_adapters(model, targets=("q_proj", "qkv_proj"))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing half-done
    apply_adapters(model, AdapterConfig(method="dora"))
    with pytest.raises(TypeError, match="applied twice"):
        apply_adapters(model)


@pytest.mark.parametrize("method,expected", [("lora", 43_646_976), ("dora", 43_646_976 + 1_400_832)])
def test_qwen3_8b_adapter_parameter_count_on_meta(method, expected):
    with torch.device("meta"):
        model = Qwen3(Qwen3Config())  # Qwen3-8B's config.json values
    _, base_total = parameter_counts(model)
    names = apply_adapters(model, method=method, r=16, alpha=32)
    trainable, total = parameter_counts(model)
    assert len(names) == 36 * 7
    assert trainable == expected and total == base_total + expected
    assert f"trainable {expected:,} / total {total:,}" in parameter_report(model)


def test_four_bit_weights_count_by_logical_size():
    layer = make_base("nf4", True)
    assert layer.weight.numel() == IN * OUT // 2  # two 4-bit values per stored byte
    assert parameter_counts(layer) == (0, IN * OUT + OUT)  # the bias of a base layer is frozen too
    assert parameter_counts(make_base("int8", True)) == (0, IN * OUT + OUT)  # one int8 per weight


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_state_dict_round_trip_and_strict_keys(method):
    source, target = tiny_qwen3(), tiny_qwen3()
    for model in (source, target):
        apply_adapters(model, method=method, r=R, alpha=ALPHA, dropout=0.0)
    for layer in source.modules():
        if isinstance(layer, LoRALinear):
            randomize(layer, seed=len(layer.lora_B))
    state = adapter_state_dict(source)
    assert len(state) == 14 * (3 if method == "dora" else 2)
    assert all(key.rsplit(".", 1)[1] in ("lora_A", "lora_B", "magnitude") for key in state)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        target(ids)  # a forward with the old adapters first
        load_adapter_state_dict(target, state)
        assert torch.equal(target(ids), source(ids))
    key = "model.layers.0.self_attn.q_proj.lora_A"
    with pytest.raises(UserError, match="model.layers.0.self_attn.q_proj.lora_X"):
        load_adapter_state_dict(target, {**state, key.replace("lora_A", "lora_X"): state[key]})
    with pytest.raises(UserError, match=key):
        load_adapter_state_dict(target, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match=key):
        load_adapter_state_dict(target, {**state, key: torch.zeros(R + 1, 32)})


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.5, foreach=False),
    "sgd-foreach": lambda params: torch.optim.SGD(params, lr=0.5, foreach=True),
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=0.05, fused=True),
}


@pytest.mark.parametrize("kind", ["linear", "nf4", "int8"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_dora_output_is_right_after_an_optimizer_step(kind, optimizer):
    """Every training forward forms the norm from the adapters as they are: after any optimizer, fused included
    (which bumps no version counter), the output is DoRA's with the new A and B."""
    torch.manual_seed(0)
    layer = randomize(LoRALinear(make_base(kind, True), R, ALPHA, dora=True))
    opt = OPTIMIZERS[optimizer](list(layer.parameters()))
    x = torch.randn(6, IN)
    layer(x).square().sum().backward()
    with torch.no_grad():
        old_norm = materialised_weight(layer).norm(dim=1)
        opt.step()
        after_optimizer_step(layer)
        new_norm = materialised_weight(layer).norm(dim=1)
        assert (new_norm - old_norm).abs().max() > 1e-3  # the step moved the norm: a stale one would show
        assert_rel(layer(x), reference_dora(layer, x), 1e-4, "output after the step")


def test_after_optimizer_step_is_a_no_op_for_lora_and_plain_models():
    after_optimizer_step(nn.Linear(3, 3))
    layer = randomize(LoRALinear(make_base("linear", False), R, ALPHA))
    x = torch.randn(2, IN)
    before = layer(x)
    after_optimizer_step(layer)
    assert torch.equal(layer(x), before)


def test_dora_output_is_right_after_load_adapter_state_dict():
    torch.manual_seed(0)
    layer = randomize(LoRALinear(make_base("nf4", False), R, ALPHA, dora=True))
    holder = Holder(layer)
    state = adapter_state_dict(holder)
    randomize(layer, seed=5)
    x = torch.randn(6, IN)
    with torch.no_grad():
        with held_dora_norms(holder, x.dtype):
            layer(x)  # a generation with the seed-5 adapters
        load_adapter_state_dict(holder, state)
        assert_rel(layer(x), reference_dora(layer, x), 1e-4, "output after loading")
        with held_dora_norms(holder, x.dtype):
            assert_rel(layer(x), reference_dora(layer, x), 1e-4, "output of the next generation")


class BaseCallCounter:
    def __init__(self, module):
        self.shapes = []
        module.register_forward_hook(lambda _module, args, _out: self.shapes.append(tuple(args[0].shape)))


@pytest.mark.parametrize("kind", ["linear", "nf4"])
def test_held_norm_equals_the_formed_one_and_skips_the_rows_of_a(kind):
    torch.manual_seed(0)
    layer = randomize(LoRALinear(make_base(kind, True), R, ALPHA, dora=True))
    calls = BaseCallCounter(layer.base)
    x = torch.randn(2, 5, IN)
    with torch.no_grad():
        expected = layer(x)
        _, formed = layer.base_and_norm(x)
        with held_dora_norms(Holder(layer), x.dtype):
            assert layer.norm_held
            assert_rel(layer.held_norm, formed, 1e-6, "held norm")
            assert_rel(layer(x), expected, 1e-6, "output with the norm held")
    assert not layer.norm_held
    assert calls.shapes == [(2 * 5 + R, IN), (2 * 5 + R, IN), (R, IN), (2, 5, IN)]  # holding: A alone, once


def test_holds_rewrite_one_tensor_and_see_the_step_between_them():
    """A decode step captured as a CUDA graph reads held_norm at its address: each hold must write there, fresh."""
    torch.manual_seed(0)
    layer = randomize(LoRALinear(make_base("nf4", False), R, ALPHA, dora=True))
    opt = torch.optim.AdamW(list(layer.parameters()), lr=0.05, fused=True)
    x = torch.randn(6, IN)
    with torch.no_grad(), held_dora_norms(layer, x.dtype):
        address, before = layer.held_norm.data_ptr(), layer.held_norm.clone()
    layer(x).square().sum().backward()
    opt.step()
    with torch.no_grad(), held_dora_norms(layer, x.dtype):
        assert layer.held_norm.data_ptr() == address
        assert (layer.held_norm - before).abs().max() > 1e-3
        assert_rel(layer(x), reference_dora(layer, x), 1e-4, "output in the next hold")


def test_changing_the_adapters_inside_a_hold_is_refused_and_the_hold_ends_on_error():
    layer = randomize(LoRALinear(make_base("linear", False), R, ALPHA, dora=True))
    holder = Holder(layer)
    state = adapter_state_dict(holder)
    with held_dora_norms(holder, torch.float32):
        with pytest.raises(RuntimeError, match="an optimizer step inside held_dora_norms"):
            after_optimizer_step(holder)
        with pytest.raises(RuntimeError, match="loading adapter weights inside held_dora_norms"):
            load_adapter_state_dict(holder, state)
    with pytest.raises(ZeroDivisionError):
        with held_dora_norms(holder, torch.float32):
            1 / 0
    assert not layer.norm_held
    after_optimizer_step(holder)


def test_norms_held_in_inference_mode_leave_a_tensor_autograd_can_use():
    layer = randomize(LoRALinear(make_base("linear", False), R, ALPHA, dora=True))
    x = torch.randn(3, IN)
    with torch.inference_mode(), held_dora_norms(layer, x.dtype):
        expected = layer(x)
    with held_dora_norms(layer, x.dtype):  # e.g. a loss under a hold, between two optimizer steps
        y = layer(x)
    y.sum().backward()
    assert_rel(y, expected, 1e-6, "a training forward after an inference-mode generation")
    held_grad, layer.magnitude.grad = layer.magnitude.grad, None
    layer(x).sum().backward()  # the same forward, the norm computed in it
    assert_rel(held_grad, layer.magnitude.grad, 1e-6, "magnitude grad under a hold")


def test_dropout_runs_the_base_once_per_forward():
    torch.manual_seed(0)
    layer = randomize(LoRALinear(make_base("nf4", True), R, ALPHA, dropout=0.3, dora=True)).train()
    calls = BaseCallCounter(layer.base)
    x = torch.randn(2, 5, IN)
    layer(x).sum().backward()
    assert calls.shapes == [(2 * 5 + R, IN)]  # one pass: the tokens, with A's r rows for the norm
    layer(x).sum().backward()  # the next micro-batch forms the norm again, in its one pass
    assert calls.shapes[1:] == [(2 * 5 + R, IN)]
    forward_like_peft(layer, x)  # PEFT's form runs the base on x (with A's rows) and again on dropout(x)
    assert calls.shapes[2:] == [(2 * 5 + R, IN), (2, 5, IN)]


@pytest.mark.parametrize("kind", ["linear", "nf4", "int8"])
def test_peft_exact_form_equals_peft_with_dropout(kind):
    """Same RNG state, same mask: forward_like_peft reproduces PEFT's training-mode DoRA with dropout > 0."""
    ours = randomize(LoRALinear(make_base(kind, True), R, ALPHA, dropout=0.3, dora=True)).train()
    model, _ = peft_twin(ours, kind, True, dropout=0.3)
    x = torch.randn(4, IN)
    torch.manual_seed(7)
    y_ours = forward_like_peft(ours, x)
    torch.manual_seed(7)
    y_peft = model(x)
    assert_rel(y_ours, y_peft, 1e-4, "PEFT-exact form with dropout")
    torch.manual_seed(7)
    assert not torch.allclose(ours(x), y_peft)  # the adapter-only-dropout form is a different sample


@pytest.mark.parametrize("kind", ["linear", "nf4", "int8"])
def test_dropout_forms_agree_without_mask_and_in_expectation(kind):
    torch.manual_seed(0)
    layer = randomize(LoRALinear(make_base(kind, True), R, ALPHA, dropout=0.3, dora=True))
    model, _ = peft_twin(layer, kind, True, dropout=0.3)
    x = torch.randn(3, IN)
    layer.eval()
    model.eval()
    with torch.no_grad():
        expected = layer(x)
        assert_rel(forward_like_peft(layer, x), expected, 1e-6, "PEFT-exact form in eval mode")
        assert_rel(model(x), expected, 1e-4, "PEFT in eval mode")
        layer.train()
        many = x.repeat(10000, 1, 1)  # (10000, 3, IN): 10000 masks at once
        for name, form in (("ours", layer.forward), ("PEFT's form", lambda v: forward_like_peft(layer, v))):
            assert_rel(form(many).mean(dim=0), expected, 2e-2, f"{name}: mean over dropout masks")


def test_adapter_config_validation_and_from_peft_json():
    with pytest.raises(ValueError, match="method"):
        AdapterConfig(method="ia3")
    with pytest.raises(ValueError, match="r=0"):
        AdapterConfig(r=0)
    peft_json = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                           use_dora=True).to_dict()
    config = adapter_config_from_peft(peft_json)
    assert (config.method, config.r, config.alpha, config.dropout) == ("dora", 8, 16, 0.1)
    assert set(config.targets) == {"q_proj", "v_proj"}


def plain_forward(layer, x):
    """LoRALinear's formula as autograd would differentiate it (its forward before the backward was written out
    by hand in AdaptedLinearFunction): the same dropout draw, through nn.Dropout."""
    lora_out = layer.lora_branch(layer.dropout(x))  # (T, out)
    if not layer.dora:
        return layer.base(x) + lora_out
    base_out, norm = layer.base_and_norm(x)
    scale = layer.magnitude / norm  # (out,)
    out = scale * (base_out + lora_out)
    return out if layer.base.bias is None else out + (1 - scale) * layer.base.bias


def gradients_of(forward, layer, x, grad, seed):
    """Output and the gradients of x, A, B (and m) of sum(forward(x) * grad), the dropout drawn after `seed`."""
    for p in layer.parameters():
        p.grad = None
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    y = forward(x)
    (y * grad).sum().backward()
    return [y, x.grad] + [p.grad for p in (layer.lora_A, layer.lora_B) + ((layer.magnitude,) if layer.dora else ())]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("kind,dora,bias", KINDS)
def test_written_out_backward_equals_the_formula_in_fp32(kind, dora, bias, dropout):
    layer = randomize(LoRALinear(make_base(kind, bias), R, ALPHA, dropout=dropout, dora=dora)).train()
    x, grad = torch.randn(3, 5, IN), torch.randn(3, 5, OUT)
    ours = gradients_of(layer, layer, x, grad, seed=7)
    formula = gradients_of(lambda v: plain_forward(layer, v), layer, x, grad, seed=7)
    for name, a, b in zip(["output", "x", "lora_A", "lora_B", "magnitude"], ours, formula):
        assert_rel(a, b, 1e-6, name)
    if dropout:  # the mask was drawn: another seed gives another output
        assert not torch.allclose(gradients_of(layer, layer, x, grad, seed=8)[0], ours[0])


def test_backward_keeps_x_once_and_a_boolean_mask():
    """What autograd keeps for backward from one adapted linear with dropout: the input itself, the mask as
    booleans, the r-wide s A x', the adapters (parameters, no copies) and nothing of the base's weight."""
    layer = randomize(LoRALinear(make_base("nf4", True), R, ALPHA, dropout=0.3, dora=False)).train()
    x = torch.randn(6, IN, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    x_saved, mask, down, lora_A, lora_B = saved
    assert x_saved is x and mask.dtype == torch.bool and mask.shape == x.shape and down.shape == (6, R)
    assert lora_A is layer.lora_A and lora_B is layer.lora_B


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("quant", [None, "nf4", "int8"])
def test_checkpointed_model_with_dropout_has_the_formulas_gradients(tmp_path, quant, method):
    """A Qwen3 with adapters (dropout 0.1) on all 7 targets, gradient checkpointing on: the recompute draws the
    same masks, and every gradient equals that of the same model computing the plain formula without
    checkpointing, to 1e-6 in fp32."""
    model = load_qwen3(save_tiny_qwen3(tmp_path / "qwen3"), quant=quant, dtype=torch.float32).train()
    apply_adapters(model, method=method, r=R, alpha=ALPHA, dropout=0.1)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        randomize(layer, seed=len(layer.lora_B))
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for checkpointing in (True, False):
        model.gradient_checkpointing = checkpointing
        for layer in layers:
            if not checkpointing:  # the plain formula, through autograd, in place of the written-out backward
                layer.forward = lambda v, layer=layer: plain_forward(layer, v)
        for p in trainable:
            p.grad = None
        torch.manual_seed(3)
        model(ids).logsumexp(-1).sum().backward()
        grads.append([p.grad for p in trainable])
    assert len(trainable) == len(layers) * (3 if method == "dora" else 2)
    for checkpointed, plain in zip(*grads):
        assert_rel(checkpointed, plain, 1e-6, "checkpointed gradient with dropout")
