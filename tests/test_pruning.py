"""pruning.py: DivPrune against a plain loop over the published rule; adjacent-frame merging on a constructed video."""
import math

import pytest
import torch

from pruning import REDUCTIONS, divprune, divprune_batch, reduce_tokens


# ---- the published rule, deliberately simple: Python floats (float64), one token at a time ------------------------
def reference_cosine(a: list[float], b: list[float]) -> float:
    dot, aa, bb = sum(x * y for x, y in zip(a, b)), sum(x * x for x in a), sum(y * y for y in b)
    return dot / math.sqrt(aa * bb) if aa and bb else 0.0  # sqrt(aa * aa) == aa: duplicates get exactly 1


def reference_divprune(x: torch.Tensor, keep: int) -> list[int]:
    rows = x.double().tolist()
    n = len(rows)
    if keep >= n:
        return list(range(n))
    d = [[1.0 - reference_cosine(rows[i], rows[j]) for j in range(n)] for i in range(n)]
    nearest_other = [min(d[i][j] for j in range(n) if j != i) for i in range(n)]
    kept = [max(range(n), key=lambda i: (nearest_other[i], -i))]  # largest, then the lower index
    while len(kept) < keep:
        rest = [i for i in range(n) if i not in kept]
        kept.append(max(rest, key=lambda i: (min(d[i][k] for k in kept), -i)))
    return sorted(kept)


