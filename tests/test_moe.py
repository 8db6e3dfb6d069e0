"""moe.py against transformers' Qwen3-MoE (the reference, test-only): the sparse block, its gradients, the
load-balancing loss, the checkpoint layouts, the MoE-or-dense layer rule, and parameter counts of the released sizes.

Tolerances: fp32, within 1e-5 of transformers (the same routing, the same sums in another order).
"""
import json
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lora import apply_adapters, dequantized_weight
from moe import MoeConfig, Qwen3MoeBlock, count_parameters, is_moe_layer, load_balancing_loss, parameter_counts, \
    router_aux_loss, split_fused_experts
from nf4 import bnb, empty_nf4_linear

ATOL = 1e-5
E, K, C, I = 8, 2, 32, 16  # experts, active per token, width, expert width


def tiny_config(**changes):
    """A transformers Qwen3MoeConfig: 8 experts of width 16, 2 active, over a 32-wide, 2-layer model."""
    from transformers import Qwen3MoeConfig
    options = dict(vocab_size=64, hidden_size=C, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, num_experts=E, num_experts_per_tok=K,
                   moe_intermediate_size=I, norm_topk_prob=True)
    config = Qwen3MoeConfig(**{**options, **changes})
    config._experts_implementation = "eager"  # the reference: one loop over experts (a built model picks grouped_mm)
    return config


def reference_block(config, seed=0):
    """transformers' block with every weight random (its own init leaves the router at zero: all ties)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    block = Qwen3MoeSparseMoeBlock(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return block


def ours_from(reference, config) -> Qwen3MoeBlock:
    """Our block holding the reference's weights, read from its fused in-memory state dict through the mapping."""
    block = Qwen3MoeBlock(config.hidden_size, MoeConfig.from_hf(config.to_dict()))
    state = dict(pair for name, tensor in reference.state_dict().items() for pair in split_fused_experts(name, tensor))
    block.load_state_dict(state, strict=True)
    return block


def fuse_experts(state: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Our per-expert block state dict -> transformers 5's in-memory layout (the inverse of split_fused_experts)."""
    gate_up = torch.stack([torch.cat([state[f"experts.{e}.gate_proj.weight"], state[f"experts.{e}.up_proj.weight"]])
                           for e in range(num_experts)])  # (E, 2I, C)
    down = torch.stack([state[f"experts.{e}.down_proj.weight"] for e in range(num_experts)])  # (E, C, I)
    return {"gate.weight": state["gate.weight"], "experts.gate_up_proj": gate_up, "experts.down_proj": down}


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("tokens", [(2, 7), (1, 1)])  # one token: only K of E experts run, the rest are skipped
def test_block_matches_transformers(norm_topk_prob, tokens):
    config = tiny_config(norm_topk_prob=norm_topk_prob)
    reference = reference_block(config)
    ours = ours_from(reference, config)
    x = torch.randn(*tokens, C, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, logits = ours(x)
        ref_logits, ref_weights, _ = reference.gate(x.view(-1, C))
        torch.testing.assert_close(y, reference(x), rtol=0, atol=ATOL)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL)
    assert y.shape == x.shape and logits.shape == (tokens[0] * tokens[1], E)
    sums = ref_weights.sum(-1)  # renormalised weights sum to 1; raw softmax top-k weights to less
    assert torch.allclose(sums, torch.ones_like(sums)) == norm_topk_prob


def test_gradients_match_transformers():
    config = tiny_config()
    reference = reference_block(config)
    ours = ours_from(reference, config)
    x = torch.randn(2, 7, C, generator=torch.Generator().manual_seed(1))
    probe = torch.randn(2, 7, C, generator=torch.Generator().manual_seed(2))
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ours(x_ours)[0] * probe).sum().backward()
    (reference(x_ref) * probe).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=0, atol=ATOL)
    torch.testing.assert_close(ours.gate.weight.grad, reference.gate.weight.grad, rtol=0, atol=ATOL)
    ref_grads = dict(pair for name in ("gate_up_proj", "down_proj")
                     for pair in split_fused_experts(f"experts.{name}", getattr(reference.experts, name).grad))
    for name, p in ours.experts.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[f"experts.{name}"], rtol=0, atol=ATOL)


