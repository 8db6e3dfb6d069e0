"""Videos and captions: frames, CLIP-exact preprocessing and caption manifests.

    video.mp4 ──read_frames──▶ uint8 RGB (F, H, W, 3) ──preprocess──▶ float (F, 3, S, S) ──collate──▶ (B, F, 3, S, S)
    manifest (.jsonl / .csv / .json) ──read_manifest──▶ [Sample(id, video, captions, split, attributes)]

Manifests. One sample per video with one or more captions; a video path is relative to the manifest's folder.
  JSONL (kovlm's own, what write_manifest writes), one object per line:
    {"id": "v001", "video": "videos/v001.mp4", "captions": ["빨간 원이 ...", "..."], "split": "train"}
  CSV: a header row with `video` and `caption` columns (optional `id`, `split`); one row per caption, rows of the
    same video are grouped (MSR-VTT style).
  JSON: a list of such objects, or {"annotations": [...]}; AI Hub-style keys are read too (`file_path`,
    `caption_ko`), and MSR-VTT's {"videos": [{"video_id", "split"}], "sentences": [{"video_id", "caption"}]}, where
    the video is `<video_dir or manifest folder>/<video_id>.mp4`.
  A row with a single `caption` string is one caption of a video and rows of the same id are merged; a row with a
  `captions` list is a whole sample, and its id may appear only once. A video listed under two ids is an error.

The synthetic Korean video dataset lives in synth.py; `python data.py synth OUT` writes it.
"""
import argparse
import csv
import io
import json
import logging
import os
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
# One OpenCV thread per process: the parallelism is DataLoader workers, and N OpenCV threads in each of N workers
# only fight over the cores.
cv2.setNumThreads(1)


class VideoError(ValueError):
    """A video that cannot be used; the message names the file, the problem and what to do."""


class ManifestError(ValueError):
    """A manifest that cannot be read; the message names the file, the line (or entry) and what is wrong."""


# ── frames ─────────────────────────────────────────────────────────────────────────────────────────────────────────
@dataclass
class FrameInfo:
    decoded: int        # frames that really decoded (the container's count is only a hint)
    indices: list[int]  # the decoded frames kept, in order
    repeated: bool      # fewer frames than asked for, so some were repeated
    reported: int       # the container's CAP_PROP_FRAME_COUNT (0 or -1 when it gives none)


