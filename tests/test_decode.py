"""decode.py on a tiny random Qwen3, on the CPU: the static-shape decode step (what a CUDA graph captures) gives the
same logits as the dynamic KV-cache forward and as recomputing the whole sequence; prefill refuses a used cache;
a Decoder is rebuilt when shapes or parameter storage change. The CUDA-graph capture itself needs a GPU and is
exercised by `python -m bench gpu-suite` there, not here.

Tolerance: ours vs ours, two routes to the same numbers in fp32: 1e-5 absolute on logits; greedy tokens exact.
"""
import pytest
import torch
from conftest import save_tiny_qwen3

from decode import Decoder, decode_one_token, prefill
from lora import LoRALinear, apply_adapters, held_dora_norms
from qwen3 import load_qwen3

ATOL = 1e-5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = save_tiny_qwen3(tmp_path_factory.mktemp("qwen3"), vocab_size=96, layers=2)
    return load_qwen3(folder, dtype=torch.float32)


def prompt_embeds(model, batch=3, length=5, seed=0):
    ids = torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))
    return ids, model.model.embed_tokens(ids)  # (B, T), (B, T, C)


@torch.no_grad()
def test_static_step_equals_dynamic_cache_and_full_recompute(model):
    ids, embeds = prompt_embeds(model)
    steps, T = 6, ids.shape[1]
    static, dynamic = model.new_kv_cache(3, T + steps), model.new_kv_cache(3, T + steps)
    logits = prefill(model, embeds, static)
    assert static.length == T
    torch.testing.assert_close(logits, model(inputs_embeds=embeds, kv_cache=dynamic)[:, -1], rtol=0, atol=ATOL)
    sequence = ids
    for i in range(steps):
        token = logits.argmax(-1)  # (B,)
        sequence = torch.cat([sequence, token[:, None]], dim=1)
        logits = decode_one_token(model, static, token[:, None], static.claim(3, 1))  # (B, V)
        torch.testing.assert_close(logits, model(token[:, None], kv_cache=dynamic)[:, -1], rtol=0, atol=ATOL)
        torch.testing.assert_close(logits, model(sequence)[:, -1], rtol=0, atol=ATOL)
    for layer in range(2):  # the two routes wrote the same keys and values into the same slots
        torch.testing.assert_close(static.keys[layer], dynamic.keys[layer], rtol=0, atol=ATOL)
        torch.testing.assert_close(static.values[layer], dynamic.values[layer], rtol=0, atol=ATOL)
    assert static.length == dynamic.length == T + steps


@torch.no_grad()
def test_decoder_greedy_tokens_equal_the_dynamic_path_and_reuse_overwrites_the_cache(model):
    _, embeds = prompt_embeds(model, seed=1)
    decoder = Decoder(model, 3, 12)
    assert not decoder.use_graph  # the CPU: eager steps, nothing to capture

    def greedy(count):
        logits, tokens = decoder.prefill(embeds), []
        for _ in range(count):
            tokens.append(logits.argmax(-1))
            logits = decoder.step(tokens[-1])
        return torch.stack(tokens, 1)
    first = greedy(6)
    cache = model.new_kv_cache(3, 12)
    logits, expected = model(inputs_embeds=embeds, kv_cache=cache)[:, -1], []
    for _ in range(6):
        expected.append(logits.argmax(-1))
        logits = model(expected[-1][:, None], kv_cache=cache)[:, -1]
    assert torch.equal(first, torch.stack(expected, 1))
    assert torch.equal(greedy(6), first)  # a second batch on the same decoder: prefill resets the cache
    assert decoder.cache.length == 5 + 6
    decoder.step(first[:, 0])  # slot 11, the last
    with pytest.raises(ValueError, match="with 12 filled; cannot add 1 positions"):
        decoder.step(first[:, 0])


@torch.no_grad()
def test_prefill_refuses_a_used_cache(model):
    _, embeds = prompt_embeds(model)
    cache = model.new_kv_cache(3, 10)
    prefill(model, embeds, cache)
    with pytest.raises(ValueError, match="empty KV cache"):
        prefill(model, embeds, cache)


@torch.no_grad()
def test_a_longer_cache_gives_the_same_tokens(model):
    _, embeds = prompt_embeds(model, seed=2)
    tokens = []
    for max_len in (5 + 4, 5 + 20):  # masked unfilled slots add nothing
        decoder, row = Decoder(model, 3, max_len), []
        logits = decoder.prefill(embeds)
        for i in range(4):
            row.append(logits.argmax(-1))
            logits = decoder.step(row[-1]) if i < 3 else logits
        tokens.append(torch.stack(row, 1))
    assert torch.equal(tokens[0], tokens[1])


def test_decoder_matches_only_its_shapes_and_parameter_storage(tmp_path):
    model = load_qwen3(save_tiny_qwen3(tmp_path, vocab_size=96, layers=1), dtype=torch.float32)
    decoder = Decoder(model, 2, 8)
    assert decoder.matches(2, 8) and decoder.matches(2, 5)  # a shorter generation fits in the longer cache
    assert not decoder.matches(3, 8) and not decoder.matches(2, 9)
    apply_adapters(model, r=2, targets=("q_proj",))  # new parameters: a captured step would not read them
    assert not decoder.matches(2, 8)


@torch.no_grad()
def test_dora_steps_inside_a_hold_equal_the_plain_forward_across_an_adapter_change(tmp_path):
    """What VLM.generate does: prefill and steps inside held_dora_norms, the same Decoder again after the adapters
    changed in place (an optimizer step): each generation's logits equal the uncached forward's of that moment."""
    model = load_qwen3(save_tiny_qwen3(tmp_path, vocab_size=96, layers=2), dtype=torch.float32)
    apply_adapters(model, method="dora", r=2, alpha=4, dropout=0.0)
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    ids, embeds = prompt_embeds(model, seed=3)
    decoder = Decoder(model, 3, 9)
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        for layer in adapters:  # in place, as an optimizer step writes
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
        with held_dora_norms(model, embeds.dtype):
            steps = [decoder.prefill(embeds)]  # (B, V) each
            for _ in range(3):
                steps.append(decoder.step(steps[-1].argmax(-1)))
        tokens = torch.stack([logits.argmax(-1) for logits in steps[:-1]], dim=1)  # (B, 3)
        for i, logits in enumerate(steps):  # the plain forward, outside the hold: the norm formed there
            torch.testing.assert_close(logits, model(torch.cat([ids, tokens[:, :i]], 1))[:, -1], rtol=0, atol=ATOL)
        assert decoder.matches(3, 9)  # the same Decoder (on a GPU, the same captured graph) both times
