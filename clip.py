"""The CLIP ViT vision tower (Radford et al. 2021, arXiv 2103.00020) and a loader for Hugging Face snapshot folders.

kovlm keeps the tower frozen and, as LLaVA-1.5 does, takes each frame's features from the second-to-last encoder
layer (`hidden_states[-2]`, CLS token dropped; LLaVA `llava/model/multimodal_encoder/clip_encoder.py`,
`mm_vision_select_layer = -2`). Module names follow transformers' `models/clip/modeling_clip.py`, so loading a
checkpoint is a prefix strip (`vision_key`) and the numbers match `CLIPVisionModel(..., output_hidden_states=True)`.

Shapes (the legend of every file):
    I   images in a batch (the B x F frames of the videos)
    S   image side in pixels (image_size); 3 colour channels
    p   patch size; P = (S // p) ** 2 patches; T = 1 + P tokens (CLS first)
    Dv  width (hidden_size); Dff MLP width (intermediate_size)
    nh  attention heads; hs head dim (Dv = nh * hs)
ViT-L/14-336: p 14, P 576, T 577, Dv 1024, Dff 4096, 24 layers, nh 16, hs 64.
"""
from dataclasses import MISSING, dataclass, field, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from infra import snapshot
from infra.errors import UserError


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the GELU approximation OpenAI trained CLIP with (openai/CLIP `clip/model.py`)."""
    return x * torch.sigmoid(1.702 * x)


# transformers' ACT2FN names of the towers' MLPs (CLIP's, SigLIP's and DINO's); its "gelu" is the exact erf form
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
               "silu": F.silu}


def check_vit_config(config, tower: str) -> None:
    """What every ViT tower's config (CLIP's, SigLIP's, DINO's) must hold: an activation kovlm has, one number each
    for the image and patch sides (square images and patches), and heads that split the width evenly."""
    if config.hidden_act not in ACTIVATIONS:
        raise UserError(f"hidden_act '{config.hidden_act}' is not supported by {tower} "
                         f"(supported: {', '.join(sorted(ACTIVATIONS))})")
    if not isinstance(config.image_size, int) or not isinstance(config.patch_size, int):
        raise UserError(f"image_size {config.image_size} and patch_size {config.patch_size} must be single numbers "
                         f"(square images and patches)")
    if config.hidden_size % config.num_attention_heads:
        raise UserError(f"hidden_size {config.hidden_size} is not divisible by "
                         f"num_attention_heads {config.num_attention_heads}")


@dataclass
class CLIPConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    num_patches: int = field(init=False)
    num_positions: int = field(init=False)
    head_dim: int = field(init=False)

    def __post_init__(self):
        check_vit_config(self, "CLIPVision")
        self.num_patches = (self.image_size // self.patch_size) ** 2  # the stride-p convolution drops a remainder
        self.num_positions = self.num_patches + 1  # + CLS
        self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, config: dict) -> "CLIPConfig":
        """From a `config.json`: a full CLIPModel's (the tower under `vision_config`) or a CLIPVisionModel's (flat).

        The defaulted fields take transformers' CLIPVisionConfig defaults; the sizes must be written out."""
        vision = config.get("vision_config", config)
        model_type = vision.get("model_type", "clip_vision_model")
        if model_type != "clip_vision_model":
            raise UserError(f"model_type '{model_type}' is not a CLIP vision tower (expected 'clip_vision_model')")
        required = [f.name for f in fields(cls) if f.init and f.default is MISSING]
        missing = [name for name in required if name not in vision]
        if missing:
            raise UserError(f"the vision config has no {', '.join(missing)}; a CLIP config.json names them all")
        return cls(**{f.name: vision[f.name] for f in fields(cls) if f.init and f.name in vision})


class CLIPVisionEmbeddings(nn.Module):
    """Patches -> tokens: a stride-p convolution (one linear map per p x p patch), CLS prepended, learned positions."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        Dv, p = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(Dv) * Dv**-0.5)  # transformers' init; loading replaces it
        self.patch_embedding = nn.Conv2d(config.num_channels, Dv, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding(config.num_positions, Dv)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values)  # (I, 3, S, S) -> (I, Dv, S/p, S/p)
        patches = patches.flatten(2).transpose(1, 2)  # (I, Dv, S/p, S/p) -> (I, Dv, P) -> (I, P, Dv)
        cls = self.class_embedding.expand(len(pixel_values), 1, -1)  # (Dv,) -> (I, 1, Dv)
        tokens = torch.cat([cls, patches], dim=1)  # (I, T, Dv)
        return tokens + self.position_embedding.weight  # (I, T, Dv) + (T, Dv): token t gets position t


class CLIPAttention(nn.Module):
    """Multi-head self-attention over all T tokens; no mask: every patch sees every patch (ViT)."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        Dv = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(Dv, Dv), nn.Linear(Dv, Dv), nn.Linear(Dv, Dv)
        self.out_proj = nn.Linear(Dv, Dv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        I, T, Dv = x.shape
        q = self.q_proj(x).view(I, T, self.num_heads, self.head_dim).transpose(1, 2)  # (I, T, Dv) -> (I, nh, T, hs)
        k = self.k_proj(x).view(I, T, self.num_heads, self.head_dim).transpose(1, 2)  # (I, T, Dv) -> (I, nh, T, hs)
        v = self.v_proj(x).view(I, T, self.num_heads, self.head_dim).transpose(1, 2)  # (I, T, Dv) -> (I, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hs)) v: (I, nh, T, hs)
        y = y.transpose(1, 2).reshape(I, T, Dv)  # (I, nh, T, hs) -> (I, T, nh, hs) -> (I, T, Dv)
        return self.out_proj(y)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))  # (I, T, Dv) -> (I, T, Dff) -> (I, T, Dv)