def test_save_pretrained_writes_per_expert_tensors_that_split_fused_experts_reproduces(tmp_path):
    """transformers 5 fuses the experts in memory and splits them again when saving: its files have the hub's
    per-expert layout, and splitting its in-memory state dict gives exactly those tensors under those names."""
    from transformers import Qwen3MoeForCausalLM
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(tiny_config())
    model.save_pretrained(tmp_path)
    in_memory = model.state_dict()
    assert tuple(in_memory["model.layers.0.mlp.experts.gate_up_proj"].shape) == (E, 2 * I, C)
    assert tuple(in_memory["model.layers.0.mlp.experts.down_proj"].shape) == (E, C, I)
    saved = load_file(tmp_path / "model.safetensors")
    assert not any("gate_up_proj" in name for name in saved)
    split = dict(pair for name, tensor in in_memory.items() for pair in split_fused_experts(name, tensor))
    assert split.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(split[name], tensor), name
    written = json.loads((tmp_path / "config.json").read_text())
    assert "num_experts" not in written and written["num_local_experts"] == E  # transformers 5's spelling
    assert MoeConfig.from_hf(written).num_experts == E


def test_split_and_fuse_round_trip_and_transformers_reads_ours():
    config = tiny_config()
    ours = ours_from(reference_block(config, seed=3), config)
    state = ours.state_dict()
    fused = fuse_experts(state, E)
    again = dict(pair for name, tensor in fused.items() for pair in split_fused_experts(name, tensor))
    assert again.keys() == state.keys() and all(torch.equal(again[name], state[name]) for name in state)
    reference = reference_block(config, seed=4)
    reference.load_state_dict(fused, strict=True)
    x = torch.randn(3, 4, C, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], reference(x), rtol=0, atol=ATOL)


