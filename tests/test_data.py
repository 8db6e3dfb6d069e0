"""data.py: frames (count, order, short and bad videos, segments of H.264 B-frame and variable-frame-rate videos),
preprocessing vs transformers' CLIPImageProcessor, splits (with seeded subsets), the bad-video policy, and the command line
(convert, check)."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import PIL
import pytest
import torch

from data import CLIP_MEAN, CLIP_STD, BadVideos, Sample, VideoError, check_splits, load_splits, main, preprocess, \
    read_frames, read_manifest, sample_indices, split_samples, write_manifest
from demo.synth import write_video

ROOT = Path(__file__).resolve().parents[1]

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


def decoded_count(path) -> int:
    """Frames that really decode (the container's header may say otherwise)."""
    capture, count = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG), 0
    while capture.grab():
        count += 1
    capture.release()
    return count


# ── frames ─────────────────────────────────────────────────────────────────────────────────────────────────────────
def test_sample_indices_are_segment_centres():
    for total, num_frames in [(20, 8), (16, 8), (100, 8), (9, 4), (7, 7), (3, 8), (1, 8)]:
        expected = [int((k + 0.5) * total / num_frames) for k in range(num_frames)]  # float form of the same rule
        assert sample_indices(total, num_frames) == expected
        assert all(0 <= i < total for i in expected)


@pytest.mark.parametrize("count", [20, 9])
def test_read_frames_count_and_order(tmp_path, count):
    path = write_video(indexed_frames(count), tmp_path / "indexed.mp4")
    frames = read_frames(path, 8)
    assert frames.shape == (8, 64, 64, 3) and frames.dtype == np.uint8
    assert [frame_index(frame) for frame in frames] == sample_indices(count, 8)  # those frames, in that order
    assert frames[:, :32, :, 0].mean() > 150 and frames[:, :32, :, 2].mean() < 80  # RGB, not OpenCV's BGR


def test_short_video_repeats_frames(tmp_path):
    path = write_video(indexed_frames(3), tmp_path / "short.mp4")
    assert [frame_index(frame) for frame in read_frames(path, 8)] == [0, 0, 0, 1, 1, 2, 2, 2]


def test_container_frame_count_is_not_trusted(tmp_path):
    """A truncated AVI still claims all its frames in its header; only the ones that decode are sampled."""
    write_avi(indexed_frames(20), tmp_path / "full.avi")
    data = (tmp_path / "full.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: int(len(data) * 0.7)])
    capture = cv2.VideoCapture(str(tmp_path / "cut.avi"))
    assert capture.get(cv2.CAP_PROP_FRAME_COUNT) == 20
    decoded = decoded_count(tmp_path / "cut.avi")
    assert 0 < decoded < 20
    assert [frame_index(frame) for frame in read_frames(tmp_path / "cut.avi", 4)] == sample_indices(decoded, 4)


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


def test_a_symlink_loop_or_a_pipe_is_not_called_missing(tmp_path):
    (tmp_path / "loop.mp4").symlink_to(tmp_path / "loop.mp4")
    os.mkfifo(tmp_path / "pipe.mp4")
    with pytest.raises(VideoError, match="loop.mp4: a symbolic link loop"):
        read_frames(tmp_path / "loop.mp4")
    with pytest.raises(VideoError, match=r"pipe.mp4: a named pipe \(FIFO\), not a regular file; give a video file"):
        read_frames(tmp_path / "pipe.mp4")


# ── segments: a colour per second, H.264 with B-frames and variable frame rate ────────────────────────────────────
COLOURS = {"red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
SECONDS = list(COLOURS)  # second k shows SECONDS[k]


def colour_of(frame: np.ndarray) -> str:
    mean = frame.reshape(-1, 3).mean(0)
    return min(COLOURS, key=lambda name: np.abs(mean - COLOURS[name]).sum())


def encode_colour_seconds(path, rates: list[int]) -> None:
    """A 4 s H.264 video (3 B-frames) whose second k is one colour at rates[k] frames per second (VFR when they
    differ)."""
    import imageio_ffmpeg
    parts = [f"color=c={name}:s=32x32:r={rate}:d=1[s{k}]" for k, (name, rate) in enumerate(zip(SECONDS, rates))]
    graph = ";".join(parts) + ";" + "".join(f"[s{k}]" for k in range(4)) + "concat=n=4,format=yuv420p"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "lavfi", "-i", graph,
                    "-fps_mode", "vfr", "-c:v", "libx264", "-bf", "3", "-g", "12", str(path)], check=True)


