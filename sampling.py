"""Choosing the next token of a caption: greedy, or sampled with temperature and nucleus (top-p) filtering, after an
optional repetition penalty and no-repeat n-gram ban. Same rules as Hugging Face's logits processors of the same names.

Shapes: B batch, V vocab, t tokens generated so far.
"""
import torch


def penalize_repetition(logits: torch.Tensor, generated: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019, arXiv 1909.05858, §4.1), applied to every token already
    generated: a positive logit is divided by `penalty`, a negative one multiplied, so both become less likely."""
    seen = logits.gather(1, generated)  # (B, t)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, generated, seen)  # (B, V)


def ban_repeated_ngrams(logits: torch.Tensor, generated: torch.Tensor, n: int) -> torch.Tensor:
    """Forbid any token that would complete an n-gram the row has already generated (Paulus et al. 2017)."""
    if generated.shape[1] < n:
        return logits
    logits = logits.clone()
    for b, row in enumerate(generated.tolist()):
        prefix = tuple(row[len(row) - n + 1:]) if n > 1 else ()
        banned = [row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i:i + n - 1]) == prefix]
        logits[b, banned] = float("-inf")
    return logits


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019, arXiv 1904.09751): keep the smallest set of tokens whose
    probabilities sum to at least top_p; the most likely token is always kept."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already >= top_p
    drop = drop_sorted.scatter(1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, generated: torch.Tensor, *, do_sample: bool = False, temperature: float = 1.0,
               top_p: float = 1.0, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) float logits of the last position, (B, t) tokens so far -> (B,) next tokens."""
    if repetition_penalty != 1.0 and generated.numel():
        logits = penalize_repetition(logits, generated, repetition_penalty)
    if no_repeat_ngram_size > 0:
        logits = ban_repeated_ngrams(logits, generated, no_repeat_ngram_size)
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