def sample_indices(total: int, num_frames: int) -> list[int]:
    """The centre frame of each of `num_frames` equal segments of `total` frames (repeats when total < num_frames)."""
    return [(2 * k + 1) * total // (2 * num_frames) for k in range(num_frames)]


def _open_video(path: Path) -> cv2.VideoCapture:
    if not path.is_file():
        raise VideoError(f"{path}: no such file; check the video path (relative to the manifest's folder)")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file (0 bytes); copy it again or drop it from the manifest")
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not capture.isOpened():
        raise VideoError(f"{path}: not a readable video (not a video file, or a codec OpenCV's FFmpeg lacks); "
                         f"re-encode it (ffmpeg -i IN -c:v libx264 OUT.mp4) or drop it from the manifest")
    return capture


def _decode(path: Path, num_frames: int, total: int | None = None):
    """Decode every frame once and convert only the sampled ones; the sample is planned from `total`, or else from
    the container's count. Returns (frames by index, the indices, frames decoded, the container's count)."""
    capture, kept, count = _open_video(path), {}, 0
    reported = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    indices = sample_indices(max(reported, 0) if total is None else total, num_frames)
    wanted = set(indices)
    try:
        while capture.grab():  # grab() decodes; retrieve() adds the colour conversion, so only kept frames pay it
            if count in wanted:
                ok, bgr = capture.retrieve()
                if not ok:
                    raise VideoError(f"{path}: frame {count} decodes but cannot be retrieved; re-encode the video")
                kept[count] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            count += 1
    except cv2.error as error:
        raise VideoError(f"{path}: OpenCV failed at frame {count} ({str(error).strip().splitlines()[-1]}); "
                         f"re-encode the video or drop it") from None
    finally:
        capture.release()
    return kept, indices, count, reported


def read_frames(path, num_frames: int = 8, *, return_info: bool = False):
    """`num_frames` frames sampled uniformly over the video, uint8 RGB (F, H, W, 3); with return_info, (frames, info).

    The container's frame count is often wrong (variable frame rate, truncated files, edit lists), so it is only a
    plan: one sequential pass keeps the frames it points at and counts the frames that really decode; when the count
    differs, a second pass keeps the frames sampled from the true count. A video shorter than `num_frames` repeats
    frames, and info.repeated says so.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    path = Path(path)
    kept, indices, decoded, reported = _decode(path, num_frames)
    if decoded == 0:
        raise VideoError(f"{path}: opens but has zero decodable frames; the file is truncated or corrupt: "
                         f"re-encode it or drop it from the manifest")
    if decoded != reported:  # the container's count was wrong: sample from the frames that really decode
        kept, indices, _, _ = _decode(path, num_frames, total=decoded)
    if not set(indices) <= kept.keys() or len({frame.shape for frame in kept.values()}) != 1:
        raise VideoError(f"{path}: frames change between decoding passes or in size mid-stream; re-encode the video")
    frames = np.stack([kept[i] for i in indices])  # (F, H, W, 3)
    info = FrameInfo(decoded=decoded, indices=indices, repeated=decoded < num_frames, reported=reported)
    return (frames, info) if return_info else frames


# ── preprocessing (transformers' CLIPImageProcessor for openai/clip-vit-large-patch14-336) ───────────────────────
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_like_pil(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """PIL's Image.resize(BICUBIC) of uint8-valued float images (N, C, H, W) -> (N, C, height, width).

    PIL's bicubic is separable: a cubic kernel with a = -0.5 whose support widens by the downscale factor
    (antialiasing), applied along one axis and then the other, with the intermediate image rounded to uint8.
    torch's bicubic with antialias=True uses the same kernel and widening (it was written to match PIL), so two
    single-axis passes with rounding after each reproduce PIL to 1/255 (PIL's coefficients are fixed-point; torch's
    own uint8 path is 4x faster but up to 2/255 off). PIL runs the horizontal pass first, except (Pillow >= 13,
    python-pillow/Pillow#9549) when the height shrinks by more than twice as many pixels as the width; the order
    changes the rounding, so it is followed here. OpenCV's and torch's plain bicubic (a = -0.75, no widening) are
    10-150/255 off on edges and downscaled detail.
    """
    in_height, in_width = images.shape[-2:]
    vertical_first = height < in_height and in_height - height > 2 * (in_width - width)
    passes = [(height, in_width), (height, width)] if vertical_first else [(in_height, width), (height, width)]
    for size in passes:
        if tuple(images.shape[-2:]) != size:  # PIL skips a pass that keeps its axis's size
            images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)
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


# ── manifests ──────────────────────────────────────────────────────────────────────────────────────────────────────
@dataclass
class Sample:
    id: str
    video: Path
    captions: list[str]
    split: str | None = None
    attributes: dict | None = None


SPLITS = ("train", "val", "test")
_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "validate": "val", "dev": "val", "test": "test"}  # MSR-VTT says "validate"
_VIDEO_KEYS = ("video", "video_path", "file_path")  # kovlm's own key, then common layouts (AI Hub: file_path)


def _parse_row(row: dict, where: str, video_dir: Path) -> tuple[Sample, bool]:
    """One manifest row -> (Sample, whether it is a single-caption row that may be merged with rows of its id)."""
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: expected an object with a video and captions, got {type(row).__name__}")
    row = {key: value for key, value in row.items() if value not in (None, "")}  # empty CSV cells = absent
    video_key = next((key for key in _VIDEO_KEYS if key in row), None)
    if video_key is None and "video_id" not in row:
        raise ManifestError(f"{where}: no video field; give one of {', '.join(_VIDEO_KEYS)} or video_id")
    video = str(row[video_key]) if video_key else f"{row['video_id']}.mp4"
    caption_key = next((key for key in ("captions", "caption", "caption_ko") if key in row), None)
    if caption_key is None:
        raise ManifestError(f"{where}: no caption field; give captions (a list), caption or caption_ko")
    captions = row[caption_key] if isinstance(row[caption_key], list) else [row[caption_key]]
    for number, caption in enumerate(captions, 1):
        if not isinstance(caption, str) or not caption.strip():
            raise ManifestError(f"{where}: caption {number} is empty or not text ({caption!r}); write a caption "
                                f"or delete it")
    split = row.get("split")
    if split is not None and str(split).lower() not in _SPLIT_NAMES:
        raise ManifestError(f"{where}: unknown split {split!r}; use train, val or test")
    sample_id = str(row.get("id", row.get("video_id", Path(video).with_suffix("").as_posix())))
    sample = Sample(id=sample_id, video=Path(os.path.normpath(video_dir / video)),
                    captions=[caption.strip() for caption in captions],
                    split=_SPLIT_NAMES[str(split).lower()] if split is not None else None,
                    attributes=row.get("attributes"))
    return sample, caption_key != "captions" and len(captions) == 1


def _manifest_rows(path: Path, text: str) -> list[tuple[str, dict]]:
    """(where, row) pairs; `where` is "file:line" for JSONL and CSV and "file: entry k" for JSON."""
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ManifestError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})"
                                        ) from None
        return rows
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        return [(f"{path}:{reader.line_num}", row) for row in reader]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})") from None
    if isinstance(data, dict) and "sentences" in data:  # MSR-VTT: splits live in "videos", captions in "sentences"
        splits = {video.get("video_id"): video.get("split") for video in data.get("videos", [])
                  if isinstance(video, dict)}
        data = [dict(sentence, split=splits.get(sentence.get("video_id"))) if isinstance(sentence, dict) else sentence
                for sentence in data["sentences"]]
    elif isinstance(data, dict):
        data = next((data[key] for key in ("annotations", "samples", "data") if key in data), None)
    if not isinstance(data, list):
        raise ManifestError(f"{path}: expected a JSON list of samples, or an object with annotations / samples / "
                            f"data / sentences")
    return [(f"{path}: entry {number}", row) for number, row in enumerate(data, 1)]


def read_manifest(path, *, video_dir=None) -> list[Sample]:
    """Samples from a JSONL / CSV / JSON manifest (layouts in the module docstring). Video paths are resolved
    relative to `video_dir`, by default the manifest's folder."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".csv", ".json"):
        raise ManifestError(f"{path}: unknown manifest type {path.suffix!r}; use .jsonl, .csv or .json")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports start with a byte-order mark
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest file") from None
    except UnicodeDecodeError as error:
        raise ManifestError(f"{path}: not UTF-8 text (byte {error.start}); a CP949 / EUC-KR file converts with "
                            f"`iconv -f cp949 -t utf-8 IN > OUT`") from None
    samples, first_seen, mergeable, owner_of_video = {}, {}, {}, {}
    for where, row in _manifest_rows(path, text):
        sample, single_caption = _parse_row(row, where, Path(video_dir) if video_dir else path.parent)
        if sample.id in samples:
            earlier = samples[sample.id]
            if not (single_caption and mergeable[sample.id]):
                raise ManifestError(f"{where}: duplicate id {sample.id!r} (first at {first_seen[sample.id]}); "
                                    f"ids must be unique")
            if (earlier.video, earlier.split) != (sample.video, sample.split):
                raise ManifestError(f"{where}: id {sample.id!r} has another video or split than at "
                                    f"{first_seen[sample.id]}")
            earlier.captions.append(sample.captions[0])
            continue
        if sample.video in owner_of_video:
            raise ManifestError(f"{where}: video {sample.video} is listed twice (also as id "
                                f"{owner_of_video[sample.video]!r} at {first_seen[owner_of_video[sample.video]]})")
        samples[sample.id], first_seen[sample.id], mergeable[sample.id] = sample, where, single_caption
        owner_of_video[sample.video] = sample.id
    if not samples:
        raise ManifestError(f"{path}: no samples")
    return list(samples.values())


def write_manifest(samples: list[Sample], path) -> Path:
    """Write kovlm's JSONL manifest; video paths are stored relative to the manifest's folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        for sample in samples:
            row = {"id": sample.id, "video": Path(os.path.relpath(sample.video, path.parent)).as_posix(),
                   "captions": sample.captions}
            row |= {"split": sample.split} if sample.split else {}
            row |= {"attributes": sample.attributes} if sample.attributes is not None else {}
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def split_samples(samples: list[Sample], seed: int = 42, val_fraction: float = 0.1,
                  test_fraction: float = 0.1) -> dict[str, list[Sample]]:
    """{"train", "val", "test"} -> samples: the manifest's own splits when it has them, else a shuffle by `seed`."""
    unsplit = [sample.id for sample in samples if sample.split is None]
    if unsplit and len(unsplit) < len(samples):
        raise ValueError(f"{len(unsplit)} of {len(samples)} samples have no split (e.g. {unsplit[0]!r}); give every "
                         f"sample a split, or none to split by seed")
    if not unsplit:
        return {name: [sample for sample in samples if sample.split == name] for name in SPLITS}
    order = sorted(samples, key=lambda sample: sample.id)  # independent of manifest order
    random.Random(seed).shuffle(order)
    num_val, num_test = round(len(order) * val_fraction), round(len(order) * test_fraction)
    parts = {"val": order[:num_val], "test": order[num_val:num_val + num_test], "train": order[num_val + num_test:]}
    return {name: [replace(sample, split=name) for sample in parts[name]] for name in SPLITS}


def load_splits(train_manifest, *, val_manifest=None, test_manifest=None, seed: int = 42, val_fraction: float = 0.1,
                test_fraction: float = 0.1) -> dict[str, list[Sample]]:
    """The run's splits: the train manifest's own (or a seeded split of it), with val / test replaced by separate
    manifests where given."""
    splits = split_samples(read_manifest(train_manifest), seed=seed, val_fraction=val_fraction,
                           test_fraction=test_fraction)
    for name, manifest in (("val", val_manifest), ("test", test_manifest)):
        if manifest:
            splits[name] = read_manifest(manifest)
    if not splits["train"]:
        raise ValueError(f"{train_manifest}: no training samples")
    return splits


def check_videos(samples: list[Sample], num_frames: int = 8, *, skip_bad: bool = False,
                 max_bad_fraction: float = 0.05) -> list[Sample]:
    """Decode each video once. A bad one raises VideoError, or with skip_bad is logged with its path and dropped;
    more than `max_bad_fraction` bad videos abort with a summary (a broken data set is not trained on silently)."""
    good, bad = [], []
    for sample in samples:
        try:
            read_frames(sample.video, num_frames)
        except VideoError as error:
            if not skip_bad:
                raise
            log.warning("skipping a bad video: %s", error)
            bad.append(str(sample.video))
            if len(bad) > max_bad_fraction * len(samples):
                raise VideoError(f"at least {len(bad)} of {len(samples)} videos are bad, more than the "
                                 f"{max_bad_fraction:.0%} allowed (first: {', '.join(bad[:3])}); fix or drop them, "
                                 f"or allow a larger fraction") from None
            continue
        good.append(sample)
    if bad:
        log.warning("skipped %d of %d videos as bad", len(bad), len(samples))
    return good


class VideoCaptionDataset(torch.utils.data.Dataset):
    """Samples -> {"id", "video", "frames": float (F, 3, S, S), "captions"}; tokenization happens in vlm.py."""

    def __init__(self, samples: list[Sample], num_frames: int = 8, image_size: int = 336):
        self.samples, self.num_frames, self.image_size = samples, num_frames, image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        frames = preprocess(read_frames(sample.video, self.num_frames), self.image_size)
        return {"id": sample.id, "video": sample.video, "frames": frames, "captions": list(sample.captions)}


def collate(batch: list[dict]) -> dict:
    return {"ids": [item["id"] for item in batch], "videos": [item["video"] for item in batch],
            "frames": torch.stack([item["frames"] for item in batch]),  # (B, F, 3, S, S)
            "captions": [item["captions"] for item in batch]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="kovlm data tools")
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synth", help="write the synthetic Korean video dataset")
    synth.add_argument("out", type=Path)
    synth.add_argument("--num", type=int, default=500, help="videos in all splits")
    synth.add_argument("--seed", type=int, default=42)
    synth.add_argument("--num-val", type=int, default=None, help="default: 10%% of --num")
    synth.add_argument("--num-test", type=int, default=None, help="default: 10%% of --num")
    synth.add_argument("--size", type=int, default=64, help="frame side in pixels")
    synth.add_argument("--frames", type=int, default=16, help="frames per video")
    check = commands.add_parser("check", help="read a manifest and decode every video once")
    check.add_argument("manifest", type=Path)
    check.add_argument("--skip-bad", action="store_true", help="drop bad videos instead of stopping at the first")
    check.add_argument("--max-bad", type=float, default=0.05, help="abort when more than this fraction is bad")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    if args.command == "synth":
        from synth import synth_dataset  # synth.py builds on this module
        manifest = synth_dataset(args.out, args.num, args.seed, num_val=args.num_val, num_test=args.num_test,
                                 size=args.size, frames=args.frames)
        megabytes = sum(file.stat().st_size for file in (args.out / "videos").glob("*.mp4")) / 2**20
        log.info("wrote %s: %d videos, %.1f MiB, %.1f s", manifest, args.num, megabytes, time.perf_counter() - start)
    else:
        try:
            samples = read_manifest(args.manifest)
            good = check_videos(samples, skip_bad=args.skip_bad, max_bad_fraction=args.max_bad)
        except (ManifestError, VideoError) as error:
            raise SystemExit(f"error: {error}") from None  # one line, not a traceback
        log.info("%s: %d samples, %d usable videos, %.1f s", args.manifest, len(samples), len(good),
                 time.perf_counter() - start)


if __name__ == "__main__":
    main()
