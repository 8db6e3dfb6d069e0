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
adapters did not touch are dequantized too. The Qwen3 is never whole in memory: the model is rebuilt with its
Qwen3 on the meta device, and each part (the embedding, each decoder layer, the final norm, the head) is read from
the base snapshot, quantized as training saw it, merged, cast and appended to its shard (infra/shards.py), then
dropped; the embedding and an untied head go straight from the snapshot's dtype to --dtype. caption.py takes the
folder in place of a checkpoint. The folder is written under a temporary name and renamed, so an interrupted export
leaves nothing that looks finished; an existing --output is replaced only with --overwrite, and only when it is empty
or an earlier export (kovlm.json), never a training run's folder. The flags, the checkpoint and its base folders'
files are checked before a model is loaded.
"""
import argparse
import copy
import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from evaluate import check_rebuilt
from features import CACHE_DTYPE
from infra import options, snapshot
from infra.checkpoint import load_checkpoint
from infra.distributed import compute_dtype
from infra.errors import UserError, user_errors
from infra.paths import check_output_folder, file_problem, temporary_name
from infra.preflight import check_bases, check_checkpoint, run_folder_of
from infra.shards import write_shards
from lora import QUANTIZED_LINEARS, LoRALinear, dequantized_weight
from moe import split_fused_experts
from nf4 import empty_int8_linear, empty_nf4_linear
from qwen3 import Qwen3, Qwen3Config, load_tensor
from vlm import VLM, VLMConfig, build_vlm

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
            state[f"{module_name}.{name}".removeprefix(".")] = tensor.to(dtype).contiguous().cpu()
    return state


# ---- the Qwen3 a part at a time ------------------------------------------------------------------------------------
def meta_qwen3(folder: Path) -> Qwen3:
    """The snapshot's Qwen3 on the meta device (every name and shape, no weight), its keys checked against the
    snapshot's headers and its fingerprint taken, as load_qwen3 would; its linears stay plain (quantized per part)."""
    config = Qwen3Config.from_hf(snapshot.read_config(folder))
    with torch.device("meta"):
        llm = Qwen3(config)
    snapshot.check_keys(folder, llm, stored_name(config), split_fused_experts if config.moe else None)
    llm.fingerprint = snapshot.fingerprint(folder)
    return llm.eval().requires_grad_(False)


def stored_name(config: Qwen3Config):
    """load_qwen3's key mapping: a tied checkpoint's spare lm_head.weight is not a weight of the model."""
    return lambda key: None if config.tie_word_embeddings and key == "lm_head.weight" else key


