"""Shared fixtures: tiny random reference models saved as Hugging Face snapshot folders, and a tokenizer.

The reference models come from transformers (test-only); kovlm's own loaders read the folders they write.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_flush_denormal(True)  # tiny random models hit denormals on the CPU; they cost 10x in time

KOREAN_TEXTS = [
    "빨간 원이 파란 배경 위에서 왼쪽으로 움직인다.",
    "파란 배경에서 빨간 원이 왼쪽으로 이동한다.",
    "초록색 사각형이 흰 배경 위를 오른쪽으로 지나간다.",
    "노란 삼각형이 검은 배경에서 위로 올라간다.",
    "이 영상을 한국어로 한 문장으로 설명하세요.",
]


def save_tiny_qwen3(path, *, tie=False, vocab_size=128, hidden_size=64, intermediate_size=96, layers=2, heads=4,
                    kv_heads=2, head_dim=24, rope_theta=10000.0, max_shard_size=None, seed=0, **extra):
    """A random transformers Qwen3ForCausalLM written to `path` (sharded when max_shard_size is given)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, rope_theta=rope_theta, max_position_embeddings=512,
                         tie_word_embeddings=tie, **extra)
    model = Qwen3ForCausalLM(config).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return Path(path)


def save_tiny_qwen3_moe(path, *, vocab_size=128, hidden_size=64, intermediate_size=96, layers=2, heads=4, kv_heads=2,
                        head_dim=16, experts=8, active=2, expert_size=32, sparse_step=1, mlp_only_layers=(),
                        norm_topk_prob=True, fused=False, seed=0):
    """A random transformers Qwen3MoeForCausalLM written to `path`, in the hub's per-expert layout (save_pretrained
    splits the experts) or, fused=True, in transformers 5's in-memory one (experts.gate_up_proj / down_proj). The
    routers are drawn at random too: transformers' init leaves them at zero, where every expert ties."""
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                            head_dim=head_dim, num_experts=experts, num_experts_per_tok=active,
                            moe_intermediate_size=expert_size, decoder_sparse_step=sparse_step,
                            mlp_only_layers=list(mlp_only_layers), norm_topk_prob=norm_topk_prob,
                            rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False)
    model = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                parameter.normal_(0, 0.5)
    if not fused:
        model.save_pretrained(path)
        return Path(path)
    Path(path).mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, Path(path) / "model.safetensors",
              metadata={"format": "pt"})
    return Path(path)


def save_tiny_clip(path, *, full=True, hidden_size=32, intermediate_size=64, layers=3, heads=4, image_size=28,
                   patch_size=7, max_shard_size=None, safe_serialization=True, seed=0):
    """A random transformers CLIPModel (full=True, text tower included) or CLIPVisionModel written to `path`."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch_size)
    if full:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
                    bos_token_id=0, eos_token_id=1, pad_token_id=1)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict()))
    else:
        model = CLIPVisionModel(vision)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if not safe_serialization:
        # transformers 5 writes only safetensors; a legacy `pytorch_model.bin` snapshot is written by hand.
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
        return path
    model.eval().save_pretrained(path, **kwargs)
    return Path(path)


# ---- tiny towers of every family, each with its image processor (vision.load_vision reads them) ----
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # transformers' IMAGENET_DEFAULT_*


def saved_once(tmp_path_factory, save, prefix: str):
    """make(**options) -> save(a new folder, **options), written once per distinct set of options."""
    folders = {}

    def make(**options):
        key = json.dumps(options, sort_keys=True)
        if key not in folders:
            folders[key] = save(tmp_path_factory.mktemp(prefix), **options)
        return folders[key]
    return make


def perturb(model, seed=0):
    """Random init plus N(0, 0.1) on every parameter, so LayerNorm gains, LayerScale, biases and registers matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def save_siglip(folder, *, full=False, resample=3, size=28, **sizes):
    """A SigLIP tower (full=True: with its text tower) and its processor at size x size; `sizes` over the tiny
    config (image_size must then equal size: the positions are learned for it)."""
    from transformers import SiglipConfig as HFConfig
    from transformers import SiglipImageProcessorPil, SiglipModel, SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(0)
    vision = SiglipVisionConfig(**TINY | dict(intermediate_size=64, image_size=28, patch_size=7) | sizes)
    if full:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99)
        model = SiglipModel(HFConfig(text_config=text, vision_config=vision.to_dict()))
    else:
        model = SiglipVisionModel(vision)
    perturb(model).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": size, "width": size}, resample=resample).save_pretrained(folder)
    return folder


