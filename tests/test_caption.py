"""caption.py on real encoded videos (H.264 and VP9 written by imageio-ffmpeg's ffmpeg) and bad files: the lines,
the JSONL, the report, the exit status; the same captions as evaluate.py; an exported folder in place of a checkpoint;
captions appended as made and resumed after kill -9; flags and outputs refused before the model loads."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import encode_colour_seconds
from test_export import save_random_checkpoint

import caption
from caption import Clip, caption_videos, collect_videos, load_captioner
from data import preprocess, read_frames
from evaluate import evaluate_checkpoint
from export import export_checkpoint
from nf4 import bnb

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
    assert result.returncode == 1, result.stderr[-3000:]  # some inputs failed
    assert result.stdout.strip(), result.stderr[-3000:]
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
    model, _, _ = load_captioner(exported, device=torch.device("cpu"), quant="nf4")  # the merged LM stored in 4 bits
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.llm.modules())
    records, _ = caption_videos(model, [Clip(v) for v in good], batch_size=2, max_new_tokens=6)
    assert len(records) == 2 and all(isinstance(r["caption"], str) for r in records)


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


# ── outputs kept safe, flags checked before loading ───────────────────────────────────────────────────────────────
def refused(argv, capsys=None) -> str:
    """caption.py's main in this process: the one `error:` line it exits with."""
    with pytest.raises(SystemExit) as stopped:
        caption.main([str(a) for a in argv])
    assert str(stopped.value.code).startswith("error: ") and "\n" not in str(stopped.value.code)
    return str(stopped.value.code)


@pytest.mark.parametrize("flags, words", [
    (["--max-new-tokens", "100000"], "--max-new-tokens 100000: the prompt"),
    (["--max-new-tokens", "600"], "over the LM's 512; lower --max-new-tokens to at most"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be a whole number >= 1, got -1"),
    (["--batch-size", "0"], "--batch-size must be a whole number >= 1, got 0"),
    (["--workers", "0"], "--workers must be a whole number >= 1, got 0"),
    (["--temperature", "-1"], "--temperature must be a finite number above 0"),
    (["--do-sample", "--temperature", "0"], "leave out --do-sample"),
    (["--do-sample", "--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--device", "tpu9"], "--device tpu9: not a device name"),
    (["--resume"], "--resume works on --output"),
    (["--quant", "nf4"], "--quant nf4 applies to export folders only"),
] + ([(["--device", "cuda"], "--device cuda: this torch sees no CUDA GPU")] if not torch.cuda.is_available() else []))
def test_flags_are_refused_before_the_model_loads(checkpoint, videos, flags, words, monkeypatch):
    monkeypatch.setattr(caption, "load_captioner", None)  # loading would fail the test with a TypeError
    assert re.search(words, refused([checkpoint, videos[1][0], *flags]))


def test_outputs_are_checked_before_loading_and_never_replaced_without_overwrite(checkpoint, videos, tmp_path,
                                                                                monkeypatch):
    monkeypatch.setattr(caption, "load_captioner", None)
    good = videos[1][0]
    (tmp_path / "old.jsonl").write_text("kept\n")
    (tmp_path / "file").write_text("")
    run = checkpoint.parent.parent
    (tmp_path / "run_link").symlink_to(run)
    cases = {tmp_path / "old.jsonl": "old.jsonl exists; add --overwrite to replace it (or --resume to continue it)",
             tmp_path: "is a folder; give a file name",
             tmp_path / "file" / "c.jsonl": "is a file (or a broken link), where a folder is needed",
             tmp_path / ("c" * 256 + ".jsonl"): "bytes, over the file system's 255",
             run / "samples" / "predictions.json": f"belongs to the training run in {run}",
             tmp_path / "run_link" / "checkpoints" / "best_model.pt": f"belongs to the training run in {run}"}
    for output, words in cases.items():
        overwrite = ["--overwrite"] if "run" in str(output) else []  # a run's files: refused even so
        assert words in refused([checkpoint, good, "--output", output, *overwrite])
    assert "--cache-dir" in refused([checkpoint, good, "--cache-dir", tmp_path / "file"])  # a file, not a folder
    assert (tmp_path / "old.jsonl").read_text() == "kept\n" and not (run / "samples").exists()


def test_captions_are_appended_as_made_and_resume_skips_those_done(checkpoint, tiny_manifest, tmp_path):
    """kill -9 mid-run keeps every caption made, as complete lines; --resume captions only the rest."""
    import signal
    import time
    out = tmp_path / ("c" * 245 + ".jsonl")  # a legal 251-byte name
    command = [sys.executable, "caption.py", str(checkpoint), str(tiny_manifest.parent), "--output", str(out),
               "--batch-size", "1", "--max-new-tokens", "40"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline and (
            not out.exists() or out.read_bytes().count(b"\n") < 4):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    kept = out.read_bytes()
    assert kept.endswith(b"\n") and all(json.loads(line) for line in kept.splitlines())  # whole lines only
    first = [json.loads(line)["video"] for line in kept.splitlines()[1:]]
    assert len(first) >= 3
    result = run_caption(*command[2:], "--resume", "--report")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert "header" in records[0] and all("header" not in r for r in records[1:])
    videos = [r["video"] for r in records[1:]]
    assert videos[:len(first)] == first and sorted(videos) == sorted(str(v) for v in tiny_manifest.parent.glob("*.mp4"))
    assert (out.parent / "report.html").read_text(encoding="utf-8").count('<tr class="video">') == 20
    before = out.read_bytes()
    other = run_caption(*command[2:6], "--resume", "--max-new-tokens", "5")
    assert other.returncode == 1 and "was written with another decoding" in other.stderr
    assert out.read_bytes() == before  # a refused resume changes nothing


def test_a_manifest_needs_no_captions_and_a_bad_span_row_is_named_alone(checkpoint, videos, tmp_path):
    _, good = videos
    rows = [{"video": str(good[0])}, {"video": str(good[1]), "start": 2, "end": 1}, {"video": str(good[1])}]
    (tmp_path / "unlabelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_caption(checkpoint, tmp_path / "unlabelled.jsonl", "--max-new-tokens", "3")
    assert result.returncode == 1  # one input row failed
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [str(good[0]), str(good[1])]
    assert f"{tmp_path / 'unlabelled.jsonl'}:2: empty span: end 1 s is not after start 2 s" in result.stderr


def test_a_symlink_loop_or_a_pipe_is_not_called_missing(tmp_path):
    (tmp_path / "loop.mp4").symlink_to(tmp_path / "loop.mp4")
    os.mkfifo(tmp_path / "pipe.mp4")
    _, failures = collect_videos([str(tmp_path / "loop.mp4"), str(tmp_path / "pipe.mp4")])
    assert failures == [(str(tmp_path / "loop.mp4"), "a symbolic link loop (the link leads back to itself)"),
                        (str(tmp_path / "pipe.mp4"), "a named pipe (FIFO), not a regular file")]


def test_torch_threads_wait_passively_unless_the_user_says_otherwise():
    """OpenMP threads that spin between operations hold shared cores the captioning thread needs."""
    script = "import os, caption; print(os.environ['OMP_WAIT_POLICY'])"
    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | (
            {"OMP_WAIT_POLICY": given} if given else {})
        shown = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=env)
        assert shown.stdout.strip() == expected, shown.stderr
