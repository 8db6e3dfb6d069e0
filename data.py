"""Videos and captions: frames (of a whole video or a segment), CLIP-exact preprocessing, splits, bad videos.

    video.mp4 (+ span) ──read_frames──▶ uint8 RGB (F, H, W, 3) ──preprocess──▶ float (F, 3, S, S)
    manifest / label folder ──manifests.read_manifest──▶ [Sample] ──load_splits──▶ {"train", "val", "test"}

Manifest layouts live in manifests.py, the label files of real data sets (AI Hub, ActivityNet Captions) in
labels.py (both in formats/), the synthetic Korean video dataset in demo/synth.py (`python -m demo.synth OUT`).

    python data.py convert aihub LABELS_DIR VIDEOS_DIR --output train.jsonl [--split S] [--max-samples N]
    python data.py convert activitynet train.json VIDEOS_DIR --output train.jsonl [--split S] [--max-samples N]
    python data.py check MANIFEST_OR_LABEL_DIR     every bad row, label entry and video, all at once
convert never replaces an existing --output without --overwrite; its flags and output are checked before any label
file is read.
"""
import argparse
import bisect
import logging
import random
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from formats.labels import SPAN_TOLERANCE
from formats.manifests import ManifestError, Sample, convert_labels, read_manifest, subset_samples, write_manifest
from infra import options
from infra.errors import UserError, user_errors
from infra.paths import check_output_file, file_problem

log = logging.getLogger(__name__)
# One OpenCV thread per process: the parallelism is DataLoader workers, and N OpenCV threads in each of N workers
# only fight over the cores.
cv2.setNumThreads(1)
SPLITS = ("train", "val", "test")
__all__ = ["ManifestError", "Sample", "read_manifest", "write_manifest"]  # re-exported: callers import them from here


class VideoError(UserError):
    """A video that cannot be used; the message names the file, the problem and what to do."""


# ── frames ─────────────────────────────────────────────────────────────────────────────────────────────────────────
def sample_indices(total: int, num_frames: int) -> list[int]:
    """The centre frame of each of `num_frames` equal segments of `total` frames (repeats when total < num_frames)."""
    return [(2 * k + 1) * total // (2 * num_frames) for k in range(num_frames)]


def _open_video(path: Path) -> cv2.VideoCapture:
    if problem := file_problem(path):  # missing, a symbolic link loop, a folder, a FIFO or device
        advice = "check the video path (relative to the manifest's folder)" if problem.startswith("no such") else \
            "give a video file"
        raise VideoError(f"{path}: {problem}; {advice}")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file (0 bytes); copy it again or drop it from the manifest")
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not capture.isOpened():
        raise VideoError(f"{path}: not a readable video (not a video file, or a codec OpenCV's FFmpeg lacks); "
                         f"re-encode it (ffmpeg -i IN -c:v libx264 OUT.mp4) or drop it from the manifest")
    return capture


def _decode(path: Path, wanted, stop: float | None = None) -> tuple[dict, list[float], bool]:
    """One pass in presentation order: (the wanted frames by index, converted to RGB; every decoded frame's time in
    seconds; whether decoding stopped at `stop`, the first frame shown at or after it, before the file's end).
    `wanted` is a set of indices, or a function of the container's frame count (a plan, not to be trusted)."""
    capture, kept, times = _open_video(path), {}, []
    if callable(wanted):
        wanted = wanted(max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0))
    try:
        while capture.grab():  # grab() decodes; retrieve() adds the colour conversion, so only kept frames pay it
            time_s = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000  # the frame's own timestamp, B-frames reordered
            if stop is not None and time_s >= stop:
                return kept, times, True
            if len(times) in wanted:
                ok, bgr = capture.retrieve()
                if not ok:
                    raise VideoError(f"{path}: frame {len(times)} decodes but cannot be retrieved; re-encode it")
                kept[len(times)] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            times.append(time_s)
    except cv2.error as error:
        raise VideoError(f"{path}: OpenCV failed at frame {len(times)} ({str(error).strip().splitlines()[-1]}); "
                         f"re-encode the video or drop it") from None
    finally:
        capture.release()
    return kept, times, False


