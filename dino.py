"""The DINOv2 (Oquab et al. 2023, arXiv 2304.07193), DINOv2-with-registers (Darcet et al. 2023, arXiv 2309.16588)
and DINOv3 (Siméoni et al. 2025, arXiv 2508.10104) ViT towers, as transformers' `modeling_dinov2.py`,
`modeling_dinov2_with_registers.py` and `modeling_dinov3_vit.py` compute them.

All three are pre-norm ViTs with LayerScale (each residual branch scaled by a learned per-channel `lambda1`) and a
CLS token first; the registers variant and DINOv3 add register tokens after it (Darcet et al.: extra tokens that
absorb the high-norm "artifact" attention, then are dropped). They differ in where positions come from:
- DINOv2: a learned table for the pretraining grid (518 px / 14 = 37 x 37), resized bicubically to the input's grid
  (the processor's 224 crop gives 16 x 16). The two transformers files differ in one argument: the registers
  variant interpolates with antialias=True; each is followed here.
- DINOv3: no table; 2-D RoPE on the patch tokens only (CLS and registers are not rotated). Patch centres are placed
  on [-1, 1] in each axis; a quarter of each head's dims rotate with the y coordinate, a quarter with x, at
  frequencies 1 / rope_theta ** (4k / hs). Training jitters those coordinates; evaluation, which is all kovlm does,
  does not.
The final LayerNorm (`layernorm` / `norm`) is loaded but never applied: transformers applies it to
`last_hidden_state` only, never to `hidden_states`. `mask_token` (masked-image pretraining) is not loaded.

Shapes (clip.py's legend, plus):
    R   register tokens (0 for DINOv2, 4 for the registers variant and DINOv3); T = 1 + R + P tokens
    g   patches per side of the input (S // p); G the learned table's side (DINOv2)
ViT-L/14 (DINOv2, 224 px): p 14, g 16, P 256, T 257, Dv 1024, Dff 4096, 24 layers, nh 16, hs 64, G 37.
ViT-L/16 (DINOv3, 224 px): p 16, g 14, P 196, R 4, T 201, Dv 1024, Dff 4096, 24 layers, nh 16, hs 64.
"""
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from clip import ACTIVATIONS, CLIPMLP, CLIPVision, check_vit_config
from infra.errors import UserError

MODEL_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit")
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")
# transformers 5 writes DINOv2 checkpoints with the original attention names and renames them when it loads
# (conversion_mapping.py, "Dinov2Model"); kovlm's modules carry the names of transformers' modeling file.
DINOV2_RENAMES = (("attention.attention.query.", "attention.q_proj."),
                  ("attention.attention.key.", "attention.k_proj."),
                  ("attention.attention.value.", "attention.v_proj."),
                  ("attention.output.dense.", "attention.o_proj."))


@dataclass
class DinoConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int  # the pretraining size: DINOv2's position table is (image_size // patch_size) ** 2
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    num_register_tokens: int = 0
    query_bias: bool = True
    key_bias: bool = True
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    use_gated_mlp: bool = False  # DINOv3's SwiGLU variants (gate_proj)
    rope_theta: float = 100.0  # DINOv3 only
    head_dim: int = field(init=False)
    position_grid: int = field(init=False)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise UserError(f"model_type '{self.model_type}' is not a DINO tower ({', '.join(MODEL_TYPES)})")
        check_vit_config(self, "the DINO towers")
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.position_grid = self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, config: dict) -> "DinoConfig":
        """From a Dinov2Model / Dinov2WithRegistersModel / DINOv3ViTModel `config.json` (the sizes written out; the
        flags default to transformers' values for that type)."""
        model_type = config.get("model_type")
        missing = [name for name in REQUIRED if name not in config]
        if missing:
            raise UserError(f"the config has no {', '.join(missing)}; a {model_type} config.json names them all")
        values = {f.name: config[f.name] for f in fields(cls) if f.init and f.name in config}
        if model_type == "dinov3_vit":
            if "intermediate_size" not in config:
                raise UserError("the config has no intermediate_size; a dinov3_vit config.json names it")
            return cls(**{"layer_norm_eps": 1e-5, "key_bias": False, **values})
        if config.get("use_swiglu_ffn"):
            raise UserError("use_swiglu_ffn (DINOv2 ViT-g/14's SwiGLU MLP) is not supported; use ViT-S/B/L")
        qkv_bias = config.get("qkv_bias", True)  # DINOv2 has one switch for q, k and v; o_proj always has a bias
        return cls(**{**values, "intermediate_size": int(config["hidden_size"] * config.get("mlp_ratio", 4)),
                      "query_bias": qkv_bias, "key_bias": qkv_bias, "value_bias": qkv_bias,
                      "num_register_tokens": config.get("num_register_tokens", 4) if model_type != "dinov2" else 0})


