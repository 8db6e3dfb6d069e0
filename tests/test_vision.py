"""vision.py (with siglip.py and dino.py) against transformers on tiny random snapshot folders (CPU, fp32).

Parity tolerances: hidden states atol 1e-5, rtol 0; preprocessing 2/255 on the unnormalised [0, 1] scale against
the folder's own transformers image processor (the PIL one; torchvision is not a test dependency).
"""
import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import save_clip, save_dinov2, save_dinov3, save_siglip
from PIL import Image
from safetensors.torch import load_file, save_file

import clip
import data
from dino import DinoConfig, Dinov2Vision, DINOv3Vision
from infra import snapshot
from siglip import SiglipConfig, SiglipVision
from vision import ImageProcessing, default_processor, load_vision, process_frames

ATOL = 1e-5
PIXEL_ATOL = 2 / 255
LAYERS = (0, 1, -2, -1)
FRAME_SHAPES = [(2, 45, 61, 3), (2, 64, 40, 3)]  # non-square, landscape and portrait


BUILDERS = {
    "clip": save_clip,
    "siglip": save_siglip,
    "siglip_full": lambda folder: save_siglip(folder, full=True),
    "siglip2_fixed": lambda folder: save_siglip(folder, resample=2),  # SigLIP 2's fixed-resolution processor
    "dinov2": save_dinov2,
    "dinov2_registers": lambda folder: save_dinov2(folder, registers=True),
    "dinov3": save_dinov3,
    "dinov3_gated": lambda folder: save_dinov3(folder, gated=True),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {kind: build(tmp_path_factory.mktemp(kind)) for kind, build in BUILDERS.items()}


def reference_model(folder):
    from transformers import AutoConfig, AutoModel, SiglipModel
    if AutoConfig.from_pretrained(folder).model_type == "siglip":
        return SiglipModel.from_pretrained(folder).vision_model.eval()
    return AutoModel.from_pretrained(folder).eval()


def reference_hidden_states(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values=pixel_values, output_hidden_states=True).hidden_states


def random_pixels(height, width=None, n=2):
    return torch.randn(n, 3, height, width or height, generator=torch.Generator().manual_seed(1))


def random_frames(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ---- forward: hidden_states[layer] minus CLS and registers ----

@pytest.mark.parametrize("kind", BUILDERS)
def test_patch_features_match_transformers(folders, kind):
    tower = load_vision(folders[kind])
    reference = reference_model(folders[kind])
    pixel_values = random_pixels(tower.config.image_size)
    hidden_states = reference_hidden_states(reference, pixel_values)
    assert len(hidden_states) == tower.config.num_hidden_layers + 1
    differences = {}
    for layer in LAYERS:
        with torch.no_grad():
            got = tower(pixel_values, layer=layer)
        expected = hidden_states[layer][:, tower.config.num_prefix_tokens:]
        assert got.shape == (2, tower.config.num_patches, tower.config.hidden_size)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        differences[layer] = (got - expected).abs().max().item()
    print(kind, differences, "max |hidden|", hidden_states[-1].abs().max().item())


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_registers", "dinov3"])
@pytest.mark.parametrize("height, width", [(42, 42), (35, 35), (21, 21), (28, 35), (49, 28)])
def test_dino_towers_take_other_sizes_as_transformers_does(folders, kind, height, width):
    """DINOv2 resizes its 6 x 6 position table to any grid (42 px is its own grid: no resizing; 28 x 35 is
    non-square); DINOv3's RoPE follows the grid. The inner model returns every token."""
    tower = load_vision(folders[kind])
    pixel_values = random_pixels(height, width)
    hidden_states = reference_hidden_states(reference_model(folders[kind]), pixel_values)
    for layer in (1, -1):
        with torch.no_grad():
            torch.testing.assert_close(tower.model(pixel_values, layer=layer), hidden_states[layer], atol=ATOL, rtol=0)


def test_bf16_tower_is_close_to_fp32(folders):
    fp32, bf16 = load_vision(folders["dinov3"]), load_vision(folders["dinov3"], dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert not bf16.training and not any(p.requires_grad for p in bf16.parameters())
    pixel_values = random_pixels(28)
    torch.testing.assert_close(bf16(pixel_values).float(), fp32(pixel_values), atol=0.1, rtol=0.05)
    assert bf16.fingerprint != fp32.fingerprint and bf16.weights_fingerprint == fp32.weights_fingerprint


# ---- preprocessing: the folder's own image processor ----

def unnormalise(pixel_values, processing):
    mean, std = torch.tensor(processing.mean).view(3, 1, 1), torch.tensor(processing.std).view(3, 1, 1)
    return torch.as_tensor(pixel_values) * std + mean


def max_pixel_difference(ours, reference, processing):
    assert ours.shape == reference.shape
    return (unnormalise(ours, processing) - unnormalise(reference, processing)).abs().max().item()


def pil_reference(folder, frames):
    from transformers import AutoImageProcessor
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    return processor(images=list(frames), return_tensors="pt").pixel_values


@pytest.mark.parametrize("kind", ["clip", "siglip", "siglip2_fixed", "dinov2", "dinov2_registers"])
@pytest.mark.parametrize("shape", FRAME_SHAPES)
def test_preprocess_matches_the_folders_image_processor(folders, kind, shape):
    tower = load_vision(folders[kind])
    frames = random_frames(shape)
    ours = tower.preprocess(frames)
    assert ours.shape == (shape[0], 3, tower.config.image_size, tower.config.image_size)
    difference = max_pixel_difference(ours, pil_reference(folders[kind], frames), tower.processing)
    print(kind, shape, f"{difference * 255:.3f}/255")
    assert difference <= PIXEL_ATOL


def pil_float_resize(frames, height, width, resample):
    """PIL's resize of each channel as a float image ("F" mode: no uint8 rounding), on the [0, 1] scale."""
    out = [[np.asarray(Image.fromarray((frame[..., c] / 255).astype(np.float32), mode="F").resize(
        (width, height), resample)) for c in range(3)] for frame in frames]
    return torch.from_numpy(np.array(out))


@pytest.mark.parametrize("shape", FRAME_SHAPES)
def test_dinov3_preprocess(folders, shape):
    """DINOv3's only processor runs on torchvision (rescale, then an antialiased bilinear resize of the float
    image); torch's antialiased bilinear is PIL's BILINEAR, so PIL's float resize is the reference here."""
    tower = load_vision(folders["dinov3"])
    frames = random_frames(shape)
    ours = unnormalise(tower.preprocess(frames), tower.processing)
    reference = pil_float_resize(frames, 28, 28, Image.BILINEAR)
    print("dinov3", shape, f"{(ours - reference).abs().max().item() * 255:.4f}/255")
    assert (ours - reference).abs().max().item() <= PIXEL_ATOL


def test_dinov3_preprocess_matches_torchvision_processor(folders):
    pytest.importorskip("torchvision")
    from transformers import DINOv3ViTImageProcessor
    tower = load_vision(folders["dinov3"])
    for shape in FRAME_SHAPES:
        frames = random_frames(shape)
        processor = DINOv3ViTImageProcessor.from_pretrained(folders["dinov3"])
        reference = processor(images=list(frames), return_tensors="pt").pixel_values
        assert max_pixel_difference(tower.preprocess(frames), reference, tower.processing) <= PIXEL_ATOL


PUBLISHED_PROCESSORS = {  # the preprocessor_config.json values of the published checkpoints
    "openai/clip-vit-large-patch14-336": ("clip", 336, {"size": 336, "crop_size": 336, "do_center_crop": True}),
    "google/siglip-so400m-patch14-384": ("siglip", 384, {"size": {"height": 384, "width": 384}, "resample": 3}),
    "google/siglip2-so400m-patch14-384": ("siglip", 384, {"size": {"height": 384, "width": 384}, "resample": 2}),
    "facebook/dinov2-large": ("dinov2", 518, {}),
}


@pytest.mark.parametrize("name", PUBLISHED_PROCESSORS)
@pytest.mark.parametrize("shape", [(1, 120, 161, 3), (1, 300, 140, 3)])
def test_real_size_processors(name, shape):
    """The published processors at their real sizes (up- and downscaling) against transformers' PIL processors."""
    from transformers import BitImageProcessorPil, CLIPImageProcessorPil, SiglipImageProcessorPil
    family, image_size, published = PUBLISHED_PROCESSORS[name]
    processor_dict = default_processor(family, image_size) | published
    processing = ImageProcessing.from_hf(processor_dict)
    reference_class = {"clip": CLIPImageProcessorPil, "siglip": SiglipImageProcessorPil,
                       "dinov2": BitImageProcessorPil}[family]
    frames = random_frames(shape)
    reference = reference_class(**processor_dict)(images=list(frames), return_tensors="pt").pixel_values
    ours = process_frames(frames, processing)
    assert ours.shape[-1] == {"facebook/dinov2-large": 224}.get(name, image_size)
    difference = max_pixel_difference(ours, reference, processing)
    print(name, shape, f"{difference * 255:.3f}/255")
    assert difference <= PIXEL_ATOL


def test_clip_preprocess_keeps_data_preprocess_numbers(folders):
    frames = random_frames((2, 90, 121, 3))
    processing = ImageProcessing.from_hf(default_processor("clip", 336) | {"size": 336, "crop_size": 336})
    assert torch.equal(process_frames(frames, processing), data.preprocess(frames, 336))
    tower = load_vision(folders["clip"])
    assert torch.equal(tower.preprocess(frames), data.preprocess(frames, 28))


def test_folder_without_processor_config_gets_published_defaults(folders, tmp_path):
    siglip_folder = shutil.copytree(folders["siglip"], tmp_path / "siglip")
    dino_folder = shutil.copytree(folders["dinov2"], tmp_path / "dinov2")
    for folder in (siglip_folder, dino_folder):
        (folder / "preprocessor_config.json").unlink()
    siglip_processing = load_vision(siglip_folder).processing
    assert (siglip_processing.height, siglip_processing.resample, siglip_processing.mean) == (28, "bicubic", (0.5,) * 3)
    dino_tower = load_vision(dino_folder)
    assert (dino_tower.processing.shortest_edge, dino_tower.processing.crop) == (256, (224, 224))
    assert (dino_tower.config.image_size, dino_tower.config.grid) == (224, 32)


# ---- config, loading, errors ----

def test_tower_config(folders):
    expected = {  # (hidden_size, image_size, patch_size, grid, num_patches, prefix tokens)
        "clip": (32, 28, 7, 4, 16, 1), "siglip": (32, 28, 7, 4, 16, 0), "siglip_full": (32, 28, 7, 4, 16, 0),
        "siglip2_fixed": (32, 28, 7, 4, 16, 0), "dinov2": (32, 28, 7, 4, 16, 1),
        "dinov2_registers": (32, 28, 7, 4, 16, 5), "dinov3": (32, 28, 7, 4, 16, 5),
        "dinov3_gated": (32, 28, 7, 4, 16, 1),
    }
    for kind, values in expected.items():
        config = load_vision(folders[kind]).config
        got = (config.hidden_size, config.image_size, config.patch_size, config.grid, config.num_patches,
               config.num_prefix_tokens)
        assert got == values, kind
    assert load_vision(folders["siglip2_fixed"]).processing.resample == "bilinear"
    assert load_vision(folders["dinov2"]).model.config.position_grid == 6


def test_clip_tower_is_clip_py(folders):
    tower = load_vision(folders["clip"])
    reference = clip.load_clip_vision(folders["clip"])
    assert isinstance(tower.model, clip.CLIPVision) and tower.fingerprint == reference.fingerprint
    pixel_values = random_pixels(28)
    assert torch.equal(tower(pixel_values, layer=-2), reference(pixel_values, layer=-2)[:, 1:])


def test_full_siglip_loads_the_vision_tower_only(folders, tensors_read):
    full, vision_only = load_vision(folders["siglip_full"]), load_vision(folders["siglip"])
    assert tensors_read and not any(key.startswith(("text_model.", "logit_scale")) for _, key in tensors_read)
    assert full.model.state_dict().keys() == vision_only.model.state_dict().keys()
    assert not any(name.startswith("head.") for name in full.model.state_dict())  # the pooling head is not built
    assert full.weights_fingerprint == snapshot.fingerprint(folders["siglip_full"]) != vision_only.weights_fingerprint


def test_dinov2_attention_keys_are_renamed(folders):
    keys = load_file(folders["dinov2"] / "model.safetensors").keys()
    assert "encoder.layer.0.attention.attention.query.weight" in keys  # transformers' on-disk name
    assert "encoder.layer.0.attention.q_proj.weight" in load_vision(folders["dinov2"]).model.state_dict()


def test_siglip2_naflex_is_refused_in_one_line(tmp_path):
    from transformers import Siglip2Config
    Siglip2Config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"NaFlex .*google/siglip2-so400m-patch14-384") as error:
        load_vision(tmp_path)
    assert "\n" not in str(error.value)


def test_unknown_model_type_is_refused(folders, tmp_path):
    folder = shutil.copytree(folders["siglip"], tmp_path / "vit")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    with pytest.raises(ValueError, match=r"config.json: model_type 'vit' is not a vision tower kovlm reads"):
        load_vision(folder)


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path))}: no config.json"):
        load_vision(tmp_path)


