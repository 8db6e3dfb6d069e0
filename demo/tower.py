"""The embedded default's vision tower: a small CLIP ViT pretrained here on the synthetic frames, as CLIP is on photos.

The tower (64 px, patch 8, width 128, 3 layers) learns from supervised heads that are discarded afterwards: colour,
shape, background and the object's patch row and column from CLIP's pooled output, and per token which patch holds
the object and what it is, so the features kovlm reads (hidden_states[-2]) carry them. `save_clip` writes it as a
transformers CLIPVisionModel folder that clip.load_clip_vision reads like any snapshot.
"""
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from clip import CLIPConfig, CLIPVision
from data import preprocess, read_frames
from demo.synth import ATTRIBUTES
from infra.schedule import get_lr
from vlm import IGNORE_INDEX

TOWER = CLIPConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                   image_size=64, patch_size=8)
TOWER_FRAMES = 8  # frames of each training video the tower pretrains on
# AdamW peak: half or double it and the tower learns shape poorly
# (results/README.md#why-the-demos-defaults-are-what-they-are)
TOWER_LR = 2e-3
# The RGB channel orders a recoloured frame takes (the identity excluded); grey backgrounds stay as they are.
CHANNEL_ORDERS = torch.tensor([[0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


def sincos_positions(grid: int, width: int) -> torch.Tensor:
    """2-D sin-cos codes (MAE's get_2d_sincos_pos_embed) of a grid x grid patch grid: (grid², width)."""
    omega = 1.0 / 10000 ** (torch.arange(width // 4) / (width // 4))  # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angles = [axis.flatten()[:, None].float() * omega for axis in (rows, cols)]  # (P, D/4) each
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)  # (P, D)


def frame_targets(frames: np.ndarray, patch: int) -> dict[str, torch.Tensor]:
    """Where the object is in each uint8 frame (N, H, W, 3): the pixels far from the frame's median colour (the
    background covers > 90% of it) are the object; their centroid gives its patch and its x / y patch column."""
    pixels = torch.from_numpy(frames).flatten(1, 2).short()  # (N, H·W, 3)
    background = pixels.median(dim=1, keepdim=True).values  # (N, 1, 3)
    mask = ((pixels - background).abs().amax(-1) > 40).float()  # (N, H·W)
    if mask.sum(1).min() < 10:
        raise RuntimeError("demo: a generated frame shows no object; the generator and frame_targets disagree")
    height, width = frames.shape[1:3]
    ys, xs = torch.arange(height).repeat_interleave(width), torch.arange(width).repeat(height)  # (H·W,) each
    y = torch.div(mask @ ys.float() / mask.sum(1), patch, rounding_mode="floor").long()  # (N,) patch row
    x = torch.div(mask @ xs.float() / mask.sum(1), patch, rounding_mode="floor").long()  # (N,) patch column
    return {"x": x, "y": y, "centre": y * (width // patch) + x}


class TowerHeads(nn.Module):
    """Supervised heads used only to pretrain the tower. CLIP's pooled output (post_layernorm of the last CLS)
    names colour, shape, background and the object's patch column and row; the tokens of the layer kovlm reads
    (hidden_states[-2]) say which patch holds the object (a softmax over patches), and that token and the max over
    tokens name its colour and shape, so the features themselves carry them. Shape is the hard attribute: x3."""
    SHAPE_WEIGHT = 3.0

    def __init__(self, width: int, grid: int):
        super().__init__()
        sizes = {name: len(ATTRIBUTES[name]) for name in ("colour", "shape", "background")} | {"x": grid, "y": grid}
        self.pooled = nn.ModuleDict({name: nn.Linear(width, n) for name, n in sizes.items()})
        self.centre = nn.Linear(width, 1)
        self.at_centre = nn.ModuleDict({name: nn.Linear(width, sizes[name]) for name in ("colour", "shape")})
        self.max_pooled = nn.ModuleDict({name: nn.Linear(width, sizes[name]) for name in ("colour", "shape")})

    def read(self, tower: CLIPVision, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = tower(pixels, layer=-2)  # (N, 1+P, D): hidden_states[-2], the features the VLM reads
        pooled = tower.post_layernorm(tower.encoder.layers[-1](states)[:, 0])  # (N, D): CLIP's pooled output
        return pooled, states[:, 1:]  # (N, D), (N, P, D)

    def loss(self, tower: CLIPVision, pixels: torch.Tensor, targets: dict) -> torch.Tensor:
        pooled, tokens = self.read(tower, pixels)
        object_token = tokens[torch.arange(len(tokens)), targets["centre"]]  # (N, D)
        predictions = [(head(pooled), name) for name, head in self.pooled.items()]
        predictions.append((self.centre(tokens).squeeze(-1), "centre"))  # (N, P, 1) -> (N, P)
        predictions += [(head(object_token), name) for name, head in self.at_centre.items()]
        predictions += [(head(tokens.amax(1)), name) for name, head in self.max_pooled.items()]  # (N, D)
        return sum(F.cross_entropy(logits, targets[name]) * (self.SHAPE_WEIGHT if name == "shape" else 1.0)
                   for logits, name in predictions)

    @torch.no_grad()
    def accuracy(self, tower: CLIPVision, pixels: torch.Tensor, targets: dict) -> dict[str, float]:
        pooled, tokens = self.read(tower, pixels)
        predicted = {name: self.pooled[name](pooled).argmax(-1) for name in ("colour", "shape", "background")}
        predicted["centre"] = self.centre(tokens).squeeze(-1).argmax(-1)
        return {name: float((value == targets[name]).float().mean()) for name, value in predicted.items()}


def load_frames(samples) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """Every frame of the samples' videos (N, H, W, 3) and its labels: the video's attributes, the object's place."""
    frames = [read_frames(s.video, num_frames=TOWER_FRAMES) for s in samples]  # (F, H, W, 3) each
    places = [frame_targets(video, TOWER.patch_size) for video in frames]
    labels = {name: torch.tensor([list(ATTRIBUTES[name]).index(s.attributes[name]) for s in samples
                                  for _ in range(TOWER_FRAMES)]) for name in ("colour", "shape", "background")}
    return np.concatenate(frames), labels | {name: torch.cat([p[name] for p in places]) for name in places[0]}


def recolour(frames: np.ndarray, targets: dict, generator: torch.Generator) -> tuple[np.ndarray, dict]:
    """The second half of a batch of uint8 frames (N, H, W, 3) with its RGB channels in another order, and no
    colour or background label there: the shape heads see every shape in more colours than the videos show it in
    (a red star turns green or blue), so the tower learns shape apart from colour, as CLIP does from photos where a
    shape comes in every colour. Without it, on the pairs split, the tower's shape head reads the held-out
    colour-shape pairs of the val frames far worse than the seen ones
    (results/README.md#why-the-demos-defaults-are-what-they-are)."""
    half = len(frames) // 2
    orders = CHANNEL_ORDERS[torch.randint(len(CHANNEL_ORDERS), (len(frames) - half,), generator=generator)]
    frames = frames.copy()
    frames[half:] = np.take_along_axis(frames[half:], orders.numpy()[:, None, None, :], axis=3)
    targets = dict(targets)
    for name in ("colour", "background"):
        targets[name] = targets[name].clone()
        targets[name][half:] = IGNORE_INDEX  # no colour or background loss on a recoloured frame
    return frames, targets


def pretrain_tower(samples, steps: int, batch_size: int, seed: int) -> tuple[CLIPVision, dict[str, float]]:
    """A CLIP vision tower trained on the training videos' frames; accuracy of its heads on the val videos' frames."""
    torch.manual_seed(seed)
    tower, grid = CLIPVision(TOWER), TOWER.image_size // TOWER.patch_size
    with torch.no_grad():  # learned positions, started from 2-D sin-cos codes at half a token's scale
        tower.embeddings.position_embedding.weight[1:] = 0.5 * sincos_positions(grid, TOWER.hidden_size)
    heads = TowerHeads(TOWER.hidden_size, grid)
    frames, targets = load_frames([s for s in samples if s.split == "train"])
    parameters = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=TOWER_LR, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, steps, max(1, steps // 20), TOWER_LR)
        batch = torch.randint(len(frames), (batch_size,), generator=generator)
        pixels, labels = recolour(frames[batch.numpy()], {name: value[batch] for name, value in targets.items()},
                                  generator)
        loss = heads.loss(tower, preprocess(pixels, TOWER.image_size), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
    frames, targets = load_frames([s for s in samples if s.split == "val"])
    accuracy = heads.accuracy(tower, preprocess(frames, TOWER.image_size), targets)
    return tower.requires_grad_(False).eval(), accuracy


def save_clip(tower: CLIPVision, folder: Path) -> None:
    """A transformers-style CLIPVisionModel folder: config.json + model.safetensors (bare keys, as transformers 5)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_act": "quick_gelu",
              "hidden_size": TOWER.hidden_size, "intermediate_size": TOWER.intermediate_size,
              "num_hidden_layers": TOWER.num_hidden_layers, "num_attention_heads": TOWER.num_attention_heads,
              "image_size": TOWER.image_size, "patch_size": TOWER.patch_size, "num_channels": TOWER.num_channels,
              "layer_norm_eps": TOWER.layer_norm_eps, "attention_dropout": 0.0, "dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
