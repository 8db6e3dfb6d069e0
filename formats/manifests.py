"""Caption manifests of every layout -> Samples: kovlm's own, CSV, JSON, MSR-VTT, and folders of AI Hub labels.

    manifest (.jsonl / .csv / .json) ──manifest_rows──▶ (where, row) pairs ─┐
    label folder / ActivityNet (labels.py) ──────────▶ (where, row) pairs ─┴─samples_from_rows──▶ [Sample]
    [Sample] ──write_manifest──▶ .jsonl          read_manifest does the first two steps for a file or a label folder
    label files ──convert_labels──▶ .jsonl        (`python data.py convert`; subset_samples for --max-samples)

Manifests: one row per sample (or per caption); a video path is relative to the manifest's folder.
  JSONL (kovlm's own, what write_manifest writes), one object per line; `start` / `end` make the row a segment:
    {"id": "v001", "video": "videos/v001.mp4", "captions": ["빨간 원이 ...", "..."], "split": "train"}
    {"id": "D2_AN_0531_000002#1", "video": "clips/D2_AN_0531_000002.mp4", "captions": ["여자가 ..."], "start": 0.0,
     "end": 16.0}
  CSV: a header with `video` and `caption` columns (optional id, split, start, end); one row per caption.
  JSON: a list of such objects, or {"annotations" | "samples" | "data": [...]}; `file_path` / `caption_ko` are read
    too, and MSR-VTT's {"videos": [{"video_id", "split"}], "sentences": [{"video_id", "caption"}]} (video
    `<video_dir or manifest folder>/<video_id>.mp4`).
  A row with a single `caption` is one caption of a sample and rows of the same id merge; a `captions` list is a
  whole sample whose id appears once. Without an id, a whole video's id is its path without suffix, a segment's
  `path#k` (k numbers that video's distinct spans in manifest order). The same video and span under two ids is an
  error. Segments: `start` and `end` in seconds, numbers or timestamps ("16.5", "0:16.00000", "1:02:03.5").
A folder given to read_manifest is a folder of AI Hub label files (labels.py), its videos looked for under that
same folder (or `video_dir`).
"""
import csv
import io
import json
import os
import random
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

# ManifestError is re-exported: readers of manifests catch it from here
from formats.labels import ManifestError, activitynet_rows, label_folder_rows, load_json, parse_span, read_text
from infra.errors import UserError
from infra.paths import file_problem, temporary_name


@dataclass
class Sample:
    id: str
    video: Path
    captions: list[str]
    split: str | None = None
    attributes: dict | None = None
    start: float | None = None  # seconds: the sample is the span [start, end) of the video when given
    end: float | None = None
    where: str | None = field(default=None, compare=False, repr=False)  # "file:line", for messages


# ── kovlm's manifests ──────────────────────────────────────────────────────────────────────────────────────────────
_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "validate": "val", "dev": "val", "test": "test"}  # MSR-VTT says "validate"
_VIDEO_KEYS = ("video", "video_path", "file_path")  # kovlm's own key, then common layouts (AI Hub: file_path)


