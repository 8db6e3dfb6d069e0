"""Fold a checkpoint's adapters into its base and write a standard Qwen3 snapshot folder plus the projector.

    python export.py runs/perceiver_dora/checkpoints/best_model.pt --output exported/ [--dtype bf16]

    exported/
      config.json, model-0000k-of-0000n.safetensors, model.safetensors.index.json   the merged Qwen3 (HF layout)
      tokenizer.json (and the base's other tokenizer files)
      projector.safetensors      the trained projector, fp32
      kovlm.json                 the model config: projector, frames, tower layer, prompt, feature rounding
      clip/                      a copy of the vision tower's folder

The folder loads in transformers' Qwen3ForCausalLM (Qwen3MoeForCausalLM for a Qwen3-MoE base: each expert under its
own per-expert names, the hub's layout, which transformers fuses as it loads) and in our load_qwen3 without adapter
code: each adapted linear becomes W + sBA (DoRA: m / ||W + sBA||_row * (W + sBA); lora.LoRALinear.merged_linear),
computed in fp32 from the dequantized base when the base is 4-bit or 8-bit, then stored in --dtype; linears the
adapters did not touch are dequantized too. caption.py takes the folder in place of a checkpoint. The folder is
written under a temporary name and renamed, so an interrupted export leaves nothing that looks finished; an existing
--output is replaced only with --overwrite, and only when it is empty or an earlier export (kovlm.json), never a
training run's folder. The flags, the checkpoint and its base folders' files are checked before a model is loaded.
"""
import argparse
import errno
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from evaluate import rebuild_model
from features import CACHE_DTYPE
from infra import options
from infra.checkpoint import load_checkpoint
from infra.distributed import compute_dtype
from infra.errors import UserError, user_errors
from infra.paths import check_output_folder, file_problem, temporary_name
from infra.preflight import check_bases, check_checkpoint, run_folder_of
from lora import dequantized_weight, merge_adapters
from vlm import VLMConfig, build_vlm

EXPORT_FORMAT = "kovlm-export-1"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja")
CLIP_FILES = ("config.json", "preprocessor_config.json", "model.safetensors", "model.safetensors.index.json",
              "pytorch_model.bin", "pytorch_model.bin.index.json")


