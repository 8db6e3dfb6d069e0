"""Vision-to-language projectors: frame-patch features of the frozen tower -> visual tokens in the LLM's space.

Shapes (the legend of every file): B batch, F frames, P patches per frame (h = w = sqrt(P)), Dv vision width,
Dm a projector's internal width, N visual tokens out, C LLM width, nh heads, hs head dim, M context tokens of an
attention, F' pooled frames, s pooled grid side.

    linear       LLaVA (arXiv 2304.08485)        per-patch Linear                           N = F·P
    mlp          LLaVA-1.5 (arXiv 2310.03744)    per-patch Linear-GELU-Linear               N = F·P
    cabstractor  Honeybee (arXiv 2312.06742)     conv blocks per frame, pool to (F', s, s)  N = num_queries
    crossattn    the experiment plan             queries attend once to all frame tokens    N = num_queries
    perceiver    Flamingo (arXiv 2204.14198)     latents attend to [frame tokens; latents]  N = num_queries

Features may arrive in bf16/fp16 from the feature cache: every projector casts its input to its own parameter
dtype, so cached bf16 features meet fp32 weights without a dtype error (and a bf16 projector takes fp32 features).
`python projectors.py` prints each projector's parameters and output tokens at the real sizes.
"""
import argparse
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from infra.errors import UserError

# The options each projector reads. The others are stored as None in its config, so a saved config states exactly
# what shaped the module (checkpoints have recorded it so from the start), and a run may ask every projector for
# its --num-queries and frames alike: linear reads neither.
RESAMPLER_OPTIONS = ("num_queries", "depth", "width", "heads", "ffn_mult", "num_frames", "temporal_init_std")
PROJECTOR_OPTIONS = {
    "linear": (),
    "mlp": ("depth",),
    "cabstractor": ("num_queries", "depth", "width", "num_frames", "temporal_init_std", "pooled_frames", "mlp_depth"),
    "crossattn": RESAMPLER_OPTIONS,
    "perceiver": RESAMPLER_OPTIONS,
}
# LLaVA-1.5's mlp2x_gelu: 2 Linear layers; Honeybee: 3 blocks per stage; the plan: one cross-attention; Flamingo: 2
DEPTH = {"mlp": 2, "cabstractor": 3, "crossattn": 1, "perceiver": 2}


