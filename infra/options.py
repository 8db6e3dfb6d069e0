"""The checks every command makes of its flags before it loads anything: one rule per kind of flag, one line
naming the flag (train.py, evaluate.py, caption.py, export.py, metrics.py, data.py share them).

    counts (batch sizes, workers, epochs)   whole numbers >= 1 (or >= 0 where 0 means "none")
    rates and sizes                         finite numbers > 0 (or >= 0); NaN and inf refused
    decoding                                max_new_tokens >= 1; sampling: temperature > 0, 0 < top_p <= 1,
                                            repetition_penalty > 0, no_repeat_ngram_size >= 0
    --device                                a device this torch has (cuda on a CPU-only build is refused)
    token limits                            prompt + new tokens within the LM's max_position_embeddings, read from
                                            the LM folder's config.json before any weight is loaded
"""
import json
import math
from pathlib import Path

import torch

from infra.errors import UserError


def flag(name: str) -> str:
    return name if name.startswith("-") else "--" + name.replace("_", "-")


def at_least(name: str, value, minimum: int) -> None:
    """A count: a whole number >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{flag(name)} must be a whole number >= {minimum}, got {value}")


def finite(name: str, value) -> None:
    """A number, and not NaN or inf (which every comparison below would let through)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{flag(name)} must be a finite number, got {value}")


def positive(name: str, value) -> None:
    finite(name, value)
    if value <= 0:
        raise UserError(f"{flag(name)} must be positive, got {value}")


def non_negative(name: str, value) -> None:
    finite(name, value)
    if value < 0:
        raise UserError(f"{flag(name)} must not be negative, got {value}")


def fraction(name: str, value) -> None:
    """A share in [0, 1)."""
    finite(name, value)
    if not 0 <= value < 1:
        raise UserError(f"{flag(name)} must be in [0, 1), got {value}")


def check_decoding(max_new_tokens: int, decoding: dict) -> None:
    """evaluate.py's and caption.py's decoding flags (evaluate.DEFAULT_DECODING's keys), as transformers' logits
    processors require them: a sampling temperature of 0 or a top-p of 0 leaves no token to draw."""
    at_least("max_new_tokens", max_new_tokens, 1)
    sampling = decoding.get("do_sample", False)
    temperature = decoding.get("temperature", 1.0)
    if not math.isfinite(temperature) or temperature < 0 or (sampling and temperature == 0):
        raise UserError(f"--temperature must be a finite number above 0 when sampling, got {temperature}"
                        + ("; for temperature 0 leave out --do-sample (greedy decoding)" if temperature == 0 else ""))
    top_p = decoding.get("top_p", 1.0)
    if not (0 < top_p <= 1):
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    positive("repetition_penalty", decoding.get("repetition_penalty", 1.0))
    at_least("no_repeat_ngram_size", decoding.get("no_repeat_ngram_size", 0), 0)


def check_device(name: str | None) -> torch.device | None:
    """--device as a torch.device this process can use (None: the command's default)."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: this torch sees no CUDA GPU (a CPU-only build, or no driver); "
                            f"use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0 to "
                            f"cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: this torch has no MPS device; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: kovlm runs on cpu, cuda or mps")
    return device


def position_limit(llm_path) -> int:
    """max_position_embeddings of the LM folder's config.json (Qwen3's default when absent), no weights read."""
    config_file = Path(llm_path) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{config_file}: cannot read the LM's config ({error}); --llm must be a Qwen3 snapshot "
                        f"folder") from None
    return int(config.get("max_position_embeddings", 40960))


def check_positions(prompt_tokens: int, new_tokens: int, limit: int, flags: str = "--max-new-tokens",
                    hint: str = "") -> None:
    """The longest sequence (prompt with its visual tokens + caption tokens + the closing <|im_end|>) within the
    LM's positions; past them RoPE has no trained angles and the KV cache no room."""
    longest = prompt_tokens + new_tokens + 1
    if longest > limit:
        most = f" to at most {limit - prompt_tokens - 1}" if limit > prompt_tokens + 1 else ""
        raise UserError(f"{flags} {new_tokens}: the prompt ({prompt_tokens} tokens with the video's) + "
                        f"{new_tokens} caption tokens = {longest} positions, over the LM's {limit}; lower "
                        f"{flags}{most}{hint}")


def check_window(num_train: int, batch_size: int, grad_accum: int, world: int) -> None:
    """One optimizer step needs batch_size x grad_accum x processes training samples; a smaller split is refused
    before anything is loaded (a shorter window would leave some micro-batches, or some processes, empty)."""
    window = batch_size * grad_accum * world
    if num_train < window:
        raise UserError(f"the train split has {num_train} samples, fewer than one optimizer step's {window} "
                        f"(--batch-size {batch_size} x --grad-accum {grad_accum} x {world} processes); lower "
                        f"--batch-size or --grad-accum, or add training videos")
