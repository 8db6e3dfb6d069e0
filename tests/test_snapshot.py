"""infra/snapshot.py: every layout transformers writes reads to the same tensors, a folder that does not fit its model is
refused in one line naming the first keys, tensors stream one at a time, and the fingerprint sees a changed tensor
anywhere while reading a bounded number of bytes."""
import gc
import json
import shutil
import weakref

import pytest
import torch
from conftest import save_tiny_clip, save_tiny_qwen3
from safetensors.torch import load_file, save_file
from torch import nn

from clip import CLIPConfig, CLIPVision, vision_key
from infra import snapshot


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    """The same CLIPModel weights in the four layouts: one file, shards + index, a .bin, .bin shards + index."""
    make = tmp_path_factory.mktemp
    folders = {"single": save_tiny_clip(make("single")),
               "sharded": save_tiny_clip(make("sharded"), max_shard_size="20KB"),
               "bin": save_tiny_clip(make("bin"), safe_serialization=False)}
    state = torch.load(folders["bin"] / "pytorch_model.bin", weights_only=True)
    folder = make("sharded_bin")  # transformers 5 writes no .bin shards: split by hand, as older versions did
    shutil.copy(folders["bin"] / "config.json", folder)
    keys, weight_map = sorted(state), {}
    for number, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), start=1):
        name = f"pytorch_model-{number:05d}-of-00002.bin"
        torch.save({key: state[key] for key in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    folders["sharded_bin"] = folder
    return folders


def test_every_layout_reads_to_the_same_tensors(clip_folders):
    assert len(list(clip_folders["sharded"].glob("model-*.safetensors"))) > 2
    single = dict(snapshot.read_tensors(clip_folders["single"]))
    assert any(key.startswith("text_model.") for key in single) and len(single) > 40
    for layout in ("sharded", "bin", "sharded_bin"):
        tensors = dict(snapshot.read_tensors(clip_folders[layout]))
        assert tensors.keys() == single.keys(), layout
        for key, tensor in tensors.items():
            assert torch.equal(tensor, single[key]), (layout, key)


def test_load_into_a_meta_model_casts_names_and_skips(clip_folders):
    config = snapshot.read_config(clip_folders["sharded"], CLIPConfig.from_hf)
    with torch.device("meta"):
        model = CLIPVision(config)
    snapshot.load_into(model, clip_folders["sharded"], vision_key, dtype=torch.bfloat16, device="cpu")
    stored = dict(snapshot.read_tensors(clip_folders["single"]))
    for name, parameter in model.state_dict().items():
        assert parameter.device.type == "cpu" and parameter.dtype == torch.bfloat16, name
        assert torch.equal(parameter, stored[f"vision_model.{name}"].to(torch.bfloat16)), name


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(4, 3), nn.Linear(3, 2)


def write_folder(folder, tensors: dict):
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file(tensors, folder / "model.safetensors")
    return folder


def refusal(folder, model=None) -> str:
    with torch.device("meta"):
        model = model or TwoLinears()
    with pytest.raises(ValueError) as refused:
        snapshot.load_into(model, folder, dtype=torch.float32, device="cpu")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{folder}: ")
    return message.removeprefix(f"{folder}: ")


def test_missing_unexpected_and_misshapen_keys_are_one_line_naming_the_first_few(tmp_path):
    good = {name: torch.zeros(tensor.shape) for name, tensor in TwoLinears().state_dict().items()}
    assert refusal(write_folder(tmp_path / "missing", {"first.weight": torch.zeros(3, 4)})) == \
        "missing weights 'first.bias', 'second.weight', 'second.bias'; the weights do not match config.json"
    extra = {f"third.{n}.weight": torch.zeros(1) for n in range(5)}
    assert refusal(write_folder(tmp_path / "unexpected", good | extra)) == \
        "unexpected weights 'third.0.weight', 'third.1.weight', 'third.2.weight' and 2 more; TwoLinears has no " \
        "place for them"
    wrong = good | {"first.weight": torch.zeros(3, 5), "second.bias": torch.zeros(7)}
    assert refusal(write_folder(tmp_path / "shape", wrong)) == \
        "weights of another shape than config.json implies: 'first.weight', 'second.bias' ('first.weight' has " \
        "shape (3, 5), but config.json implies (3, 4))"


def test_buffers_are_assigned_and_only_floating_tensors_cast(tmp_path):
    norm = nn.BatchNorm1d(3)
    norm.running_mean += 1.0
    norm.num_batches_tracked += 7
    folder = write_folder(tmp_path / "norm", norm.state_dict())
    with torch.device("meta"):
        model = nn.BatchNorm1d(3)
    snapshot.load_into(model, folder, dtype=torch.bfloat16, device="cpu")
    assert dict(model.named_buffers()).keys() == {"running_mean", "running_var", "num_batches_tracked"}
    assert model.running_mean.dtype == torch.bfloat16 and torch.equal(model.running_mean.float(), torch.ones(3))
    assert model.num_batches_tracked.dtype == torch.int64 and model.num_batches_tracked.item() == 7
    assert model.weight.dtype == torch.bfloat16 and not model.weight.requires_grad


def test_a_key_mapped_twice_is_refused(tmp_path):
    folder = write_folder(tmp_path / "twice", {"a.bias": torch.zeros(3), "b.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match="'a.bias' and 'b.bias' are both 'first.bias'"):
        snapshot.stored_shapes(folder, lambda key: "first.bias")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_safetensors_file_is_one_line_naming_the_file(clip_folders, tmp_path, damage):
    folder = shutil.copytree(clip_folders["sharded"], tmp_path / "damaged")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes({"truncated": data[:-100], "garbage": b"\xff" * 64, "empty": b""}[damage])
    for read in (lambda: list(snapshot.read_tensors(folder)), lambda: snapshot.fingerprint(folder),
                 lambda: snapshot.stored_shapes(folder)):
        with pytest.raises(ValueError) as refused:
            read()
        message = str(refused.value)
        assert message.startswith(f"{shard}: ") and "\n" not in message and "download it again" in message
        assert ("truncated" in message) == (damage == "truncated")


def test_a_truncated_bin_is_one_line_naming_the_file(clip_folders, tmp_path):
    folder = shutil.copytree(clip_folders["bin"], tmp_path / "damaged")
    weights = folder / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError) as refused:
        list(snapshot.read_tensors(folder))
    assert str(refused.value).startswith(f"{weights}: torch.load(weights_only=True) cannot read it")
    assert "\n" not in str(refused.value)


def test_tensors_stream_one_at_a_time(clip_folders):
    """The reader holds no tensor it has handed on: a place hook that converts and drops each one (qwen3's NF4)
    keeps peak memory at one full-precision tensor, whatever the model's size."""
    handed, kept = [], {}

    def convert(model, name, tensor, *, dtype, device):
        gc.collect()
        assert all(earlier() is None for earlier in handed), "an earlier tensor is still held"
        handed.append(weakref.ref(tensor))
        kept[name] = tensor.to(dtype).sum()  # the conversion's result only

    with torch.device("meta"):
        model = CLIPVision(snapshot.read_config(clip_folders["sharded"], CLIPConfig.from_hf))
    snapshot.load_into(model, clip_folders["sharded"], vision_key, dtype=torch.float16, device="cpu", place=convert)
    assert kept.keys() == model.state_dict().keys() and len(handed) == len(kept) > 10


def test_fingerprint_sees_one_middle_tensor_and_not_the_folder(tmp_path):
    source = save_tiny_qwen3(tmp_path / "source", max_shard_size="20KB", layers=4)
    copy = shutil.copytree(source, tmp_path / "elsewhere")
    assert snapshot.fingerprint(copy) == snapshot.fingerprint(source)  # byte-identical: the same weights
    changed = shutil.copytree(source, tmp_path / "merged")
    shards = sorted(changed.glob("model-*.safetensors"))
    middle = shards[len(shards) // 2]
    tensors = load_file(middle)
    key = sorted(tensors)[len(tensors) // 2]
    tensors[key] = tensors[key] + 1e-3  # same shape, dtype and file size: only the values differ
    save_file(tensors, middle, metadata={"format": "pt"})
    assert middle.stat().st_size == (source / middle.name).stat().st_size
    assert snapshot.fingerprint(changed) != snapshot.fingerprint(source)


def test_fingerprint_samples_large_tensors_and_sees_a_merged_update_past_the_first_mib(tmp_path):
    """Three 4 MiB tensors are read in BLOCKS blocks each, yet a LoRA update merged into the middle one (all its
    values change, none of the file's first MiB) is seen."""
    generator = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(1024, 1024, generator=generator) for name in ("a.weight", "b.weight", "c.weight")}
    base = write_folder(tmp_path / "base", weights)
    lora_b, lora_a = torch.randn(1024, 4, generator=generator) * 1e-3, torch.randn(4, 1024, generator=generator)
    merged = write_folder(tmp_path / "merged", weights | {"b.weight": weights["b.weight"] + lora_b @ lora_a})
    first_mib = [(folder / "model.safetensors").read_bytes()[: 1 << 20] for folder in (base, merged)]
    assert first_mib[0] == first_mib[1]  # what qwen3.py hashed before this module
    assert snapshot.fingerprint(merged) != snapshot.fingerprint(base)
    begin, _ = snapshot.read_header(base / "model.safetensors")
    read = sum(end - start for start, end in snapshot.hashed_spans(base / "model.safetensors"))
    assert read == begin + 3 * snapshot.BLOCKS * snapshot.BLOCK_BYTES < 128 * 1024  # of 12 MiB


def test_fingerprint_names_the_weights_as_stored_and_the_dtype_apart(clip_folders):
    single = snapshot.fingerprint(clip_folders["single"])
    assert len(single) == 32 and single != snapshot.fingerprint(clip_folders["bin"])  # other files, other bytes
    in_fp32 = snapshot.fingerprint_with_dtype(single, torch.float32)
    assert in_fp32 != snapshot.fingerprint_with_dtype(single, torch.bfloat16) and in_fp32 != single


def test_config_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no config.json"):
        snapshot.read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: Expecting property name"):
        snapshot.read_config(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: the vision config has no hidden_size"):
        snapshot.read_config(tmp_path, CLIPConfig.from_hf)


def test_each_tensor_is_mapped_alone_and_equals_safetensors(tmp_path):
    """read_tensors maps each tensor's own bytes (copy-on-write): the values and dtypes equal the saved tensors for
    every dtype kovlm meets, writing to one changes neither the file nor another read, and a kept tensor maps
    about its own size of the file, not the whole file."""
    state = {"a.bf16": torch.randn(300, 70).to(torch.bfloat16), "b.f32": torch.randn(5, 3), "c.f16":
             torch.randn(4000).half(), "d.i64": torch.arange(7), "e.u8": torch.arange(9, dtype=torch.uint8),
             "f.bool": torch.tensor([True, False]), "g.scalar": torch.tensor(2.5), "h.empty": torch.zeros(0, 4)}
    file = tmp_path / "model.safetensors"
    save_file(state, file)
    (tmp_path / "config.json").write_text("{}")
    read = dict(snapshot.read_tensors(tmp_path))
    assert all(read[key].dtype == value.dtype and torch.equal(read[key], value) for key, value in state.items())
    read["b.f32"].add_(1)  # copy-on-write: the file and a new read are unchanged
    assert torch.equal(load_file(file)["b.f32"], state["b.f32"])
    assert torch.equal(dict(snapshot.read_tensors(tmp_path))["b.f32"], state["b.f32"])
    kept = read.pop("c.f16")
    del read
    gc.collect()  # what remains mapped from the file (safetensors' own load_file may map it whole, so not used above)
    maps = [line.split()[0] for line in open("/proc/self/maps") if line.rstrip().endswith(str(file))]
    mapped = sum(int(end, 16) - int(start, 16) for start, end in (span.split("-") for span in maps))
    assert 0 < mapped <= kept.numel() * kept.element_size() + 2 * 4096 < file.stat().st_size
