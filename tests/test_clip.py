"""clip.py against transformers' CLIPModel / CLIPVisionModel on tiny random snapshot folders (CPU, fp32).

Parity tolerance: atol 1e-4, rtol 0 on every compared hidden state (measured differences are ~1e-6).
"""
import json
import re
import shutil

import pytest
import torch
from conftest import save_tiny_clip
from safetensors.torch import load_file, save_file

from clip import CLIPConfig, CLIPVision, load_clip_vision, vision_key
from infra import snapshot

ATOL = 1e-4
SNAPSHOTS = {
    "full": dict(full=True),
    "vision_only": dict(full=False),
    "sharded": dict(full=True, max_shard_size="20KB"),
    "sharded_vision_only": dict(full=False, max_shard_size="20KB"),
    "bin": dict(full=True, safe_serialization=False),
    "bin_vision_only": dict(full=False, safe_serialization=False),
    "image30_patch5": dict(full=False, image_size=30, patch_size=5),
    "image32_patch6": dict(full=True, image_size=32, patch_size=6, layers=2),  # 32 // 6: the conv drops 2 pixels
}


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    folders = {kind: save_tiny_clip(tmp_path_factory.mktemp(kind), **options) for kind, options in SNAPSHOTS.items()}
    folders["sharded_bin"] = shard_bin(folders["bin"], tmp_path_factory.mktemp("sharded_bin"))
    return folders