def _span_frames(path: Path, times: list[float], start: float, end: float, num_frames: int,
                 stopped: bool) -> list[int]:
    """The frames on screen at the centres of `num_frames` equal parts of [start, end): chosen by decoded time, never
    by frame count or frame rate, so a variable frame rate samples the span evenly in time."""
    if not stopped:  # decoding reached the end of the file before `end`
        last = times[-1] + (times[-1] - times[-2] if len(times) > 1 else 0)  # when the last frame stops showing
        if end > last + SPAN_TOLERANCE:
            raise VideoError(f"{path}: the span {start:g}-{end:g} s ends after the video ({last:.2f} s); fix the "
                             f"segment's timestamps")
    targets = [start + (2 * k + 1) * (end - start) / (2 * num_frames) for k in range(num_frames)]
    return [max(bisect.bisect_right(times, target) - 1, 0) for target in targets]  # the last frame shown by then


def read_frames(path, num_frames: int = 8, start: float | None = None, end: float | None = None) -> np.ndarray:
    """`num_frames` frames sampled uniformly over the video, or over the span [start, end) seconds of it: uint8 RGB
    (F, H, W, 3). A span is sampled by the frames' own presentation times (H.264 B-frames and variable frame rates
    give the frames shown inside it). The container's frame count is often wrong (variable frame rate,
    truncated files, edit lists), so it is only a plan for one pass; when the frames that really decode differ,
    a second pass keeps those sampled from the true count. Fewer frames than `num_frames` are repeated."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if (start is None) != (end is None) or (start is not None and not 0 <= start < end):
        raise UserError(f"{path}: a span needs 0 <= start < end seconds, got start={start}, end={end}")
    path = Path(path)
    if start is None:
        kept, times, _ = _decode(path, lambda reported: set(sample_indices(reported, num_frames)))
    else:
        kept, times, stopped = _decode(path, set(), stop=end)
    if not times:
        raise VideoError(f"{path}: opens but has zero decodable frames; the file is truncated or corrupt: "
                         f"re-encode it or drop it from the manifest")
    indices = sample_indices(len(times), num_frames) if start is None else _span_frames(path, times, start, end,
                                                                                       num_frames, stopped)
    if not set(indices) <= kept.keys():
        kept, _, _ = _decode(path, set(indices), stop=end)
    if not set(indices) <= kept.keys() or len({frame.shape for frame in kept.values()}) != 1:
        raise VideoError(f"{path}: frames change between decoding passes or in size mid-stream; re-encode the video")
    return np.stack([kept[i] for i in indices])  # (F, H, W, 3)


# ── preprocessing (transformers' CLIPImageProcessor for openai/clip-vit-large-patch14-336) ───────────────────────
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_like_pil(images: torch.Tensor, height: int, width: int, mode: str = "bicubic") -> torch.Tensor:
    """PIL's Image.resize(BICUBIC or BILINEAR) of uint8-valued float images (N, C, H, W) -> (N, C, height, width).

    PIL's bicubic is separable: a cubic kernel with a = -0.5 whose support widens by the downscale factor
    (antialiasing), applied along one axis and then the other, with the intermediate image rounded to uint8.
    torch's bicubic with antialias=True uses the same kernel and widening (it was written to match PIL), so two
    single-axis passes with rounding after each reproduce PIL to 1/255 (PIL's coefficients are fixed-point; torch's
    own uint8 path is 4x faster but up to 2/255 off). PIL runs the horizontal pass first, except (Pillow >= 13,
    python-pillow/Pillow#9549) when the height shrinks by more than twice as many pixels as the width; the order
    changes the rounding, so it is followed here. OpenCV's and torch's plain bicubic (a = -0.75, no widening) are
    10-150/255 off on edges and downscaled detail. mode="bilinear" is PIL's BILINEAR the same way (a triangle
    kernel widened by the downscale factor; torch's antialiased bilinear matches it).
    """
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"resize_like_pil reproduces PIL's bicubic and bilinear, not {mode!r}")
    in_height, in_width = images.shape[-2:]
    vertical_first = height < in_height and in_height - height > 2 * (in_width - width)
    passes = [(height, in_width), (height, width)] if vertical_first else [(in_height, width), (height, width)]
    for size in passes:
        if tuple(images.shape[-2:]) != size:  # PIL skips a pass that keeps its axis's size
            images = F.interpolate(images, size=size, mode=mode, antialias=True, align_corners=False)
            images = images.round_().clamp_(0, 255)  # the uint8 intermediate image
    return images


def preprocess(frames: np.ndarray, size: int = 336) -> torch.Tensor:
    """uint8 RGB frames (F, H, W, 3) -> float (F, 3, size, size), CLIPImageProcessor's numbers: the short side
    resized to `size` (bicubic, as PIL), a centre crop of size x size, x 1/255, then CLIP's mean and std."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"preprocess expects uint8 RGB frames (F, H, W, 3), got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    short, long = min(height, width), max(height, width)
    long = int(size * long / short)  # transformers' get_resize_output_image_size truncates the long side
    out_height, out_width = (long, size) if height > width else (size, long)
    # (F, H, W, 3) -> (F, 3, H, W) as a view: channels-last in memory, which torch's resampling runs 1.5x faster on
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = resize_like_pil(x, out_height, out_width)
    top, left = (out_height - size) // 2, (out_width - size) // 2
    x = x[:, :, top:top + size, left:left + size] / 255  # (F, 3, size, size)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


# ── splits ─────────────────────────────────────────────────────────────────────────────────────────────────────────
def split_samples(samples: list[Sample], seed: int = 42, val_fraction: float = 0.1,
                  test_fraction: float = 0.1) -> dict[str, list[Sample]]:
    """{"train", "val", "test"} -> samples: the manifest's own splits when it has them, else a shuffle by `seed` of
    whole videos, so segments of one video never land in two splits."""
    unsplit = [sample.id for sample in samples if sample.split is None]
    if unsplit and len(unsplit) < len(samples):
        raise UserError(f"{len(unsplit)} of {len(samples)} samples have no split (e.g. {unsplit[0]!r}); give every "
                         f"sample a split, or none to split by seed")
    if not unsplit:
        return {name: [sample for sample in samples if sample.split == name] for name in SPLITS}
    by_video = {}
    for sample in sorted(samples, key=lambda sample: sample.id):  # independent of manifest order
        by_video.setdefault(sample.video, []).append(sample)
    videos = list(by_video)
    random.Random(seed).shuffle(videos)
    num_val, num_test = round(len(samples) * val_fraction), round(len(samples) * test_fraction)
    parts = {name: [] for name in SPLITS}
    for video in videos:  # whole videos, in shuffled order, until val and then test hold their share of samples
        name = "val" if len(parts["val"]) < num_val else "test" if len(parts["test"]) < num_test else "train"
        parts[name] += [replace(sample, split=name) for sample in by_video[video]]
    return parts


def load_splits(train_manifest, *, val_manifest=None, test_manifest=None, seed: int = 42, val_fraction: float = 0.1,
                test_fraction: float = 0.1, max_samples: int | None = None) -> dict[str, list[Sample]]:
    """The run's splits: the train manifest's own (or a seeded split of it), with val / test replaced by separate
    manifests where given. `max_samples` draws a seeded subset of the train manifest, stratified by its splits."""
    samples = read_manifest(train_manifest)
    if max_samples is not None:
        samples = subset_samples(samples, max_samples, seed)
    splits = split_samples(samples, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    for name, manifest in (("val", val_manifest), ("test", test_manifest)):
        if manifest:
            splits[name] = read_manifest(manifest)
    if not splits["train"]:
        raise UserError(f"{train_manifest}: no training samples")
    return splits


def check_splits(splits: dict[str, list[Sample]]) -> None:
    """Refuse a run whose train, val or test split is missing or empty, or whose samples lack a caption."""
    for name in SPLITS:
        if not splits.get(name):
            raise UserError(f"the {name} split is empty; give the manifest {name} samples, a --{name}-manifest"
                             + (f", or a --{name}-fraction above 0" if name != "train" else ""))
        for sample in splits[name]:
            if not any(isinstance(caption, str) and caption.strip() for caption in sample.captions):
                raise UserError(f"{sample.where or name}: sample {sample.id!r} has no caption; write one or drop it")


# ── bad videos ─────────────────────────────────────────────────────────────────────────────────────────────────────
class BadVideos:
    """The one policy for bad videos (README, "Frames"): without skip_bad the first stops the run;
    with it each is reported with its path and dropped, and more than `max_bad_fraction` of `total` aborts."""

    def __init__(self, total: int, *, skip_bad: bool = False, max_bad_fraction: float = 0.05):
        self.total, self.skip_bad, self.max_bad_fraction, self.bad = total, skip_bad, max_bad_fraction, []

    def report(self, error: VideoError) -> None:
        if not self.skip_bad:
            raise error
        self.bad.append(str(error))
        log.warning("skipping a bad video (%d of %d so far): %s", len(self.bad), self.total, error)
        if len(self.bad) > self.max_bad_fraction * self.total:
            raise VideoError(f"at least {len(self.bad)} of {self.total} videos are bad, more than the "
                             f"{self.max_bad_fraction:.0%} allowed (first: {self.bad[0]}); fix or drop them, or "
                             f"allow a larger --max-bad-fraction") from None

    def summarise(self) -> None:
        if self.bad:
            log.warning("skipped %d of %d videos as bad", len(self.bad), self.total)


# ── command line ───────────────────────────────────────────────────────────────────────────────────────────────────
def check(path: Path, num_frames: int = 8) -> tuple[int, list[str]]:
    """(samples, problems): every bad row, label entry and video of a manifest or label folder, all at once."""
    problems = []
    samples = read_manifest(path, problems=problems)
    for sample in samples:
        try:
            read_frames(sample.video, num_frames, sample.start, sample.end)
        except VideoError as error:
            problems.append(f"{sample.where}: {error}")
    return len(samples), problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="kovlm data tools")
    commands = parser.add_subparsers(dest="command", required=True)
    convert_parser = commands.add_parser("convert", help="write a manifest from AI Hub labels or ActivityNet")
    convert_parser.add_argument("source", choices=("aihub", "activitynet"))
    convert_parser.add_argument("labels", type=Path, help="AI Hub label folder, or ActivityNet Captions JSON")
    convert_parser.add_argument("videos", type=Path, help="folder searched (recursively) for the videos")
    convert_parser.add_argument("--output", type=Path, required=True, help="the manifest to write (.jsonl)")
    convert_parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    convert_parser.add_argument("--split", choices=SPLITS, default=None, help="split of every row written")
    convert_parser.add_argument("--max-samples", type=int, default=None, help="a seeded subset of this size")
    convert_parser.add_argument("--seed", type=int, default=42)
    check_parser = commands.add_parser("check", help="list every bad row, label entry and video at once")
    check_parser.add_argument("manifest", type=Path, help="a manifest, or a folder of AI Hub label files")
    check_parser.add_argument("--frames", type=int, default=8, help="frames decoded per sample")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    check_command(args)
    if args.command == "convert":
        problems = convert_labels(args.source, args.labels, args.videos, args.output, split=args.split,
                           max_samples=args.max_samples, seed=args.seed)
        for problem in problems:
            log.warning("%s", problem)
        log.info("wrote %s (%d problems listed above), %.1f s", args.output, len(problems),
                 time.perf_counter() - start)
        return
    count, problems = check(args.manifest, args.frames)
    for problem in problems:
        log.error("%s", problem)
    if problems:
        raise UserError(f"{args.manifest}: {len(problems)} problems in {count} samples (listed above)")
    log.info("%s: %d samples, every video usable, %.1f s", args.manifest, count, time.perf_counter() - start)


def check_command(args: argparse.Namespace) -> None:
    """The flags and files, before any label file, manifest or video is read."""
    if args.command == "check":
        options.at_least("frames", args.frames, 1)
        return
    if args.max_samples is not None:
        options.at_least("max_samples", args.max_samples, 1)
    for given in (args.labels, args.videos):
        if not given.exists():
            raise UserError(f"{given}: no such file or folder")
    check_output_file(args.output, overwrite=args.overwrite)


if __name__ == "__main__":
    with user_errors():
        main()
