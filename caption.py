"""Captions for videos nobody labelled, from a trained checkpoint or an export.py folder.

    python caption.py runs/perceiver_dora/checkpoints/best_model.pt clip.mp4 my_videos/ [--output captions.jsonl]
    python caption.py exported/ my_videos/ --recursive --output out/captions.jsonl --report

A PATH is a video file, a folder (its video files, sorted; --recursive descends) or a manifest (.jsonl / .csv /
.json: its videos). One `path<TAB>caption` line per video is printed as captions arrive; --output writes JSONL, a
header record with the decoding settings first, then {"video": path, "caption": text}, atomically at the end. A bad
input (missing, not a video, zero frames, a codec OpenCV cannot decode) gets one stderr line naming it and why;
every other video is still captioned, and the exit status is 1 when any input failed.

The model sees what it saw in training: the checkpoint's frames, image size, tower layer, and, when it was trained
from the feature cache, features rounded to the cache's fp16. Videos are decoded and preprocessed by a pool of
background threads (OpenCV and torch release the GIL), a few batches ahead of the tower and the LM; the feature
cache (one entry per video, and one per segment of a manifest) is read and filled only with --cache-dir.
"""
import argparse
import json
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from infra.checkpoint import atomic_write_text, load_checkpoint, peak_memory
from data import VideoError, read_frames
from infra.distributed import compute_dtype, default_device
from infra.errors import user_errors
from evaluate import DEFAULT_DECODING, add_decoding_options, add_reduction_checks, check_asked_reduction, \
    decoding_from_args, rebuild_model
from export import load_exported
from features import CACHE_DTYPE, FeatureCache, feature_cache_for
from formats.labels import VIDEO_SUFFIXES
from formats.manifests import ManifestError, Sample, read_manifest
from report import render_report

MANIFEST_SUFFIXES = {".jsonl", ".csv", ".json"}


@dataclass(frozen=True)
class Clip:
    """A video to caption: a whole file, or the span [start, end) seconds of it (a manifest's segment)."""
    video: Path
    start: float | None = None
    end: float | None = None

    @property
    def name(self) -> str:
        return str(self.video) if self.start is None else f"{self.video}#{self.start:g}-{self.end:g}"

    def as_sample(self) -> Sample:
        """What the feature cache keys an entry by: the video's content and the span (none for a whole video)."""
        return Sample(self.name, self.video, [], start=self.start, end=self.end)


def collect_videos(paths: list[str], recursive: bool = False) -> tuple[list[Clip], list[tuple[str, str]]]:
    """(the clips to caption, in order; (input, why) for each input that names none)."""
    videos, failures = [], []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in (path.rglob("*") if recursive else path.iterdir())
                           if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
            videos += map(Clip, found)
            if not found:
                failures.append((str(path), "a folder without video files" +
                                 ("" if recursive else "; --recursive looks into its subfolders")))
        elif path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
            try:
                videos += [Clip(s.video, s.start, s.end) for s in read_manifest(path)]
            except ManifestError as error:
                failures.append((str(path), str(error)))
        elif not path.exists():
            failures.append((str(path), "no such file or folder"))
        else:
            videos.append(Clip(path))  # any other file is tried as a video: the decoder says whether it is one
    return videos, failures


def load_captioner(path, *, clip=None, llm=None, device, dtype: str | None = None):
    """(model, features_dtype, description) from a checkpoint file or an export.py folder."""
    if Path(path).is_dir():
        model, info = load_exported(path, clip=clip, device=device, dtype=dtype)
        return model, getattr(torch, info["features_dtype"]) if info["features_dtype"] else None, info
    checkpoint = load_checkpoint(path)
    train_config = checkpoint["train_config"]
    model = rebuild_model(checkpoint, clip=clip, llm=llm, device=device,
                          dtype=compute_dtype(dtype or train_config["dtype"], device))
    return model.eval(), CACHE_DTYPE if train_config["feature_cache"] else None, {"checkpoint": str(path)}


def prefetch(function, items: list, ahead: int, workers: int):
    """(item, function(item)) for each item in order, computed up to `ahead` items in advance by `workers` threads."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque()
        for item in items:
            pending.append((item, pool.submit(function, item)))
            if len(pending) > ahead:
                item, future = pending.popleft()
                yield item, future.result()
        while pending:
            item, future = pending.popleft()
            yield item, future.result()


class VideoReader:
    """A clip -> ("features", (F, P, Dv)) from the cache, ("pixels", (F, 3, S, S)) to encode, or ("error", why).
    A segment has its own cache entry, apart from its whole video's."""

    def __init__(self, model, cache: FeatureCache | None):
        self.num_frames, self.preprocess, self.cache = model.config.num_frames, model.vision.preprocess, cache

    def __call__(self, clip: Clip):
        try:
            if self.cache is not None and (features := self.cache.load(clip.as_sample())) is not None:
                return "features", features
            frames = read_frames(clip.video, self.num_frames, start=clip.start, end=clip.end)  # (F, H, W, 3)
            return "pixels", self.preprocess(frames)  # (F, 3, S, S), the tower's own processor
        except (VideoError, OSError) as error:
            return "error", str(error)