def shard_bin(source, folder):
    """A `pytorch_model-0000N-of-00002.bin` + index snapshot, split by hand (transformers 5 writes no .bin)."""
    state = torch.load(source / "pytorch_model.bin", weights_only=True)
    shutil.copy(source / "config.json", folder / "config.json")
    keys, weight_map = sorted(state), {}
    for number, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), start=1):
        name = f"pytorch_model-{number:05d}-of-00002.bin"
        torch.save({key: state[key] for key in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def reference_hidden_states(folder, pixel_values):
    from transformers import CLIPModel, CLIPVisionModel
    config = json.loads((folder / "config.json").read_text())
    if "vision_config" in config:
        tower = CLIPModel.from_pretrained(folder).vision_model
    else:
        tower = CLIPVisionModel.from_pretrained(folder)
    with torch.no_grad():
        return tower.eval()(pixel_values=pixel_values, output_hidden_states=True).hidden_states


def random_pixels(config, n=2):
    return torch.randn(n, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(1))


def max_differences(folder, layers=(0, 1, -2, -1)):
    """{layer: max |ours - transformers|} for one snapshot folder."""
    ours = load_clip_vision(folder)
    pixel_values = random_pixels(ours.config)
    reference = reference_hidden_states(folder, pixel_values)
    assert len(reference) == ours.config.num_hidden_layers + 1
    differences = {}
    for layer in layers:
        with torch.no_grad():
            got = ours(pixel_values, layer=layer)
        torch.testing.assert_close(got, reference[layer], atol=ATOL, rtol=0)
        differences[layer] = (got - reference[layer]).abs().max().item()
    return differences


@pytest.mark.parametrize("kind", [*SNAPSHOTS, "sharded_bin"])
def test_hidden_states_match_transformers(snapshots, kind):
    differences = max_differences(snapshots[kind])
    print(kind, differences)


def test_gelu_tower_matches_transformers(snapshots, tmp_path):
    folder = shutil.copytree(snapshots["vision_only"], tmp_path / "gelu")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    assert load_clip_vision(folder).config.hidden_act == "gelu"
    max_differences(folder, layers=(-1,))


def test_blocks_after_the_requested_layer_are_not_run(snapshots):
    model = load_clip_vision(snapshots["full"])  # 3 blocks
    calls = []
    for index, block in enumerate(model.encoder.layers):
        block.register_forward_hook(lambda module, args, output, index=index: calls.append(index))
    pixel_values = random_pixels(model.config)
    for layer, blocks_run in [(-2, [0, 1]), (0, []), (1, [0]), (-1, [0, 1, 2]), (-4, [])]:
        calls.clear()
        model(pixel_values, layer=layer)
        assert calls == blocks_run, layer


def test_loaded_model_is_frozen_in_eval_mode_and_in_the_requested_dtype(snapshots):
    model = load_clip_vision(snapshots["full"], dtype=torch.bfloat16)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    pixel_values = random_pixels(model.config)
    features = model(pixel_values, layer=-2)
    assert features.dtype == torch.bfloat16
    reference = load_clip_vision(snapshots["full"])(pixel_values, layer=-2)
    torch.testing.assert_close(features.float(), reference, atol=0.1, rtol=0.05)  # bf16 keeps ~3 decimal digits


def test_vision_key_mapping():
    assert vision_key("vision_model.encoder.layers.0.mlp.fc1.weight") == "encoder.layers.0.mlp.fc1.weight"
    assert vision_key("vision_model.pre_layrnorm.bias") == "pre_layrnorm.bias"
    assert vision_key("encoder.layers.3.self_attn.out_proj.weight") == "encoder.layers.3.self_attn.out_proj.weight"
    assert vision_key("post_layernorm.weight") == "post_layernorm.weight"
    for skipped in ["text_model.encoder.layers.0.mlp.fc1.weight", "text_projection.weight", "logit_scale",
                    "visual_projection.weight", "vision_model.embeddings.position_ids", "embeddings.position_ids",
                    "text_model.embeddings.position_ids"]:
        assert vision_key(skipped) is None, skipped


def test_only_vision_tensors_are_read(snapshots, tensors_read):
    folder = snapshots["sharded"]
    load_clip_vision(folder)
    opened, read = [file for file, _ in tensors_read], [key for _, key in tensors_read]
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    vision_keys = {key for key in weight_map if key.startswith("vision_model.")}
    assert set(read) == vision_keys and len(read) == len(vision_keys)
    assert sorted(set(opened)) == sorted({weight_map[key] for key in vision_keys})
    assert len(set(opened)) < len(set(weight_map.values()))  # the text-only shards were never opened


def test_fingerprint(snapshots, tmp_path):
    model = load_clip_vision(snapshots["full"])
    assert re.fullmatch(r"[0-9a-f]{32}", model.fingerprint) and re.fullmatch(r"[0-9a-f]{32}", model.weights_fingerprint)
    assert model.weights_fingerprint == snapshot.fingerprint(snapshots["full"])  # the snapshot's one policy
    assert load_clip_vision(snapshots["full"]).fingerprint == model.fingerprint  # stable
    copy = shutil.copytree(snapshots["full"], tmp_path / "copy")
    assert load_clip_vision(copy).fingerprint == model.fingerprint  # the weights, not the folder they are in
    bf16 = load_clip_vision(snapshots["full"], dtype=torch.bfloat16)
    assert bf16.fingerprint != model.fingerprint  # the feature cache keeps bf16 features apart from fp32 ones
    # ... but the weights are the same: a checkpoint trained in bf16 on a GPU matches its tower in fp32 on a CPU
    assert bf16.weights_fingerprint == model.weights_fingerprint

    def nudge_one_weight(weights):
        weights["vision_model.encoder.layers.1.mlp.fc1.weight"][3, 5] += 1e-3
    changed = copy_with_edited_weights(snapshots["full"], tmp_path / "changed", nudge_one_weight)
    assert load_clip_vision(changed).fingerprint != model.fingerprint


def test_real_size_clip_vit_large_patch14_336_on_meta():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    hf_config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                 num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu",
                                 layer_norm_eps=1e-5)
    config = CLIPConfig.from_hf({"model_type": "clip", "vision_config": hf_config.to_dict()})
    with torch.device("meta"):
        model = CLIPVision(config)
        reference = CLIPVisionModel(hf_config)
    D, I, L, P = 1024, 4096, 24, (336 // 14) ** 2
    embeddings = D + 3 * 14 * 14 * D + (P + 1) * D  # class, patch conv (no bias), positions
    block = 4 * (D * D + D) + (D * I + I) + (I * D + D) + 2 * 2 * D  # q k v out, fc1, fc2, 2 LayerNorms
    count = sum(p.numel() for p in model.parameters())
    assert count == embeddings + L * block + 2 * 2 * D == 303_507_456  # + pre_layrnorm, post_layernorm
    assert count == sum(p.numel() for p in reference.parameters())
    assert (config.num_positions, config.head_dim) == (577, 64)
    features = model(torch.empty(2, 3, 336, 336, device="meta"), layer=-2)
    assert features.shape == (2, 577, 1024)


def test_config_from_full_and_vision_only_dicts_agree(snapshots):
    full = json.loads((snapshots["full"] / "config.json").read_text())
    vision_only = json.loads((snapshots["vision_only"] / "config.json").read_text())
    assert CLIPConfig.from_hf(full) == CLIPConfig.from_hf(vision_only)
    assert CLIPConfig.from_hf(full).num_patches == (28 // 7) ** 2


def test_config_errors():
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                 patch_size=7)
    with pytest.raises(ValueError, match="hidden_act 'gelu_new' is not supported"):
        CLIPConfig(**sizes, hidden_act="gelu_new")
    with pytest.raises(ValueError, match="has no patch_size"):
        CLIPConfig.from_hf({k: v for k, v in sizes.items() if k != "patch_size"})
    with pytest.raises(ValueError, match="'siglip_vision_model' is not a CLIP vision tower"):
        CLIPConfig.from_hf({**sizes, "model_type": "siglip_vision_model"})


def copy_with_edited_weights(source, folder, edit):
    folder = shutil.copytree(source, folder)
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_folder_without_config(snapshots, tmp_path):
    shutil.copy(snapshots["full"] / "model.safetensors", tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path))}: no config.json"):
        load_clip_vision(tmp_path)