def test_split_passes_other_names_and_refuses_bad_shapes():
    weight = torch.zeros(4, 4)
    for name in ("model.layers.0.mlp.experts.3.gate_proj.weight", "model.layers.0.mlp.gate.weight",
                 "model.layers.1.mlp.down_proj.weight", "model.layers.0.mlp.shared_experts.down_proj"):
        assert split_fused_experts(name, weight) == [(name, weight)]
    with pytest.raises(ValueError, match="not a fused expert tensor"):
        split_fused_experts("model.layers.0.mlp.experts.gate_up_proj", torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="not a fused expert tensor"):
        split_fused_experts("model.layers.0.mlp.experts.down_proj", weight)


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_matches_transformers(masked):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(2 * 6, E, generator=generator, requires_grad=True) for _ in range(3)]  # 3 layers, B 2, T 6
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]) if masked else None  # a left-padded row
    ours = load_balancing_loss(logits, K, mask)
    reference = load_balancing_loss_func(tuple(logits), E, K, mask)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    ours_grads = torch.autograd.grad(ours, logits)
    for mine, theirs in zip(ours_grads, torch.autograd.grad(reference, logits)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
    config = MoeConfig(num_experts=E, num_experts_per_tok=K, router_aux_loss_coef=0.01)
    torch.testing.assert_close(router_aux_loss(logits, config, mask), 0.01 * reference, rtol=0, atol=1e-8)


def test_load_balancing_loss_is_k_when_balanced_and_e_when_collapsed():
    balanced = [torch.eye(E) * 5]  # token i goes to expert i: f_e = P_e = 1 / E, loss E * E * (1 / E^2) = k = 1
    torch.testing.assert_close(load_balancing_loss(balanced, 1), torch.tensor(1.0))
    collapsed = [torch.zeros(E, E).index_fill_(1, torch.tensor([0]), 30.0)]  # all on expert 0: f_0 = P_0 = 1
    torch.testing.assert_close(load_balancing_loss(collapsed, 1), torch.tensor(float(E)))


@pytest.mark.parametrize("step,mlp_only", [(1, []), (2, []), (2, [3]), (1, [0, 4]), (3, [2])])
def test_is_moe_layer_matches_transformers_decoder_layers(step, mlp_only):
    from transformers import Qwen3MoeForCausalLM
    config = tiny_config(num_hidden_layers=6, decoder_sparse_step=step, mlp_only_layers=mlp_only)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    ours = MoeConfig.from_hf(config.to_dict())
    for i, layer in enumerate(model.model.layers):
        assert is_moe_layer(i, ours) == (type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock"), i
    assert not is_moe_layer(0, None)


def test_config_refuses_what_the_block_lacks():
    with pytest.raises(ValueError, match="model_type"):
        MoeConfig.from_hf({"model_type": "qwen3", "num_experts": 8})
    with pytest.raises(ValueError, match="shared_expert"):
        MoeConfig.from_hf({"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2,
                           "moe_intermediate_size": 4, "shared_expert_intermediate_size": 16})
    with pytest.raises(ValueError, match="lacks num_experts_per_tok"):
        MoeConfig.from_hf({"model_type": "qwen3_moe", "num_experts": 8, "moe_intermediate_size": 4})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MoeConfig(num_experts=4, num_experts_per_tok=5)


def test_nf4_and_adapters_apply_to_experts_and_leave_the_router():
    """Quantizing every nn.Linear (as the NF4 loader does) reaches all 3E expert linears and not the router; DoRA
    on the expert names wraps those same linears, freezes the router, and starts equal to the quantized block."""
    config = tiny_config()
    block = ours_from(reference_block(config), config)
    linears = [name for name, module in block.named_modules() if isinstance(module, nn.Linear)]
    assert len(linears) == 3 * E and not any(name.startswith("gate") for name in linears)
    dequantized = ours_from(reference_block(config), config)
    for name in linears:
        dense = block.get_submodule(name)
        layer = empty_nf4_linear(dense.in_features, dense.out_features, bias=False, compute_dtype=torch.float32)
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", module=layer).to("cpu")
        block.set_submodule(name, layer)
        dequantized.get_submodule(name).weight.data = dequantized_weight(layer)
    x = torch.randn(2, 5, C, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        quantized_out = block(x)[0]
        torch.testing.assert_close(quantized_out, dequantized(x)[0], rtol=0, atol=ATOL)
    wrapped = apply_adapters(block, method="dora", targets=("gate_proj", "up_proj", "down_proj"), dropout=0.0)
    assert sorted(wrapped) == sorted(linears) and not block.gate.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(block(x)[0], quantized_out, rtol=0, atol=ATOL)


# The released Qwen3 sizes (their config.json on the hub): hidden, layers, heads, KV heads, MLP width, tied head.
DENSE_SIZES = {"0.6B": (1024, 28, 16, 8, 3072, True), "1.7B": (2048, 28, 16, 8, 6144, True),
               "4B": (2560, 36, 32, 8, 9728, True), "8B": (4096, 36, 32, 8, 12288, False),
               "14B": (5120, 40, 40, 8, 17408, False), "32B": (5120, 64, 64, 8, 25600, False)}
QWEN3_30B_A3B = dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, num_hidden_layers=48,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                     num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                     decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)


def published_config(size: str) -> dict:
    if size == "30B-A3B":
        return dict(QWEN3_30B_A3B)
    hidden, layers, heads, kv_heads, mlp, tied = DENSE_SIZES[size]
    return dict(model_type="qwen3", vocab_size=151936, hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=128, intermediate_size=mlp,
                tie_word_embeddings=tied)


def unique_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def parts_by_name(model: nn.Module) -> dict[str, int]:
    """transformers' parameters sorted into parameter_counts' parts by their names."""
    parts = dict.fromkeys(("embeddings", "linear_weights", "routers", "norms_and_biases"), 0)
    for name, p in model.named_parameters():
        if name.startswith(("model.embed_tokens.", "lm_head.")):
            part = "embeddings"
        elif name.endswith("mlp.gate.weight"):
            part = "routers"
        elif re.search(r"layers\.\d+\..*(proj\.weight|experts\.(gate_up|down)_proj)$", name):
            part = "linear_weights"
        else:
            part = "norms_and_biases"
        parts[part] += p.numel()
    return parts


def meta_reference(d: dict) -> nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
    moe = d["model_type"] == "qwen3_moe"
    options = {key: value for key, value in d.items() if key != "model_type"}
    with torch.device("meta"):
        return (Qwen3MoeForCausalLM(Qwen3MoeConfig(**options)) if moe else Qwen3ForCausalLM(Qwen3Config(**options)))


@pytest.mark.parametrize("size", [*DENSE_SIZES, "30B-A3B"])
def test_parameter_counts_equal_transformers(size):
    d = published_config(size)
    model = meta_reference(d)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == d["tie_word_embeddings"]
    print(f"Qwen3-{size}: {count_parameters(d):,} parameters")
    assert count_parameters(d) == unique_parameters(model)
    assert parameter_counts(d) == parts_by_name(model)


def test_parameter_counts_with_attention_bias_dense_layers_and_a_tied_head():
    config = tiny_config(num_hidden_layers=5, decoder_sparse_step=2, mlp_only_layers=[3], attention_bias=True,
                         tie_word_embeddings=True)
    d = json.loads(config.to_json_string())  # the config.json transformers writes (num_local_experts, ...)
    model = meta_reference(d)
    assert parameter_counts(d) == parts_by_name(model)
    assert count_parameters(d) == unique_parameters(model)


def test_our_block_has_transformers_parameter_count_at_30b_a3b_size():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    options = {key: value for key, value in QWEN3_30B_A3B.items() if key != "model_type"}
    with torch.device("meta"):
        ours = Qwen3MoeBlock(2048, MoeConfig.from_hf(QWEN3_30B_A3B))
        reference = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(**options))
    assert unique_parameters(ours) == unique_parameters(reference) == 128 * (3 * 2048 * 768 + 2048)
