"""caption.py on real encoded videos (H.264 and VP9 written by imageio-ffmpeg's ffmpeg) and bad files: the lines,
the JSONL, the report, the exit status; the same captions as evaluate.py; an exported folder in place of a checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import encode_colour_seconds
from test_export import save_random_checkpoint

from caption import Clip, caption_videos, collect_videos, load_captioner
from data import preprocess, read_frames
from evaluate import evaluate_checkpoint
from export import export_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def encode(path: Path, codec: str, *, frames: int = 6, size: int = 32, seed: int = 0, extra=()) -> Path:
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    raw = np.random.default_rng(seed).integers(0, 255, (frames, size, size, 3), dtype=np.uint8).tobytes()
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt",
                    "rgb24", "-s", f"{size}x{size}", "-r", "8", "-i", "-", "-c:v", codec, "-pix_fmt", "yuv420p",
                    *extra, str(path)], input=raw, check=True)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """good/: an H.264 mp4 and a VP9 webm; bad/: not a video, zero decodable frames, and a third good one."""
    root = tmp_path_factory.mktemp("encoded")
    (root / "good").mkdir()
    (root / "bad").mkdir()
    good = [encode(root / "good" / "a_h264.mp4", "libx264"), encode(root / "good" / "b_vp9.webm", "libvpx-vp9", seed=1)]
    (root / "bad" / "notes.mp4").write_text("not a video")
    whole = encode(root / "faststart.mp4", "libx264", seed=2, extra=("-movflags", "+faststart")).read_bytes()
    (root / "bad" / "truncated.mp4").write_bytes(whole[:whole.find(b"mdat") + 12])  # header, no frame data
    return root, good


@pytest.fixture(scope="module")
def checkpoint(tiny_bases, tiny_manifest, tmp_path_factory):
    clip, llm = tiny_bases
    out = tmp_path_factory.mktemp("run")
    return save_random_checkpoint(out / "checkpoints" / "best_model.pt", clip, llm, tiny_manifest, method="dora")


def run_caption(*args):
    return subprocess.run([sys.executable, "caption.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200"))


def test_cli_captions_good_videos_and_names_each_bad_one(checkpoint, videos, tmp_path):
    root, good = videos
    out = tmp_path / "out" / "captions.jsonl"
    result = run_caption(checkpoint, root / "good", root / "bad", root / "missing.mp4", "--output", out, "--report",
                         "--max-new-tokens", "5", "--batch-size", "2")
    assert result.returncode == 1  # some inputs failed
    lines = result.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(v) for v in good]  # folder order, as they come
    errors = result.stderr
    assert f"{root / 'missing.mp4'}: no such file or folder" in errors
    assert f"{root / 'bad' / 'notes.mp4'}: not a readable video" in errors
    assert f"{root / 'bad' / 'truncated.mp4'}: opens but has zero decodable frames" in errors
    assert "2 captions, 3 failed inputs" in errors and "captions/s" in errors and "Traceback" not in errors
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0]["header"]["decoding"]["max_new_tokens"] == 5 and records[0]["header"]["num_frames"] == 3
    assert [(r["video"], r["caption"]) for r in records[1:]] == [tuple(line.split("\t")) for line in lines]
    page = (out.parent / "report.html").read_text(encoding="utf-8")
    assert page.count('<tr class="video">') == 2 and page.count("data:image/jpeg") == 2 * 3


def test_all_good_exits_zero_and_help_shows_defaults(checkpoint, videos):
    root, good = videos
    result = run_caption(checkpoint, good[1], "--max-new-tokens", "3")
    assert result.returncode == 0 and result.stdout.startswith(f"{good[1]}\t")
    shown = run_caption("--help")
    assert "(default: 16)" in shown.stdout and "(default: 4)" in shown.stdout


def test_same_captions_as_evaluate(checkpoint, tiny_manifest, tmp_path):
    """The run's test videos: evaluate.py (cached fp16 features) and caption.py (decoded now, rounded alike)."""
    results = evaluate_checkpoint(checkpoint, split="test", batch_size=4, max_new_tokens=6, output_dir=tmp_path,
                                  show=False, report=False)
    model, features_dtype, _ = load_captioner(checkpoint, device=torch.device("cpu"))
    assert features_dtype == torch.float16  # the checkpoint was trained from the feature cache
    records, failures = caption_videos(model, [Clip(Path(p["video"])) for p in results["predictions"]],
                                       batch_size=4, max_new_tokens=6, features_dtype=features_dtype)
    assert failures == []
    assert [r["caption"] for r in records] == [p["prediction"] for p in results["predictions"]]


