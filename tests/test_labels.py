"""labels.py: timestamps, AI Hub label folders (nested, BOM, CP949, bad entries, missing and same-named videos, read
as a manifest, paths leading out of the videos folder, several label files of one video) and ActivityNet Captions,
turned into manifest rows."""
import json
import os
import shutil

import pytest

from formats.labels import activitynet_rows, label_folder_rows, parse_timestamp
from formats.manifests import read_manifest, samples_from_rows


# ── timestamps ─────────────────────────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("value, seconds", [(16, 16.0), (2.5, 2.5), ("16", 16.0), ("0:16.00000", 16.0),
                                            ("1:02:03.5", 3723.5), ("10:00", 600.0), (" 0:00.00000 ", 0.0)])
def test_timestamps_parse(value, seconds):
    assert parse_timestamp(value) == seconds


@pytest.mark.parametrize("value", ["", "abc", "1:75", "1:2:3:4", "-3", "1:-2", "nan", "inf", True, None, [1, 2],
                                   "1:60:00"])
def test_bad_timestamps_are_refused(value):
    with pytest.raises(ValueError, match="timestamp"):
        parse_timestamp(value)


# ── AI Hub label folders and ActivityNet Captions ──────────────────────────────────────────────────────────────────
def label(name, *entries, duration=60.0):
    return {"video_name": name, "width": 1920, "height": 1080, "frame_rate": 30, "duration": duration,
            "total_frame": duration * 30, "domain_id": "AN", "place": "outdoor",
            "trigger_info": [{"timestamps": list(span), "trigger": "Change of action", "trigger_object": "휴대폰",
                              "trigger_action": caption, "bbox": {"x1": 0.48, "y1": 0.2, "x2": 0.51, "y2": 0.25}}
                             for span, caption in entries]}


