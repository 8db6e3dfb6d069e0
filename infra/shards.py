"""A Hugging Face model's weights written as safetensors shards tensor by tensor, so that a model which never
sits whole in memory (export.py merges one decoder layer at a time) can still be saved in transformers' layout:

    model-00001-of-0000n.safetensors ... model-0000n-of-0000n.safetensors, model.safetensors.index.json

A safetensors file is an 8-byte little-endian length, a JSON header giving each tensor's dtype, shape and byte range
(data_offsets, from the end of the header), padded with spaces to 8 bytes, then the bytes of the tensors. Every
shape is known before any tensor is made, so each shard's header is written first and the tensors appended as they
come; safetensors.safe_open and transformers read the files (tests/test_export.py).
"""
import json
import math
from pathlib import Path
from typing import Iterator

import torch

from infra.snapshot import SAFETENSORS_DTYPES

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}  # torch.bfloat16 -> "BF16", as stored


def plan_shards(shapes: dict[str, tuple], itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    """The tensors' names grouped into shards in order, each under max_shard_bytes (one tensor may exceed it
    alone): transformers' rule."""
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], shapes: dict[str, tuple], dtype: torch.dtype,
                 folder: Path, max_shard_bytes: int) -> None:
    """model-0000k-of-0000n.safetensors, each under max_shard_bytes, and the index that maps each tensor to its
    shard: transformers' layout, which both loaders read. `shapes` says every tensor before any is made, so each
    shard's header is written first and `tensors` (the same names, in order) appended as they come."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(shapes, itemsize, max_shard_bytes)
    weight_map = {}
    for k, names in enumerate(shards, start=1):
        file = folder / f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        try:
            write_safetensors(file, {name: shapes[name] for name in names}, dtype, tensors)
        except OSError as error:
            if error.filename is not None:
                raise
            raise OSError(error.errno, error.strerror, str(file)) from None  # a write's error names no file
        weight_map |= {name: file.name for name in names}
    if (extra := next(tensors, None)) is not None:
        raise RuntimeError(f"write_shards: {extra[0]} came after the last tensor of the plan")
    total = sum(math.prod(shape) for shape in shapes.values()) * itemsize
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_safetensors(file: Path, shapes: dict[str, tuple], dtype: torch.dtype,
                      tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """One safetensors file: an 8-byte little-endian header length, the JSON header (each tensor's dtype, shape and
    byte range; padded with spaces to 8 bytes, as the format asks), then the tensors' bytes in the header's order,
    each taken from `tensors` and written as it comes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0  # "pt": what transformers checks before loading
    for name, shape in shapes.items():
        size = math.prod(shape) * itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as out:
        out.write(len(text).to_bytes(8, "little") + text)
        for expected, shape in shapes.items():
            name, tensor = next(tensors)
            if name != expected or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise RuntimeError(f"write_safetensors: {name} {tuple(tensor.shape)} {tensor.dtype} came where the "
                                   f"header has {expected} {tuple(shape)} {dtype}")
            write_bytes(out, tensor)


def write_bytes(out, tensor: torch.Tensor) -> None:
    """The tensor's bytes as they lie in memory (little-endian here, as the format stores them), without a copy."""
    out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