@torch.no_grad()
def caption_batch(model, batch: list, cache: FeatureCache | None, features_dtype, *, max_new_tokens: int,
                  decoding: dict) -> list[str]:
    """Captions of one batch of (video, (kind, tensor)) items: pixels go through the tower (and into the cache)."""
    device = next(model.projector.parameters()).device
    to_encode = [i for i, (_, (kind, _)) in enumerate(batch) if kind == "pixels"]
    features = [tensor for _, (_, tensor) in batch]
    if to_encode:
        encoded = model.encode_video(torch.stack([features[i] for i in to_encode]).to(device))  # (b, F, P, Dv)
        for i, row in zip(to_encode, encoded):
            features[i] = row
            if cache is not None:
                cache.save(batch[i][0].as_sample(), row)
    stacked = torch.stack([f.to(device) for f in features])  # (B, F, P, Dv)
    if features_dtype is not None:
        stacked = stacked.to(features_dtype)
    return model.generate(stacked, max_new_tokens=max_new_tokens, **decoding)


def caption_videos(model, videos: list[Clip], *, batch_size: int = 16, max_new_tokens: int = 64,
                   decoding: dict | None = None, cache: FeatureCache | None = None, features_dtype=None,
                   workers: int = 4, on_caption=None, on_failure=None) -> tuple[list[dict], list[tuple[str, str]]]:
    """({"video", "caption"} per good clip in input order (with "start" / "end" for a segment), (clip, why) per
    bad one); the callbacks see each as it comes."""
    decoding = DEFAULT_DECODING | (decoding or {})
    records, failures, batch = [], [], []

    def flush():
        captions = caption_batch(model, batch, cache, features_dtype, max_new_tokens=max_new_tokens,
                                 decoding=decoding)
        for (clip, _), caption in zip(batch, captions):
            span = {} if clip.start is None else {"start": clip.start, "end": clip.end}
            records.append({"video": str(clip.video), **span, "caption": caption})
            if on_caption:
                on_caption(records[-1])
        batch.clear()

    for video, (kind, item) in prefetch(VideoReader(model, cache), videos, ahead=2 * batch_size, workers=workers):
        if kind == "error":
            failures.append((video.name, item))
            if on_failure:
                on_failure(*failures[-1])
            continue
        batch.append((video, (kind, item)))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return records, failures


def write_captions(path: Path, header: dict, records: list[dict]) -> None:
    lines = [json.dumps({"header": header}, ensure_ascii=False)] + [json.dumps(r, ensure_ascii=False) for r in records]
    atomic_write_text(path, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a model checkpoint (best_model.pt, ...) or an export.py folder")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="video files, folders of videos, or manifests")
    parser.add_argument("--recursive", action="store_true", help="look for videos in subfolders too")
    parser.add_argument("--output", help="write the captions here as JSONL (a header record first)")
    parser.add_argument("--report", action="store_true", help="also write report.html beside --output")
    parser.add_argument("--vision", "--clip", dest="clip", metavar="DIR", help="vision tower folder instead of the "
                        "one the checkpoint names (--clip is an alias of --vision)")
    parser.add_argument("--llm", help="Qwen3 folder instead of the one the checkpoint names (checkpoints only)")
    parser.add_argument("--cache-dir", help="read and fill a feature cache here (off by default)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--workers", type=int, default=4, help="background threads decoding videos")
    add_decoding_options(parser)
    add_reduction_checks(parser)
    args = parser.parse_args(argv)
    with user_errors():
        if args.report and not args.output:
            raise ValueError("--report writes report.html beside --output; give --output FILE.jsonl too")
        return run(args)


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device) if args.device else default_device()
    model, features_dtype, source = load_captioner(args.checkpoint, clip=args.clip, llm=args.llm, device=device,
                                                   dtype=args.dtype)
    check_asked_reduction(asdict(model.config), args.token_reduction, args.visual_tokens)
    cache = feature_cache_for(model, args.cache_dir) if args.cache_dir else None
    videos, failures = collect_videos(args.paths, args.recursive)
    for path, why in failures:
        print(f"{path}: {why}", file=sys.stderr)
    progress = tqdm(total=len(videos), desc="captioning", unit="video", file=sys.stderr, disable=len(videos) < 20)

    def show(record):
        name = Clip(record["video"], record.get("start"), record.get("end")).name
        tqdm.write(f"{name}\t{record['caption']}", file=sys.stdout)
        progress.update()

    def complain(video, why):
        tqdm.write(why if why.startswith(video) else f"{video}: {why}", file=sys.stderr)
        progress.update()

    started = time.perf_counter()
    records, bad = caption_videos(model, videos, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                  decoding=decoding_from_args(args), cache=cache, features_dtype=features_dtype,
                                  workers=args.workers, on_caption=show, on_failure=complain)
    seconds = time.perf_counter() - started
    progress.close()
    speed = f"{len(records) / seconds:.2f} captions/s" if seconds else "-"
    print(f"{len(records)} captions, {len(bad) + len(failures)} failed inputs, {seconds:.1f} s ({speed}), "
          f"{peak_memory(device)}", file=sys.stderr)
    if args.output:
        header = {**source, "decoding": {"max_new_tokens": args.max_new_tokens, **decoding_from_args(args)},
                  "num_frames": model.config.num_frames, "captions_per_s": len(records) / seconds if seconds else None}
        write_captions(Path(args.output), header, records)
        if args.report:
            page = render_report("kovlm captions", {**source, "videos": len(records), "speed": speed,
                                                    "decoding": header["decoding"]}, None,
                                 [r | {"prediction": r["caption"]} for r in records],
                                 num_frames=model.config.num_frames)
            atomic_write_text(Path(args.output).with_name("report.html"), page)
    return 1 if bad or failures else 0


if __name__ == "__main__":
    sys.exit(main())
