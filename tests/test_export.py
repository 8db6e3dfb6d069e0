"""export.py: the merged folder loads in transformers' Qwen3ForCausalLM and in load_qwen3 and gives the adapted
model's logits (fp32, tiny models, NF4 base: the merge is exact up to fp32 rounding, atol 1e-4); LoRA and DoRA."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluate import rebuild_model
from export import export_checkpoint, load_exported
from infra.checkpoint import save_model
from lora import AdapterConfig
from qwen3 import load_qwen3
from train import TrainConfig
from vlm import VLMConfig, build_vlm

ROOT = Path(__file__).resolve().parents[1]


def save_random_checkpoint(path: Path, clip, llm, manifest, *, method: str = "dora", seed: int = 0,
                           quant: str | None = "nf4") -> Path:
    """A checkpoint in train.py's format whose projector and adapters are random (no training): adapters that
    change the logits, so a merge that dropped them would be seen."""
    torch.manual_seed(seed)
    config = VLMConfig(clip_path=str(clip), llm_path=str(llm), projector={"name": "crossattn", "num_queries": 4},
                       num_frames=3, quant=quant)
    model = build_vlm(config, dtype=torch.float32)
    model.add_adapters(AdapterConfig(method=method, r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if name.endswith(("lora_B", "lora_A")):
                p.normal_(0, 0.2)
            elif name.endswith("magnitude"):
                p.mul_(1 + 0.1 * torch.rand_like(p))
    train_config = TrainConfig(clip=str(clip), llm=str(llm), train_manifest=str(manifest), projector="crossattn",
                               peft=method, lora_r=4, num_frames=3, num_queries=4, dtype="fp32",
                               quant=quant or "none", output_dir=str(path.parent.parent),
                               cache_dir=str(path.parent.parent / "cache"))
    save_model(path, model, train_config, {"stage": 2})
    return path


@pytest.fixture(scope="module", params=["lora", "dora"])
def random_checkpoint(request, tiny_bases, tiny_manifest, tmp_path_factory):
    clip, llm = tiny_bases
    out = tmp_path_factory.mktemp(f"run_{request.param}")
    return save_random_checkpoint(out / "checkpoints" / "best_model.pt", clip, llm, tiny_manifest,
                                  method=request.param)


def adapted_model(checkpoint_path):
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    return rebuild_model(checkpoint, clip=None, llm=None, device="cpu", dtype=torch.float32)


def test_exported_folder_gives_the_adapted_logits_in_transformers_and_ours(random_checkpoint, tmp_path):
    from transformers import Qwen3ForCausalLM
    out = export_checkpoint(random_checkpoint, tmp_path / "exported", dtype="fp32", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    # really sharded (~40 kB a shard of the tiny fp32 model), every shard named in the index and present
    assert set(index["weight_map"].values()) == {f"model-{i:05d}-of-00006.safetensors" for i in range(1, 7)}
    assert all((out / shard).is_file() for shard in index["weight_map"].values())
    assert (out / "tokenizer.json").is_file() and (out / "clip" / "config.json").is_file()
    model = adapted_model(random_checkpoint)
    ids = torch.randint(0, model.llm.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.llm(ids)  # (B, T, V): the NF4 base with its LoRA / DoRA adapters
        ours = load_qwen3(out, dtype=torch.float32)(ids)
        hf = Qwen3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
        base = load_qwen3(model.config.llm_path, dtype=torch.float32)(ids)
    assert (expected - base).abs().max() > 1e-2  # the adapters matter, so the comparison below can fail
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hf, expected, atol=1e-4, rtol=1e-4)


def test_load_exported_rebuilds_projector_and_captions(random_checkpoint, tmp_path):
    out = export_checkpoint(random_checkpoint, tmp_path / "exported", dtype="fp32")
    exported, info = load_exported(out, dtype="fp32")
    model = adapted_model(random_checkpoint)
    assert info["merged_adapter"]["method"] in ("lora", "dora") and info["features_dtype"] == "float16"
    for key, value in model.projector.state_dict().items():
        assert torch.equal(exported.projector.state_dict()[key], value)
    features = torch.randn(2, 3, 16, 32, generator=torch.Generator().manual_seed(1))  # (B, F, P, Dv)
    assert exported.generate(features, max_new_tokens=6) == model.generate(features, max_new_tokens=6)


def test_bf16_export_stores_bf16_and_refuses_a_used_folder(random_checkpoint, tmp_path):
    from safetensors import safe_open
    out = export_checkpoint(random_checkpoint, tmp_path / "exported")
    shard = next(out.glob("model-*.safetensors"))
    with safe_open(shard, framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_checkpoint(random_checkpoint, out)
    assert not list(tmp_path.glob(".exported.*.tmp"))  # no temporary folder left behind


def test_cli_help_shows_defaults_and_bad_checkpoint_is_one_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    shown = subprocess.run([sys.executable, "export.py", "--help"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert "(default: bf16)" in shown.stdout and "(default: 2.0)" in shown.stdout
    (tmp_path / "x.pt").write_text("nope")
    result = subprocess.run([sys.executable, "export.py", str(tmp_path / "x.pt"), "--output", str(tmp_path / "o")],
                            cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'x.pt'}: not a readable")


def test_overwrite_replaces_an_earlier_export_only(random_checkpoint, tmp_path):
    out = export_checkpoint(random_checkpoint, tmp_path / "exported", dtype="fp32")
    (out / "stale.txt").write_text("from the earlier export")
    with pytest.raises(ValueError, match="exists and is not empty; add --overwrite"):
        export_checkpoint(random_checkpoint, out)
    export_checkpoint(random_checkpoint, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "kovlm.json").is_file()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="holds files but no kovlm.json: not an earlier export"):
        export_checkpoint(random_checkpoint, tmp_path / "notes", overwrite=True)
    with pytest.raises(ValueError, match="belongs to the training run"):
        export_checkpoint(random_checkpoint, random_checkpoint.parent.parent, overwrite=True)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "notes"]  # no temporary folder left


def test_a_full_disk_while_writing_a_shard_names_the_shard(random_checkpoint, tmp_path, monkeypatch):
    import errno

    from infra import shards
    from infra.errors import describe

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a file's write raises it: no file named
    monkeypatch.setattr(shards, "write_bytes", full_disk)
    with pytest.raises(OSError) as failed:
        export_checkpoint(random_checkpoint, tmp_path / "exported")
    assert re.match(r".*/model-00001-of-00001.safetensors: the disk is full", describe(failed.value))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, words", [(["--max-shard-gib", "0"], "--max-shard-gib must be positive, got 0.0"),
                                          (["--max-shard-gib", "nan"], "--max-shard-gib must be a finite number, got "
                                                                       "nan")])
def test_flags_are_refused_before_loading(random_checkpoint, tmp_path, flags, words, capsys):
    import export
    with pytest.raises(SystemExit) as stopped:
        export.main([str(random_checkpoint), "--output", str(tmp_path / "o"), *flags])
    assert stopped.value.code == f"error: {words}" and not (tmp_path / "o").exists()


# ---- the streamed export equals the whole-model merge ------------------------------------------------------------
def whole_model_state(checkpoint_path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The export as computed before it streamed: the whole adapted model rebuilt in fp32 on the CPU, every adapter
    merged (lora.merge_adapters), every parameter dequantized and cast (export.dense_state_dict)."""
    from export import dense_state_dict
    from lora import merge_adapters
    model = adapted_model(checkpoint_path)
    merge_adapters(model.llm)
    return dense_state_dict(model.llm, dtype)