@pytest.fixture(scope="module")
def colour_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    encode_colour_seconds(root / "bframes.mp4", [10, 10, 10, 10])
    encode_colour_seconds(root / "vfr.mp4", [5, 15, 2, 30])  # 53 frames: green holds 15 of them, blue 2
    return root


@pytest.mark.parametrize("name", ["bframes.mp4", "vfr.mp4"])
def test_segment_frames_come_from_the_segment_only(colour_videos, name):
    path = colour_videos / name
    for (start, end), expected in [((1, 2), ["green"] * 8), ((2, 3), ["blue"] * 4), ((0, 1), ["red"] * 8),
                                   ((3, 4), ["white"] * 8), ((2, 4), ["blue"] * 4 + ["white"] * 4)]:
        shown = [colour_of(frame) for frame in read_frames(path, len(expected), start, end)]
        assert shown == expected, (start, end, shown)
    assert [colour_of(frame) for frame in read_frames(path, 2, 1.95, 2.05)] == ["green", "blue"]
    whole = [colour_of(frame) for frame in read_frames(path, 8)]
    assert whole == sorted(whole, key=SECONDS.index) and {"red", "white"} <= set(whole)


def test_vfr_segment_is_sampled_by_time_not_by_frame_count(colour_videos):
    """A frame rate from the header (53 frames / 4 s) would put frames 13-26 in second 1: half red, half green."""
    shown = [colour_of(frame) for frame in read_frames(colour_videos / "vfr.mp4", 8, 1.0, 2.0)]
    assert shown == ["green"] * 8


def test_segment_outside_the_video(colour_videos):
    path = colour_videos / "bframes.mp4"
    assert colour_of(read_frames(path, 1, 3.9, 4.3)[0]) == "white"  # within the tolerance of the end
    with pytest.raises(VideoError, match=r"bframes.mp4: the span 3-6 s ends after the video \(4.00 s\)"):
        read_frames(path, 4, 3, 6)
    with pytest.raises(ValueError, match="0 <= start < end"):
        read_frames(path, 4, 2, 2)


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


# ── splits ─────────────────────────────────────────────────────────────────────────────────────────────
def samples_of(root, count, split=None, per_video=1) -> list[Sample]:
    return [Sample(f"{split or 'v'}{i:03d}#{k}", root / f"{split or 'v'}{i:03d}.mp4", ["설명"], split, start=k,
                   end=k + 1) if per_video > 1 else Sample(f"{split or 'v'}{i:03d}", root / f"{split or 'v'}{i:03d}.mp4",
                                                           ["설명"], split)
            for i in range(count) for k in range(per_video)]


def test_split_samples_by_seed_and_by_manifest(tmp_path):
    samples = samples_of(tmp_path, 500)
    parts = split_samples(samples, seed=42)
    assert {name: len(part) for name, part in parts.items()} == {"train": 400, "val": 50, "test": 50}
    assert {s.id for part in parts.values() for s in part} == {s.id for s in samples}
    assert all(s.split == name for name, part in parts.items() for s in part)
    assert split_samples(samples[::-1], seed=42) == parts  # independent of manifest order
    assert split_samples(samples, seed=7)["test"] != parts["test"]
    assert split_samples(parts["val"] + parts["train"] + parts["test"], seed=0) == parts  # the manifest's splits
    with pytest.raises(ValueError, match="have no split"):
        split_samples(parts["train"] + samples[:3])


def test_segments_of_one_video_stay_in_one_split(tmp_path):
    parts = split_samples(samples_of(tmp_path, 50, per_video=3), seed=1)
    videos = {name: {s.video for s in part} for name, part in parts.items()}
    assert not videos["train"] & videos["val"] and not videos["train"] & videos["test"]
    assert not videos["val"] & videos["test"]
    assert [len(part) for part in parts.values()] == [120, 15, 15]


def test_load_splits_with_max_samples(tmp_path):
    manifest = write_manifest(samples_of(tmp_path, 40, "train") + samples_of(tmp_path, 10, "test")
                              + samples_of(tmp_path, 10, "val"), tmp_path / "m.jsonl")
    splits = load_splits(manifest, max_samples=12, seed=5)
    assert {name: len(part) for name, part in splits.items()} == {"train": 8, "val": 2, "test": 2}
    assert splits == load_splits(manifest, max_samples=12, seed=5)
    unsplit = write_manifest(samples_of(tmp_path, 100), tmp_path / "unsplit.jsonl")
    assert sum(map(len, load_splits(unsplit, max_samples=20).values())) == 20


