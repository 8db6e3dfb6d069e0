"""qwen3.py against transformers' Qwen3ForCausalLM (the reference, test-only) on tiny random snapshot folders.

Tolerances: fp32 logits within 1e-4 of transformers (they agree to ~1e-7: same math, different op order); the same
model run two ways (cache / no cache, batched / alone) within 1e-5.
"""
import json
import shutil

import bitsandbytes as bnb
import pytest
import torch
from conftest import save_tiny_qwen3, saved_once
from safetensors.torch import load_file, save_file

from nf4 import int8_row_scales, keep_one_layout
from qwen3 import Qwen3, Qwen3Config, build_attention_mask, default_position_ids, load_qwen3

PARITY_ATOL = 1e-4  # ours vs transformers, fp32
SELF_ATOL = 1e-5  # ours vs ours, two routes to the same numbers


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """snapshot(**save_tiny_qwen3 options) -> folder, written once per distinct set of options."""
    return saved_once(tmp_path_factory, save_tiny_qwen3, "qwen3")


def reference(folder, **kwargs):
    from transformers import Qwen3ForCausalLM
    kwargs.setdefault("dtype", torch.float32)
    return Qwen3ForCausalLM.from_pretrained(folder, attn_implementation="eager", **kwargs).eval()


def max_abs_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])  # (B, T)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])  # (B, T)
    return ids, mask


CASES = {  # each changes one thing; the default itself is untied, GQA (4 heads, 2 KV heads), head_dim 24 != 64 / 4
    "untied-gqa-headdim": {},
    "tied": {"tie": True},
    "no-gqa": {"kv_heads": 4},
    "rope-theta-1e6": {"rope_theta": 1e6},
    "sharded": {"max_shard_size": "20KB"},
    "attention-bias": {"attention_bias": True},
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(snapshot, case):
    folder = snapshot(**CASES[case])
    if case == "sharded":
        assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    ours, ref = load_qwen3(folder, dtype=torch.float32), reference(folder)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits, ref_logits = ours(ids), ref(ids).logits
    assert (ours.lm_head is None) == ("tie" in CASES[case])
    print(f"{case}: max abs diff {max_abs_diff(ours_logits, ref_logits):.2e}")
    torch.testing.assert_close(ours_logits, ref_logits, rtol=0, atol=PARITY_ATOL)


def test_left_padded_batch_matches_transformers_and_each_row_alone(snapshot):
    folder = snapshot()
    ours, ref = load_qwen3(folder, dtype=torch.float32), reference(folder)
    rows = [[5, 17, 99, 3, 42, 8, 71, 64, 2, 9, 100, 33], [7, 7, 81, 12, 5, 40, 1], [90, 4, 26]]
    ids, mask = left_padded(rows)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers takes positions as given: pass ours
    with torch.no_grad():
        ours_logits = ours(ids, attention_mask=mask)  # (B, T, V)
        ref_logits = ref(ids, attention_mask=mask, position_ids=positions).logits
        alone = [ours(torch.tensor([row]))[0] for row in rows]  # (T_row, V) each
    real = mask.bool()
    assert torch.isfinite(ours_logits).all(), "pad positions must stay finite"
    print(f"left padding: vs transformers {max_abs_diff(ours_logits[real], ref_logits[real]):.2e}")
    torch.testing.assert_close(ours_logits[real], ref_logits[real], rtol=0, atol=PARITY_ATOL)
    for i, row_logits in enumerate(alone):
        torch.testing.assert_close(ours_logits[i, -len(rows[i]):], row_logits, rtol=0, atol=SELF_ATOL)


def test_positions_count_real_tokens_and_every_query_sees_a_key():
    # RoPE scores depend only on position differences, so wrong-but-shifted positions would not show in the
    # logits above; the positions are checked here directly.
    rows = [[5, 17, 99, 3], [7, 81], [90]]
    ids, mask = left_padded(rows)
    positions = default_position_ids(mask, 0, 4, "cpu")  # (B, T)
    for i, row in enumerate(rows):
        assert positions[i, -len(row):].tolist() == list(range(len(row)))
    step_mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)  # one decode step later
    assert default_position_ids(step_mask, 4, 1, "cpu")[:, 0].tolist() == [len(row) for row in rows]
    allowed = build_attention_mask(mask, 0, 4, "cpu")  # (B, 1, T, S)
    assert allowed.any(-1).all(), "a query row with no key to attend gives NaN on some SDPA kernels"
    assert not (allowed & ~mask.bool()[:, None, None, :] & mask.bool()[:, None, :, None]).any()  # real never sees pad
    assert build_attention_mask(None, 0, 4, "cpu") is None  # plain causal: SDPA's is_causal fast path
    cached = build_attention_mask(None, 3, 2, "cpu")  # two new queries after three cached positions
    assert torch.equal(cached[0, 0], torch.ones(2, 5, dtype=torch.bool).tril(diagonal=3))