def rope_cos_sin(grid_h: int, grid_w: int, config: DinoConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv3's RoPE angles for a grid_h x grid_w patch grid (transformers' DINOv3ViTRopePositionEmbedding in eval):
    cos and sin, each (P, hs), in fp32."""
    inv_freq = 1 / config.rope_theta ** torch.arange(0, 1, 4 / config.head_dim, dtype=torch.float32,
                                                     device=device)  # (hs/4,)
    ys = torch.arange(0.5, grid_h, dtype=torch.float32, device=device) / grid_h  # patch centres in (0, 1)
    xs = torch.arange(0.5, grid_w, dtype=torch.float32, device=device) / grid_w
    centres = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)  # (g_h, g_w, 2) -> (P, 2)
    centres = 2.0 * centres - 1.0  # (P, 2) in [-1, 1], row-major like the patch tokens
    angles = 2 * math.pi * centres[:, :, None] * inv_freq[None, None, :]  # (P, 2, hs/4): y then x
    angles = angles.flatten(1, 2).tile(2)  # (P, hs/2) -> (P, hs): rotate_half pairs dim i with dim i + hs/2
    return torch.cos(angles), torch.sin(angles)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # (..., hs) -> 2 x (..., hs/2)
    return torch.cat((-x2, x1), dim=-1)


class DinoAttention(nn.Module):
    """Multi-head self-attention over all T tokens; with `rope` (DINOv3) the last P tokens' q and k are rotated."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        Dv = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(Dv, Dv, bias=config.query_bias)
        self.k_proj = nn.Linear(Dv, Dv, bias=config.key_bias)
        self.v_proj = nn.Linear(Dv, Dv, bias=config.value_bias)
        self.o_proj = nn.Linear(Dv, Dv, bias=config.proj_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        I, T, Dv = x.shape
        q = self.q_proj(x).view(I, T, self.num_heads, self.head_dim).transpose(1, 2)  # (I, T, Dv) -> (I, nh, T, hs)
        k = self.k_proj(x).view(I, T, self.num_heads, self.head_dim).transpose(1, 2)  # (I, T, Dv) -> (I, nh, T, hs)
        v = self.v_proj(x).view(I, T, self.num_heads, self.head_dim).transpose(1, 2)  # (I, T, Dv) -> (I, nh, T, hs)
        if rope is not None:
            cos, sin = rope  # (P, hs) each
            P = cos.shape[0]
            q = torch.cat([q[:, :, :-P], q[:, :, -P:] * cos + rotate_half(q[:, :, -P:]) * sin], dim=2)  # (I,nh,T,hs)
            k = torch.cat([k[:, :, :-P], k[:, :, -P:] * cos + rotate_half(k[:, :, -P:]) * sin], dim=2)  # (I,nh,T,hs)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hs)) v: (I, nh, T, hs)
        y = y.transpose(1, 2).reshape(I, T, Dv)  # (I, nh, T, hs) -> (I, T, nh, hs) -> (I, T, Dv)
        return self.o_proj(y)


class DINOv3MLP(nn.Module):
    """up -> act -> down, or with use_gated_mlp the SwiGLU form down(act(gate(x)) * up(x))."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        Dv, Dff, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.activation = ACTIVATIONS[config.hidden_act]
        self.gate_proj = nn.Linear(Dv, Dff, bias=bias) if config.use_gated_mlp else None
        self.up_proj = nn.Linear(Dv, Dff, bias=bias)
        self.down_proj = nn.Linear(Dff, Dv, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.activation(self.up_proj(x)))  # (I, T, Dv) -> (I, T, Dff) -> (I, T, Dv)
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))  # (I, T, Dv)


class LayerScale(nn.Module):
    """x * lambda1, a learned per-channel scale on a residual branch (CaiT, arXiv 2103.17239)."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1  # (I, T, Dv) * (Dv,)


class DinoLayer(nn.Module):
    """A pre-norm block with LayerScale: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, config: DinoConfig, mlp: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = DinoAttention(config)
        self.layer_scale1 = LayerScale(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = mlp
        self.layer_scale2 = LayerScale(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.layer_scale1(self.attention(self.norm1(x), rope))  # (I, T, Dv)
        return x + self.layer_scale2(self.mlp(self.norm2(x)))  # (I, T, Dv)


class Dinov2PatchEmbeddings(nn.Module):
    def __init__(self, config: DinoConfig):
        super().__init__()
        p = config.patch_size
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=p, stride=p)


class Dinov2Embeddings(nn.Module):
    """CLS + patches + interpolated learned positions, then (registers variant) the register tokens after CLS."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        Dv, G = config.hidden_size, config.position_grid
        self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, Dv))
        self.patch_embeddings = Dinov2PatchEmbeddings(config)
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + G * G, Dv))
        if config.model_type == "dinov2_with_registers":
            self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, Dv))

    def positions(self, height: int, width: int) -> torch.Tensor:
        """The position table resized to the input's patch grid: (1, 1 + P, Dv) (transformers'
        `interpolate_pos_encoding`: bicubic, in fp32; skipped only for a square input of the table's own grid)."""
        table, p, G = self.position_embeddings, self.config.patch_size, self.config.position_grid
        grid_h, grid_w = height // p, width // p
        if grid_h * grid_w == G * G and height == width:
            return table
        patch_table = table[:, 1:].reshape(1, G, G, -1).permute(0, 3, 1, 2)  # (1, G*G, Dv) -> (1, Dv, G, G)
        antialias = self.config.model_type == "dinov2_with_registers"  # the one difference between the two files
        patch_table = F.interpolate(patch_table.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False,
                                    antialias=antialias).to(table.dtype)  # (1, Dv, g_h, g_w)
        patch_table = patch_table.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)  # (1, P, Dv)
        return torch.cat([table[:, :1], patch_table], dim=1)  # (1, 1 + P, Dv)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        patches = self.patch_embeddings.projection(pixel_values)  # (I, 3, S, S) -> (I, Dv, g, g)
        patches = patches.flatten(2).transpose(1, 2)  # (I, Dv, g, g) -> (I, P, Dv)
        cls = self.cls_token.expand(len(patches), -1, -1)  # (I, 1, Dv)
        x = torch.cat([cls, patches], dim=1) + self.positions(height, width)  # (I, 1 + P, Dv)
        if self.config.model_type == "dinov2_with_registers":  # registers get no position
            registers = self.register_tokens.expand(len(x), -1, -1)  # (I, R, Dv)
            x = torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)  # (I, T, Dv)
        return x


