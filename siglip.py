"""The SigLIP vision tower (Zhai et al. 2023, arXiv 2303.15343), also SigLIP 2's fixed-resolution checkpoints
(Tschannen et al. 2025, arXiv 2502.14786, e.g. google/siglip2-so400m-patch14-384, which publish the same
`model_type` and the same weights layout).

SigLIP's tower is CLIP's (clip.py) with three differences: no CLS token and no pre-LayerNorm (the patch tokens plus
learned positions are `hidden_states[0]`), the tanh approximation of GELU, and LayerNorm eps 1e-6. Its attention-
pooling head (`head.*`, the contrastive model's image embedding) is neither built nor loaded: VLMs take patch
features from the encoder (LLaVA-OneVision: the output of block 26 of 27 of So400M, before `post_layernorm`, which is
`hidden_states[-2]`). Module names follow transformers' `models/siglip/modeling_siglip.py`.

Shapes (clip.py's legend):
    I   images; S image side; p patch size; P = (S // p) ** 2 patches = tokens (no CLS)
    Dv  width (hidden_size); Dff MLP width (intermediate_size); nh heads, hs head dim
So400M/14-384: p 14, P 729 (27 x 27), Dv 1152, Dff 4304, 27 layers, nh 16, hs 72.
"""
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from clip import CLIPEncoderLayer, CLIPVision, check_vit_config
from infra.errors import UserError

NAFLEX_TYPES = ("siglip2", "siglip2_vision_model")
NON_VISION_PREFIXES = ("text_model.", "logit_scale", "logit_bias")


@dataclass
class SiglipConfig:
    # Defaults are transformers' SiglipVisionConfig's: a config.json that leaves a field out means them.
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    grid: int = field(init=False)
    num_patches: int = field(init=False)
    head_dim: int = field(init=False)

    def __post_init__(self):
        check_vit_config(self, "SiglipVision")
        self.grid = self.image_size // self.patch_size  # the "valid" stride-p convolution drops a remainder
        self.num_patches = self.grid ** 2
        self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, config: dict) -> "SiglipConfig":
        """From a `config.json`: a full SiglipModel's (the tower under `vision_config`) or a SiglipVisionModel's."""
        vision = config.get("vision_config", config)
        model_type = vision.get("model_type", "siglip_vision_model")
        if model_type in NAFLEX_TYPES or config.get("model_type") in NAFLEX_TYPES:
            raise UserError(f"model_type '{model_type}' is SigLIP 2's NaFlex tower (variable patches per image), "
                             f"which kovlm does not read; use a fixed-resolution SigLIP 2 checkpoint such as "
                             f"google/siglip2-so400m-patch14-384")
        if model_type != "siglip_vision_model":
            raise UserError(f"model_type '{model_type}' is not a SigLIP vision tower (expected 'siglip_vision_model')")
        return cls(**{f.name: vision[f.name] for f in fields(cls) if f.init and f.name in vision})


class SiglipVisionEmbeddings(nn.Module):
    """Patches -> tokens: a stride-p convolution (with bias) and one learned position per patch; no CLS token."""

    def __init__(self, config: SiglipConfig):
        super().__init__()
        Dv, p = config.hidden_size, config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, Dv, kernel_size=p, stride=p)
        self.position_embedding = nn.Embedding(config.num_patches, Dv)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values)  # (I, 3, S, S) -> (I, Dv, S/p, S/p)
        patches = patches.flatten(2).transpose(1, 2)  # (I, Dv, S/p, S/p) -> (I, Dv, P) -> (I, P, Dv)
        return patches + self.position_embedding.weight  # (I, P, Dv) + (P, Dv): patch t gets position t


class SiglipEncoder(nn.Module):
    """Holds the blocks under transformers' name `encoder.layers.N`; SiglipVision.forward runs them."""

    def __init__(self, config: SiglipConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))  # CLIP's block


class SiglipVision(nn.Module):
    """SigLIP's image tower up to the encoder output; `forward(x, layer)` is transformers' `hidden_states[layer]`.

    `post_layernorm` is loaded but never applied: transformers applies it to `last_hidden_state` only, never to
    `hidden_states`. The pooling head is not built (see the module docstring).
    """

    def __init__(self, config: SiglipConfig):
        super().__init__()
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fingerprint: str | None = None
        self.weights_fingerprint: str | None = None

    # CLIP's rules, shared: hidden_states[layer] needs `layer % (L + 1)` blocks; positions fix the image size.
    blocks_up_to = CLIPVision.blocks_up_to
    check_pixel_values = CLIPVision.check_pixel_values

    def forward(self, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """pixel_values (I, 3, S, S), SigLIP-normalised -> hidden_states[layer] (I, P, Dv).

        hidden_states[0] is the embeddings (no pre-LayerNorm), hidden_states[i] the output of block i; -1 is the last
        block (before post_layernorm), -2 the LLaVA-OneVision feature layer. Blocks after `layer` are not run.
        """
        self.check_pixel_values(pixel_values)
        num_blocks = self.blocks_up_to(layer)
        x = self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype))  # (I, P, Dv)
        for block in self.encoder.layers[:num_blocks]:
            x = block(x)  # (I, P, Dv)
        return x


def vision_key(checkpoint_key: str) -> str | None:
    """The SiglipVision name of a checkpoint key, or None for a key the tower does not load.

    SiglipModel checkpoints prefix the tower with `vision_model.` (so did SiglipVisionModel ones before
    transformers 5); the text tower, logit_scale and logit_bias belong to the contrastive loss, and `head.*` is the
    attention-pooling head, left out on purpose (VLMs use the patch tokens). `position_ids` are arange buffers that
    older transformers saved.
    """
    key = checkpoint_key.removeprefix("vision_model.")
    if key.startswith(NON_VISION_PREFIXES) or key.startswith("head.") or key.endswith("position_ids"):
        return None
    return key
