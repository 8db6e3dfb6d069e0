"""Hugging Face snapshot folders: the one reader every loader uses (clip.py, bert.py, qwen3.py and the towers to
come), and the one fingerprint that names a snapshot's weights in checkpoints and in the feature cache.

A snapshot folder holds `config.json` and its weights in one of the layouts transformers writes:
    model.safetensors                                  one file
    model.safetensors.index.json + model-0000N-of-M    shards; the index's weight_map names each tensor's shard
    pytorch_model.bin (or its index + shards)          older and pickled: read with torch.load(weights_only=True),
                                                       which rebuilds tensors and plain containers, never runs code
A loader is four steps (gpt-fast's: build on the meta device, then assign the checkpoint's tensors):
    config = read_config(folder, XConfig.from_hf)
    with torch.device("meta"):
        model = X(config)                                  # shapes only, no memory
    load_into(model, folder, x_name, dtype=dtype, device=device)
    model.fingerprint = fingerprint(folder)
`x_name(checkpoint_key) -> our name or None` is the loader's whole key mapping (a prefix strip, a rename); None
skips a tensor without reading it (CLIP's text tower, BERT's pooler). A loader whose checkpoints may hold several of
its tensors in one (transformers 5's fused Qwen3-MoE experts) also passes `split(name, tensor) -> [(name, piece)]`,
applied after the rename; the key check applies it to meta tensors of the stored shapes, so nothing is read.
"""
import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from infra.errors import UserError

LAYOUTS = (("model.safetensors", "model.safetensors.index.json"),
           ("pytorch_model.bin", "pytorch_model.bin.index.json"))
BLOCKS, BLOCK_BYTES = 8, 4096  # the fingerprint reads 8 evenly spaced 4 KiB blocks of each tensor (all of a small one)
CHUNK_BYTES = 1 << 20  # and a .bin whole, a MiB at a time
Rename = Callable[[str], str | None]
Split = Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]] | None


def keep_every_key(key: str) -> str:
    return key


def read_config(folder: Path, from_hf=None):
    """config.json as a dict, or read by `from_hf` (a config dataclass's classmethod), its errors naming the file."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; expected a Hugging Face model folder (config.json and "
                                f"its weights)")
    try:
        config = json.loads(file.read_text())
        return config if from_hf is None else from_hf(config)
    except ValueError as error:  # json.JSONDecodeError is one too
        raise UserError(f"{file}: {error}") from error


def weight_files(folder: Path, our_name: Rename = keep_every_key) -> list[Path]:
    """The single weight file, or the shards of an index that hold at least one tensor `our_name` keeps."""
    folder = Path(folder)
    for single, index in LAYOUTS:
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            shards = sorted({folder / shard for key, shard in weight_map.items() if our_name(key) is not None})
            for shard in shards:
                if not shard.is_file():
                    raise FileNotFoundError(f"{folder}: {index} lists {shard.name}, which is not in the folder; "
                                            f"download it again")
            return shards
    raise FileNotFoundError(f"{folder}: no weights; expected model.safetensors or pytorch_model.bin (or an index "
                            f"with its shards), as in a Hugging Face model folder")


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_header(file: Path) -> tuple[int, dict]:
    """(where the tensor bytes begin, {key: {"dtype", "shape", "data_offsets"}}) of a safetensors file: an
    8-byte little-endian length, then that many bytes of JSON. A damaged or truncated file is named here."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        try:
            header = json.loads(handle.read(length)) if 8 + length <= size else None
        except ValueError:  # not UTF-8, not JSON
            header = None
    if not isinstance(header, dict):
        raise UserError(f"{file}: not a readable safetensors file (its header does not parse); download it again")
    tensors = {key: entry for key, entry in header.items() if key != "__metadata__"}
    needed = 8 + length + max((entry["data_offsets"][1] for entry in tensors.values()), default=0)
    if needed > size:
        raise UserError(f"{file}: truncated: its header describes {needed} bytes, the file has {size}; "
                         f"download it again")
    return 8 + length, tensors