def test_check_splits_names_the_split_and_the_sample(tmp_path):
    good = {name: samples_of(tmp_path, 2, name) for name in ("train", "val", "test")}
    check_splits(good)
    with pytest.raises(ValueError, match="the val split is empty; .*, or a --val-fraction above 0$"):
        check_splits(good | {"val": []})
    with pytest.raises(ValueError, match="the test split is empty"):
        check_splits({"train": good["train"], "val": good["val"]})
    bad = Sample("x", tmp_path / "x.mp4", ["  "], "train", where="m.jsonl:7")
    with pytest.raises(ValueError, match=r"^m.jsonl:7: sample 'x' has no caption"):
        check_splits(good | {"train": good["train"] + [bad]})


# ── the bad-video policy ───────────────────────────────────────────────────────────────────────────────────────────
def test_bad_video_policy_raises_skips_or_aborts(caplog):
    errors = [VideoError(f"/data/bad{i}.mp4: no such file") for i in range(3)]
    with pytest.raises(VideoError, match="bad0.mp4"):
        BadVideos(40).report(errors[0])
    policy = BadVideos(40, skip_bad=True, max_bad_fraction=0.05)
    with caplog.at_level(logging.WARNING, logger="data"):
        policy.report(errors[0])
        policy.report(errors[1])  # 2 of 40 is 5%: still allowed
        policy.summarise()
    assert "bad0.mp4" in caplog.text and "bad1.mp4" in caplog.text and "skipped 2 of 40" in caplog.text
    with pytest.raises(VideoError, match=r"at least 3 of 40 videos are bad, more than the 5% allowed \(first: "
                                         r"/data/bad0.mp4"):
        policy.report(errors[2])


# ── the command line ───────────────────────────────────────────────────────────────────────────────────────────────
def test_convert_aihub_then_check(colour_videos, tmp_path, caplog):
    (tmp_path / "videos" / "AN").mkdir(parents=True)
    (tmp_path / "videos" / "AN" / "D2_AN_0001_000001.mp4").write_bytes((colour_videos / "vfr.mp4").read_bytes())
    entries = [{"timestamps": ["0:00.00000", "0:01.00000"], "trigger_action": "빨간 화면이 나온다."},
               {"timestamps": ["0:01.00000", "0:02.00000"], "trigger_action": "초록 화면으로 바뀐다."},
               {"timestamps": ["0:02.00000", "0:02.00000"], "trigger_action": "빈 구간"},
               {"timestamps": ["0:03.00000", "0:04.00000"], "trigger_action": ""}]
    labels = tmp_path / "labels" / "AN"
    labels.mkdir(parents=True)
    (labels / "D2_AN_0001_000001.json").write_text(json.dumps(
        {"video_name": "D2_AN_0001_000001.mp4", "duration": 4.0, "trigger_info": entries}, ensure_ascii=False),
        encoding="utf-8-sig")
    with caplog.at_level(logging.INFO, logger="data"):
        main(["convert", "aihub", str(tmp_path / "labels"), str(tmp_path / "videos"), "--output",
              str(tmp_path / "out" / "train.jsonl")])
    rows = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows == [{"id": "D2_AN_0001_000001#1", "video": "../videos/AN/D2_AN_0001_000001.mp4",
                     "captions": ["빨간 화면이 나온다."], "start": 0.0, "end": 1.0},
                    {"id": "D2_AN_0001_000001#2", "video": "../videos/AN/D2_AN_0001_000001.mp4",
                     "captions": ["초록 화면으로 바뀐다."], "start": 1.0, "end": 2.0}]
    assert "trigger_info entry 3: empty span" in caplog.text and "trigger_info entry 4: no caption" in caplog.text
    main(["check", str(tmp_path / "out" / "train.jsonl")])
    samples = read_manifest(tmp_path / "out" / "train.jsonl")
    assert [colour_of(read_frames(s.video, 4, s.start, s.end)[0]) for s in samples] == ["red", "green"]


