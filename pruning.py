"""Fewer visual tokens before the LM: DivPrune and adjacent-frame merging, applied to a projector's output tokens.

Shapes (the legend of every file): B batch, F frames, P positions per frame (patches), N tokens in, K tokens kept
(`keep`), D token width (the projector's output width, or the tower's), E = (F - 1) * P adjacent-frame pairs.

Neither method needs the LM's attention weights, so both work with SDPA / flash attention, in training as well as
in generation. Distances and similarities are computed in fp32 whatever the input dtype, from unit vectors
u = x / max(|x|, eps) (F.normalize) and their dot products g_ij = u_i·u_j, as
    d(i, j) = 1 - cos(x_i, x_j) = (g_ii + g_jj) / 2 - g_ij   (= |u_i - u_j|^2 / 2; g_ii = 1 in real arithmetic)
The second form is exactly 0 in floating point between two identical tokens (1 - g_ij is off by an ulp or so, and
that noise, not the index, would break the ties between duplicates). A zero vector (u = 0) takes g_ii = 1: distance
1 (cosine 0) to every token, another zero vector included.

DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): keep the subset of maximal diversity, greedily.
    d(i, j) = 1 - cos(x_i, x_j)
    first kept:  argmax_i  min_{j != i} d(i, j)        the token whose nearest other token is farthest
    then, K - 1 times:  argmax_{i not kept}  min_{k kept} d(i, k)
    ties go to the lower index; the K indices come back in ascending order; K >= N keeps every token.
The published code (its `DivPrune` function) lets the argmax run over every token and relies on a kept token's
self-distance being 0; here a kept token is never a candidate again, so the K indices are always distinct, also when
every remaining token duplicates a kept one.

Adjacent-frame merging (FrameFusion's first stage, Fu et al. 2024, arXiv 2501.01986, `framefusion/main.py`; DyCoke's
temporal stage is of the same kind): only for tokens laid out per frame, (B, F, P, D) or (B, F*P, D) frame-major with
`frames=F`, as the per-patch projectors (linear, mlp) give them. Pair e joins token (f, p) to token (f - 1, p) of
the previous frame, with the cosine similarity of the two original tokens. Merging a set of pairs collapses each run
of joined tokens along time at one position into the run's first token; its value is the mean of the run's tokens
(as FrameFusion's `merge_tokens_and_get_mask`), its index the first token's. Pairs form chains, so each merged pair
removes exactly one token. The resamplers' query tokens (64 for cabstractor, crossattn, perceiver) have no frames:
only divprune.

`reduce_tokens(tokens, method, keep=K, frames=F)` returns exactly min(K, N) tokens per video (the batch stays
rectangular) and their indices into the F*P input order (the first token of a run for a merged token), ascending:
    none            every token, unchanged (`keep` must be None or N)
    divprune        DivPrune down to K
    merge           merge the N - K most similar pairs (highest similarity first, ties to the lower pair index
                    e = (f - 1) * P + p), no threshold: exactly K remain. K must be >= P (one token per position).
    merge+divprune  merge every pair with similarity >= threshold (FrameFusion's `similarity_lower_bound`, 0.6), but
                    at most N - K of them, the most similar first (the same order as `merge`), so never below K;
                    then DivPrune over the merged tokens down to K.
All of it is deterministic (stable sorts, argmax's first maximum, no atomics). DivPrune holds one (B, N, N) fp32
distance matrix: 85 MB per video at N = 4,608.
"""
import torch
import torch.nn.functional as F

from infra.errors import UserError

REDUCTIONS = ("none", "divprune", "merge", "merge+divprune")
MERGE_THRESHOLD = 0.6  # FrameFusion's default similarity_lower_bound


def self_dots(dots: torch.Tensor) -> torch.Tensor:
    """u·u of unit vectors, with 1 for a zero vector (u = 0): the g_ii of the module docstring."""
    return dots.masked_fill(dots == 0, 1.0)


