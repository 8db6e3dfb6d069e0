"""Next-token rules equal transformers' logits processors of the same names."""
import torch
from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor, TopPLogitsWarper

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
    banned = 0
    for seed in range(5):
        for n in (1, 2, 3):
            logits, generated = batch(seed)
            expected = NoRepeatNGramLogitsProcessor(n)(generated, logits.clone())
            got = ban_repeated_ngrams(logits, generated, n)
            assert torch.equal(torch.isinf(got), torch.isinf(expected)), (seed, n)
            banned += int(torch.isinf(got).sum())
    assert banned > 0  # the heavy repetition does ban tokens


def test_top_p_equals_transformers():
    for seed in range(5):
        logits, _ = batch(seed)
        for top_p in (0.3, 0.8, 0.95):
            expected = TopPLogitsWarper(top_p)(None, logits.clone())
            got = top_p_filter(logits, top_p)
            assert torch.equal(torch.isinf(got), torch.isinf(expected)), (seed, top_p)


def test_greedy_and_seeded_sampling():
    logits, generated = batch(1)
    assert torch.equal(next_token(logits, generated), logits.argmax(-1))
    draw = lambda: next_token(logits, generated, do_sample=True, temperature=0.7, top_p=0.9,
                              generator=torch.Generator().manual_seed(3))
    assert torch.equal(draw(), draw())
    kept = top_p_filter(logits / 0.7, 0.9)
    assert all(torch.isfinite(kept[b, token]) for b, token in enumerate(draw()))  # only nucleus tokens are drawn