@dataclass
class ProjectorConfig:
    """One projector's options, checked here and nowhere else. depth, width and heads left None are derived
    (__post_init__); options the projector does not read (PROJECTOR_OPTIONS) become None."""
    name: str
    vision_dim: int                         # Dv: width of the tower's features
    llm_dim: int                            # C: width of the LLM's embeddings
    num_queries: int | None = 64            # N of the resamplers (cabstractor: pooled_frames x s x s)
    depth: int | None = None                # mlp: Linear layers; cabstractor: blocks per stage; attention: layers
    width: int | None = None                # Dm, the resamplers' internal width (default: vision_dim)
    heads: int | None = None                # attention heads (default: width // 64, head dim 64)
    ffn_mult: int | None = 4                # FFN hidden width = ffn_mult x Dm
    num_frames: int | None = 8              # most frames a video may have: rows of the temporal embedding
    temporal_init_std: float | None = 0.5   # see TemporalEmbedding
    pooled_frames: int | None = 4           # cabstractor: F', time steps left after pooling
    mlp_depth: int | None = 2               # cabstractor: Linear layers of the readout MLP (Honeybee's 2)

    def __post_init__(self):
        if self.name not in PROJECTOR_OPTIONS:
            raise UserError(f"unknown projector {self.name!r}; choose one of {list(PROJECTOR_OPTIONS)}")
        self.depth = DEPTH.get(self.name) if self.depth is None else self.depth
        self.width = self.vision_dim if self.width is None else self.width  # the resamplers work at Dv by default
        self.heads = max(1, self.width // 64) if self.heads is None else self.heads
        for option in [f.name for f in fields(self)][3:]:
            if option not in PROJECTOR_OPTIONS[self.name]:
                setattr(self, option, None)
        self.check_values()

    @classmethod
    def requested(cls, name: str, vision_dim: int, llm_dim: int, **options) -> "ProjectorConfig":
        """The constructor, by the name vlm.py and bench/probe.py call it: what a run asks of its projector."""
        return cls(name, vision_dim, llm_dim, **options)

    def check_values(self) -> None:
        for key in ["vision_dim", "llm_dim", *PROJECTOR_OPTIONS[self.name]]:
            value, is_std = getattr(self, key), key == "temporal_init_std"
            valid = (isinstance(value, (int, float)) and value >= 0) if is_std else (type(value) is int and value >= 1)
            if not valid:
                raise UserError(f"projector config: {key}={value!r} must be "
                                 f"{'a number >= 0' if is_std else 'an integer >= 1'}")
        if self.heads is not None and self.width % self.heads:
            raise UserError(f"projector config: width {self.width} is not divisible by heads {self.heads}; "
                             "pass heads=... that divides it")
        if self.pooled_frames is not None:
            per_time_step, remainder = divmod(self.num_queries, self.pooled_frames)
            if remainder or math.isqrt(per_time_step) ** 2 != per_time_step:
                raise UserError(f"cabstractor: num_queries {self.num_queries} must be pooled_frames "
                                 f"({self.pooled_frames}) x a square number (e.g. 64 = 4 x 4 x 4)")

    def output_tokens(self, frames: int, patches: int) -> int:
        """N for a video of `frames` frames of `patches` patches."""
        return frames * patches if self.num_queries is None else self.num_queries


def tokens_per_frame(name: str) -> bool:
    """Whether the projector `name` hands the LM one token per patch, frame after frame (F·P: linear, mlp), the
    layout adjacent-frame merging needs (pruning.py); a resampler's num_queries tokens have no frames."""
    return "num_queries" not in PROJECTOR_OPTIONS[name]


def check_features(features: torch.Tensor, config: ProjectorConfig) -> None:
    if features.ndim != 4 or features.shape[-1] != config.vision_dim:
        raise ValueError(f"{config.name} projector expects features (B, F, P, {config.vision_dim}), "
                         f"got {tuple(features.shape)}")
    if config.num_frames is not None and features.shape[1] > config.num_frames:
        raise ValueError(f"{config.name} projector got {features.shape[1]} frames but has temporal embeddings for "
                         f"{config.num_frames}; build it with num_frames={features.shape[1]} or more")


class LinearProjector(nn.Module):
    """LLaVA (arXiv 2304.08485 §4.1): one Linear maps every patch feature to a word embedding."""

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.vision_dim, config.llm_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        check_features(features, self.config)
        x = self.proj(features.to(self.proj.weight.dtype))  # (B, F, P, C)
        return x.flatten(1, 2)  # (B, F·P, C), frame after frame


class MLPProjector(nn.Module):
    """LLaVA-1.5 (arXiv 2310.03744 §3.1) `mlp2x_gelu`: Linear-GELU-Linear per patch, at C. An nn.Sequential
    like LLaVA's `mm_projector`, so the keys (`layers.0`, `layers.2`) line up with LLaVA's."""

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config = config
        layers = [nn.Linear(config.vision_dim, config.llm_dim)]
        for _ in range(config.depth - 1):
            layers += [nn.GELU(), nn.Linear(config.llm_dim, config.llm_dim)]
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        check_features(features, self.config)
        x = self.layers(features.to(self.layers[0].weight.dtype))  # (B, F, P, C)
        return x.flatten(1, 2)  # (B, F·P, C), frame after frame


class TemporalEmbedding(nn.Module):
    """LayerNorm over the tower's features, then a learned embedding per frame index (Flamingo §2.1, Fig. 4).

    Attention over a set of keys, and average pooling within a time bin, ignore the order of their inputs: this
    embedding is all that tells the resamplers which frame a token came from. Its init std decides whether it is seen:
    - It carries information in proportion to its size next to the feature it is added to. Raw tower features have
      no fixed scale (it differs between towers and layers, and ViT features hold a few very large channels), so
      they are layer-normalised first (Honeybee's `prenorm`): each token then has RMS 1 and the std is in those units.
    - Position tables are initialised at the scale of what they are added to (BERT, GPT-2: ~0.02 next to ~0.02
      token embeddings). Next to unit-RMS features 0.02 is 2% of a token; attention barely sees it, and Adam moves
      each entry by about lr per step, so a 150-step stage at lr 1e-3 cannot grow it to matter (what the demo
      measured: results/README.md, "The temporal embedding's init std").
    - Default 0.5: the frame code is half a token's RMS (a fifth of the sum's energy). Random codes in Dv dimensions
      are nearly orthogonal, so frames are told apart while the content still dominates.
    """

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.vision_dim)
        self.embedding = nn.Parameter(torch.randn(config.num_frames, config.vision_dim) * config.temporal_init_std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.norm(features.to(self.embedding.dtype))  # (B, F, P, Dv), RMS 1 per token
        return x + self.embedding[:features.shape[1], None, :]  # (B, F, P, Dv) + (F, 1, Dv): one code per frame


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, Dm, h, w) map (timm's LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)  # (B,h,w,Dm)
        return x.permute(0, 3, 1, 2)  # (B, Dm, h, w)


class SqueezeExcite(nn.Module):
    """Channel gates from the pooled map (SENet, arXiv 1709.01507), as timm's SEModule."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, reduced, 1), nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True))))  # (B, Dm, 1, 1)
        return x * torch.sigmoid(gate)  # (B, Dm, h, w) * (B, Dm, 1, 1)


class RegBottleneck(nn.Module):
    """A block of timm's RegStage as Honeybee builds it (SiLU, LayerNorm2d; timm's bottle_ratio 1, group_size 1,
    se_ratio 0.25): 1x1 conv, depthwise 3x3 conv, squeeze-excite, 1x1 conv, residual. The 3x3 conv keeps locality."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(in_channels, channels, 1, bias=False), LayerNorm2d(channels, eps=1e-6)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.norm2 = LayerNorm2d(channels, eps=1e-6)
        self.se = SqueezeExcite(channels, round(in_channels * 0.25))
        self.conv3, self.norm3 = nn.Conv2d(channels, channels, 1, bias=False), LayerNorm2d(channels, eps=1e-6)
        self.shortcut = nn.Identity() if in_channels == channels else nn.Sequential(
            nn.Conv2d(in_channels, channels, 1, bias=False), LayerNorm2d(channels, eps=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.norm1(self.conv1(x)))  # (B, Dm, h, w)
        y = self.se(F.silu(self.norm2(self.conv2(y))))  # (B, Dm, h, w), each channel sees its 3x3 neighbourhood
        return F.silu(self.norm3(self.conv3(y)) + self.shortcut(x))  # (B, Dm, h, w)


class CAbstractor(nn.Module):
    """Honeybee's C-Abstractor (arXiv 2312.06742 §3.2; kakaobrain/honeybee projectors.py) in a video form.

    Honeybee: blocks on the patch grid, AdaptiveAvgPool2d to sqrt(N) x sqrt(N), blocks, MLP readout. Here the first
    blocks run on each frame's h x w grid; the pooling is 3-D, over (time, h, w) to (F', s, s), N = F'·s·s
    (64 = 4 x 4 x 4), averaging neighbouring frames as it averages neighbouring patches; the second blocks run on
    each pooled time step; tokens leave time-major, so frame order reaches the LLM as token order, and the temporal
    embedding keeps the order inside a time bin. Honeybee's 2-D position embedding is left out: P is not fixed at
    construction (576 real, 16-64 in the demo), CLIP features already hold CLIP's, and the zero-padded convs see the
    grid borders. Fewer frames than F' (or patches than s x s) are stretched by the pooling, so N stays fixed.
    """

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config = config
        self.pooled_side = math.isqrt(config.num_queries // config.pooled_frames)  # s
        self.temporal = TemporalEmbedding(config)
        width, depth = config.width, config.depth
        self.stage1 = nn.Sequential(*[RegBottleneck(width if i else config.vision_dim, width) for i in range(depth)])
        self.stage2 = nn.Sequential(*[RegBottleneck(width, width) for _ in range(depth)])
        readout = [nn.Linear(width, config.llm_dim)]  # Honeybee's build_mlp: Linear, then (SiLU, Linear) x (depth-1)
        for _ in range(config.mlp_depth - 1):
            readout += [nn.SiLU(), nn.Linear(config.llm_dim, config.llm_dim)]
        self.readout = nn.Sequential(*readout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        check_features(features, self.config)
        batch, frames, patches, _ = features.shape
        side = math.isqrt(patches)  # h = w
        if side * side != patches:
            raise UserError(f"cabstractor needs a square patch grid per frame, got P={patches}")
        pooled, s, width = self.config.pooled_frames, self.pooled_side, self.config.width
        x = self.temporal(features).transpose(2, 3)  # (B, F, Dv, P)
        x = self.stage1(x.reshape(batch * frames, -1, side, side))  # (B·F, Dv, h, w) -> (B·F, Dm, h, w), row-major
        x = x.reshape(batch, frames, width, side, side).transpose(1, 2)  # (B, Dm, F, h, w)
        x = F.adaptive_avg_pool3d(x, (pooled, s, s))  # (B, Dm, F', s, s)
        x = self.stage2(x.transpose(1, 2).reshape(batch * pooled, width, s, s))  # (B·F', Dm, s, s)
        x = x.reshape(batch, pooled, width, s * s).transpose(2, 3)  # (B, F', s·s, Dm)
        return self.readout(x.reshape(batch, pooled * s * s, width))  # (B, N, Dm) -> (B, N, C)


class Attention(nn.Module):
    """Multi-head attention of `queries` over `context` (no mask), with F.scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(width, width, bias=False), nn.Linear(width, width, bias=False)
        self.v_proj, self.o_proj = nn.Linear(width, width, bias=False), nn.Linear(width, width, bias=False)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        (batch, n, width), m = queries.shape, context.shape[1]
        q = self.q_proj(queries).view(batch, n, self.heads, -1).transpose(1, 2)  # (B, nh, N, hs)
        k = self.k_proj(context).view(batch, m, self.heads, -1).transpose(1, 2)  # (B, nh, M, hs)
        v = self.v_proj(context).view(batch, m, self.heads, -1).transpose(1, 2)  # (B, nh, M, hs)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q @ k^T / sqrt(hs)) (B, nh, N, M) @ v -> (B, nh, N, hs)
        return self.o_proj(out.transpose(1, 2).reshape(batch, n, width))  # (B, N, nh·hs) -> (B, N, Dm)


class CrossAttentionLayer(nn.Module):
    """Latents attend to the frame tokens only (pre-norm residual), then Flamingo's FFW (Linear-GELU-Linear)."""

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        width, hidden = config.width, config.ffn_mult * config.width
        self.latents_layernorm, self.context_layernorm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.cross_attn = Attention(width, config.heads)
        self.post_attention_layernorm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, width, bias=False))

    def attend(self, latents: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        return self.cross_attn(self.latents_layernorm(latents), self.context_layernorm(frames))  # (B, N, Dm)

    def forward(self, latents: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attend(latents, frames)  # (B, N, Dm)
        return latents + self.mlp(self.post_attention_layernorm(latents))  # (B, N, Dm) -> (B, N, 4Dm) -> (B, N, Dm)


class PerceiverLayer(CrossAttentionLayer):
    """Flamingo's resampler layer (§2.1, Fig. 4): queries from the latents, keys/values from [frame tokens;
    latents], so the latents also attend to each other."""

    def attend(self, latents: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        normed = self.latents_layernorm(latents)  # (B, N, Dm)
        context = torch.cat([self.context_layernorm(frames), normed], dim=1)  # (B, F·P + N, Dm)
        return self.cross_attn(normed, context)  # (B, N, Dm)


class CrossAttentionAbstractor(nn.Module):
    """The experiment plan's abstractor (the plan calls it "C-Abstractor"; it is not Honeybee's): num_queries
    learned queries attend once to all F·P frame tokens (temporal embeddings added to the keys/values so frame
    order reaches the LLM), an FFN, a final LayerNorm, then a Linear to C. depth > 1 repeats the layer."""
    layer_type = CrossAttentionLayer

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config, width = config, config.width
        self.temporal = TemporalEmbedding(config)
        # Dm = Dv by default (Flamingo's resampler runs at its vision width); another Dm adds a Linear into it.
        self.input_proj = nn.Identity() if width == config.vision_dim else nn.Linear(config.vision_dim, width)
        self.latents = nn.Parameter(torch.randn(config.num_queries, width))  # N(0, 1), as flamingo-pytorch
        self.layers = nn.ModuleList([self.layer_type(config) for _ in range(config.depth)])
        self.norm, self.output_proj = nn.LayerNorm(width), nn.Linear(width, config.llm_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        check_features(features, self.config)
        frames = self.input_proj(self.temporal(features)).flatten(1, 2)  # (B, F, P, Dm) -> (B, F·P, Dm)
        latents = self.latents.expand(features.shape[0], -1, -1)  # (B, N, Dm)
        for layer in self.layers:
            latents = layer(latents, frames)  # (B, N, Dm)
        return self.output_proj(self.norm(latents))  # (B, N, C)


class PerceiverResampler(CrossAttentionAbstractor):
    """Flamingo's Perceiver Resampler (arXiv 2204.14198 §2.1, Fig. 4, appendix A.1.1): temporal embeddings added to
    the frame tokens, flattened over time; num_queries latents attend to [frame tokens; latents], then an FFN, for
    `depth` layers; a final LayerNorm, then a Linear to C. It is the crossattn abstractor with Flamingo's layer:
    only what the keys/values are made of differs."""
    layer_type = PerceiverLayer


PROJECTORS: dict[str, type] = {"linear": LinearProjector, "mlp": MLPProjector, "cabstractor": CAbstractor,
                               "crossattn": CrossAttentionAbstractor, "perceiver": PerceiverResampler}


def build_projector(name: str, vision_dim: int, llm_dim: int, **options) -> nn.Module:
    """The projector `name`: (B, F, P, vision_dim) features -> (B, N, llm_dim); `options` are ProjectorConfig's."""
    return projector_from_config(ProjectorConfig(name, vision_dim, llm_dim, **options))


def projector_from_config(config: ProjectorConfig | dict) -> nn.Module:
    """Rebuild a projector from its config, or from the dict a checkpoint saved (dataclasses.asdict)."""
    config = ProjectorConfig(**config) if isinstance(config, dict) else config
    return PROJECTORS[config.name](config)


def parameter_table(vision_dim=1024, llm_dim=4096, frames=8, patches=576) -> str:
    """Markdown table: each projector's parameters and output tokens, from a forward on the meta device."""
    rows = ["| projector | parameters | output tokens | internal width | depth |", "|---|---:|---:|---:|---|"]
    for name in PROJECTORS:
        with torch.device("meta"):
            projector = build_projector(name, vision_dim, llm_dim)
            tokens = projector(torch.empty(1, frames, patches, vision_dim)).shape[1]
        c = projector.config
        depth = {"linear": "1 Linear", "mlp": f"{c.depth} Linear", "crossattn": f"{c.depth} layer",
                 "cabstractor": f"{c.depth} + {c.depth} blocks, {c.mlp_depth}-layer readout",
                 "perceiver": f"{c.depth} layers"}[name]
        params = sum(p.numel() for p in projector.parameters())
        rows.append(f"| `{name}` | {params:,} | {tokens:,} | {c.width or '-'} | {depth} |")
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print each projector's parameters and output tokens.")
    for flag, default in [("--vision-dim", 1024), ("--llm-dim", 4096), ("--frames", 8), ("--patches", 576)]:
        parser.add_argument(flag, type=int, default=default)
    args = parser.parse_args()
    print(f"Dv {args.vision_dim}, C {args.llm_dim}, F {args.frames}, P {args.patches}\n")
    print(parameter_table(args.vision_dim, args.llm_dim, args.frames, args.patches))