NF4_OPTIONS = {"max_shard_size": "20KB"}  # quantized while streaming across 16 shards


def test_nf4_matches_transformers_bitsandbytes(snapshot):
    from transformers import BitsAndBytesConfig
    folder = snapshot(**NF4_OPTIONS)
    ours = load_qwen3(folder, quant="nf4", dtype=torch.float32)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    ref = reference(folder, quantization_config=quantization)
    ours_4bit = {name: m for name, m in ours.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    ref_4bit = {name: m for name, m in ref.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(ours_4bit) == set(ref_4bit) and len(ours_4bit) == 2 * 7  # every decoder-layer linear, no lm_head
    for name, module in ours_4bit.items():  # the same 4-bit codes and the same (double-quantized) block scales
        assert torch.equal(module.weight.data, ref_4bit[name].weight.data), name
        assert torch.equal(module.weight.quant_state.absmax, ref_4bit[name].weight.quant_state.absmax), name
        # bitsandbytes' AVX512-BF16 CPU repacking is off in ours (nf4.keep_one_layout); off here too, so both run
        # the same dequantize + fp32 matmul.
        keep_one_layout(ref_4bit[name])
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits, ref_logits = ours(ids), ref(ids).logits
        full_logits = load_qwen3(folder, dtype=torch.float32)(ids)
    print(f"nf4: vs transformers+bitsandbytes {max_abs_diff(ours_logits, ref_logits):.2e}, "
          f"vs unquantized {max_abs_diff(ours_logits, full_logits):.2e}")
    torch.testing.assert_close(ours_logits, ref_logits, rtol=0, atol=PARITY_ATOL)
    assert max_abs_diff(ours_logits, full_logits) > 1e-3, "4-bit weights must change the logits"


def test_int8_matches_transformers_bitsandbytes(snapshot):
    """LLM.int8 (threshold 6, no fp16 copy) on every decoder-layer linear: the same int8 rows and scales as
    transformers' load_in_8bit, and the same logits (eval mode: bitsandbytes' int8 matmul on both sides)."""
    from transformers import BitsAndBytesConfig
    folder = snapshot(**NF4_OPTIONS)
    ours = load_qwen3(folder, quant="int8", dtype=torch.float32)
    ref = reference(folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    ours_8bit = {name: m for name, m in ours.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    ref_8bit = {name: m for name, m in ref.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert set(ours_8bit) == set(ref_8bit) and len(ours_8bit) == 2 * 7
    for name, module in ours_8bit.items():
        assert module.weight.dtype == torch.int8 and module.state.threshold == 6.0
        assert not module.state.has_fp16_weights, name  # no fp16 copy of the weight kept
        assert torch.equal(module.weight.data, ref_8bit[name].weight.data), name
        assert torch.equal(int8_row_scales(module), int8_row_scales(ref_8bit[name])), name
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits, ref_logits = ours(ids), ref(ids).logits
        full_logits = load_qwen3(folder, dtype=torch.float32)(ids)
    print(f"int8: vs transformers+bitsandbytes {max_abs_diff(ours_logits, ref_logits):.2e}, "
          f"vs unquantized {max_abs_diff(ours_logits, full_logits):.2e}")
    torch.testing.assert_close(ours_logits, ref_logits, rtol=0, atol=PARITY_ATOL)
    assert max_abs_diff(ours_logits, full_logits) > 1e-4, "int8 weights must change the logits"


def test_nf4_model_keeps_embeddings_norms_head_in_dtype_and_is_frozen(snapshot):
    model = load_qwen3(snapshot(**NF4_OPTIONS), quant="nf4", dtype=torch.bfloat16)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for name, p in model.named_parameters():
        quantized = isinstance(model.get_submodule(name.rpartition(".")[0]), bnb.nn.Linear4bit)
        assert p.dtype == (torch.uint8 if quantized else torch.bfloat16), name
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def test_nf4_gradients_unchanged_by_an_earlier_eval_forward(snapshot):
    model = load_qwen3(snapshot(**NF4_OPTIONS), quant="nf4", dtype=torch.float32)
    embeds = model.model.embed_tokens(torch.tensor([[3, 1, 4, 1, 5, 9]])).requires_grad_()

    def input_gradient():
        embeds.grad = None
        model(inputs_embeds=embeds).square().mean().backward()
        return embeds.grad.clone()
    before = input_gradient()
    with torch.no_grad():
        model(inputs_embeds=embeds)  # an evaluation pass between two training steps
    torch.testing.assert_close(input_gradient(), before, rtol=0, atol=0)


def greedy_with_cache(model, ids, mask, steps):
    """Prefill once, then one token per forward; returns the new tokens (B, steps) and their logits."""
    cache = model.new_kv_cache(ids.shape[0], ids.shape[1] + steps)
    logits = model(ids, attention_mask=mask, kv_cache=cache)[:, -1]  # (B, V)
    tokens, step_logits = [], []
    for _ in range(steps):
        step_logits.append(logits)
        tokens.append(logits.argmax(-1, keepdim=True))  # (B, 1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(tokens[-1])], dim=1)  # (B, S + 1)
        logits = model(tokens[-1], attention_mask=mask, kv_cache=cache)[:, -1]
    assert cache.length == ids.shape[1] + steps
    return torch.cat(tokens, dim=1), torch.stack(step_logits, dim=1)


@torch.no_grad()
def test_kv_cache_greedy_equals_full_recompute_and_transformers_generate(snapshot):
    folder = snapshot()
    model = load_qwen3(folder, dtype=torch.float32)
    prompt = torch.tensor([[5, 17, 99, 3, 42]])
    tokens, step_logits = greedy_with_cache(model, prompt, None, steps=8)
    sequence = prompt
    for step in range(8):
        full = model(sequence)[:, -1]  # the whole sequence again, no cache
        torch.testing.assert_close(step_logits[:, step], full, rtol=0, atol=SELF_ATOL)
        sequence = torch.cat([sequence, full.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(sequence[:, 5:], tokens)
    ref_tokens = reference(folder).generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)[:, 5:]
    assert torch.equal(tokens, ref_tokens)


@torch.no_grad()
def test_batched_left_padded_decode_equals_one_at_a_time(snapshot):
    model = load_qwen3(snapshot(), dtype=torch.float32)
    rows = [[5, 17, 99, 3, 42, 8], [7, 81, 12], [90]]
    ids, mask = left_padded(rows)
    tokens, step_logits = greedy_with_cache(model, ids, mask, steps=6)
    for i, row in enumerate(rows):
        row_tokens, row_logits = greedy_with_cache(model, torch.tensor([row]), None, steps=6)
        assert torch.equal(tokens[i], row_tokens[0])
        torch.testing.assert_close(step_logits[i], row_logits[0], rtol=0, atol=SELF_ATOL)


@torch.no_grad()
def test_left_padded_cache_steps_equal_the_uncached_forward_at_every_step(snapshot):
    """The cache's one write path: prefill writes slots [0, T), each step the next slot; at every step the logits
    equal a forward over the whole left-padded sequence without a cache."""
    model = load_qwen3(snapshot(), dtype=torch.float32)
    ids, mask = left_padded([[5, 17, 99, 3, 42, 8], [7, 81, 12], [90]])
    tokens, step_logits = greedy_with_cache(model, ids, mask, steps=5)
    for step in range(5):
        sequence = torch.cat([ids, tokens[:, :step]], dim=1)  # (B, T + step)
        full_mask = torch.cat([mask, torch.ones_like(tokens[:, :step])], dim=1)
        full = model(sequence, attention_mask=full_mask)[:, -1]  # (B, V)
        torch.testing.assert_close(step_logits[:, step], full, rtol=0, atol=SELF_ATOL)


@torch.no_grad()
def test_prefill_attends_with_is_causal_and_no_mask_then_steps_read_the_filled_slots(snapshot, monkeypatch):
    import qwen3
    model = load_qwen3(snapshot(layers=1), dtype=torch.float32)
    calls, sdpa = [], qwen3.F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, is_causal=False, **options):
        calls.append((attn_mask is None, is_causal, k.shape[2]))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **options)
    monkeypatch.setattr(qwen3.F, "scaled_dot_product_attention", recording_sdpa)
    cache = model.new_kv_cache(2, 10)
    model(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), kv_cache=cache)  # a prefill: no padding, empty cache
    model(torch.tensor([[9], [10]]), kv_cache=cache)
    assert calls == [(True, True, 4), (False, False, 5)]  # keys of the filled slots only, never all 10
    assert cache.length == 5


@torch.no_grad()
def test_hidden_states_then_logits_equals_forward(snapshot):
    model = load_qwen3(snapshot(tie=True), dtype=torch.float32)
    ids = torch.tensor([[5, 17, 99, 3], [1, 2, 3, 4]])
    assert torch.equal(model.logits_from_hidden(model.hidden_states(ids)), model(ids))


def test_gradient_checkpointing_gives_the_same_gradients(snapshot):
    model = load_qwen3(snapshot(), dtype=torch.float32)
    calls = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda *_: calls.append(1))  # pre: recomputation stops early
    embeds = model.model.embed_tokens(torch.tensor([[5, 17, 99, 3, 42, 8]])).requires_grad_()

    def input_gradient(checkpointing):
        model.gradient_checkpointing, embeds.grad = checkpointing, None
        model(inputs_embeds=embeds).square().mean().backward()
        return embeds.grad.clone()
    plain = input_gradient(False)
    calls.clear()
    checkpointed = input_gradient(True)
    assert len(calls) == 2 * len(model.model.layers)  # every layer ran again in backward
    print(f"gradient checkpointing: max abs diff {max_abs_diff(plain, checkpointed):.2e}")
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-7)
    calls.clear()
    with torch.no_grad():
        model(inputs_embeds=embeds)
    assert len(calls) == len(model.model.layers)  # inactive without grad
    with pytest.raises(ValueError, match="gradient checkpointing reruns layers"):
        model(inputs_embeds=embeds, kv_cache=model.new_kv_cache(1, 8))


@torch.no_grad()
def test_bad_call_arguments_raise(snapshot):
    model = load_qwen3(snapshot(), dtype=torch.float32)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model()
    with pytest.raises(ValueError, match=r"must be \(B, cached \+ T\) = \(1, 3\)"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 2))
    cache = model.new_kv_cache(1, 4)
    model(torch.tensor([[1, 2, 3]]), kv_cache=cache)
    with pytest.raises(ValueError, match="with 3 filled; cannot add 2 positions"):
        model(torch.tensor([[4, 5]]), kv_cache=cache)