def copy_with_edited_weights(source, folder, edit):
    folder = shutil.copytree(source, folder)
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_missing_and_unexpected_keys(folders, tmp_path):
    def drop(weights):
        del weights["layer.1.attention.q_proj.bias"]
    folder = copy_with_edited_weights(folders["dinov3"], tmp_path / "missing", drop)
    with pytest.raises(ValueError, match=rf"{folder}: missing weights 'layer.1.attention.q_proj.bias'"):
        load_vision(folder)

    def add_key_bias(weights):  # dinov3's config says key_bias false
        weights["layer.0.attention.k_proj.bias"] = torch.zeros(32)
    folder = copy_with_edited_weights(folders["dinov3"], tmp_path / "extra", add_key_bias)
    with pytest.raises(ValueError, match=r"unexpected weights 'layer.0.attention.k_proj.bias'; "
                                         r"DINOv3Vision has no place for them"):
        load_vision(folder)

    def shrink(weights):
        weights["vision_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(63, 32)
    folder = copy_with_edited_weights(folders["siglip_full"], tmp_path / "shape", shrink)
    with pytest.raises(ValueError, match=r"'vision_model.encoder.layers.0.mlp.fc1.weight' has "
                                         r"shape \(63, 32\), but config.json implies \(64, 32\)"):
        load_vision(folder)


def test_processor_size_must_match_fixed_positions(folders, tmp_path):
    from transformers import SiglipImageProcessorPil
    folder = shutil.copytree(folders["siglip"], tmp_path / "siglip")
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    with pytest.raises(ValueError, match=r"preprocessor_config.json: gives 32 px images, but the tower's positions "
                                         r"are learned for image_size 28"):
        load_vision(folder)


def test_bad_forward_inputs(folders):
    tower = load_vision(folders["dinov2"])
    with pytest.raises(ValueError, match=r"expects \(N, 3, 28, 28\), what tower.preprocess gives"):
        tower(torch.zeros(1, 3, 35, 35))
    with pytest.raises(IndexError, match=r"layer 4 is out of range: a 3-layer tower"):
        tower(torch.zeros(1, 3, 28, 28), layer=4)


# ---- real sizes, on the meta device ----

def count(model, skip=()):
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(skip))


