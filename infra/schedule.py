"""When the loop does what: the learning rate of each optimizer step and the order in which videos and their
reference captions are seen. Pure functions of (seed, stage, epoch, step), so a resumed run sees the same order."""
import math

import numpy as np
import torch


def get_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warmup to peak_lr, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_windows(num_samples: int, window_size: int, seed: int, stage: int, epoch: int) -> list[list[int]]:
    """The epoch's shuffled sample indices cut into optimizer-step windows (an incomplete tail is dropped,
    unless the whole epoch is smaller than one window)."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 1000 + stage * 100 + epoch))
    count = max(1, num_samples // window_size)
    return [order[i * window_size:(i + 1) * window_size].tolist() for i in range(count)]


def epoch_caption_choice(captions_per_sample: list[int], seed: int, stage: int, epoch: int) -> list[int]:
    """Which reference caption each video trains on this epoch: drawn per epoch, the same on every process."""
    rng = np.random.default_rng([seed, stage, epoch])
    return [int(rng.integers(count)) for count in captions_per_sample]
