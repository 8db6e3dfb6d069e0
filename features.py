"""The frozen-feature cache: the vision tower never changes, so each video (or segment) is encoded once and its
features are kept on disk (README, "The feature cache"). Later epochs and evaluation run zero tower forwards.

A cache entry is one safetensors file named by a key over everything that decides the features: the video file's
content (sha256 of every byte: a video is small beside the model snapshots), the segment's span, the number of
frames and the image size, the tower's fingerprint (snapshot.fingerprint of its folder with the dtype it computes
in, set by the loader: bf16 features are not fp32 features), the layer, and the tower's preprocessing (its folder's
image processor: resize, crop, filter, mean and std; CLIP's own processor, data.preprocess's numbers, goes unsaid,
as in every entry written before the other towers, so those keep their keys). Change any of them and the key
changes, so stale features are never returned. The entry's metadata holds that key, the video's path and a sha256
of the tensor's bytes; an entry that does not parse, fails its checksum (a changed byte, another entry's data) or
carries another key (another video's whole entry) is recomputed with one warning naming the video. Features are
stored in CACHE_DTYPE (fp16): (F, P, Dv) = (8, 576, 1024) is 9.4 MB; a model trained from the cache saw its
features rounded to it, so captioning without the cache rounds them alike (caption.py).
"""
import hashlib
import json
import os
import secrets
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data import BadVideos, Sample, VideoError, read_frames
from vision import ImageProcessing, default_processor, process_frames

CACHE_DTYPE = torch.float16  # what every entry holds: half the disk of fp32


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored (dtype and shape are checked by the entry's key and header)."""
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy()).hexdigest()