def read_shards(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the shards the index names, read with safetensors.safe_open, each from the shard named."""
    from safetensors import safe_open
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(folder / shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            tensors |= {name: f.get_tensor(name) for name in f.keys()}
            assert {n for n, s in index["weight_map"].items() if s == shard} == set(f.keys())
    return tensors


@pytest.fixture(scope="module")
def moe_llm(tiny_bases, tmp_path_factory):
    """A tiny Qwen3-MoE with the tiny bases' tokenizer, its experts stored fused (transformers 5's layout, which the
    export splits per expert): layer 0 dense, layer 1 a router and 4 experts."""
    import shutil

    from conftest import save_tiny_qwen3_moe
    from tokenizers import Tokenizer
    _, llm = tiny_bases
    vocab = Tokenizer.from_file(str(llm / "tokenizer.json")).get_vocab_size()
    folder = save_tiny_qwen3_moe(tmp_path_factory.mktemp("moe") / "llm", vocab_size=vocab, hidden_size=48,
                                 intermediate_size=64, head_dim=16, experts=4, active=2, expert_size=24,
                                 mlp_only_layers=(0,), fused=True)
    shutil.copy(llm / "tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("quant", ["nf4", "int8", None])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_streamed_shards_equal_the_whole_model_merge(tiny_bases, tiny_manifest, moe_llm, tmp_path, method, quant,
                                                     moe):
    clip, llm = tiny_bases
    checkpoint = save_random_checkpoint(tmp_path / "run" / "checkpoints" / "best_model.pt", clip,
                                        moe_llm if moe else llm, tiny_manifest, method=method, quant=quant)
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        out = export_checkpoint(checkpoint, tmp_path / f"exported_{dtype}", dtype=dtype, max_shard_bytes=30_000)
        streamed, expected = read_shards(out), whole_model_state(checkpoint, torch_dtype)
        assert list(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == list(expected)
        assert streamed.keys() == expected.keys()
        for name, tensor in expected.items():
            assert streamed[name].dtype == torch_dtype and torch.equal(streamed[name], tensor), name


def test_shards_hold_at_most_max_shard_bytes_unless_one_tensor_is_larger(tmp_path):
    from safetensors import safe_open

    from infra.shards import write_shards
    tensors = {f"t{i}": torch.randn(size, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)
               for i, size in enumerate([100, 300, 2000, 50, 50, 400, 7])}  # 2000 x 2 bytes: alone over 1000
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    write_shards(iter(tensors.items()), shapes, torch.bfloat16, tmp_path, max_shard_bytes=1000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert index["metadata"]["total_size"] == 2 * 2907 and list(index["weight_map"]) == list(tensors)
    # in order: t0 t1 (800 bytes) | t2 alone (4000) | t3 t4 t5 (1000) | t6
    assert [[n for n, s in index["weight_map"].items() if s == shard] for shard in shards] == \
        [["t0", "t1"], ["t2"], ["t3", "t4", "t5"], ["t6"]]
    for shard in shards:
        with safe_open(tmp_path / shard, framework="pt") as f:
            sizes = [f.get_tensor(name).numel() * 2 for name in f.keys()]
            assert sum(sizes) <= 1000 or len(sizes) == 1
            for name in f.keys():
                assert torch.equal(f.get_tensor(name), tensors[name])


def test_a_stream_that_differs_from_the_plan_is_refused(tmp_path):
    from infra.shards import write_shards
    with pytest.raises(RuntimeError, match=r"b \(2,\) torch.float32 came where the header has a"):
        write_shards(iter([("b", torch.zeros(2))]), {"a": (2,)}, torch.float32, tmp_path, max_shard_bytes=100)
