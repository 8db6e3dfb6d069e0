"""The frozen-feature cache: the vision tower never changes, so each video is encoded once and its features are
kept on disk (DESIGN.md, performance principle 1). Later epochs and evaluation run zero CLIP forwards.

A cache entry is one safetensors file named by a key over everything that decides the features: the video file's
content (sha256), the number of frames and the image size, the tower's fingerprint (config + weights) and the layer.
Change any of them and the key changes, so stale features are never returned. A corrupt entry is recomputed with a
warning. Features are stored in fp16: (F, P, Dv) = (8, 576, 1024) is 9.4 MB per video.
"""
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data import Sample, VideoCaptionDataset, VideoError, check_videos, preprocess, read_frames


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


class FeatureCache:
    def __init__(self, root: str | Path, *, tower: str, num_frames: int, image_size: int, layer: int,
                 dtype: torch.dtype = torch.float16):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        settings = json.dumps({"tower": tower, "num_frames": num_frames, "image_size": image_size, "layer": layer})
        self.settings_key = hashlib.sha256(settings.encode()).hexdigest()[:16]
        self.dtype = dtype
        self._content_keys: dict[tuple, str] = {}  # (path, size, mtime) -> sha256, so a file is hashed once a run

    def path_for(self, video: str | Path) -> Path:
        stat = os.stat(video)
        identity = (str(video), stat.st_size, stat.st_mtime_ns)
        if identity not in self._content_keys:
            self._content_keys[identity] = file_sha256(Path(video))
        return self.root / f"{self._content_keys[identity][:32]}-{self.settings_key}.safetensors"

    def holds(self, video: str | Path) -> bool:
        """Whether a readable entry exists. A torn or corrupt file (its header or sizes do not parse) is deleted with
        a warning, so the caller recomputes it."""
        path = self.path_for(video)
        if not path.exists():
            return False
        try:
            with safe_open(path, framework="pt") as f:
                f.get_slice("features").get_shape()
            return True
        except Exception as error:
            warnings.warn(f"feature cache entry {path} for {video} is unreadable ({error}); recomputing it")
            path.unlink(missing_ok=True)
            return False

    def load(self, video: str | Path) -> torch.Tensor | None:
        """Cached features (F, P, Dv), or None when absent or unreadable (then they are recomputed)."""
        path = self.path_for(video)
        if not path.exists():
            return None
        try:
            return load_file(path)["features"].clone()  # own the memory: safetensors maps the file
        except Exception as error:  # a torn or corrupt file: recompute rather than crash
            warnings.warn(f"feature cache entry {path} for {video} is unreadable ({error}); recomputing it")
            path.unlink(missing_ok=True)
            return None

    def save(self, video: str | Path, features: torch.Tensor) -> None:
        path = self.path_for(video)
        temporary = path.with_suffix(".tmp")
        save_file({"features": features.to(self.dtype).contiguous().cpu()}, temporary)
        os.replace(temporary, path)  # atomic: a reader sees the old state or the whole new file


class FramesOrError(Dataset):
    """Preprocessed frames of each sample, or the VideoError that reading it raised (so workers never die on it)."""

    def __init__(self, samples: list[Sample], num_frames: int, image_size: int):
        self.samples, self.num_frames, self.image_size = samples, num_frames, image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        try:
            return index, preprocess(read_frames(self.samples[index].video, self.num_frames), self.image_size)
        except VideoError as error:
            return index, error


def fill_feature_cache(model, samples: list[Sample], cache: FeatureCache, *, image_size: int, batch_size: int = 8,
                       num_workers: int = 0, skip_bad: bool = False, max_bad_fraction: float = 0.05,
                       show_progress: bool = True) -> tuple[list[Sample], int]:
    """Encode every sample whose features are not cached yet. Returns (the samples with features, videos encoded).
    A bad video raises, or with skip_bad is reported with its path and dropped; too many bad videos abort."""
    missing = [s for s in samples if not cache.holds(s.video)]
    frames = FramesOrError(missing, model.config.num_frames, image_size)
    loader = DataLoader(frames, batch_size=1, num_workers=num_workers, collate_fn=lambda items: items[0])
    bad, pending = [], []
    device = model.vision.embeddings.patch_embedding.weight.device
    for index, item in tqdm(loader, total=len(missing), desc="encoding videos", disable=not show_progress):
        if isinstance(item, VideoError):
            if not skip_bad:
                raise item
            warnings.warn(f"skipping bad video: {item}")
            bad.append(missing[index])
            if len(bad) > max_bad_fraction * len(samples):
                raise VideoError(f"{len(bad)} of {len(samples)} videos are bad (more than {max_bad_fraction:.0%}); "
                                 f"first: {bad[0].video}. Fix the data or raise --max-bad-fraction")
            continue
        pending.append((missing[index], item))
        if len(pending) == batch_size:
            encode_pending(model, pending, cache, device)
    encode_pending(model, pending, cache, device)
    good = [s for s in samples if s not in bad]
    return good, len(missing) - len(bad)


