"""Caption annotations of every layout -> Samples: kovlm's manifests, MSR-VTT, AI Hub label folders, ActivityNet.

    manifest (.jsonl / .csv / .json) or a folder of AI Hub label files ──read_manifest──▶ [Sample]
    AI Hub label folder ──label_folder_rows──▶ rows ─┐
    ActivityNet Captions JSON ──activitynet_rows──▶ rows ─┴─samples_from_rows──▶ [Sample] ──write_manifest──▶ .jsonl

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
AI Hub label folders: one JSON file per video (UTF-8, with or without a byte-order mark; CP949 files are read and
  reported). LABEL_LAYOUTS names the keys read: the video's file name, the list of captioned segments, each one's
  [start, end] and sentence, and the video's duration (to check spans). Every *.json under the folder is a label
  file; its video is found by file name anywhere under the videos folder (a name with folders is tried relative to
  it first; of several files with that name, the one in the label file's own relative folder wins). When
  read_manifest is given the folder itself, the videos are looked for under that same folder. Assumed of layouts not
  seen: one JSON object per video, a list of entries each holding a span and one Korean sentence; such a layout is
  one more LABEL_LAYOUTS row. Bad entries (no caption, an empty or out-of-video span, an unparsable timestamp), label
  files that are not JSON and missing videos are reported (missing videos in one summary line) and skipped.
"""
import csv
import io
import json
import math
import os
import secrets
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SPAN_TOLERANCE = 0.5  # seconds a span may run past the video's end (labels round; containers trim the last frame)
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts"}


class ManifestError(ValueError):
    """A manifest that cannot be read; the message names the file, the line (or entry) and what is wrong."""


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


# ── timestamps ─────────────────────────────────────────────────────────────────────────────────────────────────────
def parse_timestamp(value) -> float:
    """Seconds from a number or a "[[H:]M:]S[.fff]" string: 16, "16.5", "0:16.00000", "1:02:03.5"."""
    problem = f"unparsable timestamp {value!r}; write seconds (16.5) or [H:]M:S (0:16.5, 1:02:03.5)"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        *upper, last = value.strip().split(":")
        try:
            seconds = float(last)
        except ValueError:
            raise ValueError(problem) from None
        if len(upper) > 2 or not all(part.isdigit() for part in upper) or (upper and not 0 <= seconds < 60) or (
                len(upper) == 2 and int(upper[1]) >= 60):
            raise ValueError(problem)
        seconds += sum(int(part) * 60 ** (len(upper) - i) for i, part in enumerate(upper))
    else:
        raise ValueError(problem)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"timestamp {value!r} is negative or not finite")
    return seconds


def parse_span(start, end, duration=None) -> tuple[float, float]:
    """(start, end) in seconds; an empty span, or (given the video's duration) one past its end, is refused."""
    start, end = parse_timestamp(start), parse_timestamp(end)
    if end <= start:
        raise ValueError(f"empty span: end {end:g} s is not after start {start:g} s")
    if duration is not None and end > parse_timestamp(duration) + SPAN_TOLERANCE:
        raise ValueError(f"span {start:g}-{end:g} s ends after the video ({parse_timestamp(duration):g} s)")
    return start, end


# ── kovlm's manifests ──────────────────────────────────────────────────────────────────────────────────────────────
_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "validate": "val", "dev": "val", "test": "test"}  # MSR-VTT says "validate"
_VIDEO_KEYS = ("video", "video_path", "file_path")  # kovlm's own key, then common layouts (AI Hub: file_path)