class FeatureCache:
    """Cached features (F, P, Dv) of a Sample (its span included) or of a whole video given by its path."""

    def __init__(self, root: str | Path, *, tower: str, num_frames: int, image_size: int, layer: int,
                 preprocessing: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        settings = {"tower": tower, "num_frames": num_frames, "image_size": image_size, "layer": layer}
        if preprocessing is not None:  # None: CLIP's processor, keyed as before the other towers (preprocessing_key)
            settings["preprocessing"] = preprocessing
        settings = json.dumps(settings)
        self.settings_key = hashlib.sha256(settings.encode()).hexdigest()[:16]
        self._content_keys: dict[tuple, str] = {}  # (path, size, mtime) -> sha256, so a file is hashed once a run
        self._verified: set[tuple] = set()  # entries whose checksum passed this run: (path, size, mtime)

    def entry_key(self, item: Sample | str | Path) -> str:
        """Everything that decides the features of `item`; a missing video raises VideoError."""
        video, start, end = (item.video, item.start, item.end) if isinstance(item, Sample) else (item, None, None)
        if not Path(video).is_file():
            raise VideoError(f"{video}: no such file; check the video path (relative to the manifest's folder)")
        stat = os.stat(video)
        identity = (str(video), stat.st_size, stat.st_mtime_ns)
        if identity not in self._content_keys:
            self._content_keys[identity] = file_sha256(Path(video))
        span = "" if start is None else f"@{float(start)!r}-{float(end)!r}"  # 1 and 1.0 are one span
        return f"{self._content_keys[identity]}{span}-{self.settings_key}"

    def path_for(self, item: Sample | str | Path) -> Path:
        return self.root / f"{hashlib.sha256(self.entry_key(item).encode()).hexdigest()[:32]}.safetensors"

    def holds(self, item: Sample | str | Path) -> bool:
        """Whether a sound entry exists (checked once a run); a missing video is not held. A bad entry is deleted
        with a warning, so the caller recomputes it."""
        try:
            path = self.path_for(item)
        except VideoError:
            return False
        if not path.exists():
            return False
        stat = path.stat()
        if (str(path), stat.st_size, stat.st_mtime_ns) in self._verified:
            return True
        return self.load(item) is not None

    def load(self, item: Sample | str | Path) -> torch.Tensor | None:
        """Cached features (F, P, Dv), or None when absent or bad (then they are recomputed)."""
        path, key = self.path_for(item), self.entry_key(item)
        if not path.exists():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                metadata, features = f.metadata() or {}, f.get_tensor("features").clone()  # own the memory
        except Exception as error:  # a torn or corrupt file: recompute rather than crash
            problem = f"unreadable ({error})"
        else:
            if metadata.get("key") != key:
                problem = f"the entry of another video or span ({metadata.get('video', 'unknown')})"
            elif metadata.get("sha256") != tensor_sha256(features):
                problem = "changed since it was written (its checksum fails)"
            else:
                stat = path.stat()
                self._verified.add((str(path), stat.st_size, stat.st_mtime_ns))
                return features
        video = item.video if isinstance(item, Sample) else item
        warnings.warn(f"feature cache entry {path} for {video} is {problem}; recomputing it")
        path.unlink(missing_ok=True)
        return None

    def save(self, item: Sample | str | Path, features: torch.Tensor) -> None:
        path, key = self.path_for(item), self.entry_key(item)
        features = features.to(CACHE_DTYPE).contiguous().cpu()
        video = item.video if isinstance(item, Sample) else item
        metadata = {"key": key, "video": str(video), "sha256": tensor_sha256(features)}
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # unique to the writer
        try:
            save_file({"features": features}, temporary, metadata=metadata)
            os.replace(temporary, path)  # atomic: a reader sees the old state or the whole new file
        finally:
            temporary.unlink(missing_ok=True)


def preprocessing_key(processing: ImageProcessing) -> str | None:
    """The tower's preprocessing as the cache keys it: its fields as JSON, or None for CLIP's processor at its image
    size (data.preprocess's numbers), which entries written before the other towers were made with unsaid."""
    if processing == ImageProcessing.from_hf(default_processor("clip", processing.image_size)):
        return None
    return json.dumps(asdict(processing))


def feature_cache_for(model, root: str | Path) -> FeatureCache:
    """The cache of `model`'s features: its tower (weights and compute dtype), layer, frames and preprocessing."""
    tower = model.vision
    return FeatureCache(root, tower=tower.fingerprint, num_frames=model.config.num_frames,
                        image_size=tower.config.image_size, layer=model.config.vision_layer,
                        preprocessing=preprocessing_key(tower.processing))


class VideoCaptionDataset(Dataset):
    """Samples -> {"id", "video", "frames": float (F, 3, S, S), "captions"}; tokenization happens in vlm.py. Frames
    go through `processing` (the tower's, tower.processing: a small value, so loader workers get it without the
    tower's weights). With keep_errors, a bad video's item holds {"error": VideoError} instead of raising, so
    loader workers never die."""

    def __init__(self, samples: list[Sample], num_frames: int, processing: ImageProcessing, *,
                 keep_errors: bool = False):
        self.samples, self.num_frames, self.processing, self.keep_errors = samples, num_frames, processing, keep_errors

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        item = {"id": sample.id, "video": sample.video, "captions": list(sample.captions)}
        try:
            frames = read_frames(sample.video, self.num_frames, sample.start, sample.end)
        except VideoError as error:
            if not self.keep_errors:
                raise
            return item | {"error": error}
        return item | {"frames": process_frames(frames, self.processing)}


def check_videos(samples: list[Sample], num_frames: int = 8, *, skip_bad: bool = False,
                 max_bad_fraction: float = 0.05) -> list[Sample]:
    """Decode each sample's frames once (--no-feature-cache); bad videos go through data.BadVideos."""
    policy, good = BadVideos(len(samples), skip_bad=skip_bad, max_bad_fraction=max_bad_fraction), []
    for sample in samples:
        try:
            read_frames(sample.video, num_frames, sample.start, sample.end)
            good.append(sample)
        except VideoError as error:
            policy.report(error)
    policy.summarise()
    return good


def fill_feature_cache(model, samples: list[Sample], cache: FeatureCache, *, batch_size: int = 8,
                       num_workers: int = 0, skip_bad: bool = False, max_bad_fraction: float = 0.05,
                       show_progress: bool = True) -> tuple[list[Sample], int]:
    """Encode every sample whose features are not cached yet. Returns (the samples with features, videos encoded).
    A bad video raises, or with skip_bad is reported with its path and dropped; too many bad videos abort."""
    missing = [s for s in samples if not cache.holds(s)]
    frames = VideoCaptionDataset(missing, model.config.num_frames, model.vision.processing, keep_errors=True)
    loader = DataLoader(frames, batch_size=1, num_workers=num_workers, collate_fn=lambda items: items[0])
    policy, bad, pending = BadVideos(len(samples), skip_bad=skip_bad, max_bad_fraction=max_bad_fraction), set(), []
    device = next(model.vision.parameters()).device
    for index, item in enumerate(tqdm(loader, total=len(missing), desc="encoding videos", disable=not show_progress)):
        if "error" in item:
            policy.report(item["error"])
            bad.add(id(missing[index]))
            continue
        pending.append((missing[index], item["frames"]))
        if len(pending) == batch_size:
            encode_pending(model, pending, cache, device)
    encode_pending(model, pending, cache, device)
    policy.summarise()
    return [s for s in samples if id(s) not in bad], len(missing) - len(bad)


def encode_pending(model, pending: list, cache: FeatureCache, device) -> None:
    if not pending:
        return
    pixels = torch.stack([frames for _, frames in pending]).to(device)  # (B, F, 3, S, S)
    features = model.encode_video(pixels)  # (B, F, P, Dv)
    for (sample, _), row in zip(pending, features):
        cache.save(sample, row)
    pending.clear()


class CachedFeatureDataset(Dataset):
    """Training and evaluation items straight from the cache: {"id", "video", "features", "captions"}."""

    def __init__(self, samples: list[Sample], cache: FeatureCache):
        self.samples, self.cache = samples, cache

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        features = self.cache.load(sample)
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
    cache = feature_cache_for(model, cache_dir)
    if is_main:
        for name, samples in splits.items():
            held = sum(cache.holds(s) for s in samples)
            splits[name], encoded = fill_feature_cache(
                model, samples, cache, batch_size=batch_size, num_workers=num_workers, skip_bad=skip_bad,
                max_bad_fraction=max_bad_fraction, show_progress=show_progress)
            if show_progress:
                print(f"{name}: {len(samples)} videos, {held} already cached, {encoded} encoded now")
    if world > 1:
        torch.distributed.barrier()
        splits = {name: [s for s in samples if cache.holds(s)] for name, samples in splits.items()}
    return splits, cache


def video_dataset(samples: list[Sample], cache: FeatureCache | None, *, num_frames: int,
                  processing: ImageProcessing) -> Dataset:
    """Items with cached "features", or without a cache (--no-feature-cache) "frames" decoded and preprocessed by
    the tower's `processing`, to encode per batch."""
    if cache is None:
        return VideoCaptionDataset(samples, num_frames, processing)
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