def test_exported_folder_gives_the_checkpoints_captions(checkpoint, videos, tmp_path):
    _, good = videos
    exported = export_checkpoint(checkpoint, tmp_path / "exported", dtype="fp32")
    captions = {}
    for source in (checkpoint, exported):
        model, features_dtype, _ = load_captioner(source, device=torch.device("cpu"))
        records, _ = caption_videos(model, [Clip(v) for v in good], batch_size=2, max_new_tokens=6,
                                    features_dtype=features_dtype)
        captions[source] = [r["caption"] for r in records]
    assert captions[checkpoint] == captions[exported] and len(captions[exported]) == 2


def test_cache_is_filled_only_when_asked_and_then_read(checkpoint, videos, tmp_path):
    from features import FeatureCache
    _, good = videos
    model, features_dtype, _ = load_captioner(checkpoint, device=torch.device("cpu"))
    cache = FeatureCache(tmp_path / "cache", tower=model.vision.fingerprint, num_frames=3,
                         image_size=model.vision.config.image_size, layer=model.config.vision_layer)
    first, _ = caption_videos(model, [Clip(v) for v in good], max_new_tokens=6, cache=cache,
                              features_dtype=features_dtype)
    assert all(cache.holds(v) for v in good)
    model.encode_video = None  # a second run must not touch the tower
    again, _ = caption_videos(model, [Clip(v) for v in good], max_new_tokens=6, cache=cache,
                              features_dtype=features_dtype)
    assert again == first


def test_segments_of_one_video_get_one_cache_entry_each(checkpoint, tmp_path):
    """Two spans of one encoded video (a colour per second) in a manifest, captioned with --cache-dir: two entries,
    each that span's features, and none for the whole video."""
    from features import FeatureCache
    encode_colour_seconds(tmp_path / "colours.mp4", [10, 10, 10, 10])
    segments = [{"video": "colours.mp4", "caption": "빨간 화면", "start": 0, "end": 1},
                {"video": "colours.mp4", "caption": "초록 화면", "start": 1, "end": 2}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(s, ensure_ascii=False) for s in segments) + "\n",
                                      encoding="utf-8")
    result = run_caption(checkpoint, tmp_path / "m.jsonl", "--cache-dir", tmp_path / "cache", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [
        f"{tmp_path / 'colours.mp4'}#0-1", f"{tmp_path / 'colours.mp4'}#1-2"]
    model, _, _ = load_captioner(checkpoint, device=torch.device("cpu"))
    cache = FeatureCache(tmp_path / "cache", tower=model.vision.fingerprint, num_frames=model.config.num_frames,
                         image_size=model.vision.config.image_size, layer=model.config.vision_layer)
    clips = [Clip(tmp_path / "colours.mp4", s["start"], s["end"]) for s in segments]
    entries = sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors"))
    assert entries == sorted(cache.path_for(clip.as_sample()).name for clip in clips) and len(set(entries)) == 2
    assert not cache.holds(tmp_path / "colours.mp4")  # the whole video was never encoded
    red, green = (cache.load(clip.as_sample()).float() for clip in clips)
    for clip, cached in zip(clips, (red, green)):  # each entry holds its own span's features (fp16 storage)
        frames = read_frames(clip.video, model.config.num_frames, start=clip.start, end=clip.end)
        direct = model.encode_video(preprocess(frames, model.vision.config.image_size)[None])[0]
        torch.testing.assert_close(cached, direct.float(), atol=2e-3, rtol=1e-3)
    assert (red - green).abs().max() > 0.1  # and the two spans' features differ


def test_collect_videos_folders_recursion_and_manifests(videos, tiny_manifest, tmp_path):
    root, good = videos
    found, failures = collect_videos([str(root)])
    assert [c.video for c in found] == [root / "faststart.mp4"] and failures == []
    found, _ = collect_videos([str(root)], recursive=True)
    assert {c.video for c in found} >= set(good) | {root / "bad" / "notes.mp4"}
    (tmp_path / "empty").mkdir()
    _, failures = collect_videos([str(tmp_path / "empty")])
    assert failures == [(str(tmp_path / "empty"), "a folder without video files; --recursive looks into its "
                                                  "subfolders")]
    found, _ = collect_videos([str(tiny_manifest)])
    assert len(found) == 20 and found[0].video == tiny_manifest.parent / "v0.mp4"
