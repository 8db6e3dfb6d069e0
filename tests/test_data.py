"""data.py: frames (count, order, short and bad videos), preprocessing vs transformers' CLIPImageProcessor,
manifests (formats, malformed lines, duplicates), splits, bad-video handling, and the synthetic dataset."""
import json
import logging

import cv2
import numpy as np
import PIL
import pytest
import torch

from data import (CLIP_MEAN, CLIP_STD, ManifestError, Sample, VideoCaptionDataset, VideoError, check_videos, collate,
                  main, preprocess, read_frames, read_manifest, sample_indices, split_samples, write_manifest)
from synth import (ATTRIBUTES, CAPTION_TEMPLATES, CAPTION_WORDS, attribute_combinations, caption_choices, make_caption,
                   parse_caption_attributes, synth_dataset, write_video)

BITS = 8  # a frame's index is written as 8 black / white bars (8 px wide each) in its lower half


def indexed_frames(count: int, size: int = 64) -> np.ndarray:
    """uint8 RGB (count, size, size, 3): red upper half (checks RGB order), frame index in binary bars below."""
    frames = np.zeros((count, size, size, 3), np.uint8)
    frames[:, : size // 2] = (200, 30, 30)
    for index in range(count):
        for bit in range(BITS):
            if index >> bit & 1:
                frames[index, size // 2:, bit * size // BITS:(bit + 1) * size // BITS] = 255
    return frames


def frame_index(frame: np.ndarray) -> int:
    """Read the bars back; each bar's centre is averaged, which survives mp4 / JPEG compression."""
    size = frame.shape[1]
    bar = size // BITS
    bits = [frame[size * 5 // 8:size * 7 // 8, b * bar + 2:(b + 1) * bar - 2].mean() > 128 for b in range(BITS)]
    return sum(1 << b for b, on in enumerate(bits) if on)


def write_avi(frames: np.ndarray, path) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 8, frames.shape[2:0:-1])
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


# ── frames ─────────────────────────────────────────────────────────────────────────────────────────────────────────
def test_sample_indices_are_segment_centres():
    for total, num_frames in [(20, 8), (16, 8), (100, 8), (9, 4), (7, 7), (3, 8), (1, 8)]:
        expected = [int((k + 0.5) * total / num_frames) for k in range(num_frames)]  # float form of the same rule
        assert sample_indices(total, num_frames) == expected
        assert all(0 <= i < total for i in expected)


@pytest.mark.parametrize("count", [20, 9])
def test_read_frames_count_and_order(tmp_path, count):
    path = write_video(indexed_frames(count), tmp_path / "indexed.mp4")
    frames, info = read_frames(path, 8, return_info=True)
    assert frames.shape == (8, 64, 64, 3) and frames.dtype == np.uint8
    assert info.decoded == count and not info.repeated
    assert info.indices == sample_indices(count, 8)
    assert [frame_index(frame) for frame in frames] == info.indices  # the frames really are those, in that order
    assert frames[:, :32, :, 0].mean() > 150 and frames[:, :32, :, 2].mean() < 80  # RGB, not OpenCV's BGR


def test_short_video_repeats_frames_and_says_so(tmp_path):
    path = write_video(indexed_frames(3), tmp_path / "short.mp4")
    frames, info = read_frames(path, 8, return_info=True)
    assert frames.shape[0] == 8 and info.decoded == 3 and info.repeated
    shown = [frame_index(frame) for frame in frames]
    assert shown == info.indices and shown == sorted(shown) and set(shown) == {0, 1, 2}


def test_container_frame_count_is_not_trusted(tmp_path):
    """A truncated AVI still claims all its frames in its header; only the ones that decode are sampled."""
    write_avi(indexed_frames(20), tmp_path / "full.avi")
    data = (tmp_path / "full.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: int(len(data) * 0.7)])
    frames, info = read_frames(tmp_path / "cut.avi", 4, return_info=True)
    assert info.reported == 20 and 0 < info.decoded < 20
    assert info.indices == sample_indices(info.decoded, 4)
    assert [frame_index(frame) for frame in frames] == info.indices


def test_bad_videos_name_the_file_and_the_problem(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("this is a caption file, not a video\n" * 20)
    write_avi(np.zeros((0, 64, 64, 3), np.uint8), tmp_path / "zero.avi")
    cases = {"missing.mp4": "no such file", "empty.mp4": "empty file", "text.mp4": "not a readable video",
             "zero.avi": "zero decodable frames"}
    for name, problem in cases.items():
        with pytest.raises(VideoError) as caught:
            read_frames(tmp_path / name)
        message = str(caught.value)
        assert str(tmp_path / name) in message and problem in message and "\n" not in message


# ── preprocessing ──────────────────────────────────────────────────────────────────────────────────────────────────
def natural_frame(height: int, width: int, seed: int) -> np.ndarray:
    """A real-looking frame: smooth shading, hard and antialiased edges, text, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([110 + 90 * np.sin(5 * x + c) * np.cos(3 * y - 2 * c) for c in range(3)], -1)
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    for _ in range(10):
        colour = rng.integers(0, 256, 3).tolist()
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(2, max(3, min(height, width) // 4)))
        cv2.circle(image, (cx, cy), r, colour, -1, cv2.LINE_AA)
        cv2.rectangle(image, (cx, cy), (cx + r, cy + r // 2), colour[::-1], -1)
    cv2.putText(image, "kovlm 336", (width // 8, height // 2), cv2.FONT_HERSHEY_SIMPLEX, max(height, width) / 400,
                (255, 255, 255), 1, cv2.LINE_AA)
    return image


def clip_reference(size: int):
    import transformers
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return processor_class(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                           do_convert_rgb=True, do_resize=True, do_center_crop=True, do_rescale=True,
                           do_normalize=True, resample=3, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


FRAME_SHAPES = {"landscape": (240, 320), "portrait": (320, 180), "square": (200, 200), "odd": (133, 217),
                "tall": (301, 99), "tiny": (40, 56)}


@pytest.mark.parametrize("size", [336, 64])
@pytest.mark.parametrize("shape", list(FRAME_SHAPES))
def test_preprocess_matches_clip_image_processor(size, shape):
    """Target: max |difference| <= 2/255 and mean <= 0.5/255, in pixel units (normalised difference x std)."""
    if shape == "tall" and int(PIL.__version__.split(".")[0]) < 13:
        pytest.skip("Pillow < 13 always resizes horizontally first; kovlm follows Pillow >= 13 (Pillow#9549)")
    height, width = FRAME_SHAPES[shape]
    frames = np.stack([natural_frame(height, width, seed) for seed in range(2)])
    ours = preprocess(frames, size)
    reference = torch.from_numpy(np.stack(clip_reference(size)(images=list(frames), return_tensors="np")
                                          ["pixel_values"]))
    assert ours.shape == reference.shape == (2, 3, size, size) and ours.dtype == torch.float32
    pixels = (ours - reference).abs() * torch.tensor(CLIP_STD).view(3, 1, 1) * 255
    assert pixels.max() <= 2 and pixels.mean() <= 0.5, (pixels.max(), pixels.mean())


# ── manifests ──────────────────────────────────────────────────────────────────────────────────────────────────────
def some_samples(root) -> list[Sample]:
    return [Sample("a", root / "videos" / "a.mp4", ["빨간 원이 움직인다.", "붉은 원이 이동한다."], "train",
                   {"colour": "red"}),
            Sample("b", root / "clips" / "b.mp4", ["파란 별이 위로 올라간다."], "test"),
            Sample("c", root / "c.mp4", ["노란 세모가 나온다.", "노란색 삼각형", "세 번째 설명"])]


def test_jsonl_round_trip(tmp_path):
    samples = some_samples(tmp_path)
    path = write_manifest(samples, tmp_path / "manifest.jsonl")
    assert read_manifest(path) == samples
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0])["video"] == "videos/a.mp4"  # relative


def test_csv_groups_one_caption_per_row(tmp_path):
    (tmp_path / "m.csv").write_text("video,caption,split\nv1.mp4,첫 번째 설명,train\nv2.mp4,다른 영상,val\n"
                                    "v1.mp4,두 번째 설명,train\n", encoding="utf-8-sig")
    samples = read_manifest(tmp_path / "m.csv")
    assert [(s.id, s.video, s.captions, s.split) for s in samples] == [
        ("v1", tmp_path / "v1.mp4", ["첫 번째 설명", "두 번째 설명"], "train"),
        ("v2", tmp_path / "v2.mp4", ["다른 영상"], "val")]


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


def test_manifest_file_problems(tmp_path):
    (tmp_path / "cp949.jsonl").write_bytes(GOOD_LINE.replace("좋은 설명", "한국어").encode("cp949"))
    (tmp_path / "m.txt").write_text(GOOD_LINE)
    (tmp_path / "bad.json").write_text('[{"video": "a.mp4", "captions": ["x"]},\n {"video": "b.mp4", }]')
    (tmp_path / "entry.json").write_text('[{"video": "a.mp4", "captions": ["x"]}, {"video": "b.mp4"}]')
    cases = {"cp949.jsonl": "iconv -f cp949", "m.txt": "unknown manifest type", "missing.jsonl": "no such manifest",
             "bad.json": "bad.json:2: not valid JSON", "entry.json": "entry.json: entry 2: no caption field"}
    for name, problem in cases.items():
        with pytest.raises(ManifestError, match=problem):
            read_manifest(tmp_path / name)


def test_split_samples_by_seed_and_by_manifest(tmp_path):
    samples = [Sample(f"v{i:03d}", tmp_path / f"v{i:03d}.mp4", ["설명"]) for i in range(500)]
    parts = split_samples(samples, seed=42)
    assert {name: len(part) for name, part in parts.items()} == {"train": 400, "val": 50, "test": 50}
    assert {s.id for part in parts.values() for s in part} == {s.id for s in samples}
    assert all(s.split == name for name, part in parts.items() for s in part)
    assert split_samples(samples[::-1], seed=42) == parts  # independent of manifest order
    assert split_samples(samples, seed=7)["test"] != parts["test"]
    assert split_samples(parts["val"] + parts["train"] + parts["test"], seed=0) == parts  # the manifest's splits
    with pytest.raises(ValueError, match="have no split"):
        split_samples(parts["train"] + samples[:3])


# ── bad videos in a data set, and batches ────────────────────────────────────────────────────────────────────────
def video_samples(tmp_path, good: int, bad: int) -> list[Sample]:
    write_video(indexed_frames(10, 32), tmp_path / "good.mp4")
    samples = []
    for i in range(good):
        (tmp_path / f"g{i}.mp4").write_bytes((tmp_path / "good.mp4").read_bytes())
        samples.append(Sample(f"g{i}", tmp_path / f"g{i}.mp4", [f"설명 {i}"]))
    return samples + [Sample(f"b{i}", tmp_path / f"bad{i}.mp4", ["설명"]) for i in range(bad)]  # missing files


def test_check_videos_skips_or_aborts(tmp_path, caplog):
    samples = video_samples(tmp_path, good=20, bad=1)
    with pytest.raises(VideoError, match="bad0.mp4: no such file"):
        check_videos(samples)
    with caplog.at_level(logging.WARNING, logger="data"):
        kept = check_videos(samples, skip_bad=True, max_bad_fraction=0.05)  # 1 of 21 is under 5%
    assert [s.id for s in kept] == [f"g{i}" for i in range(20)]
    assert "bad0.mp4" in caplog.text
    with pytest.raises(VideoError, match=r"at least 1 of 12 videos are bad, more than the 5% allowed \(first: .*bad0.mp4\)"):
        check_videos(video_samples(tmp_path, good=10, bad=2), skip_bad=True)


def test_dataset_and_collate(tmp_path):
    samples = video_samples(tmp_path, good=3, bad=0)
    dataset = VideoCaptionDataset(samples, num_frames=4, image_size=32)
    batch = collate([dataset[0], dataset[2]])
    assert batch["frames"].shape == (2, 4, 3, 32, 32) and batch["frames"].dtype == torch.float32
    assert batch["ids"] == ["g0", "g2"] and batch["captions"] == [["설명 0"], ["설명 2"]]
    assert batch["videos"] == [samples[0].video, samples[2].video]


# ── the synthetic dataset ──────────────────────────────────────────────────────────────────────────────────────────
def test_parse_inverts_every_template_value_and_synonym():
    combinations = attribute_combinations()
    assert len(combinations) == 6 * 5 * 4 * 4
    for template in CAPTION_TEMPLATES:
        for n, attributes in enumerate(combinations):  # every value, and every pair of values, in every template
            choices = caption_choices(attributes)
            words = {slot: options[n % len(options)] for slot, options in choices.items()}
            assert parse_caption_attributes(make_caption(template, words)) == attributes
        for attributes in combinations[:: len(combinations) // 24]:  # and every synonym of every slot
            choices = caption_choices(attributes)
            for slot, options in choices.items():
                for option in options:
                    words = {s: option if s == slot else o[0] for s, o in choices.items()}
                    assert parse_caption_attributes(make_caption(template, words)) == attributes


def test_parse_says_none_when_unsure():
    assert parse_caption_attributes("빨간 원과 파란 별이 검은 배경에서 움직인다.") == {
        "colour": None, "shape": None, "motion": None, "background": "black"}
    assert set(parse_caption_attributes("영상이 나온다.").values()) == {None}
    assert all(set(CAPTION_WORDS[name]) == set(values) for name, values in ATTRIBUTES.items())


def test_synth_is_deterministic_and_holds_out_combinations(tmp_path):
    options = dict(num=24, num_val=6, num_test=6, size=32, frames=8)
    first = synth_dataset(tmp_path / "a", seed=3, **options)
    second = synth_dataset(tmp_path / "b", seed=3, **options)
    assert first.read_text(encoding="utf-8") == second.read_text(encoding="utf-8")
    samples = read_manifest(first)
    for sample in samples[::5]:
        assert np.array_equal(read_frames(sample.video, 8), read_frames(tmp_path / "b" / "videos" /
                                                                        sample.video.name, 8))
    assert synth_dataset(tmp_path / "c", seed=4, **options).read_text(encoding="utf-8") != first.read_text(
        encoding="utf-8")
    combos = {name: {tuple(s.attributes.values()) for s in samples if s.split == name} for name in
              ("train", "val", "test")}
    assert [len([s for s in samples if s.split == name]) for name in ("train", "val", "test")] == [12, 6, 6]
    assert not combos["train"] & combos["val"] and not combos["train"] & combos["test"]
    assert not combos["val"] & combos["test"]
    for sample in samples:
        assert 2 <= len(sample.captions) <= 5 and len(set(sample.captions)) == len(sample.captions)
        assert all(parse_caption_attributes(caption) == sample.attributes for caption in sample.captions)
        frames, info = read_frames(sample.video, 8, return_info=True)
        assert frames.shape == (8, 32, 32, 3) and info.decoded == 8


def test_synth_heldout_is_the_same_for_any_size(tmp_path):
    """The held-out combinations depend on the seed only, so a bigger run tests on the same combinations."""
    small = read_manifest(synth_dataset(tmp_path / "s", 10, 5, num_val=0, num_test=5, size=16, frames=2))
    big = read_manifest(synth_dataset(tmp_path / "b", 20, 5, num_val=0, num_test=10, size=16, frames=2))
    assert [s.attributes for s in small if s.split == "test"] == [s.attributes for s in big if s.split == "test"][:5]


def test_synth_command_line(tmp_path):
    main(["synth", str(tmp_path / "out"), "--num", "5", "--seed", "1", "--size", "32", "--frames", "8"])
    samples = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert len(samples) == 5 and all(s.video.is_file() for s in samples)
    main(["check", str(tmp_path / "out" / "manifest.jsonl")])
    samples[0].video.write_bytes(b"")
    with pytest.raises(SystemExit, match=r"^error: .*train00000.mp4: empty file"):
        main(["check", str(tmp_path / "out" / "manifest.jsonl")])