def random_tokens(n: int, dim: int, seed: int, duplicates: int = 0, zeros: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    for _ in range(duplicates):  # copy one token over another
        source, target = torch.randint(0, n, (2,), generator=g).tolist()
        x[target] = x[source]
    x[torch.randperm(n, generator=g)[:zeros]] = 0.0
    return x


@pytest.mark.parametrize("n, keep, dim", [(1, 1, 4), (6, 1, 3), (6, 6, 3), (6, 9, 3), (17, 4, 8), (40, 10, 5),
                                          (64, 16, 32), (64, 63, 2), (33, 33, 16)])
def test_divprune_matches_the_published_rule(n, keep, dim):
    for seed in range(3):
        x = random_tokens(n, dim, seed)
        kept = divprune(x, keep)
        assert kept.dtype == torch.long
        assert kept.tolist() == reference_divprune(x, keep)


@pytest.mark.parametrize("n, keep, dim, duplicates, zeros", [(20, 5, 4, 8, 0), (20, 18, 4, 12, 0), (30, 30, 6, 25, 0),
                                                             (16, 8, 3, 0, 3), (24, 20, 5, 10, 4)])
def test_divprune_duplicates_and_zero_vectors_tie_to_the_lower_index(n, keep, dim, duplicates, zeros):
    for seed in range(3):
        x = random_tokens(n, dim, seed, duplicates=duplicates, zeros=zeros)
        assert divprune(x, keep).tolist() == reference_divprune(x, keep)


def test_divprune_all_identical_keeps_the_first_tokens():
    x = torch.randn(1, 7).expand(12, 7)
    assert divprune(x, 5).tolist() == [0, 1, 2, 3, 4]


def test_divprune_batch_equals_each_row_and_takes_low_precision():
    x = torch.stack([random_tokens(48, 12, seed, duplicates=seed * 5) for seed in range(4)])  # (B, N, D)
    for keep in (1, 7, 48, 60):
        batched = divprune_batch(x, keep)
        assert batched.shape == (4, min(keep, 48))
        assert torch.equal(batched, torch.stack([divprune(row, keep) for row in x]))
    half = x.bfloat16()  # distances are fp32 whatever the input: bf16 tokens give their fp32 values' choice
    assert torch.equal(divprune_batch(half, 9), divprune_batch(half.float(), 9))


def test_divprune_batch_with_valid_equals_divprune_of_the_valid_tokens():
    x = torch.stack([random_tokens(30, 6, seed, duplicates=4) for seed in range(3)])  # (B, N, D)
    valid = torch.rand(3, 30, generator=torch.Generator().manual_seed(0)) < 0.6
    kept = divprune_batch(x, 8, valid=valid)
    for row, mask, chosen in zip(x, valid, kept):
        where = mask.nonzero()[:, 0]
        assert torch.equal(chosen, where[divprune(row[mask], 8)])
    with pytest.raises(ValueError, match="valid tokens"):
        divprune_batch(x, 31, valid=valid)


def test_divprune_is_ascending_and_deterministic():
    x = random_tokens(200, 24, 7)
    first, second = divprune(x, 50), divprune(x, 50)
    assert torch.equal(first, second)
    assert bool((first[1:] > first[:-1]).all())


# ---- adjacent-frame merging on a constructed video ---------------------------------------------------------------
FRAMES, SIDE, DIM = 4, 3, 16
POSITIONS = SIDE * SIDE


def static_background_video(seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """(F, P, D) features of a video whose background is static (the same token at each position in every frame)
    and whose shape moves one position per frame; and the flat indices where the shape is."""
    g = torch.Generator().manual_seed(seed)
    background = torch.randn(POSITIONS, DIM, generator=g)  # one token per position, (P, D)
    shape = torch.randn(DIM, generator=g)
    video = background.expand(FRAMES, POSITIONS, DIM).clone()  # (F, P, D)
    shape_at = [f * POSITIONS + f for f in range(FRAMES)]  # frame f: the shape at position f
    video.view(-1, DIM)[shape_at] = shape
    return video, shape_at


def expected_after_threshold_merging() -> list[int]:
    """Frame 0 whole; later, the shape's token and the background it uncovers (neither matches the previous frame)."""
    later = [[f * POSITIONS + f - 1, f * POSITIONS + f] for f in range(1, FRAMES)]
    return list(range(POSITIONS)) + [i for pair in later for i in pair]


@pytest.mark.parametrize("method", ["merge", "merge+divprune"])
def test_static_background_merges_and_the_moving_shape_does_not(method):
    video, shape_at = static_background_video()
    kept = expected_after_threshold_merging()  # 15 of 36: every static background token merged away
    reduced, indices = reduce_tokens(video[None], method, keep=len(kept), threshold=0.9)
    assert indices[0].tolist() == kept
    assert set(shape_at) <= set(indices[0].tolist())
    torch.testing.assert_close(reduced[0], video.view(-1, DIM)[kept])  # the mean of identical tokens


def test_merge_threshold_never_goes_below_keep_and_divprune_finishes():
    video, shape_at = static_background_video()
    reduced, indices = reduce_tokens(video[None], "merge+divprune", keep=6, threshold=0.9)
    assert reduced.shape == (1, 6, DIM)
    merged = video.view(-1, DIM)[expected_after_threshold_merging()]
    after = divprune(merged, 6)  # DivPrune over the merged tokens, mapped back to the input order
    assert indices[0].tolist() == [expected_after_threshold_merging()[i] for i in after.tolist()]
    loose, _ = reduce_tokens(video[None], "merge+divprune", keep=30, threshold=0.9)  # only 6 merges allowed
    strict, _ = reduce_tokens(video[None], "merge", keep=30)
    assert torch.equal(loose, strict)  # both take the 6 most similar pairs


def test_merged_value_is_the_mean_of_the_run_and_ties_go_to_the_lower_pair():
    run = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [-1.0, 0.0]])  # one position, 4 frames: (F, D)
    reduced, indices = reduce_tokens(run[:, None, :][None], "merge", keep=2)  # (B, F, P, D) = (1, 4, 1, 2)
    assert indices.tolist() == [[0, 3]]
    torch.testing.assert_close(reduced[0], torch.tensor([[0.9, 0.1], [-1.0, 0.0]]))
    onehot = torch.eye(4).expand(3, 4, 4)  # 3 identical frames, 4 positions: every pair has similarity exactly 1
    _, indices = reduce_tokens(onehot[None], "merge", keep=10)
    assert indices.tolist() == [[0, 1, 2, 3, 6, 7, 8, 9, 10, 11]]  # pairs 0 and 1: frame 1's positions 0 and 1