def encode_pending(model, pending: list, cache: FeatureCache, device) -> None:
    if not pending:
        return
    pixels = torch.stack([frames for _, frames in pending]).to(device)  # (B, F, 3, S, S)
    features = model.encode_video(pixels)  # (B, F, P, Dv)
    for (sample, _), row in zip(pending, features):
        cache.save(sample.video, row)
    pending.clear()


class CachedFeatureDataset(Dataset):
    """Training and evaluation items straight from the cache: {"id", "video", "features", "captions"}."""

    def __init__(self, samples: list[Sample], cache: FeatureCache):
        self.samples, self.cache = samples, cache

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        features = self.cache.load(sample.video)
        if features is None:
            raise RuntimeError(f"features of {sample.video} are missing from the cache {self.cache.root}; "
                               "run fill_feature_cache first")
        return {"id": sample.id, "video": str(sample.video), "features": features, "captions": sample.captions}


def prepare_splits(model, splits: dict[str, list[Sample]], *, cache_dir: str | None, skip_bad: bool,
                   max_bad_fraction: float = 0.05, batch_size: int = 8, num_workers: int = 0, run=None,
                   show_progress: bool = True) -> tuple[dict[str, list[Sample]], FeatureCache | None]:
    """Every split's videos checked and, with a cache_dir, encoded into the cache (the vision tower's only work;
    rank 0 encodes, the other ranks wait). Without one (--no-feature-cache) each video is decoded once to find the
    bad ones, and the tower will encode every batch. Returns the splits without bad videos, and the cache."""
    is_main, world = (run.is_main, run.world) if run is not None else (True, 1)
    if cache_dir is None:
        return {name: check_videos(samples, model.config.num_frames, skip_bad=skip_bad,
                                   max_bad_fraction=max_bad_fraction) for name, samples in splits.items()}, None
    cache = FeatureCache(cache_dir, tower=model.vision.fingerprint, num_frames=model.config.num_frames,
                         image_size=model.vision.config.image_size, layer=model.config.vision_layer)
    if is_main:
        for name, samples in splits.items():
            held = sum(cache.holds(s.video) for s in samples)
            splits[name], encoded = fill_feature_cache(
                model, samples, cache, image_size=model.vision.config.image_size, batch_size=batch_size,
                num_workers=num_workers, skip_bad=skip_bad, max_bad_fraction=max_bad_fraction,
                show_progress=show_progress)
            if show_progress:
                print(f"{name}: {len(samples)} videos, {held} already cached, {encoded} encoded now")
    if world > 1:
        torch.distributed.barrier()
        splits = {name: [s for s in samples if cache.holds(s.video)] for name, samples in splits.items()}
    return splits, cache


def video_dataset(samples: list[Sample], cache: FeatureCache | None, *, num_frames: int, image_size: int) -> Dataset:
    """Items with cached "features", or without a cache (--no-feature-cache) decoded "frames" to encode per batch."""
    if cache is None:
        return VideoCaptionDataset(samples, num_frames, image_size)
    return CachedFeatureDataset(samples, cache)


def collate_features(batch: list[dict]) -> dict:
    key = "features" if "features" in batch[0] else "frames"
    return {"ids": [item["id"] for item in batch], "videos": [str(item["video"]) for item in batch],
            key: torch.stack([item[key] for item in batch]),  # (B, F, P, Dv) features or (B, F, 3, S, S) frames
            "captions": [item["captions"] for item in batch]}


def batch_features(model, batch: dict, device) -> torch.Tensor:
    """(B, F, P, Dv) features of a collated batch: from the cache, or from the tower when the cache is off."""
    if "features" in batch:
        return batch["features"].to(device)
    return model.encode_video(batch["frames"].to(device))
