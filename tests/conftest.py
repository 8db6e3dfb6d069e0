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
