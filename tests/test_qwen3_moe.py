"""qwen3.py on Qwen3-MoE folders against transformers' Qwen3MoeForCausalLM (logits, greedy generation, the router's
load-balancing loss), quantized experts, and LoRA / DoRA on it against PEFT, on tiny random snapshot folders.

Tolerances: fp32 logits within 1e-5 of transformers (the same routing, sums in another order); adapters against
PEFT relative to the reference's largest magnitude, 1e-4, as tests/test_lora.py; ours two ways (merged / unmerged,
checkpointed / plain) 1e-5.
"""

import pytest
import torch
from conftest import save_tiny_qwen3_moe, saved_once
from safetensors.torch import save_file
from test_lora import assert_rel, randomize

from decode import Decoder
from export import dense_state_dict
from lora import ATTENTION_LINEARS, LoRALinear, apply_adapters, merge_adapters
from moe import Qwen3MoeBlock, load_balancing_loss
from nf4 import bnb
from qwen3 import Qwen3MLP, load_qwen3

ATOL = 1e-5
CASES = {  # the default: 2 layers, both MoE, 8 experts of width 32, 2 active, renormalised top-k
    "every-layer-moe": {},
    "sparse-step-2-mlp-only": {"layers": 6, "sparse_step": 2, "mlp_only_layers": (3,), "norm_topk_prob": False},
    "fused-layout": {"fused": True},  # transformers 5's in-memory expert tensors, as a file
}


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """snapshot(**save_tiny_qwen3_moe options) -> folder, written once per distinct set of options."""
    return saved_once(tmp_path_factory, save_tiny_qwen3_moe, "qwen3_moe")


def reference(folder):
    from transformers import Qwen3MoeForCausalLM
    return Qwen3MoeForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                               experts_implementation="eager").eval()


def token_ids(shape, seed=0):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(snapshot, case):
    folder = snapshot(**CASES[case])
    ours, ref = load_qwen3(folder, dtype=torch.float32), reference(folder)
    if case == "sparse-step-2-mlp-only":  # MoE where (i + 1) % 2 == 0 and i is not in mlp_only_layers
        assert [type(layer.mlp) for layer in ours.model.layers] == [Qwen3MLP, Qwen3MoeBlock, Qwen3MLP, Qwen3MLP,
                                                                    Qwen3MLP, Qwen3MoeBlock]
    ids = token_ids((2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=0, atol=ATOL)


def test_both_expert_layouts_load_the_same_weights(snapshot):
    per_expert = load_qwen3(snapshot(), dtype=torch.float32).state_dict()
    fused = load_qwen3(snapshot(fused=True), dtype=torch.float32).state_dict()
    assert per_expert.keys() == fused.keys() and "model.layers.1.mlp.experts.7.down_proj.weight" in fused
    assert all(torch.equal(per_expert[name], fused[name]) for name in fused)


@torch.no_grad()
@pytest.mark.parametrize("case", ["every-layer-moe", "sparse-step-2-mlp-only"])
def test_greedy_decode_equals_transformers_generate(snapshot, case):
    """decode.py's prefill + eager steps (never a CUDA graph for MoE) give transformers' greedy tokens."""
    folder = snapshot(**CASES[case])
    model = load_qwen3(folder, dtype=torch.float32)
    prompt = token_ids((2, 6), seed=1)
    decoder = Decoder(model, 2, 6 + 8)
    assert not decoder.use_graph
    logits, tokens = decoder.prefill(model.model.embed_tokens(prompt)), []
    for step in range(8):
        tokens.append(logits.argmax(-1))  # (B,)
        if step < 7:
            logits = decoder.step(tokens[-1])
    expected = reference(folder).generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)[:, 6:]
    assert torch.equal(torch.stack(tokens, dim=1), expected)


@pytest.mark.parametrize("quant,linear", [("nf4", bnb.nn.Linear4bit), ("int8", bnb.nn.Linear8bitLt)])
def test_quantization_reaches_the_experts_and_leaves_the_router(snapshot, quant, linear):
    model = load_qwen3(snapshot(fused=True), quant=quant, dtype=torch.float32)
    block = model.model.layers[0].mlp
    assert all(isinstance(getattr(expert, name), linear) for expert in block.experts
               for name in ("gate_proj", "up_proj", "down_proj"))
    assert isinstance(model.model.layers[0].self_attn.q_proj, linear)
    assert block.gate.weight.dtype == torch.float32 and not block.gate.weight.requires_grad
    ids = token_ids((2, 9))
    with torch.no_grad():
        quantized = model(ids)
        per_expert = load_qwen3(snapshot(), quant=quant, dtype=torch.float32)(ids)  # the same codes either layout
        full = load_qwen3(snapshot(), dtype=torch.float32)(ids)
    assert torch.equal(quantized, per_expert)
    assert 1e-4 < (quantized - full).abs().max() < 0.3 * full.abs().max()