class Dinov2Encoder(nn.Module):
    """Holds the blocks under transformers' name `encoder.layer.N`; Dinov2Vision.forward runs them."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        self.layer = nn.ModuleList(DinoLayer(config, CLIPMLP(config)) for _ in range(config.num_hidden_layers))


class Dinov2Vision(nn.Module):
    """DINOv2 (and DINOv2 with registers) up to the encoder output; `forward(x, layer)` is transformers'
    `hidden_states[layer]`, (I, T, Dv) with CLS (and registers) first."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        self.config = config
        self.embeddings = Dinov2Embeddings(config)
        self.encoder = Dinov2Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fingerprint: str | None = None
        self.weights_fingerprint: str | None = None

    blocks_up_to = CLIPVision.blocks_up_to  # CLIP's rule: hidden_states[layer] needs `layer % (L + 1)` blocks

    def forward(self, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """pixel_values (I, 3, H, W), ImageNet-normalised, any size of at least one patch -> (I, T, Dv)."""
        check_pixel_values(pixel_values, self.config)
        num_blocks = self.blocks_up_to(layer)
        x = self.embeddings(pixel_values.to(self.embeddings.cls_token.dtype))  # (I, T, Dv) = hidden_states[0]
        for block in self.encoder.layer[:num_blocks]:
            x = block(x)  # (I, T, Dv)
        return x


class DINOv3Embeddings(nn.Module):
    """CLS, registers, then the patches; no position table (RoPE in attention)."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        Dv, p = config.hidden_size, config.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, Dv))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, Dv))
        self.patch_embeddings = nn.Conv2d(config.num_channels, Dv, kernel_size=p, stride=p)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embeddings(pixel_values)  # (I, 3, S, S) -> (I, Dv, g, g)
        patches = patches.flatten(2).transpose(1, 2)  # (I, Dv, g, g) -> (I, P, Dv)
        prefix = torch.cat([self.cls_token, self.register_tokens], dim=1).expand(len(patches), -1, -1)  # (I, 1+R, Dv)
        return torch.cat([prefix, patches], dim=1)  # (I, T, Dv)


class DINOv3Vision(nn.Module):
    """DINOv3's ViT up to the encoder output; `forward(x, layer)` is transformers' `hidden_states[layer]`,
    (I, T, Dv) with CLS and registers first. Blocks live under `layer.N`, the checkpoint's name."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        self.config = config
        self.embeddings = DINOv3Embeddings(config)
        self.layer = nn.ModuleList(DinoLayer(config, DINOv3MLP(config)) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fingerprint: str | None = None
        self.weights_fingerprint: str | None = None

    blocks_up_to = CLIPVision.blocks_up_to

    def forward(self, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """pixel_values (I, 3, H, W), ImageNet-normalised, any size of at least one patch -> (I, T, Dv)."""
        check_pixel_values(pixel_values, self.config)
        num_blocks = self.blocks_up_to(layer)
        weight = self.embeddings.patch_embeddings.weight
        x = self.embeddings(pixel_values.to(weight.dtype))  # (I, T, Dv) = hidden_states[0]
        p = self.config.patch_size
        cos, sin = rope_cos_sin(pixel_values.shape[-2] // p, pixel_values.shape[-1] // p, self.config, weight.device)
        rope = cos.to(weight.dtype), sin.to(weight.dtype)  # transformers casts them to the input's dtype
        for block in self.layer[:num_blocks]:
            x = block(x, rope)  # (I, T, Dv)
        return x


def check_pixel_values(pixel_values: torch.Tensor, config: DinoConfig) -> None:
    c, p = config.num_channels, config.patch_size
    if pixel_values.ndim != 4 or pixel_values.shape[1] != c or min(pixel_values.shape[2:]) < p:
        raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; this tower expects (N, {c}, H, W) "
                         f"with H and W at least the patch size {p}")


def vision_key(checkpoint_key: str) -> str | None:
    """The Dinov2Vision / DINOv3Vision name of a checkpoint key, or None for a key the tower does not load
    (`mask_token`, only used in masked-image pretraining). DINOv2's attention keys are renamed as transformers
    renames them when loading; DINOv3 checkpoints already carry the module names."""
    if checkpoint_key == "embeddings.mask_token":
        return None
    for old, new in DINOV2_RENAMES:
        checkpoint_key = checkpoint_key.replace(old, new)
    return checkpoint_key


def build_dino(config: DinoConfig) -> nn.Module:
    return DINOv3Vision(config) if config.model_type == "dinov3_vit" else Dinov2Vision(config)