def test_folder_without_weights(snapshots, tmp_path):
    shutil.copy(snapshots["full"] / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path))}: no weights; expected model.safetensors"):
        load_clip_vision(tmp_path)


def test_missing_shard(snapshots, tmp_path):
    folder = shutil.copytree(snapshots["sharded"], tmp_path / "sharded")
    (folder / "model-00013-of-00013.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="index.json lists model-00013-of-00013.safetensors, which is not"):
        load_clip_vision(folder)


def test_unsupported_hidden_act_names_the_config_file(snapshots, tmp_path):
    folder = shutil.copytree(snapshots["vision_only"], tmp_path / "gelu_new")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu_new"}))
    with pytest.raises(ValueError, match=r"config.json: hidden_act 'gelu_new' is not supported"):
        load_clip_vision(folder)


def test_missing_key(snapshots, tmp_path):
    def drop(weights):
        del weights["vision_model.encoder.layers.1.mlp.fc2.bias"]
    folder = copy_with_edited_weights(snapshots["full"], tmp_path / "missing", drop)
    with pytest.raises(ValueError, match=rf"{folder}: missing weights 'encoder.layers.1.mlp.fc2.bias'"):
        load_clip_vision(folder)


def test_shape_mismatch(snapshots, tmp_path):
    def shrink(weights):
        weights["vision_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(63, 32)
    folder = copy_with_edited_weights(snapshots["full"], tmp_path / "shape", shrink)
    with pytest.raises(ValueError, match=r"'vision_model.encoder.layers.0.mlp.fc1.weight' has "
                                         r"shape \(63, 32\), but config.json implies \(64, 32\)"):
        load_clip_vision(folder)


def test_unexpected_vision_key(snapshots, tmp_path):
    def add_a_block(weights):
        weights["vision_model.encoder.layers.3.mlp.fc1.weight"] = torch.zeros(64, 32)
    folder = copy_with_edited_weights(snapshots["full"], tmp_path / "extra", add_a_block)
    with pytest.raises(ValueError, match=r"unexpected weights 'vision_model.encoder.layers.3.mlp.fc1.weight'"):
        load_clip_vision(folder)


def test_bad_forward_inputs(snapshots):
    model = load_clip_vision(snapshots["full"])
    with pytest.raises(ValueError, match=r"expects \(N, 3, 28, 28\): resize the frames to image_size=28"):
        model(torch.zeros(1, 3, 32, 32))
    with pytest.raises(IndexError, match=r"layer 4 is out of range: a 3-layer tower has hidden states -4..3"):
        model(torch.zeros(1, 3, 28, 28), layer=4)
