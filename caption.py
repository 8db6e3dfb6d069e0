"""Captions for videos nobody labelled, from a trained checkpoint or an export.py folder.

    python caption.py runs/perceiver_dora/checkpoints/best_model.pt clip.mp4 my_videos/ [--output captions.jsonl]
    python caption.py exported/ my_videos/ --recursive --output out/captions.jsonl --report
    python caption.py exported/ my_videos/ --output out/captions.jsonl --resume   # after an interruption

A PATH is a video file, a folder (its video files, sorted; --recursive descends) or a manifest (.jsonl / .csv /
.json: its videos and spans; captions are not needed, and a bad row is reported by its line while the others are
captioned). One `path<TAB>caption` line per video is printed as captions arrive; --output appends the same to a
JSONL file as each caption is made (a header record with the decoding settings first, then {"video": path,
"caption": text}, one complete, flushed line at a time), so an interrupted run keeps every caption made; --resume
continues such a file, skipping the videos already in it. An existing --output is never replaced without
--overwrite. A bad input (missing, not a video, zero frames, a codec OpenCV cannot decode) gets one stderr line
naming it and why; every other video is still captioned, and the exit status is 1 when any input failed. The flags,
the inputs, the output files and the LM's position limit are checked before a model is loaded.

The model sees what it saw in training: the checkpoint's frames, image size, tower layer, and, when it was trained
from the feature cache, features rounded to the cache's fp16. Videos are decoded and preprocessed by a pool of
background threads (OpenCV and torch release the GIL), a few batches ahead of the tower and the LM; the feature
cache (one entry per video, and one per segment of a manifest) is read and filled only with --cache-dir.
"""
import os

# torch's OpenMP threads busy-wait (spin) between operations by default; on cores shared with other processes a
# spinning thread holds the core the captioning thread is waiting for, and the many small operations of decoding
# one token at a time run many times slower (results/README.md). libgomp reads the policy once, when torch loads it,
# so it is set before torch is imported; a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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

from data import VideoError, read_frames
from evaluate import DEFAULT_DECODING, add_decoding_options, add_reduction_checks, check_asked_reduction, \
    decoding_from_args, rebuild_model
from export import load_exported, read_export_info
from features import CACHE_DTYPE, FeatureCache, feature_cache_for
from formats.labels import VIDEO_SUFFIXES
from formats.manifests import ManifestError, Sample, read_manifest
from infra import options
from infra.checkpoint import atomic_write_text, load_checkpoint, peak_memory
from infra.distributed import compute_dtype, default_device
from infra.errors import UserError, user_errors
from infra.paths import check_output_file, check_output_folder, file_problem
from infra.preflight import check_bases, check_checkpoint, run_folder_of
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
            problems = []
            try:
                videos += [Clip(s.video, s.start, s.end) for s in read_manifest(path, problems=problems,
                                                                                need_captions=False)]
            except ManifestError as error:
                problems.append(str(error))
            failures += [(str(path), problem) for problem in problems]  # each names its line
        elif problem := file_problem(path):  # missing, a symbolic link loop, a FIFO or device
            failures.append((str(path), problem))
        else:
            videos.append(Clip(path))  # any other file is tried as a video: the decoder says whether it is one
    return videos, failures


def load_captioner(path, *, clip=None, llm=None, device, dtype: str | None = None, quant: str | None = None):
    """(model, features_dtype, description) from a checkpoint file or an export.py folder (its merged LM stored as
    exported, or in `quant`: nf4 / int8)."""
    if Path(path).is_dir():
        model, info = load_exported(path, clip=clip, device=device, dtype=dtype, quant=quant)
        return model, getattr(torch, info["features_dtype"]) if info["features_dtype"] else None, info
    checkpoint = check_checkpoint(load_checkpoint(path), path)
    train_config = checkpoint["train_config"]
    model = rebuild_model(checkpoint, clip=clip, llm=llm, device=device,
                          dtype=compute_dtype(dtype or train_config["dtype"], device), where=str(path))
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