def test_router_logits_give_transformers_load_balancing_loss(snapshot):
    folder = snapshot(**CASES["sparse-step-2-mlp-only"])
    ours, ref = load_qwen3(folder, dtype=torch.float32), reference(folder)
    ids = token_ids((2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0  # a left-padded row: its pads count in neither loss
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    router_logits = []
    with torch.no_grad():
        ours.hidden_states(ids, attention_mask=mask, router_logits=router_logits)
        expected = ref(ids, attention_mask=mask, position_ids=positions, output_router_logits=True).aux_loss
    assert len(router_logits) == 2 and router_logits[0].shape == (2 * 10, 8)  # layers 1 and 5
    torch.testing.assert_close(load_balancing_loss(router_logits, 2, mask), expected, rtol=0, atol=ATOL)


def test_router_gradients_are_the_same_with_gradient_checkpointing(snapshot):
    model = load_qwen3(snapshot(), dtype=torch.float32)
    embeds = model.model.embed_tokens(token_ids((1, 7))).requires_grad_()

    def input_gradient(checkpointing):
        model.gradient_checkpointing, embeds.grad, router_logits = checkpointing, None, []
        hidden = model.hidden_states(inputs_embeds=embeds, router_logits=router_logits)
        (hidden.square().mean() + load_balancing_loss(router_logits, 2)).backward()
        return embeds.grad.clone()
    torch.testing.assert_close(input_gradient(True), input_gradient(False), rtol=0, atol=1e-7)


def peft_reference(folder, method: str, ours):
    """PEFT on transformers' model, the same target_modules, holding our adapters' values."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(ATTENTION_LINEARS),
                        use_dora=method == "dora")
    model = get_peft_model(reference(folder), config)
    layers = {name: m for name, m in ours.named_modules() if isinstance(m, LoRALinear)}
    assert {name for name, m in model.named_modules() if hasattr(m, "lora_A")} == \
        {f"base_model.model.{name}" for name in layers}
    with torch.no_grad():
        for name, layer in layers.items():
            twin = model.get_submodule(f"base_model.model.{name}")
            twin.lora_A["default"].weight.copy_(layer.lora_A)
            twin.lora_B["default"].weight.copy_(layer.lora_B)
            if layer.dora:
                twin.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    return model


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_attention_adapters_match_peft_and_leave_router_and_experts_frozen(snapshot, method):
    folder = snapshot(**CASES["sparse-step-2-mlp-only"])
    ours = load_qwen3(folder, dtype=torch.float32)
    names = apply_adapters(ours, method=method, r=4, alpha=8, dropout=0.0, targets=ATTENTION_LINEARS)
    assert len(names) == 6 * 4 and not any("mlp" in name for name in names)
    for layer in ours.modules():
        if isinstance(layer, LoRALinear):
            randomize(layer, seed=len(layer.lora_B))
    trainable = {name for name, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(name.rsplit(".", 1)[1] in ("lora_A", "lora_B", "magnitude") for name in trainable)
    peft = peft_reference(folder, method, ours)
    ids = token_ids((2, 12))
    ours_logits, peft_logits = ours(ids), peft(input_ids=ids).logits
    assert_rel(ours_logits, peft_logits, 1e-4, "logits")
    ours_logits.logsumexp(-1).sum().backward()
    peft_logits.logsumexp(-1).sum().backward()
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.5.self_attn.o_proj"):
        layer, twin = ours.get_submodule(name), peft.get_submodule(f"base_model.model.{name}")
        assert_rel(layer.lora_B.grad, twin.lora_B["default"].weight.grad, 1e-4, f"{name} lora_B gradient")
        assert_rel(layer.lora_A.grad, twin.lora_A["default"].weight.grad, 1e-4, f"{name} lora_A gradient")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_expert_adapters_merge_into_the_layout_transformers_loads(snapshot, tmp_path, method):
    """Every expert adapted too (all seven targets): merged equals unmerged, and the merged weights under their
    names (export.py's dense_state_dict) load in transformers, which fuses the per-expert tensors, with the adapted
    logits."""
    from transformers import Qwen3MoeForCausalLM
    folder = snapshot()
    model = load_qwen3(folder, quant="nf4", dtype=torch.float32)
    names = apply_adapters(model, method=method, r=4, alpha=8, dropout=0.0)
    assert len(names) == 2 * (4 + 8 * 3)  # per layer: attention, and 8 experts' three linears
    assert not model.model.layers[0].mlp.gate.weight.requires_grad
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            randomize(layer, seed=len(layer.lora_B) + layer.lora_A.shape[1])
    ids = token_ids((2, 9))
    with torch.no_grad():
        adapted = model(ids)
        merge_adapters(model)
        torch.testing.assert_close(model(ids), adapted, rtol=0, atol=ATOL)
        state = dense_state_dict(model, torch.float32)
        assert "model.layers.0.mlp.experts.3.up_proj.weight" in state and "model.layers.0.mlp.gate.weight" in state
        save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / "config.json").write_text((folder / "config.json").read_text())
        hf = Qwen3MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, experts_implementation="eager")
        torch.testing.assert_close(hf.eval()(ids).logits, adapted, rtol=0, atol=1e-4)
