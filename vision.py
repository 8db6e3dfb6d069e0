"""One entry point for every vision tower kovlm reads, chosen by the folder's config.json `model_type`:

    model_type                         module      tower                       tokens before the patches
    clip, clip_vision_model            clip.py     CLIP ViT                    CLS
    siglip, siglip_vision_model        siglip.py   SigLIP, SigLIP 2 (fixed)    none
    dinov2, dinov2_with_registers      dino.py     DINOv2 (+ 4 registers)      CLS (+ registers)
    dinov3_vit                         dino.py     DINOv3 ViT                  CLS + registers

    tower = load_vision(path, dtype=torch.float32, device="cpu")
    pixels = tower.preprocess(frames)       uint8 RGB (F, H, W, 3) -> float (F, 3, S, S), the folder's image processor
    features = tower(pixels, layer=-2)      (F, 3, S, S) -> (F, P, Dv): hidden_states[layer], patches only
    tower.config                            hidden_size, image_size (S), patch_size, grid, num_patches (P), ...

Preprocessing follows the folder's `preprocessor_config.json` as transformers' PIL image processors run it (resize,
centre crop, x rescale_factor, normalise; PIL's filters reproduced by data.resize_like_pil), except DINOv3, whose
only processor rescales to float first and resizes with torch's antialiased filter. A folder without one gets the
family's published processor (CLIP: short side S + centre crop S, bicubic, CLIP mean/std; SigLIP: S x S bicubic,
mean = std = 0.5; DINOv2: short side 256 + centre crop 224, bicubic, ImageNet mean/std; DINOv3: 224 x 224 bilinear,
ImageNet mean/std).
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import clip
import dino
import siglip
from data import CLIP_MEAN, CLIP_STD, resize_like_pil
from infra import snapshot
from infra.errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # transformers' IMAGENET_DEFAULT_*
RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as preprocessor_config.json writes them


# ---- preprocessing: the folder's image processor ----

@dataclass(frozen=True)
class ImageProcessing:
    """A resolved `preprocessor_config.json`: resize (the short side to `shortest_edge`, the long side truncated as
    transformers does, or to exactly height x width), an optional centre crop, x rescale_factor, (x - mean) / std."""
    shortest_edge: int | None
    height: int | None
    width: int | None
    crop: tuple[int, int] | None  # (height, width)
    resample: str  # "bicubic" or "bilinear"
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_first: bool = False  # DINOv3's processor: x rescale_factor, then resize in float (no uint8 rounding)

    @property
    def image_size(self) -> int:
        return self.crop[0] if self.crop else self.height

    @classmethod
    def from_hf(cls, processor: dict, *, rescale_first: bool = False) -> "ImageProcessing":
        """From a preprocessor_config.json dict laid over the family's defaults (transformers' field names)."""
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if not processor.get(flag, True):
                raise ValueError(f"{flag} is false; kovlm's towers need resized, rescaled, normalised frames")
        if processor.get("resample") not in RESAMPLE:
            raise ValueError(f"resample {processor.get('resample')} is not supported (2 bilinear, 3 bicubic)")
        size, crop = processor["size"], processor.get("crop_size")
        if isinstance(size, int):  # older files: transformers' get_size_dict
            size = {"height": size, "width": size} if processor.get("default_to_square") else {"shortest_edge": size}
        if not processor.get("do_center_crop"):
            crop = None
        elif isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if set(size) not in ({"shortest_edge"}, {"height", "width"}):
            raise ValueError(f"size {size} is not supported (shortest_edge, or height and width)")
        processing = cls(size.get("shortest_edge"), size.get("height"), size.get("width"),
                         (crop["height"], crop["width"]) if crop else None, RESAMPLE[processor["resample"]],
                         processor.get("rescale_factor", 1 / 255), tuple(processor["image_mean"]),
                         tuple(processor["image_std"]), rescale_first)
        processing.check_square()
        return processing

    def check_square(self) -> None:
        out = self.crop or ((self.height, self.width) if self.shortest_edge is None else None)
        if out is None or out[0] != out[1]:
            raise ValueError(f"the processor gives non-square images ({self}); the towers need S x S frames")
        smallest = self.shortest_edge or min(self.height, self.width)
        if self.crop and self.crop[0] > smallest:
            raise ValueError(f"the centre crop {self.crop} is larger than the resized image ({smallest} px)")

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        if self.shortest_edge is None:
            return self.height, self.width
        short, long = sorted((height, width))
        long = int(self.shortest_edge * long / short)  # transformers' get_resize_output_image_size truncates
        return (long, self.shortest_edge) if height > width else (self.shortest_edge, long)


def process_frames(frames: np.ndarray, processing: ImageProcessing) -> torch.Tensor:
    """uint8 RGB frames (F, H, W, 3) -> float (F, 3, S, S), the numbers of the processor `processing` describes."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"preprocess expects uint8 RGB frames (F, H, W, 3), got {frames.dtype} {frames.shape}")
    out_height, out_width = processing.resized_size(*frames.shape[1:3])
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (F, H, W, 3) -> (F, 3, H, W), 0..255
    # x / (1 / factor): for 1/255 this is data.preprocess's x / 255, bit for bit
    if processing.rescale_first:
        x = F.interpolate(x / (1 / processing.rescale_factor), size=(out_height, out_width), mode=processing.resample,
                          antialias=True, align_corners=False)  # torchvision's resize of a float image
    else:
        x = resize_like_pil(x, out_height, out_width, processing.resample) / (1 / processing.rescale_factor)
    if processing.crop:
        crop_height, crop_width = processing.crop
        top, left = (out_height - crop_height) // 2, (out_width - crop_width) // 2
        x = x[:, :, top:top + crop_height, left:left + crop_width]  # (F, 3, S, S)
    mean, std = torch.tensor(processing.mean).view(3, 1, 1), torch.tensor(processing.std).view(3, 1, 1)
    return (x - mean) / std