def test_flat_tokens_with_frames_equal_the_grid():
    videos = torch.randn(2, FRAMES, POSITIONS, DIM)
    for method in ("merge", "merge+divprune"):
        grid = reduce_tokens(videos, method, keep=12, threshold=0.0)
        flat = reduce_tokens(videos.flatten(1, 2), method, keep=12, frames=FRAMES, threshold=0.0)
        assert all(torch.equal(a, b) for a, b in zip(grid, flat))


def test_a_mixed_batch_stays_rectangular_ascending_and_deterministic():
    static, _ = static_background_video(0)
    moving, _ = static_background_video(1)
    noise = torch.randn(FRAMES, POSITIONS, DIM, generator=torch.Generator().manual_seed(2))
    batch = torch.stack([static, static.roll(1, dims=0), moving, noise]).bfloat16()  # (B, F, P, D)
    for method in REDUCTIONS:
        keep = None if method == "none" else 11
        reduced, indices = reduce_tokens(batch, method, keep=keep, threshold=0.5)
        count = FRAMES * POSITIONS if method == "none" else 11
        assert reduced.shape == (4, count, DIM) and indices.shape == (4, count) and reduced.dtype == torch.bfloat16
        assert bool((indices[:, 1:] > indices[:, :-1]).all())
        again = reduce_tokens(batch, method, keep=keep, threshold=0.5)
        assert torch.equal(reduced, again[0]) and torch.equal(indices, again[1])
        for video, row in zip(batch, indices):  # each video as if alone
            assert torch.equal(reduce_tokens(video[None], method, keep=keep, threshold=0.5)[1][0], row)


def test_keep_at_least_all_tokens_changes_nothing():
    videos = torch.randn(2, FRAMES, POSITIONS, DIM)
    for method in REDUCTIONS:
        reduced, indices = reduce_tokens(videos, method, keep=FRAMES * POSITIONS)
        assert torch.equal(reduced, videos.flatten(1, 2))
        assert indices.tolist() == [list(range(FRAMES * POSITIONS))] * 2


def test_reduce_tokens_refuses_what_it_cannot_do():
    queries = torch.randn(2, 64, DIM)  # a resampler's output: no frames
    with pytest.raises(ValueError, match="only support 'divprune'"):
        reduce_tokens(queries, "merge", keep=32)
    assert reduce_tokens(queries, "divprune", keep=32)[0].shape == (2, 32, DIM)
    videos = torch.randn(1, FRAMES, POSITIONS, DIM)
    with pytest.raises(ValueError, match="at least one token per position"):
        reduce_tokens(videos, "merge", keep=POSITIONS - 1)
    assert reduce_tokens(videos, "merge+divprune", keep=POSITIONS - 1)[0].shape == (1, POSITIONS - 1, DIM)
    with pytest.raises(ValueError, match="unknown token reduction"):
        reduce_tokens(videos, "fastv", keep=8)
    with pytest.raises(ValueError, match="keeps all"):
        reduce_tokens(videos, "none", keep=8)
    with pytest.raises(ValueError, match="frames=3"):
        reduce_tokens(videos, "merge", keep=20, frames=3)


def test_gradients_reach_the_kept_tokens_through_the_run_means():
    run = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [-1.0, 0.0]], requires_grad=True)  # (F, D), P = 1
    reduced, _ = reduce_tokens(run[:, None, :][None], "merge+divprune", keep=2, threshold=0.5)
    reduced.sum().backward()
    torch.testing.assert_close(run.grad, torch.tensor([[1 / 3] * 2] * 3 + [[1.0, 1.0]]))
    tokens = torch.randn(1, 20, 4, requires_grad=True)
    reduced, indices = reduce_tokens(tokens, "divprune", keep=5)
    reduced.sum().backward()
    assert tokens.grad[0].abs().sum(-1).nonzero()[:, 0].tolist() == indices[0].tolist()
