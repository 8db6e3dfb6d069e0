"""Data sets that ship labels per video or per span (AI Hub label folders, ActivityNet Captions) -> manifest rows;
and what every caption reader shares: timestamps and spans, text encodings, ManifestError.

    AI Hub label folder ──label_folder_rows──▶ (where, row) pairs ─┐
    ActivityNet Captions JSON ──activitynet_rows──▶ (where, row) ──┴─▶ manifests.samples_from_rows ─▶ [Sample]

A row is what one line of a kovlm manifest holds ({"id", "video", "captions", "start", "end", "split"}), so
manifests.py turns rows of every source into Samples by one set of rules. This module imports neither manifests.py
nor data.py: both build on it.

AI Hub label folders: one JSON file per video (UTF-8, with or without a byte-order mark; CP949 files and files with
  a byte-order mark are read and reported). LABEL_LAYOUTS names the keys read: the video's file name, the list of
  captioned segments, each one's [start, end] and sentence, and the video's duration (to check spans). Every *.json
  under the folder is a label file; its video is found by file name anywhere under the videos folder (a name with
  folders is tried relative to it first; of several files with that name, the one in the label file's own relative
  folder wins). A video path that leads outside the videos folder (`..`, an absolute path, a symbolic link out of
  it) is reported and skipped: label files may come from anywhere. Several label files of one video keep all their
  segments, numbered on from one file to the next (`name#k` ids stay distinct). Assumed of
  layouts not seen: one JSON object per video, a list of entries each holding a span and one Korean sentence; such
  a layout is one more LABEL_LAYOUTS row. Bad entries (no caption, an empty or out-of-video span, an unparsable
  timestamp), label files that are not JSON and missing videos are reported (missing videos in one summary line)
  and skipped.
ActivityNet Captions: {"v_id": {"duration", "timestamps": [[s, e], ...], "sentences": [...]}}; a video is found by
  its id as the file name without suffix, with or without the "v_" prefix.
Timestamps: seconds as numbers or strings, or [H:]M:S ("16.5", "0:16.00000", "1:02:03.5").
"""
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from infra.errors import UserError

SPAN_TOLERANCE = 0.5  # seconds a span may run past the video's end (labels round; containers trim the last frame)
VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts"}


class ManifestError(UserError):
    """A manifest or label file that cannot be read; the message names the file, the line (or entry) and what is
    wrong."""


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
            raise UserError(problem) from None
        if len(upper) > 2 or not all(part.isdigit() for part in upper) or (upper and not 0 <= seconds < 60) or (
                len(upper) == 2 and int(upper[1]) >= 60):
            raise UserError(problem)
        seconds += sum(int(part) * 60 ** (len(upper) - i) for i, part in enumerate(upper))
    else:
        raise UserError(problem)
    if not math.isfinite(seconds) or seconds < 0:
        raise UserError(f"timestamp {value!r} is negative or not finite")
    return seconds


def parse_span(start, end, duration=None) -> tuple[float, float]:
    """(start, end) in seconds; an empty span, or (given the video's duration) one past its end, is refused."""
    start, end = parse_timestamp(start), parse_timestamp(end)
    if end <= start:
        raise UserError(f"empty span: end {end:g} s is not after start {start:g} s")
    if duration is not None and end > parse_timestamp(duration) + SPAN_TOLERANCE:
        raise UserError(f"span {start:g}-{end:g} s ends after the video ({parse_timestamp(duration):g} s)")
    return start, end