def read_text(path: Path, *, allow_cp949: bool = False) -> tuple[str, bool]:
    """(text, whether it was CP949). UTF-8 with or without a byte-order mark (spreadsheets write one)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig"), False
    except UnicodeDecodeError as error:
        if allow_cp949:
            try:
                return data.decode("cp949"), True
            except UnicodeDecodeError:
                pass
        raise ManifestError(f"{path}: not UTF-8 text (byte {error.start}); a CP949 / EUC-KR file converts with "
                            f"`iconv -f cp949 -t utf-8 IN > OUT`") from None


def _load_json(path: Path, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})") from None


def manifest_rows(path: Path, text: str) -> list[tuple[str, dict]]:
    """(where, row) pairs; `where` is "file:line" for JSONL and CSV and "file: entry k" for JSON."""
    if path.suffix == ".jsonl":
        return [(f"{path}:{number}", _jsonl_line(path, number, line))
                for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        return [(f"{path}:{reader.line_num}", row) for row in reader]
    data = _load_json(path, text)
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


def parse_row(row: dict, where: str, video_dir: Path) -> tuple[Sample, str, bool]:
    """One row -> (Sample, its default id base, whether it is a single-caption row that may merge with its id's)."""
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


def samples_from_rows(rows: list[tuple[str, dict]], video_dir: Path, problems: list[str] | None = None
                      ) -> list[Sample]:
    """Samples from (where, row) pairs: single-caption rows of one id merge, default ids are given. A bad row raises
    ManifestError, or with a `problems` list is appended to it and skipped (so `data.py check` can list them all)."""
    samples, mergeable, owner, spans_of = {}, {}, {}, defaultdict(list)
    for where, row in rows:
        try:
            if isinstance(row, ManifestError):
                raise row
            sample, base_id, single_caption = parse_row(row, where, video_dir)
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


def read_manifest(path, *, video_dir=None, problems: list[str] | None = None) -> list[Sample]:
    """Samples from a JSONL / CSV / JSON manifest or a folder of AI Hub label files (layouts in the module
    docstring). Video paths are resolved relative to `video_dir`, by default the manifest's folder (or the label
    folder). With a `problems` list, bad rows are collected there instead of raised; a label folder's problems are
    always reported and skipped (in `problems`, else as warnings)."""
    path = Path(path)
    if path.is_dir():
        rows, notes = label_folder_rows(path, Path(video_dir) if video_dir else path)
        if problems is not None:
            problems += notes
        else:
            for note in notes:
                warnings.warn(note, stacklevel=2)
    elif not path.is_file():
        raise ManifestError(f"{path}: no such manifest file or label folder; give a .jsonl / .csv / .json manifest "
                            f"or a folder of AI Hub label files")
    elif path.suffix not in (".jsonl", ".csv", ".json"):
        raise ManifestError(f"{path}: unknown manifest type {path.suffix!r}; use .jsonl, .csv or .json")
    else:
        rows = manifest_rows(path, read_text(path)[0])
    samples = samples_from_rows(rows, Path(video_dir) if video_dir else path if path.is_dir() else path.parent,
                                problems)
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
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        temporary.write_text("".join(lines), encoding="utf-8")
        os.replace(temporary, path)  # a reader sees the old manifest or the whole new one
    finally:
        temporary.unlink(missing_ok=True)
    return path


# ── real segment-caption data sets ─────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class LabelLayout:
    """Which keys of a per-video label file hold what."""
    video: str              # the video's file name (or a path under the videos folder)
    entries: str            # the list of captioned segments
    span: tuple[str, ...]   # one key holding [start, end], or two keys holding start and end
    caption: str            # a segment's sentence
    duration: str | None = None  # the video's length in seconds, to check spans against


LABEL_LAYOUTS = {  # the first whose `entries` key a file has is used
    # AI Hub 비디오 전환 경계 추론 데이터: {"video_name": "D2_AN_0531_000002.mp4", "duration": 60.0,
    #   "trigger_info": [{"timestamps": ["0:00.00000", "0:16.00000"], "trigger_action": "여자가 ..."}, ...]}
    "aihub-trigger": LabelLayout(video="video_name", entries="trigger_info", span=("timestamps",),
                                 caption="trigger_action", duration="duration"),
}


class VideoFinder:
    """Every video file under a folder, found by file name (AI Hub) or by name without suffix (ActivityNet)."""

    def __init__(self, root: Path):
        self.root, self.by_name, self.by_stem = Path(root), defaultdict(list), defaultdict(list)
        for folder, _, names in sorted(os.walk(self.root)):
            for name in sorted(names):
                if Path(name).suffix.lower() in VIDEO_SUFFIXES:
                    self.by_name[name].append(Path(folder) / name)
                    self.by_stem[Path(name).stem].append(Path(folder) / name)

    def find(self, name: str, *, near: Path = Path("."), by_stem: bool = False) -> Path | None:
        """The one video called `name`; of several, the one in the folder `near` (relative to the root)."""
        if Path(name).parent != Path(".") and (self.root / name).is_file():
            return self.root / name
        found = (self.by_stem if by_stem else self.by_name).get(Path(name).name, [])
        if len(found) > 1:
            found = [path for path in found if path.parent == self.root / near] or found
        if len(found) > 1:
            raise ValueError(f"{len(found)} videos are called {Path(name).name} ({', '.join(map(str, found[:3]))}); "
                             f"give the path under the videos folder")
        return found[0] if found else None


def segment_row(sample_id: str, video: Path, span, caption, *, duration=None, split=None) -> dict:
    """One manifest row for a captioned segment; ValueError says what is wrong with it."""
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"no caption ({caption!r})")
    if not isinstance(span, (list, tuple)) or len(span) != 2:
        raise ValueError(f"the span must be [start, end], got {span!r}")
    start, end = parse_span(*span, duration)
    return {"id": sample_id, "video": str(video), "captions": [caption.strip()], "start": start, "end": end} | (
        {"split": split} if split else {})