def test_check_reports_every_problem_at_once(colour_videos, tmp_path, caplog):
    (tmp_path / "v.mp4").write_bytes((colour_videos / "bframes.mp4").read_bytes())
    (tmp_path / "empty.mp4").write_bytes(b"")
    lines = ['{"video": "v.mp4", "caption": "좋은 구간", "start": 0, "end": 2}',
             '{"video": "v.mp4", "caption": "영상 밖", "start": 3, "end": 9}',
             '{"video": "empty.mp4", "caption": "빈 파일"}',
             '{"video": "v.mp4", "caption": "나쁜 시각", "start": "3초", "end": 4}',
             '{"video": "missing.mp4", "caption": "없는 파일"}', 'not json']
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.ERROR, logger="data"), pytest.raises(ValueError, match="5 problems in 4 samples"):
        main(["check", str(tmp_path / "m.jsonl")])
    reported = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    expected = [(4, "unparsable timestamp"), (6, "not valid JSON"), (2, "ends after the video"), (3, "empty file"),
                (5, "no such file")]
    assert len(reported) == 5
    assert all(message.startswith(f"{tmp_path / 'm.jsonl'}:{line}:") and problem in message
               for message, (line, problem) in zip(reported, expected)), reported


def test_short_training_run_on_a_converted_manifest_of_spans(colour_videos, tiny_bases, tmp_path):
    from train import TrainConfig
    from train import main as train_main
    clip, llm = tiny_bases
    labels, captions = tmp_path / "labels", ["빨간 화면", "초록 화면", "파란 화면", "흰 화면"]
    for v in range(4):
        (tmp_path / "videos" / f"clip{v}.mp4").parent.mkdir(exist_ok=True)
        (tmp_path / "videos" / f"clip{v}.mp4").write_bytes((colour_videos / ("vfr.mp4", "bframes.mp4")[v % 2])
                                                           .read_bytes() + b"\0" * v)  # four distinct files
        entries = [{"timestamps": [f"0:0{k}.00000", f"0:0{k + 1}.00000"], "trigger_action": captions[k]}
                   for k in range(4)]
        labels.mkdir(exist_ok=True)
        (labels / f"clip{v}.json").write_text(json.dumps({"video_name": f"clip{v}.mp4", "duration": 4.0,
                                                          "trigger_info": entries}, ensure_ascii=False))
    main(["convert", "aihub", str(labels), str(tmp_path / "videos"), "--output", str(tmp_path / "train.jsonl")])
    assert len(read_manifest(tmp_path / "train.jsonl")) == 16
    cfg = TrainConfig(clip=str(clip), llm=str(llm), train_manifest=str(tmp_path / "train.jsonl"),
                      output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), projector="perceiver",
                      peft="lora", stage1_epochs=1, stage2_epochs=1, batch_size=4, num_frames=2, num_queries=4,
                      lora_r=4, lora_alpha=8, eval_batch_size=8, max_new_tokens=4, num_workers=0, dtype="fp32",
                      val_fraction=0.25, test_fraction=0.25)
    train_main(cfg)
    assert (tmp_path / "run" / "checkpoints" / "final_model.pt").is_file()
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 16  # one entry per segment


def test_convert_never_replaces_an_output_without_overwrite(tmp_path, caplog):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "v.mp4").write_bytes(b"")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "v.json").write_text(json.dumps(
        {"video_name": "v.mp4", "trigger_info": [{"timestamps": [0, 1], "trigger_action": "새 캡션"}]}), encoding="utf-8")
    (tmp_path / "train.jsonl").write_text("kept\n")
    command = ["convert", "aihub", str(tmp_path / "labels"), str(tmp_path / "videos"), "--output",
               str(tmp_path / "train.jsonl")]
    with pytest.raises(ValueError, match="train.jsonl exists; add --overwrite to replace it"):
        main(command)
    assert (tmp_path / "train.jsonl").read_text() == "kept\n"
    main(command + ["--overwrite"])
    assert json.loads((tmp_path / "train.jsonl").read_text())["captions"] == ["새 캡션"]


@pytest.mark.parametrize("command, words", [
    (["convert", "aihub", "L", "V", "--output", "o.jsonl", "--max-samples", "0"], "--max-samples must be a whole "
                                                                                  "number >= 1, got 0"),
    (["check", "m.jsonl", "--frames", "0"], "--frames must be a whole number >= 1, got 0"),
])
def test_flags_are_refused_before_anything_is_read(command, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = subprocess.run([sys.executable, str(ROOT / "data.py"), *command], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.strip() == f"error: {words}"