def cosine_distances(x: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity between every pair of tokens, in fp32: (B, N, D) -> (B, N, N)."""
    unit = F.normalize(x.float(), dim=-1)  # (B, N, D)
    dots = unit @ unit.transpose(1, 2)  # (B, N, D) @ (B, D, N) -> (B, N, N)
    half = self_dots(dots.diagonal(dim1=1, dim2=2)) / 2  # (B, N), from the same GEMM as the pairs' dots
    return dots.neg_().add_(half[:, :, None]).add_(half[:, None, :])  # (g_ii + g_jj) / 2 - g_ij


def divprune_batch(x: torch.Tensor, keep: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """DivPrune per row of x (B, N, D): kept indices (B, min(keep, N)), ascending in each row.

    `valid` (B, N) bool marks the tokens that take part (the others are neither kept nor anyone's nearest token);
    the result then equals DivPrune over each row's valid tokens alone, and keep must not exceed any row's count."""
    B, N, _ = x.shape
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    if valid is None:
        if keep >= N:
            return torch.arange(N, device=x.device).expand(B, N)
        valid = torch.ones(B, N, dtype=torch.bool, device=x.device)
    elif keep > int(valid.sum(1).min()):
        raise ValueError(f"keep {keep} is more than the {int(valid.sum(1).min())} valid tokens of a row")
    distance = cosine_distances(x.detach())  # (B, N, N); the choice is not differentiable, so no graph for it
    distance.diagonal(dim1=1, dim2=2).fill_(float("inf"))  # min over j != i
    if not valid.all():
        distance.masked_fill_(~valid[:, None, :], float("inf"))  # an invalid token is nobody's nearest
    rows = torch.arange(B, device=x.device)
    kept = torch.empty(B, keep, dtype=torch.long, device=x.device)
    # score: -inf for a token that is kept or invalid, else its distance to the kept set (at the first step: to
    # its nearest other token); argmax returns the first maximum, so ties go to the lower index
    score = distance.amin(dim=2).masked_fill_(~valid, float("-inf"))  # (B, N)
    for step in range(keep):  # one O(N) step per kept token
        chosen = score.argmax(dim=1)  # (B,)
        kept[:, step] = chosen
        to_chosen = distance[rows, chosen]  # (B, N): d(chosen, i), a row; = d(i, chosen) up to fp32 rounding
        score = to_chosen.masked_fill_(~valid, float("-inf")) if step == 0 else torch.minimum(score, to_chosen)
        score[rows, chosen] = float("-inf")  # kept: never a candidate again
    return kept.sort(dim=1).values


def divprune(x: torch.Tensor, keep: int) -> torch.Tensor:
    """DivPrune's kept indices for x (N, D): (min(keep, N),) LongTensor, ascending."""
    return divprune_batch(x[None], keep)[0]


def adjacent_similarity(grid: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each token to the token at the same position of the previous frame, in fp32:
    (B, F, P, D) -> (B, F - 1, P); entry [f - 1, p] is the pair (f - 1, p) - (f, p). Exactly 1 for a static token."""
    unit = F.normalize(grid.float(), dim=-1)  # (B, F, P, D)
    half = self_dots((unit * unit).sum(dim=-1)) / 2  # (B, F, P)
    dots = (unit[:, 1:] * unit[:, :-1]).sum(dim=-1)  # (B, F - 1, P)
    return 1.0 - (half[:, 1:] + half[:, :-1] - dots)  # 1 - d


def choose_merges(similarity: torch.Tensor, most: int, threshold: float | None = None) -> torch.Tensor:
    """Which tokens merge into the previous frame's: (B, F - 1, P) similarities -> (B, F, P) bool (frame 0 never).

    At most `most` pairs per video, the most similar first, ties to the lower pair index (a stable sort); with a
    threshold, only pairs whose similarity is >= threshold."""
    B, F1, P = similarity.shape
    flat = similarity.reshape(B, F1 * P)  # (B, E), pair e = (f - 1) * P + p
    order = flat.sort(dim=1, descending=True, stable=True).indices  # (B, E)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(F1 * P, device=flat.device).expand(B, -1))
    merged = rank < most  # (B, E)
    if threshold is not None:
        merged &= flat >= threshold
    first_frame = torch.zeros(B, 1, P, dtype=torch.bool, device=flat.device)
    return torch.cat([first_frame, merged.view(B, F1, P)], dim=1)  # (B, F, P)


def merge_runs(grid: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """Each run of merged tokens replaced at its first token by the run's mean (the other entries are partial sums
    that no caller reads): (B, F, P, D), merged (B, F, P) -> (B, F, P, D), in grid's dtype."""
    total = grid.to(torch.float32, copy=True)  # (B, F, P, D) sums
    count = torch.ones(merged.shape, device=grid.device)  # (B, F, P)
    for f in range(grid.shape[1] - 2, -1, -1):  # from the last frame back: frame f + 1 hands its run on to frame f
        joins = merged[:, f + 1]  # (B, P)
        total[:, f] += torch.where(joins[..., None], total[:, f + 1], 0.0)
        count[:, f] += joins * count[:, f + 1]
    return (total / count[..., None]).to(grid.dtype)


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, D) at indices (B, K) -> (B, K, D)."""
    return tokens.gather(1, indices[..., None].expand(-1, -1, tokens.shape[-1]))


def reduce_tokens(tokens: torch.Tensor, method: str, keep: int | None = None, *, frames: int | None = None,
                  threshold: float = MERGE_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce each video's visual tokens to exactly min(keep, N) (the rules in the module docstring).

    tokens (B, F, P, D), or (B, N, D) with frames=F when they are laid out per frame (N = F * P, frame-major).
    Returns (reduced (B, K, D) in tokens' dtype, indices (B, K) into the N input tokens, ascending)."""
    if method not in REDUCTIONS:
        raise UserError(f"unknown token reduction '{method}' (choose from {', '.join(REDUCTIONS)})")
    if tokens.dim() == 4:
        if frames is not None and frames != tokens.shape[1]:
            raise ValueError(f"frames={frames} but the tokens hold {tokens.shape[1]} frames")
        frames = tokens.shape[1]
        tokens = tokens.flatten(1, 2)  # (B, F, P, D) -> (B, N, D)
    B, N, D = tokens.shape
    everything = torch.arange(N, device=tokens.device).expand(B, N)
    if method == "none":
        if keep not in (None, N):
            raise UserError(f"token reduction 'none' keeps all {N} tokens; keep={keep} needs a reduction method")
        return tokens, everything
    if keep is None or keep < 1:
        raise UserError(f"token reduction '{method}' needs keep >= 1 tokens per video, got {keep}")
    if keep >= N:
        return tokens, everything
    if method == "divprune":
        indices = divprune_batch(tokens, keep)
        return gather_tokens(tokens, indices), indices
    if frames is None:
        raise UserError(f"'{method}' needs tokens laid out per frame (frames=F); tokens without frames, such as a "
                         "resampler's queries, only support 'divprune'")
    if N % frames:
        raise ValueError(f"{N} tokens do not split into {frames} frames")
    P = N // frames
    if method == "merge" and keep < P:
        raise UserError(f"'merge' keeps at least one token per position ({P}); use 'merge+divprune' for {keep}")
    grid = tokens.reshape(B, frames, P, D)  # (B, F, P, D)
    similarity = adjacent_similarity(grid.detach())  # (B, F - 1, P)
    merged = choose_merges(similarity, N - keep, threshold if method == "merge+divprune" else None)
    means = merge_runs(grid, merged).view(B, N, D)  # a run's mean at its first token; gradients flow through it
    first = ~merged.view(B, N)  # (B, N): the tokens left after merging
    if method == "merge":
        indices = first.nonzero()[:, 1].view(B, keep)  # exactly keep per row, ascending
    else:
        indices = divprune_batch(means, keep, valid=first)
    return gather_tokens(means, indices), indices