def manifest_rows(path: Path, text: str) -> list[tuple[str, dict]]:
    """(where, row) pairs; `where` is "file:line" for JSONL and CSV and "file: entry k" for JSON."""
    if path.suffix == ".jsonl":
        return [(f"{path}:{number}", _jsonl_line(path, number, line))
                for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        return [(f"{path}:{reader.line_num}", row) for row in reader]
    data = load_json(path, text)
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


def _jsonl_line(path: Path, number: int, line: str) -> dict | ManifestError:
    """The line's object, or the error it raises when parsed (so `data.py check` lists every bad line)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        return ManifestError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})")


def parse_row(row: dict, where: str, video_dir: Path, need_captions: bool = True) -> tuple[Sample, str, bool]:
    """One row -> (Sample, its default id base, whether it is a single-caption row that may merge with its id's).
    Without need_captions (caption.py's unlabelled videos) caption fields are not read."""
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: expected an object with a video and captions, got {type(row).__name__}")
    row = {key: value for key, value in row.items() if value not in (None, "")}  # empty CSV cells = absent
    video_key = next((key for key in _VIDEO_KEYS if key in row), None)
    if video_key is None and "video_id" not in row:
        raise ManifestError(f"{where}: no video field; give one of {', '.join(_VIDEO_KEYS)} or video_id")
    video = str(row[video_key]) if video_key else f"{row['video_id']}.mp4"
    caption_key = next((key for key in ("captions", "caption", "caption_ko") if key in row), None)
    if not need_captions:
        row, caption_key = {**row, "captions": []}, "captions"
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
    if ("start" in row) != ("end" in row):
        raise ManifestError(f"{where}: a segment needs both start and end (seconds), or neither for the whole video")
    try:
        start, end = parse_span(row["start"], row["end"]) if "start" in row else (None, None)
    except ValueError as error:
        raise ManifestError(f"{where}: {error}") from None
    given_id = row.get("id", row.get("video_id"))
    sample = Sample(id=None if given_id is None else str(given_id), video=Path(os.path.normpath(video_dir / video)),
                    captions=[caption.strip() for caption in captions], attributes=row.get("attributes"),
                    split=_SPLIT_NAMES[str(split).lower()] if split is not None else None, start=start, end=end,
                    where=where)
    return sample, Path(video).with_suffix("").as_posix(), caption_key != "captions" and len(captions) == 1


def samples_from_rows(rows: list[tuple[str, dict]], video_dir: Path, problems: list[str] | None = None,
                      need_captions: bool = True) -> list[Sample]:
    """Samples from (where, row) pairs: single-caption rows of one id merge, default ids are given. A bad row raises
    ManifestError, or with a `problems` list is appended to it and skipped (so `data.py check` can list them all)."""
    samples, mergeable, owner, spans_of = {}, {}, {}, defaultdict(list)
    for where, row in rows:
        try:
            if isinstance(row, ManifestError):
                raise row
            sample, base_id, single_caption = parse_row(row, where, video_dir, need_captions)
            span = (sample.start, sample.end)
            if sample.id is None and sample.start is None:
                sample.id = base_id
            elif sample.id is None:  # k numbers the video's distinct spans: rows of one span are one sample
                spans_of[base_id] += [span] if span not in spans_of[base_id] else []
                sample.id = f"{base_id}#{spans_of[base_id].index(span) + 1}"
            _add_sample(samples, mergeable, owner, sample, single_caption)
        except ManifestError as error:
            if problems is None:
                raise
            problems.append(str(error))
    return list(samples.values())


def _add_sample(samples: dict, mergeable: dict, owner: dict, sample: Sample, single_caption: bool) -> None:
    earlier = samples.get(sample.id)
    if earlier is not None:
        if not (single_caption and mergeable[sample.id]):
            raise ManifestError(f"{sample.where}: duplicate id {sample.id!r} (first at {earlier.where}); ids must be "
                                f"unique")
        if (earlier.video, earlier.split, earlier.start, earlier.end) != (sample.video, sample.split, sample.start,
                                                                          sample.end):
            raise ManifestError(f"{sample.where}: id {sample.id!r} has another video, span or split than at "
                                f"{earlier.where}")
        earlier.captions.append(sample.captions[0])
        return
    clip = (sample.video, sample.start, sample.end)
    if clip in owner:
        span = "" if sample.start is None else f" span {sample.start:g}-{sample.end:g} s"
        raise ManifestError(f"{sample.where}: video {sample.video}{span} is listed twice (also as id "
                            f"{owner[clip].id!r} at {owner[clip].where})")
    samples[sample.id], mergeable[sample.id], owner[clip] = sample, single_caption, sample


def read_manifest(path, *, video_dir=None, problems: list[str] | None = None, need_captions: bool = True
                  ) -> list[Sample]:
    """Samples from a JSONL / CSV / JSON manifest or a folder of AI Hub label files (layouts in the module
    docstring). Video paths are resolved relative to `video_dir`, by default the manifest's folder (or the label
    folder). With a `problems` list, bad rows are collected there instead of raised; a label folder's problems are
    always reported and skipped (in `problems`, else as warnings). Without need_captions the rows need no caption
    (videos to caption)."""
    path = Path(path)
    if path.is_dir():
        rows, notes = label_folder_rows(path, Path(video_dir) if video_dir else path)
        if problems is not None:
            problems += notes
        else:
            for note in notes:
                warnings.warn(note, stacklevel=2)
    elif problem := file_problem(path):
        problem = "no such manifest file or label folder" if problem == "no such file or folder" else problem
        raise ManifestError(f"{path}: {problem}; give a .jsonl / .csv / .json manifest or a folder of AI Hub label "
                            f"files")
    elif path.suffix not in (".jsonl", ".csv", ".json"):
        raise ManifestError(f"{path}: unknown manifest type {path.suffix!r}; use .jsonl, .csv or .json")
    else:
        rows = manifest_rows(path, read_text(path)[0])
    samples = samples_from_rows(rows, Path(video_dir) if video_dir else path if path.is_dir() else path.parent,
                                problems, need_captions)
    if not samples:
        raise ManifestError(f"{path}: no samples")
    return samples


def write_manifest(samples: list[Sample], path) -> Path:
    """Write kovlm's JSONL manifest atomically; video paths are stored relative to the manifest's folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for sample in samples:
        row = {"id": sample.id, "video": Path(os.path.relpath(sample.video, path.parent)).as_posix(),
               "captions": sample.captions}
        row |= {"start": sample.start, "end": sample.end} if sample.start is not None else {}
        row |= {"split": sample.split} if sample.split else {}
        row |= {"attributes": sample.attributes} if sample.attributes is not None else {}
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    temporary = temporary_name(path)
    try:
        temporary.write_text("".join(lines), encoding="utf-8")
        os.replace(temporary, path)  # a reader sees the old manifest or the whole new one
    finally:
        temporary.unlink(missing_ok=True)
    return path


# ── subsets and conversions ────────────────────────────────────────────────────────────────────────────────────────
def subset_samples(samples: list[Sample], max_samples: int, seed: int = 42) -> list[Sample]:
    """At most `max_samples` samples drawn by `seed`, each split keeping its share (largest remainders); manifest
    order is kept."""
    if max_samples < 1:
        raise UserError(f"max_samples must be at least 1, got {max_samples}")
    if max_samples >= len(samples):
        return list(samples)
    groups = {}
    for sample in samples:
        groups.setdefault(sample.split, []).append(sample)
    shares = {name: max_samples * len(group) / len(samples) for name, group in groups.items()}
    counts = {name: int(share) for name, share in shares.items()}
    for name in sorted(shares, key=lambda n: counts[n] - shares[n])[:max_samples - sum(counts.values())]:
        counts[name] += 1
    rng, chosen = random.Random(seed), set()
    for name, group in groups.items():
        chosen |= {sample.id for sample in rng.sample(sorted(group, key=lambda s: s.id), counts[name])}
    return [sample for sample in samples if sample.id in chosen]


def convert_labels(source: str, path: Path, videos_dir: Path, output: Path, *, split: str | None = None,
                   max_samples: int | None = None, seed: int = 42) -> list[str]:
    """Write a kovlm manifest from AI Hub label files or ActivityNet Captions; returns the problems skipped."""
    reader = label_folder_rows if source == "aihub" else activitynet_rows
    for given in (path, videos_dir):
        if not Path(given).exists():
            raise FileNotFoundError(f"{given}: no such file or folder")
    rows, problems = reader(Path(path), Path(videos_dir), split=split)
    samples = samples_from_rows(rows, Path("."), problems)
    if not samples:
        raise ManifestError(f"{path}: no usable segments ({len(problems)} problems, the first: "
                            f"{problems[0] if problems else 'no label files'})")
    write_manifest(subset_samples(samples, max_samples, seed) if max_samples else samples, output)
    return problems
