"""Next-token rules equal transformers' logits processors of the same names, one by one and chained, and the
decoding flags (--do-sample, --temperature, --top-p, --repetition-penalty, --no-repeat-ngram-size) give through
VLM.generate the tokens transformers' `generate` gives on the same tiny model, prompt and seed."""
import argparse

import pytest
import torch
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor, \
    TemperatureLogitsWarper, TopPLogitsWarper

from sampling import ban_repeated_ngrams, next_token, penalize_repetition, top_p_filter


def batch(seed=0, B=3, V=50, t=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * 3, torch.randint(0, 8, (B, t), generator=g)  # heavy repetition


def test_repetition_penalty_equals_transformers():
    for seed in range(5):
        logits, generated = batch(seed)
        expected = RepetitionPenaltyLogitsProcessor(1.3)(generated, logits.clone())
        torch.testing.assert_close(penalize_repetition(logits, generated, 1.3), expected, atol=0, rtol=0)


def test_no_repeat_ngram_equals_transformers():
    rows_with_bans = {1: 0, 2: 0, 3: 0}
    for seed in range(5):
        for n in (1, 2, 3):
            logits, generated = batch(seed)
            expected = NoRepeatNGramLogitsProcessor(n)(generated, logits.clone())
            got = ban_repeated_ngrams(logits, generated, n)
            torch.testing.assert_close(got, expected, atol=0, rtol=0)  # the same -inf, the rest untouched
            for row, banned in zip(generated.tolist(), torch.isinf(got)):
                # the tokens that followed an earlier occurrence of the row's last n-1 tokens, counted by hand
                tail = row[len(row) - n + 1:] if n > 1 else []
                follow = {row[i + n - 1] for i in range(len(row) - n + 1) if row[i:i + n - 1] == tail}
                assert banned.nonzero().flatten().tolist() == sorted(follow), (seed, n, row)
                rows_with_bans[n] += bool(follow)
    assert rows_with_bans == {1: 15, 2: 13, 3: 4}  # of 15 rows: the heavy repetition bans tokens at every n


def test_temperature_equals_transformers():
    for seed in range(5):
        logits, _ = batch(seed)
        for temperature in (0.3, 0.7, 1.5):
            expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
            torch.testing.assert_close(logits / temperature, expected, atol=0, rtol=0)


def test_top_p_equals_transformers():
    for seed in range(5):
        logits, _ = batch(seed)
        for top_p in (0.3, 0.8, 0.95):
            expected = TopPLogitsWarper(top_p)(None, logits.clone())
            torch.testing.assert_close(top_p_filter(logits, top_p), expected, atol=0, rtol=0)


def test_the_chain_and_the_seeded_draw_equal_transformers():
    """next_token's order (penalty, n-gram ban, temperature, top-p) is transformers' `_get_logits_processor` order,
    and with the same seed the draw is the same torch.multinomial on the same probabilities."""
    for seed in range(5):
        logits, generated = batch(seed)
        chain = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), NoRepeatNGramLogitsProcessor(2),
                                     TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.9)])
        expected = chain(generated, logits.clone())
        ours = top_p_filter(ban_repeated_ngrams(penalize_repetition(logits, generated, 1.2), generated, 2) / 0.7, 0.9)
        torch.testing.assert_close(ours, expected, atol=0, rtol=0)
        torch.manual_seed(seed)
        drawn = torch.multinomial(expected.softmax(-1), 1).squeeze(1)  # transformers' _sample
        torch.manual_seed(seed)
        assert torch.equal(next_token(logits, generated, do_sample=True, temperature=0.7, top_p=0.9,
                                      repetition_penalty=1.2, no_repeat_ngram_size=2), drawn)


def test_greedy_and_seeded_sampling():
    logits, generated = batch(1)
    assert torch.equal(next_token(logits, generated), logits.argmax(-1))
    draw = lambda: next_token(logits, generated, do_sample=True, temperature=0.7, top_p=0.9,
                              generator=torch.Generator().manual_seed(3))
    assert torch.equal(draw(), draw())
    kept = top_p_filter(logits / 0.7, 0.9)
    assert all(torch.isfinite(kept[b, token]) for b, token in enumerate(draw()))  # only nucleus tokens are drawn


# ---- through VLM.generate, against transformers' generate --------------------------------------------------------
MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def model_and_reference(tiny_bases):
    """Our VLM on the tiny bases (fp32, no quantization) and transformers' Qwen3 read from the same folder."""
    from transformers import Qwen3ForCausalLM

    from vlm import VLMConfig, build_vlm
    torch.manual_seed(0)
    config = VLMConfig(clip_path=str(tiny_bases[0]), llm_path=str(tiny_bases[1]), num_frames=3, quant=None,
                       projector={"name": "perceiver", "num_queries": 4})
    model = build_vlm(config, dtype=torch.float32).eval()
    reference = Qwen3ForCausalLM.from_pretrained(tiny_bases[1], dtype=torch.float32).eval()
    return model, reference