def _missing_line(missing: list[str], what: str, videos_dir: Path) -> list[str]:
    if not missing:
        return []
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return [f"{len(missing)} {what} have no video under {videos_dir}: {', '.join(missing[:5])}{more}; skipped"]


def label_folder_rows(labels_dir: Path, videos_dir: Path, *, split: str | None = None
                      ) -> tuple[list[tuple[str, dict]], list[str]]:
    """(where, row) pairs for every captioned segment in the label files under `labels_dir`, and the problems."""
    finder, rows, problems, missing, cp949 = VideoFinder(videos_dir), [], [], [], []
    for label in sorted(Path(labels_dir).rglob("*.json")):
        try:
            text, is_cp949 = read_text(label, allow_cp949=True)
            data = json.loads(text)
        except json.JSONDecodeError as error:
            problems.append(f"{label}:{error.lineno}: not valid JSON ({error.msg}); skipped")
            continue
        except ManifestError as error:
            problems.append(f"{error}; skipped")
            continue
        cp949 += [label.name] if is_cp949 else []
        layout = next((layout for layout in LABEL_LAYOUTS.values() if isinstance(data, dict)
                       and layout.entries in data), None)
        if layout is None or not isinstance(data.get(layout.video), str) or not isinstance(data[layout.entries],
                                                                                            list):
            problems.append(f"{label}: not a known label layout (a video name and a list under "
                            f"{', '.join(layout.entries for layout in LABEL_LAYOUTS.values())}); skipped")
            continue
        try:
            video = finder.find(data[layout.video], near=label.parent.relative_to(labels_dir))
        except ValueError as error:
            problems.append(f"{label}: {error}; skipped")
            continue
        if video is None:
            missing.append(data[layout.video])
            continue
        for k, entry in enumerate(data[layout.entries], 1):
            where = f"{label}: {layout.entries} entry {k}"
            try:
                entry = entry if isinstance(entry, dict) else {}
                span = entry.get(layout.span[0]) if len(layout.span) == 1 else [entry.get(key) for key in layout.span]
                rows.append((where, segment_row(f"{Path(data[layout.video]).stem}#{k}", video, span,
                                                entry.get(layout.caption), split=split,
                                                duration=data.get(layout.duration) if layout.duration else None)))
            except ValueError as error:
                problems.append(f"{where}: {error}; skipped")
    problems += _missing_line(missing, "label files", videos_dir)
    if cp949:
        problems.append(f"{len(cp949)} label files are CP949 text, not UTF-8, and were read as CP949: "
                        f"{', '.join(cp949[:5])}")
    return rows, problems


def activitynet_rows(path: Path, videos_dir: Path, *, split: str | None = None
                     ) -> tuple[list[tuple[str, dict]], list[str]]:
    """ActivityNet Captions ({"v_id": {"duration", "timestamps": [[s, e], ...], "sentences": [...]}}) as rows; a
    video is found by its id as the file name without suffix (with or without the "v_" prefix)."""
    path = Path(path)
    data = _load_json(path, read_text(path)[0])
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected ActivityNet Captions' object of video ids, got {type(data).__name__}")
    finder, rows, problems, missing = VideoFinder(videos_dir), [], [], []
    for video_id, entry in data.items():
        where = f"{path}: {video_id}"
        if not isinstance(entry, dict) or not isinstance(entry.get("timestamps"), list) or not isinstance(
                entry.get("sentences"), list) or len(entry["timestamps"]) != len(entry["sentences"]):
            problems.append(f"{where}: needs lists timestamps and sentences of the same length; skipped")
            continue
        video = finder.find(video_id, by_stem=True) or (finder.find(video_id[2:], by_stem=True)
                                                        if video_id.startswith("v_") else None)
        if video is None:
            missing.append(video_id)
            continue
        for k, (span, sentence) in enumerate(zip(entry["timestamps"], entry["sentences"]), 1):
            try:
                rows.append((f"{where} segment {k}", segment_row(f"{video_id}#{k}", video, span, sentence,
                                                                 duration=entry.get("duration"), split=split)))
            except ValueError as error:
                problems.append(f"{where} segment {k}: {error}; skipped")
    return rows, problems + _missing_line(missing, "video ids", videos_dir)