def default_processor(model_type: str, image_size: int) -> dict:
    """The family's published image processor, for folders without a preprocessor_config.json."""
    if model_type.startswith("clip"):
        return {"size": {"shortest_edge": image_size}, "crop_size": image_size, "do_center_crop": True,
                "resample": 3, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
    if model_type.startswith("siglip"):
        return {"size": {"height": image_size, "width": image_size}, "resample": 3, "image_mean": (0.5,) * 3,
                "image_std": (0.5,) * 3}
    if model_type.startswith("dinov2"):
        return {"size": {"shortest_edge": 256}, "crop_size": 224, "do_center_crop": True, "resample": 3,
                "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}
    return {"size": {"height": 224, "width": 224}, "resample": 2, "image_mean": IMAGENET_MEAN,
            "image_std": IMAGENET_STD, "default_to_square": True}


# ---- the tower ----

@dataclass(frozen=True)
class TowerConfig:
    model_type: str  # config.json's
    hidden_size: int  # Dv
    image_size: int  # S: preprocess's output side, forward's input side
    patch_size: int  # p
    grid: int  # S // p patches per side
    num_patches: int  # P = grid ** 2
    num_prefix_tokens: int  # CLS + registers, which forward drops
    num_hidden_layers: int


class VisionTower(nn.Module):
    """A family's tower (`model`, whose forward returns all tokens) behind the one interface kovlm uses."""

    def __init__(self, model: nn.Module, config: TowerConfig, processing: ImageProcessing):
        super().__init__()
        self.model, self.config, self.processing = model, config, processing

    def forward(self, pixel_values: torch.Tensor, layer: int = -2) -> torch.Tensor:
        """(I, 3, S, S) -> hidden_states[layer] without CLS and registers: (I, P, Dv)."""
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; this tower expects "
                             f"(N, 3, {size}, {size}), what tower.preprocess gives")
        return self.model(pixel_values, layer=layer)[:, self.config.num_prefix_tokens:]  # (I, T, Dv) -> (I, P, Dv)

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        return process_frames(frames, self.processing)

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    @property
    def weights_fingerprint(self) -> str:
        return self.model.weights_fingerprint


# ---- loading a snapshot folder ----

def load_weights(folder: Path, model: nn.Module, rename: Callable[[str], str | None], *, dtype: torch.dtype,
                 device) -> nn.Module:
    """The checkpoint's tensors, renamed by `rename` (None: not the tower's: a text tower, SigLIP's pooling head,
    DINO's mask token), cast to `dtype`, become the parameters of `model`, built on the meta device; the two
    fingerprints as clip.load_clip_vision keeps them (the weights as stored: a checkpoint's base identity; and as
    they compute: the feature cache's key)."""
    snapshot.load_into(model, folder, rename, dtype=dtype, device=device)
    model.weights_fingerprint = snapshot.fingerprint(folder)
    model.fingerprint = snapshot.fingerprint_with_dtype(model.weights_fingerprint, dtype)
    return model.requires_grad_(False).eval()


def read_json(file: Path, what: str) -> dict | None:
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{file}: not valid JSON ({error}); the {what} is damaged") from None


def load_vision(path, *, dtype: torch.dtype = torch.float32, device="cpu") -> VisionTower:
    """A frozen tower (eval mode, requires_grad False) from a Hugging Face CLIP, SigLIP, DINOv2 or DINOv3 folder:
    (a) the config from config.json, (b) the family's `vision_key` renaming, (c) a meta build and assignment."""
    folder = Path(path)
    model_type = snapshot.read_config(folder).get("model_type")
    if model_type in ("clip", "clip_vision_model"):
        model = clip.load_clip_vision(folder, dtype=dtype, device=device)
    else:
        model, rename = tower_on_meta(folder)
        model = load_weights(folder, model, rename, dtype=dtype, device=device)
    processing = folder_processing(folder, model_type, model.config)
    return VisionTower(model, tower_config(model_type, model.config, processing), processing).eval()


def read_tower_config(path) -> TowerConfig:
    """The tower's TowerConfig from its folder's config.json and preprocessor_config.json, no weights read (so a
    command can count the visual tokens before anything loads)."""
    folder = Path(path)
    model_type = snapshot.read_config(folder).get("model_type")
    if model_type in ("clip", "clip_vision_model"):
        config = snapshot.read_config(folder, clip.CLIPConfig.from_hf)
    else:
        config = tower_on_meta(folder)[0].config
    return tower_config(model_type, config, folder_processing(folder, model_type, config))


def tower_on_meta(folder: Path) -> tuple[nn.Module, Callable[[str], str | None]]:
    try:
        return build_on_meta(snapshot.read_config(folder))
    except ValueError as error:
        raise UserError(f"{folder / 'config.json'}: {error}") from None


def tower_config(model_type: str, config, processing: "ImageProcessing") -> TowerConfig:
    size, patch = processing.image_size, config.patch_size
    prefix = 0 if model_type.startswith("siglip") else 1 + getattr(config, "num_register_tokens", 0)
    return TowerConfig(model_type=model_type, hidden_size=config.hidden_size, image_size=size, patch_size=patch,
                       grid=size // patch, num_patches=(size // patch) ** 2, num_prefix_tokens=prefix,
                       num_hidden_layers=config.num_hidden_layers)


def build_on_meta(hf_config: dict) -> tuple[nn.Module, Callable[[str], str | None]]:
    """A SigLIP or DINO tower for `hf_config`, on the meta device (shapes only), and its checkpoint-key renaming."""
    model_type = hf_config.get("model_type")
    with torch.device("meta"):
        if model_type in ("siglip", "siglip_vision_model", *siglip.NAFLEX_TYPES):
            return siglip.SiglipVision(siglip.SiglipConfig.from_hf(hf_config)), siglip.vision_key
        if model_type in dino.MODEL_TYPES:
            return dino.build_dino(dino.DinoConfig.from_hf(hf_config)), dino.vision_key
    raise UserError(f"model_type '{model_type}' is not a vision tower kovlm reads (clip, siglip, dinov2, "
                     f"dinov2_with_registers, dinov3_vit)")


def folder_processing(folder: Path, model_type: str, config) -> ImageProcessing:
    """The folder's preprocessor_config.json over the family's published processor; CLIP and SigLIP, whose
    positions are learned for one size, must be given frames of exactly that size."""
    processor_file = folder / "preprocessor_config.json"
    found = read_json(processor_file, "image processor config") or {}
    processor = default_processor(model_type, config.image_size) | {k: v for k, v in found.items() if v is not None}
    try:
        processing = ImageProcessing.from_hf(processor, rescale_first=model_type == "dinov3_vit")
    except (KeyError, ValueError) as error:
        raise UserError(f"{processor_file}: {error}") from None
    fixed_size = not model_type.startswith("dino")
    if fixed_size and processing.image_size != config.image_size:
        raise UserError(f"{processor_file}: gives {processing.image_size} px images, but the tower's positions are "
                         f"learned for image_size {config.image_size}")
    return processing