class CaptionFile:
    """--output: JSONL appended one complete line per caption (one write of the whole line, flushed), so an
    interrupted run keeps every caption made. A new file starts with the header record; --resume appends to an
    existing one after checking that it was written with the same model and decoding settings."""

    def __init__(self, path: Path, header: dict, *, resume: bool):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "r+b" if resume and self.path.exists() else "w+b", buffering=0)
        complete = self.file.read().rfind(b"\n") + 1  # a line cut off by an interruption is dropped
        self.file.truncate(complete)
        self.file.seek(complete)
        if complete == 0:
            self.append({"header": header})

    def append(self, record: dict) -> None:
        try:
            self.file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        except OSError as error:  # a plain write names no file
            raise OSError(error.errno, error.strerror, str(self.path)) from None

    def close(self) -> None:
        self.file.close()


def read_caption_file(path: Path, header: dict) -> list[dict]:
    """The caption records of an earlier run's --output (for --resume); refused when its header names another model
    or other decoding settings. A last line cut off by an interruption is left out (CaptionFile drops it)."""
    data = path.read_bytes()
    lines = data[:data.rfind(b"\n") + 1].decode("utf-8", errors="replace").splitlines()
    try:
        saved = json.loads(lines[0])["header"] if lines else None
        records = [json.loads(line) for line in lines[1:] if line.strip()]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"--output {path}: not a caption.py JSONL file (no header record, or a line that is not "
                        f"JSON); choose another --output, or --overwrite it") from None
    if saved is None:
        return []
    for key in ("source", "decoding", "num_frames"):
        if saved.get(key) != header[key]:
            raise UserError(f"--output {path} was written with another {key} ({json.dumps(saved.get(key))}, now "
                            f"{json.dumps(header[key])}); --resume it with the same model and flags, or choose "
                            f"another --output")
    return [r for r in records if isinstance(r, dict) and "video" in r and "caption" in r]


