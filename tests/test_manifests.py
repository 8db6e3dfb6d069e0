"""manifests.py: kovlm's manifest layouts (JSONL / CSV / JSON / MSR-VTT, segments), malformed rows, bad files, seeded
subsets."""
import json

import pytest

from formats.manifests import ManifestError, Sample, read_manifest, subset_samples, write_manifest


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


# ── subsets ────────────────────────────────────────────────────────────────────────────────────────────────────────
def test_subset_is_seeded_and_stratified_by_split(tmp_path):
    samples = [Sample(f"{split}{i:03d}", tmp_path / f"{split}{i:03d}.mp4", ["설명"], split)
               for split, count in (("train", 800), ("val", 100), ("test", 100)) for i in range(count)]
    subset = subset_samples(samples, 500, seed=3)
    assert [sum(s.split == name for s in subset) for name in ("train", "val", "test")] == [400, 50, 50]
    assert subset == subset_samples(samples, 500, seed=3) and subset != subset_samples(samples, 500, seed=4)
    assert subset == [s for s in samples if s in subset]  # manifest order kept
    assert len(subset_samples(samples[:7] + samples[800:803], 5, seed=0)) == 5
    assert subset_samples(samples, 5000) == samples


def test_videos_to_caption_need_no_captions_and_a_bad_row_is_named_alone(tmp_path):
    """caption.py's manifests: rows without captions are read; a bad span is named by its line, the rest kept."""
    rows = [{"video": "a.mp4"}, {"video": "b.mp4", "start": 3, "end": 1}, {"video": "c.mp4", "start": 0, "end": 2},
            {"video": "d.mp4", "caption": ""}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    problems = []
    samples = read_manifest(tmp_path / "m.jsonl", problems=problems, need_captions=False)
    assert [(s.video.name, s.start, s.captions) for s in samples] == [("a.mp4", None, []), ("c.mp4", 0.0, []),
                                                                      ("d.mp4", None, [])]
    assert problems == [f"{tmp_path / 'm.jsonl'}:2: empty span: end 1 s is not after start 3 s"]
    with pytest.raises(ManifestError, match="m.jsonl:1: no caption field"):
        read_manifest(tmp_path / "m.jsonl")  # a labelled set still needs them


def test_a_manifest_that_is_a_symlink_loop_or_a_pipe_says_so(tmp_path):
    import os
    (tmp_path / "loop.jsonl").symlink_to(tmp_path / "loop.jsonl")
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(ManifestError, match="loop.jsonl: a symbolic link loop"):
        read_manifest(tmp_path / "loop.jsonl")
    with pytest.raises(ManifestError, match=r"pipe.jsonl: a named pipe \(FIFO\)"):
        read_manifest(tmp_path / "pipe.jsonl")
