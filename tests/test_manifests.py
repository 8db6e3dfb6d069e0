"""manifests.py: kovlm's manifest layouts (JSONL / CSV / JSON / MSR-VTT, segments), malformed rows, timestamps, and
the converters of real segment-caption data sets (AI Hub label folders, ActivityNet Captions)."""
import json
import shutil

import pytest

from manifests import (ManifestError, Sample, activitynet_rows, label_folder_rows, parse_timestamp, read_manifest,
                       samples_from_rows, write_manifest)


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


# ── manifests ──────────────────────────────────────────────────────────────────────────────────────────────────────
def some_samples(root) -> list[Sample]:
    return [Sample("a", root / "videos" / "a.mp4", ["빨간 원이 움직인다.", "붉은 원이 이동한다."], "train",
                   {"colour": "red"}),
            Sample("b", root / "clips" / "b.mp4", ["파란 별이 위로 올라간다."], "test"),
            Sample("c", root / "c.mp4", ["노란 세모가 나온다.", "노란색 삼각형", "세 번째 설명"]),
            Sample("c#1", root / "c.mp4", ["세모가 멈춘다."], start=1.5, end=3.25)]


def test_jsonl_round_trip_with_segments(tmp_path):
    samples = some_samples(tmp_path)
    path = write_manifest(samples, tmp_path / "manifest.jsonl")
    assert read_manifest(path) == samples
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["video"] == "videos/a.mp4" and "start" not in rows[0]  # relative; whole videos carry no span
    assert (rows[3]["start"], rows[3]["end"]) == (1.5, 3.25)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # the temporary file is gone


def test_segment_rows_get_ids_per_span_and_merge_captions(tmp_path):
    lines = [{"video": "clips/v.mp4", "caption": "첫 장면", "start": "0:00.5", "end": 4},
             {"video": "clips/v.mp4", "caption": "둘째 장면", "start": 4, "end": "0:09"},
             {"video": "clips/v.mp4", "caption": "첫 장면의 다른 설명", "start": 0.5, "end": 4.0},
             {"video": "clips/w.mp4", "caption": "전체 영상"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines),
                                      encoding="utf-8")
    samples = read_manifest(tmp_path / "m.jsonl")
    assert [(s.id, s.captions, s.start, s.end) for s in samples] == [
        ("clips/v#1", ["첫 장면", "첫 장면의 다른 설명"], 0.5, 4.0), ("clips/v#2", ["둘째 장면"], 4.0, 9.0),
        ("clips/w", ["전체 영상"], None, None)]
    assert samples[0].where == f"{tmp_path / 'm.jsonl'}:1"


def test_csv_groups_one_caption_per_row(tmp_path):
    (tmp_path / "m.csv").write_text("video,caption,split,start,end\nv1.mp4,첫 번째 설명,train,,\nv2.mp4,다른 영상,val,,\n"
                                    "v1.mp4,두 번째 설명,train,,\nv2.mp4,구간,val,0:01,0:02.5\n", encoding="utf-8-sig")
    samples = read_manifest(tmp_path / "m.csv")
    assert [(s.id, s.video, s.captions, s.split, s.start, s.end) for s in samples] == [
        ("v1", tmp_path / "v1.mp4", ["첫 번째 설명", "두 번째 설명"], "train", None, None),
        ("v2", tmp_path / "v2.mp4", ["다른 영상"], "val", None, None),
        ("v2#1", tmp_path / "v2.mp4", ["구간"], "val", 1.0, 2.5)]


def test_json_ai_hub_and_msrvtt_layouts(tmp_path):
    ai_hub = {"annotations": [{"id": "k1", "file_path": "clips/k1.mp4", "caption_ko": ["사람이 걷는다.", "걷는 사람"]},
                              {"id": "k2", "file_path": "clips/k2.mp4", "caption_ko": "차가 달린다."}]}
    (tmp_path / "aihub.json").write_text(json.dumps(ai_hub, ensure_ascii=False), encoding="utf-8")
    samples = read_manifest(tmp_path / "aihub.json")
    assert [(s.id, s.video, s.captions) for s in samples] == [
        ("k1", tmp_path / "clips" / "k1.mp4", ["사람이 걷는다.", "걷는 사람"]),
        ("k2", tmp_path / "clips" / "k2.mp4", ["차가 달린다."])]
    msrvtt = {"videos": [{"video_id": "video0", "split": "train"}, {"video_id": "video1", "split": "validate"}],
              "sentences": [{"video_id": "video0", "caption": "개가 뛴다."}, {"video_id": "video1", "caption": "춤"},
                            {"video_id": "video0", "caption": "강아지가 달린다."}]}
    (tmp_path / "msrvtt.json").write_text(json.dumps(msrvtt, ensure_ascii=False), encoding="utf-8")
    samples = read_manifest(tmp_path / "msrvtt.json", video_dir=tmp_path / "all")
    assert [(s.id, s.video, s.captions, s.split) for s in samples] == [
        ("video0", tmp_path / "all" / "video0.mp4", ["개가 뛴다.", "강아지가 달린다."], "train"),
        ("video1", tmp_path / "all" / "video1.mp4", ["춤"], "val")]