def read_bin(file: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin's tensors; memory-mapped (nothing read until used) when it is torch's zip format."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as error:  # torch's message may advise weights_only=False, the unsafe path: never repeat it
        raise UserError(f"{file}: torch.load(weights_only=True) cannot read it ({type(error).__name__}): damaged, "
                         f"truncated, or holding more than tensors") from None


def split_shapes(name: str, shape: tuple, split: Split) -> list[tuple[str, tuple]]:
    """(name, shape) of each piece `split` makes of a tensor of this shape, from a meta tensor: nothing is read."""
    if split is None:
        return [(name, shape)]
    return [(piece, tuple(tensor.shape)) for piece, tensor in split(name, torch.empty(shape, device="meta"))]


def stored_shapes(folder: Path, our_name: Rename = keep_every_key, split: Split = None
                  ) -> dict[str, tuple[str, tuple]]:
    """{our name: (checkpoint key, shape)} of every tensor `our_name` keeps (and of each piece `split` makes of
    it), from the files' headers: no tensor is read (a .bin is memory-mapped)."""
    stored = {}
    for file in weight_files(folder, our_name):
        if file.suffix == ".safetensors":
            shapes = {key: tuple(entry["shape"]) for key, entry in read_header(file)[1].items()}
        else:
            shapes = {key: tuple(tensor.shape) for key, tensor in read_bin(file).items()}
        for key, shape in shapes.items():
            if (name := our_name(key)) is None:
                continue
            for piece, piece_shape in split_shapes(name, shape, split):
                if piece in stored:
                    raise UserError(f"{folder}: '{stored[piece][0]}' and '{key}' are both '{piece}'; keep one of "
                                     f"them")
                stored[piece] = (key, piece_shape)
    return stored


def first_few(items: list[str], few: int = 3) -> str:
    return ", ".join(items[:few]) + (f" and {len(items) - few} more" if len(items) > few else "")


def check_keys(folder: Path, model: nn.Module, our_name: Rename = keep_every_key, split: Split = None) -> None:
    """Every kept tensor must have a place in `model.state_dict()` (a meta model is enough), of the same shape,
    and every place must be filled: else one line names the folder and the first few keys."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    stored = stored_shapes(folder, our_name, split)
    unexpected = [f"'{key}'" for name, (key, _) in stored.items() if name not in expected]
    if unexpected:
        raise UserError(f"{folder}: unexpected weights {first_few(unexpected)}; {type(model).__name__} has no "
                         f"place for them")
    missing = [f"'{name}'" for name in expected if name not in stored]
    if missing:
        raise UserError(f"{folder}: missing weights {first_few(missing)}; the weights do not match config.json")
    misshapen = [(key, shape, expected[name]) for name, (key, shape) in stored.items() if shape != expected[name]]
    if misshapen:
        keys = first_few([f"'{key}'" for key, _, _ in misshapen])
        key, shape, implied = misshapen[0]
        raise UserError(f"{folder}: weights of another shape than config.json implies: {keys} ('{key}' has shape "
                         f"{shape}, but config.json implies {implied})")


def read_tensors(folder: Path, our_name: Rename = keep_every_key, split: Split = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor as stored) for each kept tensor (or each piece `split` makes of it), one at a time: a
    caller that converts each one as it comes (qwen3.py's NF4) never holds the whole model in full precision.
    Skipped tensors are never read."""
    def named(name: str, tensor: torch.Tensor):
        return [(name, tensor)] if split is None else split(name, tensor)
    for file in weight_files(folder, our_name):
        if file.suffix == ".safetensors":
            data_start, entries = read_header(file)  # a damaged file is named in one line here
            for key, entry in entries.items():
                if (name := our_name(key)) is not None:
                    yield from named(name, map_tensor(file, data_start, entry))
        else:
            for key, tensor in read_bin(file).items():
                if (name := our_name(key)) is not None:
                    yield from named(name, tensor)


def map_tensor(file: Path, data_start: int, entry: dict) -> torch.Tensor:
    """One tensor of a safetensors file on a private (copy-on-write) memory map of its own bytes: nothing is read
    until used, and dropping the tensor unmaps it. A map of the whole file would keep every page read through it
    resident while any one of its tensors lived (a kept bf16 embedding would hold its 4 GB shard)."""
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise UserError(f"{file}: tensor dtype {entry['dtype']} is not one kovlm reads "
                        f"({', '.join(SAFETENSORS_DTYPES)}); convert the snapshot to bf16 or fp32")
    dtype, (begin, end) = SAFETENSORS_DTYPES[entry["dtype"]], entry["data_offsets"]
    if begin == end:
        return torch.empty(entry["shape"], dtype=dtype)
    raw = np.memmap(file, dtype=np.uint8, mode="c", offset=data_start + begin, shape=(end - begin,))
    return torch.from_numpy(raw).view(dtype).reshape(entry["shape"])


def assign(model: nn.Module, name: str, tensor: torch.Tensor, *, dtype: torch.dtype, device) -> None:
    """Put one checkpoint tensor, moved and (floating point only) cast, in place of the meta tensor `name`, a
    parameter or a buffer. A tensor already in the wanted dtype and device stays on its own memory map (map_tensor:
    private, copy-on-write pages, as transformers leaves them): the pages of an embedding's rows never looked up are
    never read into memory, and the others can be dropped and read again by the kernel instead of being held twice."""
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    if attribute in module._buffers:
        module.register_buffer(attribute, value)
    else:
        setattr(module, attribute, nn.Parameter(value, requires_grad=False))


def load_into(model: nn.Module, folder: Path, our_name: Rename = keep_every_key, *, dtype: torch.dtype, device,
              place=assign, split: Split = None, progress: str | None = None) -> None:
    """Fill `model` (built on the meta device) from the folder: every key is checked from the headers first, then
    each tensor (or each piece `split` makes of it) is read and handed to `place(model, name, tensor, dtype=,
    device=)` (default `assign`), one at a time. With `progress`, a model of 100M weights or more shows a bar
    (weights placed, and the time left) under that name on the main process."""
    check_keys(folder, model, our_name, split)
    total = sum(tensor.numel() for tensor in model.state_dict().values())
    shown = progress is not None and total >= 100_000_000 and os.environ.get("RANK", "0") == "0"
    with tqdm(total=total, desc=progress, unit="weights", unit_scale=True, disable=not shown) as bar:
        for name, tensor in read_tensors(folder, our_name, split):
            place(model, name, tensor, dtype=dtype, device=device)
            bar.update(tensor.numel())


# ---- fingerprint ----

def fingerprint(folder: Path) -> str:
    """The identity of a snapshot's weights as stored, 32 hex digits: a checkpoint records it for its bases.

    sha256 over config.json and, for each weight file, its name and size; for safetensors its header (every
    tensor's name, dtype, shape and offsets) and BLOCKS evenly spaced blocks of each tensor's bytes, the whole
    tensor when it is small; a .bin (an older, smaller snapshot) whole. Any change of shape or dtype is seen, and
    so is a change of a tensor's values that reaches its sampled blocks, as a fine-tune or a merged LoRA update
    (every value changes) does; a few values edited between the blocks of a large tensor are not. At most 32 KiB
    a tensor: about 12 MiB of Qwen3-8B's 16 GB. A byte-identical copy in another folder has the same fingerprint."""
    folder = Path(folder)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for file in weight_files(folder):
        digest.update(f"{file.name}:{file.stat().st_size}\n".encode())
        with open(file, "rb") as handle:
            for start, end in hashed_spans(file):
                handle.seek(start)
                digest.update(handle.read(end - start))
    return digest.hexdigest()[:32]


def hashed_spans(file: Path) -> Iterator[tuple[int, int]]:
    """The byte ranges `fingerprint` reads: a safetensors file's header and sampled blocks of each tensor."""
    if file.suffix != ".safetensors":
        size = file.stat().st_size
        yield from ((start, min(start + CHUNK_BYTES, size)) for start in range(0, size, CHUNK_BYTES))
        return
    begin, tensors = read_header(file)
    yield 0, begin
    for first, last in sorted(entry["data_offsets"] for entry in tensors.values()):
        start, end = begin + first, begin + last
        if end - start <= BLOCKS * BLOCK_BYTES:
            yield start, end
            continue
        step = (end - start - BLOCK_BYTES) / (BLOCKS - 1)  # the first block at the start, the last at the end
        for block in range(BLOCKS):
            yield start + round(block * step), start + round(block * step) + BLOCK_BYTES


def fingerprint_with_dtype(weights_fingerprint: str, dtype: torch.dtype) -> str:
    """The identity of what those weights compute in `dtype`: the feature cache's key for a tower, since bf16
    features are not fp32 features, while a checkpoint's base identity stays the weights as stored (a run trained
    in bf16 on a GPU is evaluated in fp32 on a CPU)."""
    return hashlib.sha256(f"{weights_fingerprint}|{dtype}".encode()).hexdigest()[:32]