def write_label(path, data, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(json.dumps(data, ensure_ascii=False).encode(encoding))


@pytest.fixture
def aihub(tmp_path):
    """labels/ (nested, a BOM file, a CP949 file, a bad JSON file, a missing video, an empty caption, an empty
    span, an out-of-video span) and videos/ (nested; the videos are empty placeholders, never decoded here)."""
    labels, videos = tmp_path / "labels", tmp_path / "videos"
    for name in ("AN/D2_AN_0531_000002.mp4", "AN/sub/D2_AN_0531_000003.mp4", "BO/D2_BO_0001_000001.mp4"):
        (videos / name).parent.mkdir(parents=True, exist_ok=True)
        (videos / name).write_bytes(b"")
    write_label(labels / "AN" / "D2_AN_0531_000002.json", label(
        "D2_AN_0531_000002.mp4", (("0:00.00000", "0:16.00000"), "여자가 휴대폰으로 사진을 찍는다."),
        (("0:16.00000", "0:40.50000"), "여자가 휴대폰을 내려놓는다."), (("0:40.5", "0:41"), "  ")))
    write_label(labels / "AN" / "deep" / "D2_AN_0531_000003.json", label(
        "D2_AN_0531_000003.mp4", (("0:05", "0:05"), "빈 구간"), (("0:10", "1:10.00000"), "영상 밖 구간"),
        (("0:01", "0:02"), "남자가 문을 연다.")), encoding="utf-8-sig")
    write_label(labels / "BO" / "D2_BO_0001_000001.json", label("D2_BO_0001_000001.mp4", (("0:00", "0:03"), "공이 구른다.")),
                encoding="cp949")
    write_label(labels / "BO" / "D2_BO_0001_000009.json", label("D2_BO_0001_000009.mp4", (("0:00", "0:03"), "없는 영상")))
    (labels / "BO" / "broken.json").write_text('{"video_name": "x.mp4", ', encoding="utf-8")
    return labels, videos


def test_aihub_label_folder_rows_and_problems(aihub):
    labels, videos = aihub
    rows, problems = label_folder_rows(labels, videos)
    samples = samples_from_rows(rows, videos)
    assert [(s.id, s.video, s.captions, s.start, s.end) for s in samples] == [
        ("D2_AN_0531_000002#1", videos / "AN/D2_AN_0531_000002.mp4", ["여자가 휴대폰으로 사진을 찍는다."], 0.0, 16.0),
        ("D2_AN_0531_000002#2", videos / "AN/D2_AN_0531_000002.mp4", ["여자가 휴대폰을 내려놓는다."], 16.0, 40.5),
        ("D2_AN_0531_000003#3", videos / "AN/sub/D2_AN_0531_000003.mp4", ["남자가 문을 연다."], 1.0, 2.0),
        ("D2_BO_0001_000001#1", videos / "BO/D2_BO_0001_000001.mp4", ["공이 구른다."], 0.0, 3.0)]
    expected = [f"{labels / 'AN/D2_AN_0531_000002.json'}: trigger_info entry 3: no caption",
                f"{labels / 'AN/deep/D2_AN_0531_000003.json'}: trigger_info entry 1: empty span",
                f"{labels / 'AN/deep/D2_AN_0531_000003.json'}: trigger_info entry 2: span 10-70 s ends after the "
                f"video (60 s)",
                f"{labels / 'BO/broken.json'}:1: not valid JSON",
                f"1 label files have no video under {videos}: D2_BO_0001_000009.mp4; skipped",
                "1 label files are CP949 text, not UTF-8, and were read as CP949: D2_BO_0001_000001.json",
                "1 label files begin with a UTF-8 byte-order mark and were read as UTF-8: D2_AN_0531_000003.json"]
    assert len(problems) == len(expected) and all(p.startswith(e) for p, e in zip(problems, expected)), problems
    assert all("\n" not in problem for problem in problems)


def test_label_folder_as_manifest_finds_videos_beside_the_labels(aihub, tmp_path):
    labels, videos = aihub
    shutil.copytree(videos, labels, dirs_exist_ok=True)  # videos and labels in one folder
    with pytest.warns(UserWarning) as caught:
        samples = read_manifest(labels)
    assert [s.id for s in samples] == ["D2_AN_0531_000002#1", "D2_AN_0531_000002#2", "D2_AN_0531_000003#3",
                                       "D2_BO_0001_000001#1"]
    assert all(s.video.is_relative_to(labels) for s in samples)
    assert len(caught) == 7 and "no caption" in str(caught[0].message)


def test_videos_of_one_name_in_two_folders(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / "videos" / folder).mkdir(parents=True)
        (tmp_path / "videos" / folder / "same.mp4").write_bytes(b"")
    write_label(tmp_path / "labels" / "b" / "same.json", label("same.mp4", ((0, 1), "b 폴더의 영상")))
    write_label(tmp_path / "labels" / "c" / "same.json", label("same.mp4", ((0, 1), "어느 영상인지 모름")))
    rows, problems = label_folder_rows(tmp_path / "labels", tmp_path / "videos")
    assert [row["video"] for _, row in rows] == [str(tmp_path / "videos" / "b" / "same.mp4")]  # the label's folder
    assert len(problems) == 1 and "2 videos are called same.mp4" in problems[0]


def test_activitynet_captions(tmp_path):
    (tmp_path / "videos").mkdir()
    for name in ("v_QOlSCBRmfWY.mp4", "sJFgo9H6zNo.mkv"):
        (tmp_path / "videos" / name).write_bytes(b"")
    data = {"v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81], [56.26, 90.0]],
                              "sentences": ["A woman is seen speaking.", "She dances.", "Out of the video."]},
            "v_sJFgo9H6zNo": {"duration": 10.0, "timestamps": [[1, 2]], "sentences": ["Found without v_."]},
            "v_missing": {"duration": 5, "timestamps": [[0, 1]], "sentences": ["gone"]},
            "v_bad": {"duration": 5, "timestamps": [[0, 1]], "sentences": []}}
    (tmp_path / "train.json").write_text(json.dumps(data), encoding="utf-8")
    rows, problems = activitynet_rows(tmp_path / "train.json", tmp_path / "videos", split="train")
    samples = samples_from_rows(rows, tmp_path)
    assert [(s.id, s.video.name, s.start, s.end, s.split) for s in samples] == [
        ("v_QOlSCBRmfWY#1", "v_QOlSCBRmfWY.mp4", 0.83, 19.86, "train"),
        ("v_QOlSCBRmfWY#2", "v_QOlSCBRmfWY.mp4", 17.37, 60.81, "train"),
        ("v_sJFgo9H6zNo#1", "sJFgo9H6zNo.mkv", 1.0, 2.0, "train")]
    assert [p.split(": ", 1)[1] if p.startswith(str(tmp_path / "train.json")) else p for p in problems] == [
        "v_QOlSCBRmfWY segment 3: span 56.26-90 s ends after the video (82.73 s); skipped",
        "v_bad: needs lists timestamps and sentences of the same length; skipped",
        f"1 video ids have no video under {tmp_path / 'videos'}: v_missing; skipped"]


