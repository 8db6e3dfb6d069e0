"""Projectors: shapes, gradients, real-size parameter counts (meta device), frame order, dtypes, configs, errors."""
import hashlib
import math
from dataclasses import asdict, fields

import pytest
import torch

from projectors import DEPTH, PROJECTOR_OPTIONS, PROJECTORS, Attention, ProjectorConfig, build_projector, \
    parameter_table, projector_from_config

DV, DLLM = 32, 48  # small widths keep every test in seconds on the CPU
RESAMPLERS = ["cabstractor", "crossattn", "perceiver"]


def small(name, **options):
    torch.manual_seed(0)
    return build_projector(name, DV, DLLM, **options)


def features(frames, patches, batch=2, seed=1, dim=DV):
    return torch.randn(batch, frames, patches, dim, generator=torch.Generator().manual_seed(seed))


def relative_change(a, b):
    return ((a - b).norm() / a.norm()).item()


def test_every_projector_is_registered_with_its_options():
    """Each registered projector builds from its own defaults and states every option it reads in its config."""
    assert list(PROJECTORS) == ["linear", "mlp", "cabstractor", "crossattn", "perceiver"]
    assert set(PROJECTORS) == set(PROJECTOR_OPTIONS)
    for name, reads in PROJECTOR_OPTIONS.items():
        config = build_projector(name, DV, DLLM).config
        assert {f.name for f in fields(config) if getattr(config, f.name) is not None} == \
            {"name", "vision_dim", "llm_dim", *reads}
        assert config.depth == DEPTH.get(name)


@pytest.mark.parametrize("name", list(PROJECTORS))
@pytest.mark.parametrize("frames, patches", [(1, 16), (3, 64), (8, 16), (8, 576),
                                             (8, 729), (8, 256), (8, 196)])  # SigLIP So400M, DINOv2-L, DINOv3-L
def test_output_shape(name, frames, patches):
    projector = small(name)
    out = projector(features(frames, patches))
    tokens = frames * patches if name in ("linear", "mlp") else 64
    assert out.shape == (2, tokens, DLLM)
    assert projector.config.output_tokens(frames, patches) == tokens
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name, options, tokens", [
    ("perceiver", dict(num_queries=16), 16),  # the tiny demo's resampler
    ("crossattn", dict(num_queries=16, depth=2, width=64, heads=4), 16),
    ("cabstractor", dict(num_queries=16, pooled_frames=4), 16),  # 4 x 2 x 2
    ("cabstractor", dict(num_queries=16, pooled_frames=1, width=40), 16),  # 1 x 4 x 4, width != Dv
    ("perceiver", dict(width=64, heads=2, num_frames=6), 64),  # width != Dv: input projection
    ("mlp", dict(depth=3), 6 * 16),
])
def test_output_shape_with_options(name, options, tokens):
    assert small(name, **options)(features(6, 16)).shape == (2, tokens, DLLM)


@pytest.mark.parametrize("name", list(PROJECTORS))
def test_gradients_reach_every_parameter(name):
    options = {} if name in ("linear", "mlp") else dict(num_frames=3)
    projector = small(name, **options)
    out = projector(features(3, 16))  # F = num_frames: every temporal embedding row is used
    (out * torch.randn_like(out)).sum().backward()
    for key, parameter in projector.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, key