# ── text files ─────────────────────────────────────────────────────────────────────────────────────────────────────
def read_text(path: Path, *, allow_cp949: bool = False) -> tuple[str, str]:
    """(text, its encoding: "utf-8", "utf-8-sig" with a byte-order mark (spreadsheets write one) or "cp949")."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig"), "utf-8-sig" if data.startswith(b"\xef\xbb\xbf") else "utf-8"
    except UnicodeDecodeError as error:
        if allow_cp949:
            try:
                return data.decode("cp949"), "cp949"
            except UnicodeDecodeError:
                pass
        raise ManifestError(f"{path}: not UTF-8 text (byte {error.start}); a CP949 / EUC-KR file converts with "
                            f"`iconv -f cp949 -t utf-8 IN > OUT`") from None


def load_json(path: Path, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})") from None


# ── finding videos by name ─────────────────────────────────────────────────────────────────────────────────────────
class VideoFinder:
    """Every video file under a folder, found by file name (AI Hub) or by name without suffix (ActivityNet)."""

    def __init__(self, root: Path):
        self.root, self.by_name, self.by_stem = Path(root), defaultdict(list), defaultdict(list)
        self.resolved_root = self.root.resolve()
        for folder, _, names in sorted(os.walk(self.root)):
            for name in sorted(names):
                if Path(name).suffix.lower() in VIDEO_SUFFIXES:
                    self.by_name[name].append(Path(folder) / name)
                    self.by_stem[Path(name).stem].append(Path(folder) / name)

    def find(self, name: str, *, near: Path = Path("."), by_stem: bool = False) -> Path | None:
        """The one video called `name`; of several, the one in the folder `near` (relative to the root). A path that
        resolves outside the root (`..`, absolute, a symbolic link out of it) raises ValueError."""
        if Path(name).parent != Path(".") and (self.root / name).is_file():
            return self.inside(self.root / name, name)
        found = (self.by_stem if by_stem else self.by_name).get(Path(name).name, [])
        if len(found) > 1:
            found = [path for path in found if path.parent == self.root / near] or found
        if len(found) > 1:
            raise UserError(f"{len(found)} videos are called {Path(name).name} ({', '.join(map(str, found[:3]))}); "
                             f"give the path under the videos folder")
        return self.inside(found[0], name) if found else None

    def inside(self, path: Path, name: str) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.resolved_root):
            raise UserError(f"the video {name!r} leads outside the videos folder {self.root} (to {resolved})")
        return path


def _missing_line(missing: list[str], what: str, videos_dir: Path) -> list[str]:
    if not missing:
        return []
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return [f"{len(missing)} {what} have no video under {videos_dir}: {', '.join(missing[:5])}{more}; skipped"]


# ── label files ────────────────────────────────────────────────────────────────────────────────────────────────────
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


def segment_row(sample_id: str, video: Path, span, caption, *, duration=None, split=None) -> dict:
    """One manifest row for a captioned segment; ValueError says what is wrong with it."""
    if not isinstance(caption, str) or not caption.strip():
        raise UserError(f"no caption ({caption!r})")
    if not isinstance(span, (list, tuple)) or len(span) != 2:
        raise UserError(f"the span must be [start, end], got {span!r}")
    start, end = parse_span(*span, duration)
    return {"id": sample_id, "video": str(video), "captions": [caption.strip()], "start": start, "end": end} | (
        {"split": split} if split else {})


def read_label(label: Path) -> tuple[dict, LabelLayout, str]:
    """(the label file's object, its layout, its encoding); ValueError says why it cannot be used."""
    try:
        text, encoding = read_text(label, allow_cp949=True)
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{label}:{error.lineno}: not valid JSON ({error.msg})") from None
    layout = next((layout for layout in LABEL_LAYOUTS.values() if isinstance(data, dict) and layout.entries in data),
                  None)
    if layout is None or not isinstance(data.get(layout.video), str) or not isinstance(data[layout.entries], list):
        raise UserError(f"{label}: not a known label layout (a video name and a list under "
                         f"{', '.join(layout.entries for layout in LABEL_LAYOUTS.values())})")
    return data, layout, encoding


def label_rows(label: Path, data: dict, layout: LabelLayout, video: Path, split: str | None, problems: list[str],
               first: int = 1) -> list[tuple[str, dict]]:
    """(where, row) for each good entry of one label file, numbered from `first`; each bad one is appended to
    `problems`."""
    rows = []
    for k, entry in enumerate(data[layout.entries], first):
        where = f"{label}: {layout.entries} entry {k - first + 1}"
        entry = entry if isinstance(entry, dict) else {}
        span = entry.get(layout.span[0]) if len(layout.span) == 1 else [entry.get(key) for key in layout.span]
        try:
            rows.append((where, segment_row(f"{Path(data[layout.video]).stem}#{k}", video, span,
                                            entry.get(layout.caption), split=split,
                                            duration=data.get(layout.duration) if layout.duration else None)))
        except ValueError as error:
            problems.append(f"{where}: {error}; skipped")
    return rows


def label_folder_rows(labels_dir: Path, videos_dir: Path, *, split: str | None = None
                      ) -> tuple[list[tuple[str, dict]], list[str]]:
    """(where, row) pairs for every captioned segment in the label files under `labels_dir`, and the problems."""
    finder, rows, problems, missing, encodings = VideoFinder(videos_dir), [], [], [], defaultdict(list)
    segments_of = defaultdict(int)  # id base -> segments numbered so far: label files of one video share it
    for label in sorted(Path(labels_dir).rglob("*.json")):
        try:
            data, layout, encoding = read_label(label)
        except ValueError as error:  # a ManifestError too: each names the file
            problems.append(f"{error}; skipped")
            continue
        encodings[encoding].append(label.name)
        try:
            video = finder.find(data[layout.video], near=label.parent.relative_to(labels_dir))
        except ValueError as error:
            problems.append(f"{label}: {error}; skipped")
            continue
        if video is None:
            missing.append(data[layout.video])
            continue
        base_id = Path(data[layout.video]).stem
        rows += label_rows(label, data, layout, video, split, problems, first=segments_of[base_id] + 1)
        segments_of[base_id] += len(data[layout.entries])
    problems += _missing_line(missing, "label files", videos_dir)
    for encoding, what in (("cp949", "are CP949 text, not UTF-8, and were read as CP949"),
                           ("utf-8-sig", "begin with a UTF-8 byte-order mark and were read as UTF-8")):
        if encodings[encoding]:
            problems.append(f"{len(encodings[encoding])} label files {what}: {', '.join(encodings[encoding][:5])}")
    return rows, problems


def activitynet_rows(path: Path, videos_dir: Path, *, split: str | None = None
                     ) -> tuple[list[tuple[str, dict]], list[str]]:
    """ActivityNet Captions as (where, row) pairs, and the problems."""
    path = Path(path)
    data = load_json(path, read_text(path)[0])
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected ActivityNet Captions' object of video ids, got {type(data).__name__}")
    finder, rows, problems, missing = VideoFinder(videos_dir), [], [], []
    for video_id, entry in data.items():
        where = f"{path}: {video_id}"
        if not isinstance(entry, dict) or not isinstance(entry.get("timestamps"), list) or not isinstance(
                entry.get("sentences"), list) or len(entry["timestamps"]) != len(entry["sentences"]):
            problems.append(f"{where}: needs lists timestamps and sentences of the same length; skipped")
            continue
        try:
            video = finder.find(video_id, by_stem=True) or (finder.find(video_id[2:], by_stem=True)
                                                            if video_id.startswith("v_") else None)
        except ValueError as error:  # outside the videos folder, or several videos of that name
            problems.append(f"{where}: {error}; skipped")
            continue
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