def test_video_paths_that_lead_outside_the_videos_folder_are_reported_and_skipped(tmp_path):
    """Label files may come from anywhere: `..`, an absolute path or a symbolic link out of VIDEOS_DIR never become a
    row that train, evaluate or caption would open."""
    videos, labels = tmp_path / "videos", tmp_path / "labels"
    (videos / "sub").mkdir(parents=True)
    (tmp_path / "secret.mp4").write_bytes(b"outside")
    (videos / "inside.mp4").write_bytes(b"")
    (videos / "sub" / "link.mp4").symlink_to(tmp_path / "secret.mp4")
    (videos / "sub" / "ok_link.mp4").symlink_to(videos / "inside.mp4")  # a link that stays inside is fine
    up_to_root = os.path.relpath("/", videos)  # ../../.. to the file system's root
    for k, name in enumerate((f"{up_to_root}/etc/passwd", str(tmp_path / "secret.mp4"), "../secret.mp4",
                              "sub/link.mp4", "link.mp4", "sub/ok_link.mp4")):
        write_label(labels / f"{k}.json", label(name, ((0, 1), "어떤 영상")))
    rows, problems = label_folder_rows(labels, videos)
    assert [row["video"] for _, row in rows] == [str(videos / "sub" / "ok_link.mp4")]
    outside = [p for p in problems if "leads outside the videos folder" in p]
    assert len(outside) == 5 and all(p.endswith("; skipped") for p in outside), problems
    data = {"../secret.mp4": {"duration": 5, "timestamps": [[0, 1]], "sentences": ["밖"]}}
    (tmp_path / "an.json").write_text(json.dumps(data), encoding="utf-8")
    rows, problems = activitynet_rows(tmp_path / "an.json", videos)
    assert rows == [] and "leads outside the videos folder" in problems[0]


def test_several_label_files_of_one_video_keep_every_segment_with_distinct_ids(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "v.mp4").write_bytes(b"")
    write_label(tmp_path / "labels" / "a.json", label("v.mp4", ((0, 1), "첫 파일 하나"), ((1, 2), "첫 파일 둘")))
    write_label(tmp_path / "labels" / "b.json", label("v.mp4", ((2, 3), "둘째 파일"), ((1, 2), "같은 구간")))
    rows, problems = label_folder_rows(tmp_path / "labels", tmp_path / "videos")
    samples = samples_from_rows(rows, tmp_path, problems)
    assert [(s.id, s.start, s.captions) for s in samples] == [("v#1", 0.0, ["첫 파일 하나"]), ("v#2", 1.0, ["첫 파일 둘"]),
                                                               ("v#3", 2.0, ["둘째 파일"])]
    assert len(problems) == 1 and "b.json: trigger_info entry 2: video" in problems[0] and "listed twice" in problems[0]