# Real sizes: CLIP ViT-L/14-336 (Dv 1024, 8 x 576 patches), Qwen3-8B (Dllm 4096). Each count is derived from the
# architecture by hand (C = 1024 internal width, biases only where the module has them), then asserted.
C, DV_REAL, DLLM_REAL = 1024, 1024, 4096
TEMPORAL = 2 * DV_REAL + 8 * DV_REAL  # input LayerNorm + 8 frame embeddings
BOTTLENECK = (C * C + 2 * C) + (9 * C + 2 * C) + (C * C // 4 + C // 4 + C // 4 * C + C) + (C * C + 2 * C)
ATTENTION_LAYER = 3 * 2 * C + 4 * C * C + 2 * 4 * C * C  # 3 LayerNorms, q/k/v/o (no bias), FFN 4C (no bias)
REAL_SIZE = {  # name: (parameters, output tokens, from the formula, the formula's value)
    "linear": (DV_REAL * DLLM_REAL + DLLM_REAL, 4608, 4_198_400),
    "mlp": (DV_REAL * DLLM_REAL + DLLM_REAL + DLLM_REAL * DLLM_REAL + DLLM_REAL, 4608, 20_979_712),
    "cabstractor": (TEMPORAL + 6 * BOTTLENECK + C * DLLM_REAL + DLLM_REAL + DLLM_REAL * DLLM_REAL + DLLM_REAL,
                    64, 36_818_432),
    "crossattn": (TEMPORAL + 64 * C + 1 * ATTENTION_LAYER + 2 * C + C * DLLM_REAL + DLLM_REAL, 64, 16_865_280),
    "perceiver": (TEMPORAL + 64 * C + 2 * ATTENTION_LAYER + 2 * C + C * DLLM_REAL + DLLM_REAL, 64, 29_454_336),
}


@pytest.mark.parametrize("name", list(PROJECTORS))
def test_real_size_parameters_and_tokens_on_meta(name):
    expected_params, expected_tokens, literal = REAL_SIZE[name]
    with torch.device("meta"):
        projector = build_projector(name, DV_REAL, DLLM_REAL)
        out = projector(torch.empty(1, 8, 576, DV_REAL, dtype=torch.bfloat16))
    assert sum(p.numel() for p in projector.parameters()) == expected_params == literal
    assert out.shape == (1, expected_tokens, DLLM_REAL)
    assert projector.config.width == (None if name in ("linear", "mlp") else 1024)


def test_parameter_table_lists_the_real_size_counts():
    table = parameter_table()
    for name, (params, tokens, _) in REAL_SIZE.items():
        assert f"| `{name}` | {params:,} | {tokens:,} |" in table


@pytest.mark.parametrize("name", RESAMPLERS)
def test_frame_order_changes_the_output(name):
    # At init the attention is near uniform, which averages the frame codes away, so the change is small
    # (~1%); it is still four orders of magnitude above float noise, and the control below is exactly 0.
    projector, x = small(name), features(8, 16)
    assert relative_change(projector(x), projector(x.flip(1))) > 1e-3


@pytest.mark.parametrize("name", ["crossattn", "perceiver"])
def test_without_temporal_embedding_attention_ignores_frame_order(name):
    # The control for the test above: with the embedding at zero, attention over the set of frame tokens is
    # invariant to their order, so the temporal embedding is what carries it.
    projector, x = small(name, temporal_init_std=0.0), features(8, 16)
    torch.testing.assert_close(projector(x), projector(x.flip(1)), rtol=1e-5, atol=1e-5)


def test_cabstractor_keeps_order_inside_a_pooled_time_bin():
    # 8 frames pool to 4 time steps: frames 0 and 1 share a bin, which averages them; only the temporal
    # embedding tells them apart.
    x = features(8, 16)
    swapped = x[:, [1, 0, 2, 3, 4, 5, 6, 7]]
    assert relative_change(small("cabstractor")(x), small("cabstractor")(swapped)) > 1e-3
    blind = small("cabstractor", temporal_init_std=0.0)
    torch.testing.assert_close(blind(x), blind(swapped), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_per_patch_projectors_permute_tokens_with_frames(name):
    projector, x, order = small(name), features(3, 16), [2, 0, 1]
    out = projector(x).view(2, 3, 16, DLLM)
    torch.testing.assert_close(projector(x[:, order]).view(2, 3, 16, DLLM), out[:, order])


def test_temporal_embedding_init_std_is_the_option():
    assert ProjectorConfig("perceiver", DV, DLLM).temporal_init_std == 0.5  # results/README.md: the demo measured it
    for std in (0.02, 0.5):
        embedding = build_projector("perceiver", 256, 8, num_frames=64, temporal_init_std=std).temporal.embedding
        assert embedding.std().item() == pytest.approx(std, rel=0.05)


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attention, queries, context = Attention(32, heads=4), torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    split = lambda t: t.view(2, -1, 4, 8).transpose(1, 2)  # (B, nh, T, hs)
    q, k, v = split(attention.q_proj(queries)), split(attention.k_proj(context)), split(attention.v_proj(context))
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)  # (B, nh, 5, 7)
    expected = attention.o_proj((weights @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attention(queries, context), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(PROJECTORS))
def test_half_precision_features_are_cast_to_the_projector_dtype(name):
    projector, x = small(name), features(2, 16).to(torch.bfloat16)
    out = projector(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, projector(x.float()))
    assert projector.to(torch.bfloat16)(x.float()).dtype == torch.bfloat16


@pytest.mark.parametrize("name", list(PROJECTORS))
def test_config_round_trips_through_a_plain_dict(name):
    projector = small(name)
    saved = asdict(projector.config)
    rebuilt = projector_from_config(saved)
    rebuilt.load_state_dict(projector.state_dict())
    assert rebuilt.config == projector.config
    x = features(2, 16)
    torch.testing.assert_close(rebuilt(x), projector(x))


def test_unused_options_stay_none_in_the_saved_config():
    saved = asdict(small("linear").config)
    assert saved == {"name": "linear", "vision_dim": DV, "llm_dim": DLLM, **{k: None for k in list(saved)[3:]}}
    assert asdict(small("perceiver").config)["width"] == DV  # derived defaults are stored
    for name in PROJECTORS:  # a saved config passes straight back through build_projector
        config = small(name).config
        assert build_projector(**asdict(config)).config == config


def test_a_run_asks_every_projector_alike_and_each_reads_its_own_options():
    """train.py asks for --num-queries and the video's frames whatever the projector: linear reads neither, mlp
    neither, the resamplers both; a value out of range is refused for a projector that reads it."""
    assert ProjectorConfig.requested("linear", DV, DLLM, num_queries=16, num_frames=3) == \
        ProjectorConfig("linear", DV, DLLM)
    assert build_projector("mlp", DV, DLLM, width=64, num_queries=16).config == ProjectorConfig("mlp", DV, DLLM)
    perceiver = ProjectorConfig.requested("perceiver", DV, DLLM, num_queries=16, num_frames=3)
    assert (perceiver.num_queries, perceiver.num_frames, perceiver.depth) == (16, 3, 2)
    with pytest.raises(ValueError, match="num_queries=0 must be an integer >= 1"):
        ProjectorConfig.requested("crossattn", DV, DLLM, num_queries=0)


def state_digest(projector) -> tuple[int, str]:
    """(number of entries, sha256 prefix of 'key shape' lines in state_dict order): the names, shapes and order."""
    lines = "\n".join(f"{key} {tuple(value.shape)}" for key, value in projector.state_dict().items())
    return len(projector.state_dict()), hashlib.sha256(lines.encode()).hexdigest()[:16]


# Written by the projectors.py before its config became one dataclass with real defaults (commit 64fcd01): for each
# projector built with torch.manual_seed(0) at Dv 32, C 48, the record a checkpoint keeps (VLMConfig.projector:
# asdict(projector.config) without the widths), state_digest, and the output on features(4, 16) (seed 1): sum,
# sum of |x|, out[0, 0, :3]. torch 2.13.0 on the CPU.
OLD_RECORDS = [
    ({"name": "linear", "num_queries": None, "depth": None, "width": None, "heads": None, "ffn_mult": None,
      "num_frames": None, "temporal_init_std": None, "pooled_frames": None, "mlp_depth": None},
     (2, "ef4d64b7f543b2d2"), (-168.0986, 2963.0481, [-0.31526, 0.8606, -0.57222])),
    ({"name": "mlp", "num_queries": None, "depth": 2, "width": None, "heads": None, "ffn_mult": None,
      "num_frames": None, "temporal_init_std": None, "pooled_frames": None, "mlp_depth": None},
     (4, "d0ea904f5de1474e"), (17.1007, 1014.5747, [0.02168, 0.44533, 0.03141])),
    ({"name": "cabstractor", "num_queries": 16, "depth": 3, "width": 32, "heads": None, "ffn_mult": None,
      "num_frames": 4, "temporal_init_std": 0.5, "pooled_frames": 4, "mlp_depth": 2},
     (85, "84c60d18b7b269fb"), (-14.8455, 386.3813, [-0.00651, -0.4055, 0.20311])),
    ({"name": "crossattn", "num_queries": 16, "depth": 1, "width": 32, "heads": 1, "ffn_mult": 4, "num_frames": 4,
      "temporal_init_std": 0.5, "pooled_frames": None, "mlp_depth": None},
     (20, "cdb8812cceb89307"), (-29.8412, 712.4467, [-0.94627, -1.28198, 0.74248])),
    ({"name": "perceiver", "num_queries": 16, "depth": 2, "width": 32, "heads": 1, "ffn_mult": 4, "num_frames": 4,
      "temporal_init_std": 0.5, "pooled_frames": None, "mlp_depth": None},
     (32, "b486bb3fd57dda4b"), (-30.7747, 718.8482, [-0.60333, -1.45433, 0.75682])),
    ({"name": "mlp", "num_queries": None, "depth": 3, "width": None, "heads": None, "ffn_mult": None,
      "num_frames": None, "temporal_init_std": None, "pooled_frames": None, "mlp_depth": None},
     (6, "117bc7c15ce27f5d"), (92.5013, 541.3843, [0.13859, -0.1868, 0.09606])),
    ({"name": "perceiver", "num_queries": 64, "depth": 2, "width": 64, "heads": 2, "ffn_mult": 4, "num_frames": 4,
      "temporal_init_std": 0.5, "pooled_frames": None, "mlp_depth": None},
     (34, "83279097b5d5556d"), (105.5764, 2890.9272, [0.02386, 0.45473, 1.31982])),
    ({"name": "cabstractor", "num_queries": 16, "depth": 3, "width": 40, "heads": None, "ffn_mult": None,
      "num_frames": 4, "temporal_init_std": 0.5, "pooled_frames": 1, "mlp_depth": 2},
     (88, "de72c595f15d8c96"), (21.0155, 289.9969, [0.07132, 0.04758, 0.02662])),
]


@pytest.mark.parametrize("record, digest, output", OLD_RECORDS, ids=[r[0]["name"] for r in OLD_RECORDS])
def test_a_record_saved_before_rebuilds_the_same_projector(record, digest, output):
    """A checkpoint's projector record from before rebuilds the same module (names, shapes, init order under a
    seed, outputs), both as build_vlm reads it (the set options as requests) and as a plain dict; and today's code
    writes the same record, so evaluate's config comparison passes for old and new checkpoints alike."""
    torch.manual_seed(0)
    requests = {k: v for k, v in record.items() if v is not None}
    projector = build_projector(vision_dim=DV, llm_dim=DLLM, **requests)
    assert state_digest(projector) == digest
    with torch.no_grad():
        out = projector(features(4, 16))
    assert out.sum().item() == pytest.approx(output[0], abs=2e-3)
    assert out.abs().sum().item() == pytest.approx(output[1], rel=1e-5)
    assert out[0, 0, :3].tolist() == pytest.approx(output[2], abs=1e-5)
    written = {k: v for k, v in asdict(projector.config).items() if k not in ("vision_dim", "llm_dim")}
    assert written == record
    assert projector_from_config(record | {"vision_dim": DV, "llm_dim": DLLM}).config == projector.config


@pytest.mark.parametrize("call, message", [
    (lambda: build_projector("qformer", DV, DLLM), "unknown projector 'qformer'; choose one of"),
    (lambda: build_projector("perceiver", DV, DLLM, num_queries=0), "num_queries=0 must be an integer >= 1"),
    (lambda: build_projector("perceiver", DV, DLLM, num_queries=None), "num_queries=None must be an integer >= 1"),
    (lambda: build_projector("perceiver", DV, DLLM, temporal_init_std=-1.0), "must be a number >= 0"),
    (lambda: build_projector("crossattn", DV, DLLM, width=48, heads=5), "not divisible by heads"),
    (lambda: build_projector("cabstractor", DV, DLLM, num_queries=48), "pooled_frames .4. x a square number"),
])
def test_bad_configuration_raises_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("call, message", [
    (lambda: build_projector("perceiver", DV, DLLM, num_latents=16), "unexpected keyword argument 'num_latents'"),
    (lambda: projector_from_config({"name": "mlp", "vision_dim": 8, "llm_dim": 8, "size": 3}),
     "unexpected keyword argument 'size'"),
    (lambda: projector_from_config({"name": "mlp", "vision_dim": 8}), "missing 1 required positional argument"),
])
def test_an_unknown_or_missing_option_is_named(call, message):
    with pytest.raises(TypeError, match=message):
        call()


@pytest.mark.parametrize("x, message", [
    (features(9, 16), "got 9 frames but has temporal embeddings for 8; build it with num_frames=9"),
    (features(2, 16, dim=DV + 1), r"expects features \(B, F, P, 32\), got \(2, 2, 16, 33\)"),
    (features(2, 20), "square patch grid per frame, got P=20"),
])
def test_bad_features_raise_a_clear_error(x, message):
    with pytest.raises(ValueError, match=message):
        small("cabstractor")(x)


def test_perceiver_differs_from_crossattn_only_by_attending_to_its_latents():
    # Same modules and weights; Flamingo's layer adds the latents to the keys/values, which must change the output.
    crossattn, perceiver = small("crossattn", depth=2), small("perceiver")
    perceiver.load_state_dict(crossattn.state_dict())
    x = features(3, 16)
    assert relative_change(crossattn(x), perceiver(x)) > 1e-2