def dense_state_dict(llm: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every parameter of the (merged) Qwen3 under its Hugging Face name, 4-bit weights dequantized, in `dtype`."""
    state = {}
    for module_name, module in llm.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            tensor = dequantized_weight(module) if name == "weight" and isinstance(module, torch.nn.Linear) \
                else parameter.detach()
            state[f"{module_name}.{name}"] = tensor.to(dtype).contiguous().cpu()
    return state


def write_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    """model-0000k-of-0000n.safetensors, each under max_shard_bytes (one tensor may exceed it alone), and the
    index that maps each tensor to its shard: transformers' layout, which both loaders read."""
    shards, size = [[]], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for k, names in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        try:
            save_file({name: state[name] for name in names}, folder / file, metadata={"format": "pt"})
        except SafetensorError as error:  # its message names no file ("I/O error: No space left on device")
            raise OSError(errno.ENOSPC if "No space left" in str(error) else errno.EIO, str(error),
                          str(folder / file)) from None
        weight_map |= {name: file for name in names}
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_files(source: Path, target: Path, names) -> list[str]:
    """The files `names` of `source` that exist, copied into `target`; when `names` holds a safetensors index (the
    tower's weights), the shards it lists too. The LM's own weights are never copied: the merged ones are written."""
    target.mkdir(parents=True, exist_ok=True)
    copied = [name for name in names if (source / name).is_file()]
    for name in copied:
        shutil.copy2(source / name, target / name)
    if "model.safetensors.index.json" in copied:  # a sharded tower: its shards too
        for shard in set(json.loads((source / "model.safetensors.index.json").read_text())["weight_map"].values()):
            shutil.copy2(source / shard, target / shard)
    return copied


def check_export_target(output, checkpoint_path, *, overwrite: bool) -> Path:
    """--output: a new or empty folder, or with `overwrite` an earlier export; never a training run's folder."""
    output = check_output_folder(output, overwrite=overwrite, runs=[r for r in [run_folder_of(checkpoint_path)] if r])
    if output.is_dir() and any(output.iterdir()) and not (output / "kovlm.json").is_file():
        raise UserError(f"--output {output} holds files but no kovlm.json: not an earlier export, so --overwrite does "
                        f"not replace it; choose another folder")
    return output


def export_checkpoint(checkpoint_path, output, *, dtype: str = "bf16", clip=None, llm=None,
                      max_shard_bytes: int = 2 << 30, overwrite: bool = False) -> Path:
    """Write the merged model folder (see the module docstring); returns its path."""
    output = check_export_target(output, checkpoint_path, overwrite=overwrite)
    checkpoint = check_checkpoint(load_checkpoint(checkpoint_path), checkpoint_path)
    # fp32 on the CPU: the merge W + sBA and DoRA's norm are computed at full precision whatever the storage dtype
    model = rebuild_model(checkpoint, clip=clip, llm=llm, device="cpu", dtype=torch.float32,
                          where=str(checkpoint_path))
    merged = merge_adapters(model.llm) if model.config.adapter is not None else []
    temporary = temporary_name(output)
    temporary.mkdir(parents=True)
    try:
        write_shards(dense_state_dict(model.llm, DTYPES[dtype]), temporary, max_shard_bytes)
        config = json.loads((Path(model.config.llm_path) / "config.json").read_text())
        config |= {"dtype": {"bf16": "bfloat16", "fp32": "float32"}[dtype]}
        config.pop("quantization_config", None)
        (temporary / "config.json").write_text(json.dumps(config, indent=2))
        if "tokenizer.json" not in copy_files(Path(model.config.llm_path), temporary, TOKENIZER_FILES):
            raise FileNotFoundError(f"{model.config.llm_path}: no tokenizer.json to export with the model")
        copy_files(Path(model.config.clip_path), temporary / "clip", CLIP_FILES)
        save_file({k: v.contiguous() for k, v in model.projector.state_dict().items()},
                  temporary / "projector.safetensors")
        train_config = checkpoint["train_config"]
        vlm_config = asdict(model.config) | {"clip_path": "clip", "llm_path": ".", "adapter": None, "quant": None}
        info = {"format": EXPORT_FORMAT, "vlm_config": vlm_config, "source_checkpoint": str(checkpoint_path),
                "merged_adapter": checkpoint["vlm_config"]["adapter"], "merged_linears": len(merged),
                "dtype": train_config["dtype"], "storage_dtype": dtype,
                "features_dtype": str(CACHE_DTYPE).removeprefix("torch.") if train_config["feature_cache"] else None}
        (temporary / "kovlm.json").write_text(json.dumps(info, ensure_ascii=False, indent=1))
        replace_folder(temporary, output)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return output


def replace_folder(new: Path, output: Path) -> None:
    """Rename `new` to `output`; an earlier folder there (empty, or an export under --overwrite) is moved aside
    first and removed after, so `output` always holds one whole export."""
    old = temporary_name(output) if output.exists() else None
    if old is not None:
        os.replace(output, old)
    os.replace(new, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_export_info(folder) -> dict:
    """kovlm.json of an export folder, its format checked."""
    info_file = Path(folder) / "kovlm.json"
    if not info_file.is_file():
        raise FileNotFoundError(f"{folder}: no kovlm.json; pass a checkpoint file or a folder written by export.py")
    info = json.loads(info_file.read_text())
    if info.get("format") != EXPORT_FORMAT:
        raise UserError(f"{info_file}: format {info.get('format')!r}, expected {EXPORT_FORMAT!r}")
    return info


def load_exported(folder, *, clip=None, device="cpu", dtype: str | None = None, quant: str | None = None):
    """(VLM, kovlm.json's content) from an export folder; the LLM in `dtype` (default: the run's), optionally 4-bit."""
    folder = Path(folder)
    info = read_export_info(folder)
    saved = info["vlm_config"]
    config = VLMConfig(**saved | {"clip_path": str(clip or folder / saved["clip_path"]),
                                  "llm_path": str(folder / saved["llm_path"]), "quant": quant})
    device = torch.device(device)
    model = build_vlm(config, device=device, dtype=compute_dtype(dtype or info["dtype"], device))
    model.projector.load_state_dict(load_file(folder / "projector.safetensors", device=str(device)), strict=True)
    return model.eval(), info | {"exported": str(folder)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a model checkpoint (best_model.pt, ...)")
    parser.add_argument("--output", required=True, help="the folder to write (must not exist, or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="storage dtype of the LLM weights")
    parser.add_argument("--vision", "--clip", dest="clip", metavar="DIR", help="vision tower folder instead of the "
                        "one the checkpoint names (--clip is an alias of --vision)")
    parser.add_argument("--llm", help="Qwen3 folder instead of the one the checkpoint names")
    parser.add_argument("--max-shard-gib", type=float, default=2.0, help="largest safetensors shard")
    args = parser.parse_args(argv)
    with user_errors():
        check_command(args)
        out = export_checkpoint(args.checkpoint, args.output, dtype=args.dtype, clip=args.clip, llm=args.llm,
                                max_shard_bytes=int(args.max_shard_gib * 2**30), overwrite=args.overwrite)
        print(f"wrote {out}: {len(list(out.glob('model-*.safetensors')))} shard(s), projector, tokenizer, clip/")


def check_command(args: argparse.Namespace) -> None:
    """Before a model loads: the flags, the checkpoint, its base folders' files and the output folder."""
    options.positive("max_shard_gib", args.max_shard_gib)
    if problem := file_problem(args.checkpoint):
        raise UserError(f"{args.checkpoint}: {problem}; give a checkpoint file (best_model.pt, ...)")
    vlm_config = check_checkpoint(load_checkpoint(args.checkpoint), args.checkpoint)["vlm_config"]
    check_bases(vlm_config, args.clip or vlm_config["clip_path"], args.llm or vlm_config["llm_path"], 1)
    check_export_target(args.output, args.checkpoint, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