def save_clip(folder):
    from transformers import CLIPImageProcessorPil
    save_tiny_clip(folder, full=False, image_size=28, patch_size=7)
    CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(folder)
    return folder


def save_dinov2(folder, *, registers=False, **sizes):
    """A DINOv2 tower (with 4 registers when asked), `sizes` over the tiny config, and its processor (short side 32,
    centre crop 28)."""
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, \
        Dinov2WithRegistersModel
    torch.manual_seed(0)
    sizes = TINY | dict(image_size=42, patch_size=7) | sizes  # a 6 x 6 position table, resized to the crop's 4 x 4 grid
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**sizes, num_register_tokens=4)) if registers \
        else Dinov2Model(Dinov2Config(**sizes))
    perturb(model).save_pretrained(folder)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, resample=3,
                         image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)).save_pretrained(folder)
    return folder


DINOV3_PROCESSOR = {  # what DINOv3ViTImageProcessor writes (it needs torchvision, so it is written by hand here)
    "image_processor_type": "DINOv3ViTImageProcessorFast", "do_resize": True, "size": {"height": 28, "width": 28},
    "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "crop_size": None, "do_center_crop": None}


def save_dinov3(folder, *, gated=False, **sizes):
    """A DINOv3 tower (4 registers; gated: a SwiGLU MLP and none), `sizes` over the tiny config, and its processor
    (28 x 28)."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel
    torch.manual_seed(0)
    options = dict(use_gated_mlp=True, hidden_act="silu", num_register_tokens=0) if gated else \
        dict(num_register_tokens=4)
    config = TINY | dict(intermediate_size=64, image_size=28, patch_size=7) | options | sizes
    model = DINOv3ViTModel(DINOv3ViTConfig(**config))
    perturb(model).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(DINOV3_PROCESSOR))
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer with Qwen3's chat tokens (the demo's builder)."""
    from demo import train_tokenizer
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(KOREAN_TEXTS * 20, out, vocab_size=400)
    return out


@pytest.fixture(scope="session")
def tiny_bases(tmp_path_factory, tokenizer_dir):
    """(clip_dir, llm_dir): a vision-only CLIP (28 px, patch 7: 16 patches, width 32) and a Qwen3 (width 48) whose
    folder holds the tokenizer, as a real Qwen3 snapshot does."""
    import shutil

    from tokenizers import Tokenizer
    root = tmp_path_factory.mktemp("bases")
    vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    llm = save_tiny_qwen3(root / "llm", vocab_size=vocab, hidden_size=48, intermediate_size=64, head_dim=16)
    shutil.copy(tokenizer_dir / "tokenizer.json", llm / "tokenizer.json")
    clip = save_tiny_clip(root / "clip", full=False, hidden_size=32, image_size=28, patch_size=7)
    return clip, llm


def write_noise_video(path, seed, num_frames=6, size=28):
    """A short mp4 of random frames."""
    import cv2
    import numpy as np
    rng = np.random.default_rng(seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 8, (size, size))
    for _ in range(num_frames):
        writer.write(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    writer.release()
    return Path(path)


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory):
    """manifest.jsonl of 20 noise videos with two Korean captions each: 12 train, 4 val, 4 test."""
    import json
    root = tmp_path_factory.mktemp("videos")
    colours = ["빨간", "파란", "노란", "초록색"]
    lines = []
    for i in range(20):
        write_noise_video(root / f"v{i}.mp4", seed=i)
        split = "train" if i < 12 else "val" if i < 16 else "test"
        captions = [f"{colours[i % 4]} 원이 움직인다.", f"{colours[(i + 1) % 4]} 원이 지나간다."]
        lines.append(json.dumps({"id": f"v{i}", "video": f"v{i}.mp4", "captions": captions, "split": split},
                                ensure_ascii=False))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifest.jsonl"


@pytest.fixture
def tensors_read(monkeypatch):
    """(file name, key) of every tensor the snapshot reader maps from a safetensors file, in order."""
    from infra import snapshot
    read, real_map_tensor = [], snapshot.map_tensor

    def spying_map_tensor(file, data_start, entry):
        read.append((file.name, next(key for key, value in snapshot.read_header(file)[1].items() if value == entry)))
        return real_map_tensor(file, data_start, entry)

    monkeypatch.setattr(snapshot, "map_tensor", spying_map_tensor)
    return read
