"""The embedded default: tiny, generated, self-contained assets that `train.py` uses when no paths are given.

Real CLIP / Qwen3 weights and real datasets cannot be fetched offline, so the demo builds its own with our own code:
a synthetic Korean video dataset, a tokenizer with Qwen3's chat tokens, and tiny CLIP / Qwen3 snapshot folders that
the normal loaders read.
"""
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

# The special tokens of Qwen3's tokenizer that kovlm's prompt uses. `<think>` / `</think>` are ordinary added
# tokens in Qwen3 (decoding with skip_special_tokens keeps them), so they are added the same way here.
QWEN3_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                        "<|video_pad|>"]
QWEN3_THINK_TOKENS = ["<think>", "</think>"]


def train_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 1000) -> Path:
    """Train a byte-level BPE tokenizer (Qwen3's kind) on `texts`; write `out_dir/tokenizer.json`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN3_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["user\n", "assistant\n", *texts], trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_THINK_TOKENS])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    return out_dir / "tokenizer.json"
