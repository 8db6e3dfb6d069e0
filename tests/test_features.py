"""features.py: the feature cache equals encoding afresh and runs the tower once; its key holds the span; each kind
of corrupt entry is recomputed with one warning naming the video; bad videos (missing ones too) go through the one
policy with the cache on and off; the frames dataset and batches."""
import hashlib
import json
import logging
import os
import struct
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import write_noise_video
from torch import nn

import features
from data import Sample, VideoError, preprocess, read_frames
from features import CACHE_DTYPE, FeatureCache, VideoCaptionDataset, check_videos, collate_features, \
    feature_cache_for, fill_feature_cache, prepare_splits
from vision import ImageProcessing, default_processor

FRAMES, SIZE = 3, 16
CLIP_PROCESSING = ImageProcessing.from_hf(default_processor("clip", SIZE))


class TinyTower(nn.Module):
    """The part of vlm.VLM the cache uses: a patch embedding as the tower, its processing (CLIP's at SIZE:
    data.preprocess's numbers), encode_video, config.num_frames."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.vision = nn.Module()
        self.vision.embeddings = nn.Module()
        self.vision.embeddings.patch_embedding = nn.Conv2d(3, 8, kernel_size=8, stride=8)
        self.vision.fingerprint, self.vision.config = "tiny tower", SimpleNamespace(image_size=SIZE)
        self.vision.processing = CLIP_PROCESSING
        self.config = SimpleNamespace(num_frames=FRAMES, vision_layer=-2)
        self.calls = 0

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        batch, frames = pixels.shape[:2]
        x = self.vision.embeddings.patch_embedding(pixels.flatten(0, 1))  # (I, Dv, 2, 2)
        return x.flatten(2).transpose(1, 2).unflatten(0, (batch, frames))  # (B, F, P, Dv)


def encode_directly(model, sample) -> torch.Tensor:
    frames = preprocess(read_frames(sample.video, FRAMES, sample.start, sample.end), SIZE)
    return model.encode_video(frames[None])[0]


@pytest.fixture
def videos(tmp_path):
    """Three whole noise videos (16 frames at 8 fps: 2 s) and the two 1 s segments of the first."""
    whole = [Sample(f"v{i}", write_noise_video(tmp_path / f"v{i}.mp4", seed=i, num_frames=16), [f"캡션 {i}"])
             for i in range(3)]
    return whole + [Sample(f"v0#{k}", whole[0].video, ["구간"], start=k, end=k + 1) for k in (0, 1)]


def new_cache(root, num_frames=FRAMES):
    return FeatureCache(root, tower="tiny tower", num_frames=num_frames, image_size=SIZE, layer=-2)


def test_cache_equals_encoding_afresh_and_runs_the_tower_once(videos, tmp_path):
    model, cache = TinyTower(), new_cache(tmp_path / "cache")
    good, encoded = fill_feature_cache(model, videos, cache, batch_size=2, show_progress=False)
    assert (good, encoded, model.calls) == (videos, 5, 3)  # batches of 2, 2, 1
    for sample in videos:
        torch.testing.assert_close(cache.load(sample).float(), encode_directly(model, sample), atol=2e-3,
                                   rtol=1e-3)  # fp16 storage
    model.calls = 0
    assert fill_feature_cache(model, videos, cache, show_progress=False)[1] == 0 and not model.calls


def test_key_holds_the_span_the_content_and_the_settings(videos, tmp_path):
    model, cache = TinyTower(), new_cache(tmp_path / "cache")
    fill_feature_cache(model, videos, cache, show_progress=False)
    whole, first, second = videos[0], videos[3], videos[4]
    assert len({cache.path_for(s) for s in (whole, first, second)}) == 3 and len(list(cache.root.iterdir())) == 5
    assert cache.path_for(whole) == cache.path_for(whole.video)  # a path means the whole video
    assert cache.path_for(first) == cache.path_for(replace(first, start=0.0, end=1.0))  # the span 0-1 s, however typed
    assert not torch.equal(cache.load(first), cache.load(second))
    assert not new_cache(tmp_path / "cache", num_frames=4).holds(first)
    write_noise_video(whole.video, seed=99, num_frames=16)  # the same path, new content
    fresh = new_cache(tmp_path / "cache")
    assert not fresh.holds(first) and not fresh.holds(whole) and fresh.holds(videos[1])


def test_clip_processing_keeps_the_keys_of_before_and_any_other_processing_has_its_own(tmp_path):
    """Entries written before the other towers were keyed without the preprocessing (it was CLIP's, data.preprocess):
    a tower with CLIP's processor keys them alike; another processor (SigLIP's filter, ImageNet's mean) does not."""
    model = TinyTower()
    before = json.dumps({"tower": "tiny tower", "num_frames": FRAMES, "image_size": SIZE, "layer": -2})
    assert feature_cache_for(model, tmp_path).settings_key == hashlib.sha256(before.encode()).hexdigest()[:16]
    keys = {feature_cache_for(model, tmp_path).settings_key}
    for other in (replace(CLIP_PROCESSING, resample="bilinear"), replace(CLIP_PROCESSING, mean=(0.485, 0.456, 0.406)),
                  ImageProcessing.from_hf(default_processor("siglip", SIZE))):
        model.vision.processing = other
        keys.add(feature_cache_for(model, tmp_path).settings_key)
    assert len(keys) == 4


def swap_data(target, source) -> None:
    """Keep target's safetensors header, put source's tensor bytes under it (same shape and dtype)."""
    def split(path):
        raw = path.read_bytes()
        size = struct.unpack("<Q", raw[:8])[0]
        return raw[:8 + size], raw[8 + size:]
    target.write_bytes(split(target)[0] + split(source)[1])


def flip_last_byte(path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("corruption, problem", [
    (lambda cache, a, b: flip_last_byte(cache.path_for(a)), "checksum fails"),
    (lambda cache, a, b: swap_data(cache.path_for(a), cache.path_for(b)), "checksum fails"),
    (lambda cache, a, b: cache.path_for(a).write_bytes(cache.path_for(b).read_bytes()), "another video or span"),
    (lambda cache, a, b: cache.path_for(a).write_bytes(b"\x00torn write"), "unreadable")])
def test_corrupt_entry_is_recomputed_with_one_warning_naming_the_video(videos, tmp_path, corruption, problem):
    model, cache = TinyTower(), new_cache(tmp_path / "cache")
    fill_feature_cache(model, videos, cache, show_progress=False)
    target, other = videos[3], videos[1]
    expected = cache.load(target)
    corruption(cache, target, other)
    fresh = new_cache(tmp_path / "cache")  # a new run: nothing verified yet
    with pytest.warns(UserWarning) as caught:
        _, encoded = fill_feature_cache(model, videos, fresh, show_progress=False)
    assert encoded == 1 and len(caught) == 1
    assert problem in str(caught[0].message) and str(target.video) in str(caught[0].message)
    torch.testing.assert_close(fresh.load(target), expected)


def test_entry_metadata_and_writer_unique_temporary_names(videos, tmp_path, monkeypatch):
    cache, replaced = new_cache(tmp_path / "cache"), []
    real_replace = os.replace
    monkeypatch.setattr(features.os, "replace", lambda src, dst: (replaced.append(str(src)), real_replace(src, dst)))
    tensor = torch.randn(FRAMES, 4, 8)
    cache.save(videos[3], tensor)
    cache.save(videos[3], tensor)
    assert len(set(replaced)) == 2 and all(f".{os.getpid()}." in name for name in replaced)
    with open(cache.path_for(videos[3]), "rb") as file:
        header = json.loads(file.read(struct.unpack("<Q", file.read(8))[0]))
    metadata = header["__metadata__"]
    assert metadata["key"] == cache.entry_key(videos[3]) and metadata["video"] == str(videos[3].video)
    assert metadata["sha256"] == hashlib.sha256(tensor.half().numpy().tobytes()).hexdigest()
    assert header["features"]["dtype"] == "F16" and cache.load(videos[3]).dtype == CACHE_DTYPE == torch.float16
    assert [p.name for p in cache.root.iterdir()] == [cache.path_for(videos[3]).name]


@pytest.mark.parametrize("with_cache", [True, False])
def test_skip_bad_drops_a_missing_video_with_the_cache_on_and_off(videos, tmp_path, caplog, with_cache):
    model, missing = TinyTower(), Sample("gone", tmp_path / "gone.mp4", ["없는 영상"])
    samples = videos + [missing]
    splits = {"train": samples}
    cache_dir = str(tmp_path / "cache") if with_cache else None
    with pytest.raises(VideoError, match="gone.mp4: no such file"):
        prepare_splits(model, dict(splits), cache_dir=cache_dir, skip_bad=False, show_progress=False)
    with caplog.at_level(logging.WARNING, logger="data"):
        kept, _ = prepare_splits(model, dict(splits), cache_dir=cache_dir, skip_bad=True, max_bad_fraction=0.2,
                                 show_progress=False)
    assert kept["train"] == videos and "gone.mp4: no such file" in caplog.text and "skipped 1 of 6" in caplog.text
    with pytest.raises(VideoError, match=r"at least 1 of 6 videos are bad, more than the 10% allowed"):
        prepare_splits(model, dict(splits), cache_dir=cache_dir, skip_bad=True, max_bad_fraction=0.1,
                       show_progress=False)


def test_frames_dataset_keeps_errors_and_batches(videos, tmp_path):
    samples = videos + [Sample("gone", tmp_path / "gone.mp4", ["없는 영상"])]
    with pytest.raises(VideoError, match="no such file"):
        VideoCaptionDataset(samples, FRAMES, CLIP_PROCESSING)[5]
    dataset = VideoCaptionDataset(samples, FRAMES, CLIP_PROCESSING, keep_errors=True)
    assert isinstance(dataset[5]["error"], VideoError) and "frames" not in dataset[5]
    batch = collate_features([dataset[0], dataset[4]])
    assert batch["frames"].shape == (2, FRAMES, 3, SIZE, SIZE) and batch["ids"] == ["v0", "v0#1"]
    assert batch["captions"] == [["캡션 0"], ["구간"]]
    assert not torch.equal(batch["frames"][0], batch["frames"][1])  # the segment is its own frames
    assert check_videos(videos, FRAMES) == videos