def copy_snapshot(source, target, edit_tensors=None, edit_config=None):
    """A single-file copy of snapshot `source`, with its tensors and/or config dict edited in place."""
    target.mkdir()
    tensors = load_file(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    (edit_tensors or (lambda t: None))(tensors)
    (edit_config or (lambda c: None))(config)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_folder_without_config_or_weights(snapshot, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_qwen3(tmp_path)
    shutil.copy(snapshot() / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights; expected model.safetensors"):
        load_qwen3(tmp_path)
    sharded = shutil.copytree(snapshot(max_shard_size="20KB"), tmp_path / "sharded")
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="lists model-00002-.*, which is not in the folder"):
        load_qwen3(sharded)


def test_missing_unexpected_and_misshapen_tensors(snapshot, tmp_path):
    source = snapshot()
    missing = copy_snapshot(source, tmp_path / "missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="missing weights 'model.layers.1.mlp.up_proj.weight'"):
        load_qwen3(missing)
    extra = copy_snapshot(source, tmp_path / "extra",
                          lambda t: t.update({"model.layers.0.self_attn.rotary.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match="unexpected weights 'model.layers.0.self_attn.rotary.weight'"):
        load_qwen3(extra)
    shape = copy_snapshot(source, tmp_path / "shape",
                          lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(96, 64)}))
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(96, 64\), but "
                                         r"config.json implies \(48, 64\)"):
        load_qwen3(shape)


def test_tied_checkpoint_that_still_carries_lm_head(snapshot, tmp_path):
    source = snapshot(tie=True)
    same = copy_snapshot(source, tmp_path / "same",
                         lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    with torch.no_grad():
        torch.testing.assert_close(load_qwen3(same, dtype=torch.float32)(torch.tensor([[1, 2]])),
                                   load_qwen3(source, dtype=torch.float32)(torch.tensor([[1, 2]])), rtol=0, atol=0)
    other = copy_snapshot(source, tmp_path / "other",
                          lambda t: t.update({"lm_head.weight": torch.zeros_like(t["model.embed_tokens.weight"])}))
    with pytest.raises(ValueError, match="tie_word_embeddings=true but lm_head.weight differs"):
        load_qwen3(other)


def test_config_reading_and_refusals(snapshot, tmp_path):
    hf = json.loads((snapshot() / "config.json").read_text())
    transformers4 = {k: v for k, v in hf.items() if k not in ("rope_parameters", "head_dim")}
    transformers4.update(rope_theta=1e6, rope_scaling=None)  # 4.x layout, head_dim left to its default
    config = Qwen3Config.from_hf(transformers4)
    assert (config.rope_theta, config.head_dim) == (1e6, 64 // 4)
    assert Qwen3Config.from_hf(hf).rope_theta == 10000.0 and Qwen3Config.from_hf(hf).head_dim == 24
    with pytest.raises(ValueError, match="RoPE type 'yarn'"):
        Qwen3Config.from_hf({**hf, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}})
    with pytest.raises(ValueError, match="use_sliding_window=True is not supported"):
        Qwen3Config.from_hf({**hf, "use_sliding_window": True})
    with pytest.raises(ValueError, match="config.json lacks hidden_size"):
        Qwen3Config.from_hf({k: v for k, v in hf.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="quant='int4'"):
        load_qwen3(snapshot(), quant="int4")


def test_fingerprint_tells_snapshots_apart(snapshot):
    first, again = load_qwen3(snapshot()).fingerprint, load_qwen3(snapshot()).fingerprint
    assert len(first) == 32 and first == again
    assert load_qwen3(snapshot(seed=1)).fingerprint != first


QWEN3_8B_CONFIG = {  # Qwen/Qwen3-8B config.json (transformers 4.51 layout)
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 12288, "max_position_embeddings": 40960,
    "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936}


def test_qwen3_8b_parameter_count():
    from transformers import Qwen3Config as HFQwen3Config
    from transformers import Qwen3ForCausalLM
    with torch.device("meta"):
        ours = Qwen3(Qwen3Config.from_hf(QWEN3_8B_CONFIG))
        ref = Qwen3ForCausalLM(HFQwen3Config(**QWEN3_8B_CONFIG))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    assert count * 2 == 16_381_470_720  # the bf16 "total_size" in Qwen3-8B's model.safetensors.index.json