def features(batch=3, seed=1):
    return torch.randn(batch, 3, 16, 32, generator=torch.Generator().manual_seed(seed))


def decoding(flags: str) -> dict:
    """The keyword arguments evaluate.py and caption.py hand to VLM.generate for these command-line flags."""
    from evaluate import add_decoding_options, decoding_from_args
    parser = argparse.ArgumentParser()
    add_decoding_options(parser)
    return decoding_from_args(parser.parse_args(flags.split()))


def our_tokens(model, feats, seed, **settings) -> list[list[int]]:
    """VLM.generate's token ids (its template's decode swapped for the identity), each row cut after its stop."""
    template = model.template
    torch.manual_seed(seed)
    template.decode = lambda ids: ids
    try:
        rows = model.generate(feats, max_new_tokens=MAX_NEW_TOKENS, **settings)
    finally:
        del template.decode
    return [cut_at_stop(row, template) for row in rows]


def reference_tokens(model, reference, feats, seed, **settings) -> list[list[int]]:
    """transformers' generate on the same prompt embeddings (the projector's tokens spliced in), the same stops."""
    from vlm import splice_visual_tokens
    template = model.template
    with torch.no_grad():
        visual = model.project(feats)  # (B, N, C)
        ids = model.prompt_ids(feats.shape[0], visual.shape[1])  # (B, T)
        embeds = splice_visual_tokens(model.llm.model.embed_tokens, ids, visual, template.video_pad_id)
        torch.manual_seed(seed)
        out = reference.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=MAX_NEW_TOKENS, top_k=None,
                                 eos_token_id=[template.im_end_id, template.end_of_text_id],
                                 pad_token_id=template.end_of_text_id, **settings)
    return [cut_at_stop(row, template) for row in out.tolist()]


def cut_at_stop(row: list[int], template) -> list[int]:
    stops = [i for i, token in enumerate(row) if token in (template.im_end_id, template.end_of_text_id)]
    return row[:stops[0] + 1] if stops else row


@pytest.mark.filterwarnings("ignore:Passing `(repetition_penalty|no_repeat_ngram_size)` with `inputs_embeds`")
@pytest.mark.parametrize("flags", [
    "--do-sample",
    "--do-sample --temperature 0.7 --top-p 0.9",
    "--do-sample --temperature 1.3 --repetition-penalty 1.3",
    "--do-sample --temperature 0.8 --top-p 0.8 --repetition-penalty 1.2 --no-repeat-ngram-size 2",
])
def test_seeded_sampling_through_generate_equals_transformers(model_and_reference, flags):
    """Both draw with torch.multinomial from the default generator, once per step for the whole batch, on
    probabilities equal to float rounding: with the same seed they draw the same tokens. The prompt's tokens are
    not penalised by either (transformers applies the penalty and the n-gram ban to generated tokens only when
    it is given embeddings)."""
    model, reference = model_and_reference
    settings, feats = decoding(flags), features()
    assert settings["do_sample"]
    for seed in (0, 5):
        ours = our_tokens(model, feats, seed, **settings)
        assert ours == reference_tokens(model, reference, feats, seed, **settings), (flags, seed)
        assert [len(row) for row in ours] == [MAX_NEW_TOKENS] * 3  # nothing stops early: every draw is compared
    assert our_tokens(model, feats, 0, **settings) != our_tokens(model, feats, 5, **settings)  # the seed matters


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")
@pytest.mark.parametrize("flags", ["", "--repetition-penalty 1.3", "--temperature 0.5 --repetition-penalty 1.3"])
def test_greedy_equivalent_sampling_equals_transformers_greedy(model_and_reference, flags):
    """Greedy decoding, and sampling made greedy (temperature before an argmax; a nucleus so small it keeps only
    the most likely token), give transformers' greedy tokens."""
    model, reference = model_and_reference
    settings, feats = decoding(flags), features()
    greedy = reference_tokens(model, reference, feats, seed=0, **settings)
    assert our_tokens(model, feats, 0, **settings) == greedy
    nucleus_of_one = decoding(f"{flags} --do-sample --top-p 1e-6")
    for seed in (0, 5):
        assert our_tokens(model, feats, seed, **nucleus_of_one) == greedy
        assert reference_tokens(model, reference, feats, seed, **nucleus_of_one) == greedy
    sampled = our_tokens(model, feats, 0, **decoding(f"{flags} --do-sample"))
    assert sampled != greedy  # the control: without the tiny nucleus, sampling departs from greedy