def merged_llm_tensors(llm: Qwen3, folder: Path, quant: str | None, adapters: dict[str, torch.Tensor],
                       dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor in `dtype`) of every parameter of the merged Qwen3, in dense_state_dict's order, one part at a
    time (the embedding, each decoder layer, the final norm, the head), each read from the snapshot, merged, handed
    on and dropped before the next: memory holds one part. `llm` is the meta Qwen3 with its adapters (LoRALinear
    over plain meta linears), `adapters` the checkpoint's tensors under the LLM's names."""
    parts = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(llm.config.num_hidden_layers)), "model.norm"]
    for path in parts + (["lm_head"] if llm.lm_head is not None else []):
        part = merged_part(read_part(llm, path, folder, quant, adapters, dtype))
        for name, tensor in dense_state_dict(part, dtype).items():
            yield f"{path}.{name}", tensor
        del part, tensor  # before the next part is read, not after


def read_part(llm: Qwen3, path: str, folder: Path, quant: str | None, adapters: dict[str, torch.Tensor],
              dtype: torch.dtype) -> torch.nn.Module:
    """A copy of the meta module `path` filled from the snapshot as load_qwen3 fills it, and its adapters from the
    checkpoint. A part that merges (adapted or quantized linears) reads in fp32, so that the merge and the
    dequantization are computed in fp32 from weights quantized from fp32 values, as the trained model's were;
    a part that does not (the embedding, an untied head, norms) is cast straight to `dtype`, which is exact."""
    part = copy.deepcopy(llm.get_submodule(path))  # still meta; plain linears copy, bitsandbytes' meta ones do not
    if quant is not None and path.startswith("model.layers."):
        swap_to_quantized(part, quant)
    merges = any(isinstance(m, (LoRALinear, *QUANTIZED_LINEARS)) for m in part.modules())
    prefix = f"{path}."
    tensors = snapshot.read_tensors(folder, lambda key: key if key.startswith(prefix) else None,
                                    split_fused_experts if llm.config.moe else None)
    for name, tensor in tensors:
        load_tensor(part, base_name(part, name.removeprefix(prefix)), tensor,
                    dtype=torch.float32 if merges else dtype, device="cpu")
    for name, tensor in adapters.items():
        if name.startswith(prefix):
            snapshot.assign(part, name.removeprefix(prefix), tensor, dtype=torch.float32, device="cpu")
    return part


def swap_to_quantized(part: torch.nn.Module, quant: str) -> None:
    """Every plain linear of a decoder layer (an adapter's base too) becomes an empty 4-bit or 8-bit one, computing
    in fp32: qwen3.swap_quantized_linears, for one layer."""
    empty_linear = {"nf4": empty_nf4_linear, "int8": empty_int8_linear}[quant]
    for name, linear in list(part.named_modules()):
        if type(linear) is torch.nn.Linear:
            part.set_submodule(name, empty_linear(linear.in_features, linear.out_features,
                                                  bias=linear.bias is not None, compute_dtype=torch.float32))


def base_name(part: torch.nn.Module, name: str) -> str:
    """A snapshot tensor's name inside `part`: an adapted linear keeps its base at `.base`."""
    module_name, _, tensor_name = name.rpartition(".")
    adapted = isinstance(part.get_submodule(module_name), LoRALinear)
    return ".".join(n for n in (module_name, "base" if adapted else "", tensor_name) if n)


def merged_part(part: torch.nn.Module) -> torch.nn.Module:
    """`part` with each LoRALinear replaced by its merged_linear() (W + sBA, DoRA's rescaling, in fp32)."""
    if isinstance(part, LoRALinear):
        return part.merged_linear()
    for name, module in list(part.named_modules()):
        if isinstance(module, LoRALinear):
            part.set_submodule(name, module.merged_linear())
    return part


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


def rebuild_on_meta(checkpoint: dict, *, clip, llm, where: str) -> VLM:
    """evaluate.rebuild_model's VLM and checks, but its Qwen3 on the meta device (names and shapes, the adapters'
    too): merged_llm_tensors reads the weights a part at a time. The tower is loaded (its identity and width are
    checked; nothing is computed with it, so bf16); the projector holds the checkpoint's weights."""
    saved = VLMConfig(**checkpoint["vlm_config"])
    config = replace(saved, clip_path=clip or saved.clip_path, llm_path=llm or saved.llm_path)
    model = build_vlm(config, dtype=torch.bfloat16, llm=meta_qwen3(Path(config.llm_path)))
    check_rebuilt(saved, model, checkpoint["trainable"], where)
    model.projector.load_state_dict({k.removeprefix("projector."): v for k, v in checkpoint["trainable"].items()
                                     if k.startswith("projector.")}, strict=True)
    return model


def export_checkpoint(checkpoint_path, output, *, dtype: str = "bf16", clip=None, llm=None,
                      max_shard_bytes: int = 2 << 30, overwrite: bool = False) -> Path:
    """Write the merged model folder (see the module docstring); returns its path."""
    output = check_export_target(output, checkpoint_path, overwrite=overwrite)
    checkpoint = check_checkpoint(load_checkpoint(checkpoint_path), checkpoint_path)
    model = rebuild_on_meta(checkpoint, clip=clip, llm=llm, where=str(checkpoint_path))
    merged = [name for name, module in model.llm.named_modules() if isinstance(module, LoRALinear)]
    adapters = {k.removeprefix("llm."): v for k, v in checkpoint["trainable"].items() if k.startswith("llm.")}
    folder = Path(model.config.llm_path)
    with torch.device("meta"):  # the merged model's names and shapes: the base's
        shapes = {name: tuple(p.shape) for name, p in Qwen3(model.llm.config).named_parameters()}
    temporary = temporary_name(output)
    temporary.mkdir(parents=True)
    try:
        tensors = merged_llm_tensors(model.llm, folder, model.config.quant, adapters, DTYPES[dtype])
        write_shards(tensors, shapes, DTYPES[dtype], temporary, max_shard_bytes)
        config = json.loads((folder / "config.json").read_text())
        config |= {"dtype": {"bf16": "bfloat16", "fp32": "float32"}[dtype]}
        config.pop("quantization_config", None)
        (temporary / "config.json").write_text(json.dumps(config, indent=2))
        if "tokenizer.json" not in copy_files(folder, temporary, TOKENIZER_FILES):
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