class CLIPEncoderLayer(nn.Module):
    """A pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))  # (I, T, Dv)
        return x + self.mlp(self.layer_norm2(x))  # (I, T, Dv)


class CLIPEncoder(nn.Module):
    """Holds the blocks under transformers' name `encoder.layers.N`; CLIPVision.forward runs them."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPVision(nn.Module):
    """CLIP's image tower up to the encoder output; `forward(x, layer)` is transformers' `hidden_states[layer]`.

    `post_layernorm` is part of the checkpoint but forward never applies it: transformers applies it only to the
    pooled CLS token (`pooler_output`), never to `hidden_states`, and the features kovlm uses are hidden states.
    It is kept so that every vision weight of a checkpoint has a home.
    `load_clip_vision` sets `weights_fingerprint` (the snapshot's, snapshot.fingerprint) and `fingerprint` (those
    weights in the dtype they compute in: the feature cache's key); a model built in code has neither.
    """

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: transformers' name
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fingerprint: str | None = None
        self.weights_fingerprint: str | None = None

    def forward(self, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """pixel_values (I, 3, S, S), CLIP-normalised -> hidden_states[layer] (I, T, Dv).

        hidden_states[0] is the embeddings after pre_layrnorm, hidden_states[i] the output of block i; -1 is the
        last block (transformers' last_hidden_state), -2 the LLaVA feature layer. Blocks after `layer` are not run.
        """
        self.check_pixel_values(pixel_values)
        num_blocks = self.blocks_up_to(layer)
        weight = self.embeddings.patch_embedding.weight
        x = self.pre_layrnorm(self.embeddings(pixel_values.to(weight.dtype)))  # (I, T, Dv) = hidden_states[0]
        for block in self.encoder.layers[:num_blocks]:
            x = block(x)  # (I, T, Dv)
        return x

    def blocks_up_to(self, layer: int) -> int:
        """How many blocks produce hidden_states[layer] (python indexing over embeddings + each block's output)."""
        num_states = self.config.num_hidden_layers + 1
        if not -num_states <= layer < num_states:
            raise IndexError(f"layer {layer} is out of range: a {num_states - 1}-layer tower has hidden states "
                             f"{-num_states}..{num_states - 1}")
        return layer % num_states

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        # Positions are learned for exactly image_size; no interpolation to other sizes (as transformers' default).
        c, size = self.config.num_channels, self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (c, size, size):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; this tower expects "
                             f"(N, {c}, {size}, {size}): resize the frames to image_size={size} first")


# ---- loading a Hugging Face snapshot folder (snapshot.py reads it) ----

NON_VISION_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")


def vision_key(checkpoint_key: str) -> str | None:
    """The CLIPVision name of a checkpoint key, or None for a key the vision tower does not load.

    CLIPModel checkpoints prefix the tower with `vision_model.`; CLIPVisionModel ones written by transformers 5 have
    bare keys. The text tower, both projections into the joint space and logit_scale belong to CLIP's contrastive
    head, not to the tower. `embeddings.position_ids` is an arange buffer older transformers saved; forward adds
    the position table directly, so it is not needed.
    """
    if checkpoint_key.endswith("embeddings.position_ids"):
        return None
    if checkpoint_key.startswith("vision_model."):
        return checkpoint_key.removeprefix("vision_model.")
    if checkpoint_key.startswith(NON_VISION_PREFIXES):
        return None
    return checkpoint_key


def load_clip_vision(path, *, dtype: torch.dtype = torch.float32, device="cpu") -> CLIPVision:
    """A frozen CLIPVision (eval mode, requires_grad False) from a Hugging Face CLIP or CLIPVision model folder.

    The module is built on the meta device (shapes, no memory) and the checkpoint's tensors, cast to `dtype`, become
    its parameters one by one: memory holds one copy. Every vision key must match a parameter in name and shape,
    and every parameter must be in the checkpoint.
    """
    folder = Path(path)
    config = snapshot.read_config(folder, CLIPConfig.from_hf)
    with torch.device("meta"):
        model = CLIPVision(config)
    snapshot.load_into(model, folder, vision_key, dtype=dtype, device=device)
    model.weights_fingerprint = snapshot.fingerprint(folder)  # a checkpoint's base identity: the weights as stored
    model.fingerprint = snapshot.fingerprint_with_dtype(model.weights_fingerprint, dtype)  # the feature cache's key
    return model.requires_grad_(False).eval()