def clip_of(record: dict) -> Clip:
    return Clip(Path(record["video"]), record.get("start"), record.get("end"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a model checkpoint (best_model.pt, ...) or an export.py folder")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="video files, folders of videos, or manifests")
    parser.add_argument("--recursive", action="store_true", help="look for videos in subfolders too")
    parser.add_argument("--output", help="append the captions here as JSONL (a header record first)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output (and its report)")
    parser.add_argument("--resume", action="store_true", help="continue an existing --output: skip its videos")
    parser.add_argument("--report", action="store_true", help="also write report.html beside --output")
    parser.add_argument("--vision", "--clip", dest="clip", metavar="DIR", help="vision tower folder instead of the "
                        "one the checkpoint names (--clip is an alias of --vision)")
    parser.add_argument("--llm", help="Qwen3 folder instead of the one the checkpoint names (checkpoints only)")
    parser.add_argument("--cache-dir", help="read and fill a feature cache here (off by default)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--quant", choices=["nf4", "int8", "none"], default="none", help="an export folder's merged "
                        "LM: none keeps its weights as exported (bf16: 16 GB for Qwen3-8B); nf4 or int8 quantize them "
                        "as they load (a checkpoint keeps the quantization it trained with)")
    parser.add_argument("--workers", type=int, default=4, help="background threads decoding videos")
    add_decoding_options(parser)
    add_reduction_checks(parser)
    args = parser.parse_args(argv)
    with user_errors():
        return run(args, *check_command(args))


def check_command(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Everything caption.py can check before a model loads: the flags, the model's files and token limit, and
    the output files. Returns (the header of --output, the records an earlier run left there for --resume)."""
    options.at_least("batch_size", args.batch_size, 1)
    options.at_least("workers", args.workers, 1)
    options.check_decoding(args.max_new_tokens, decoding_from_args(args))
    options.check_device(args.device)
    if (args.report or args.resume) and not args.output:
        raise UserError(f"--{'report' if args.report else 'resume'} works on --output; give --output FILE.jsonl too")
    if args.resume and args.overwrite:
        raise UserError("--resume continues --output, --overwrite replaces it: give one of them")
    source = Path(args.checkpoint)
    if source.is_dir():
        if args.llm:
            raise UserError("--llm applies to checkpoints only: an export folder holds its merged LM")
        vlm_config = read_export_info(source)["vlm_config"]
        clip, llm = args.clip or source / vlm_config["clip_path"], source / vlm_config["llm_path"]
    else:
        if args.quant != "none":
            raise UserError(f"--quant {args.quant} applies to export folders only: a checkpoint's model is rebuilt "
                            f"with the quantization it trained with")
        if problem := file_problem(source):
            raise UserError(f"{source}: {problem}; give a checkpoint file or an export.py folder")
        vlm_config = check_checkpoint(load_checkpoint(source), source)["vlm_config"]
        clip, llm = args.clip or vlm_config["clip_path"], args.llm or vlm_config["llm_path"]
    check_bases(vlm_config, clip, llm, args.max_new_tokens)
    if args.cache_dir:
        check_output_folder(args.cache_dir, overwrite=True, flag="--cache-dir")  # a folder, filled entry by entry
    header = {"source": str(source.resolve()), "decoding": {"max_new_tokens": args.max_new_tokens,
                                                            **decoding_from_args(args)},
              "num_frames": vlm_config["num_frames"]}
    if not args.output:
        return header, []
    runs = [folder] if (folder := run_folder_of(source)) else []
    output = check_output_file(args.output, overwrite=args.overwrite or args.resume, runs=runs,
                               hint=" (or --resume to continue it)")
    if args.report:
        check_output_file(output.with_name("report.html"), overwrite=args.overwrite or args.resume, flag="--report",
                          runs=runs)
    return header, read_caption_file(output, header) if args.resume and output.exists() else []


def run(args: argparse.Namespace, header: dict, done: list[dict]) -> int:
    videos, failures = collect_videos(args.paths, args.recursive)
    for path, why in failures:
        print(f"{path}: {why}", file=sys.stderr)
    finished = {clip_of(record) for record in done}
    if done:
        print(f"--resume: {len(done)} captions already in {args.output}; "
              f"{sum(clip not in finished for clip in videos)} videos to go", file=sys.stderr)
    videos = [clip for clip in videos if clip not in finished]
    device = options.check_device(args.device) or default_device()
    model, features_dtype, source = load_captioner(args.checkpoint, clip=args.clip, llm=args.llm, device=device,
                                                   dtype=args.dtype, quant=None if args.quant == "none" else args.quant)
    check_asked_reduction(asdict(model.config), args.token_reduction, args.visual_tokens)
    cache = feature_cache_for(model, args.cache_dir) if args.cache_dir else None
    progress = tqdm(total=len(videos), desc="captioning", unit="video", file=sys.stderr, disable=len(videos) < 20)
    output = CaptionFile(Path(args.output), header | source, resume=args.resume) if args.output else None

    def show(record):
        tqdm.write(f"{clip_of(record).name}\t{record['caption']}", file=sys.stdout)
        if output is not None:
            output.append(record)
        progress.update()

    def complain(video, why):
        tqdm.write(why if why.startswith(video) else f"{video}: {why}", file=sys.stderr)
        progress.update()

    started = time.perf_counter()
    try:
        records, bad = caption_videos(model, videos, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                      decoding=decoding_from_args(args), cache=cache, features_dtype=features_dtype,
                                      workers=args.workers, on_caption=show, on_failure=complain)
    finally:
        if output is not None:
            output.close()
    seconds = time.perf_counter() - started
    progress.close()
    speed = f"{len(records) / seconds:.2f} captions/s" if seconds else "-"
    print(f"{len(records)} captions, {len(bad) + len(failures)} failed inputs, {seconds:.1f} s ({speed}), "
          f"{peak_memory(device)}", file=sys.stderr)
    if args.report:
        every = done + records
        page = render_report("kovlm captions", {**source, "videos": len(every), "speed": speed,
                                                "decoding": header["decoding"]}, None,
                             [r | {"prediction": r["caption"]} for r in every], num_frames=model.config.num_frames)
        atomic_write_text(Path(args.output).with_name("report.html"), page)
    return 1 if bad or failures else 0


if __name__ == "__main__":
    sys.exit(main())