GOOD_LINE = '{"id": "ok", "video": "ok.mp4", "captions": ["좋은 설명"]}'
BAD_LINES = {
    "bad JSON": ('{"id": "x", "video": "x.mp4", "captions": ["a"]', "not valid JSON"),
    "not an object": ('["x.mp4", "caption"]', "expected an object"),
    "missing video": ('{"id": "x", "captions": ["a"]}', "no video field"),
    "missing caption": ('{"id": "x", "video": "x.mp4"}', "no caption field"),
    "empty caption": ('{"id": "x", "video": "x.mp4", "captions": ["a", "  "]}', "caption 2 is empty"),
    "caption not text": ('{"id": "x", "video": "x.mp4", "captions": [3]}', "caption 1 is empty or not text"),
    "unknown split": ('{"id": "x", "video": "x.mp4", "captions": ["a"], "split": "holdout"}', "unknown split"),
    "duplicate id": ('{"id": "ok", "video": "y.mp4", "captions": ["a"]}', "duplicate id 'ok'"),
    "video twice": ('{"id": "z", "video": "ok.mp4", "captions": ["a"]}', "listed twice"),
    "start only": ('{"video": "x.mp4", "captions": ["a"], "start": 3}', "needs both start and end"),
    "empty span": ('{"video": "x.mp4", "captions": ["a"], "start": 3, "end": "0:03"}', "empty span"),
    "bad timestamp": ('{"video": "x.mp4", "captions": ["a"], "start": "1분", "end": 9}', "unparsable timestamp '1분'"),
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_malformed_line_names_file_and_line(tmp_path, kind):
    line, problem = BAD_LINES[kind]
    path = tmp_path / "m.jsonl"
    path.write_text(f"{GOOD_LINE}\n\n{line}\n", encoding="utf-8")  # the blank line 2 is skipped, not miscounted
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:3:") and problem in message and "\n" not in message
    if kind in ("duplicate id", "video twice"):
        assert f"{path}:1" in message.split(":3:", 1)[1]  # and names where it was first


def test_collecting_problems_lists_every_bad_row(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join([GOOD_LINE] + [line for line, _ in BAD_LINES.values()]) + "\n", encoding="utf-8")
    problems = []
    samples = read_manifest(path, problems=problems)
    assert [s.id for s in samples] == ["ok"]
    assert len(problems) == len(BAD_LINES)
    assert all(problem.startswith(f"{path}:{number}:") and expected in problem
               for number, (problem, (_, expected)) in enumerate(zip(problems, BAD_LINES.values()), 2))


def test_manifest_file_problems(tmp_path):
    (tmp_path / "cp949.jsonl").write_bytes(GOOD_LINE.replace("좋은 설명", "한국어").encode("cp949"))
    (tmp_path / "m.txt").write_text(GOOD_LINE)
    (tmp_path / "bad.json").write_text('[{"video": "a.mp4", "captions": ["x"]},\n {"video": "b.mp4", }]')
    (tmp_path / "entry.json").write_text('[{"video": "a.mp4", "captions": ["x"]}, {"video": "b.mp4"}]')
    cases = {"cp949.jsonl": "iconv -f cp949", "m.txt": "unknown manifest type",
             "missing.jsonl": "missing.jsonl: no such manifest file or label folder",
             "bad.json": "bad.json:2: not valid JSON", "entry.json": "entry.json: entry 2: no caption field"}
    for name, problem in cases.items():
        with pytest.raises(ManifestError, match=problem):
            read_manifest(tmp_path / name)


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
                "1 label files are CP949 text, not UTF-8, and were read as CP949: D2_BO_0001_000001.json"]
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
    assert len(caught) == 6 and "no caption" in str(caught[0].message)


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
