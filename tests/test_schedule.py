"""The learning rate and the data order: pure functions of (seed, stage, epoch, step), so a resumed run sees the
same schedule and the same videos and captions as one that never stopped."""
import math

import pytest

from infra.schedule import epoch_caption_choice, epoch_windows, get_lr


def test_warmup_rises_linearly_to_the_peak_then_the_cosine_falls_to_zero():
    peak, total, warmup = 1e-3, 100, 10
    assert [get_lr(s, total, warmup, peak) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert get_lr(10, total, warmup, peak) == pytest.approx(peak)  # the cosine starts at the peak
    halfway = 10 + 45
    assert get_lr(halfway, total, warmup, peak) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert get_lr(total, total, warmup, peak) == pytest.approx(0.0, abs=1e-12)
    lrs = [get_lr(s, total, warmup, peak) for s in range(warmup, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_windows_cover_each_sample_once_per_epoch_and_differ_between_epochs():
    windows = epoch_windows(10, 3, seed=42, stage=1, epoch=0)
    assert len(windows) == 3 and all(len(w) == 3 for w in windows)  # 10 // 3 windows; the tail of 1 is dropped
    flat = [i for w in windows for i in w]
    assert len(set(flat)) == 9 and set(flat) <= set(range(10))
    assert windows == epoch_windows(10, 3, seed=42, stage=1, epoch=0)  # deterministic
    assert windows != epoch_windows(10, 3, seed=42, stage=1, epoch=1)
    assert windows != epoch_windows(10, 3, seed=42, stage=2, epoch=0)
    small = epoch_windows(2, 8, seed=0, stage=1, epoch=0)  # fewer samples than one window: one short window
    assert len(small) == 1 and sorted(small[0]) == [0, 1]


def test_each_video_draws_one_of_its_own_captions_per_epoch():
    counts = [1, 2, 5, 3] * 50
    choice = epoch_caption_choice(counts, seed=42, stage=1, epoch=0)
    assert all(0 <= c < n for c, n in zip(choice, counts))
    assert choice == epoch_caption_choice(counts, seed=42, stage=1, epoch=0)
    assert choice != epoch_caption_choice(counts, seed=42, stage=1, epoch=1)
    assert {c for c, n in zip(choice, counts) if n == 5} == set(range(5))  # every caption gets drawn
