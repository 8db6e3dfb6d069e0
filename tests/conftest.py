"""Shared fixtures: tiny random reference models saved as Hugging Face snapshot folders, and a tokenizer.

The reference models come from transformers (test-only); kovlm's own loaders read the folders they write.
"""
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