def test_real_size_towers_on_meta():
    """Published configs: our parameter counts equal transformers' minus what is not built (SigLIP's pooling
    head, DINO's mask token), and the patch features have the expected shapes."""
    from transformers import Dinov2Config, Dinov2Model, DINOv3ViTConfig, DINOv3ViTModel, SiglipVisionConfig, \
        SiglipVisionModel
    so400m = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  image_size=384, patch_size=14)
    dinov2_large = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518,
                        patch_size=14, mlp_ratio=4)
    dinov3_large = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=224, patch_size=16, num_register_tokens=4, key_bias=False)
    with torch.device("meta"):  # shapes only: nothing is allocated
        cases = [
            (SiglipVision(SiglipConfig.from_hf(so400m)), SiglipVisionModel(SiglipVisionConfig(**so400m)), ("head.",),
             384, (729, 1152)),
            (Dinov2Vision(DinoConfig.from_hf({"model_type": "dinov2", **dinov2_large})),
             Dinov2Model(Dinov2Config(**dinov2_large)), ("embeddings.mask_token",), 224, (257, 1024)),
            (DINOv3Vision(DinoConfig.from_hf({"model_type": "dinov3_vit", **dinov3_large})),
             DINOv3ViTModel(DINOv3ViTConfig(**dinov3_large)), ("embeddings.mask_token",), 224, (201, 1024)),
        ]
        for ours, reference, not_built, size, tokens in cases:
            assert count(ours) == count(reference, not_built), type(ours).__name__
            assert ours(torch.empty(2, 3, size, size, device="meta"), layer=-2).shape == (2, *tokens)
