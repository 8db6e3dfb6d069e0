"""What evaluate.py, caption.py and export.py check of a checkpoint and its base folders before loading a model:
the checkpoint's fields and (once the model is built, before its weights are set) its tensors' names and shapes, the
folders' weight files (whole, from their headers), and the longest sequence a caption may need against the LM's
positions, computed from config.json and tokenizer.json alone. Each refusal is one line naming the file, field or
tensor.
"""
from pathlib import Path

import torch

from infra import options
from infra.errors import UserError
from infra.paths import check_snapshot_files
from projectors import ProjectorConfig
from vision import read_tower_config
from vlm import ChatTemplate, VLMConfig, load_tokenizer

CHECKPOINT_FIELDS = {"vlm_config": dict, "train_config": dict, "trainable": dict}


def check_checkpoint(checkpoint: dict, path) -> dict:
    """The fields evaluate.py, caption.py and export.py read, present and of their kind; refused naming the first."""
    for name, kind in CHECKPOINT_FIELDS.items():
        if not isinstance(checkpoint.get(name), kind):
            raise UserError(f"{path}: the checkpoint has no {name!r} "
                            f"({'missing' if name not in checkpoint else type(checkpoint[name]).__name__}); it is not "
                            f"a model checkpoint that train.py wrote, or it is damaged")
    return checkpoint


def check_trainable_shapes(state: dict, model, where: str = "checkpoint") -> None:
    """Every tensor of a checkpoint's trainable state named and shaped as the rebuilt model's; the first that is not
    is refused in one line (before load_state_dict's many-line size-mismatch error)."""
    expected = model.trainable_state_dict()
    for name, tensor in state.items():
        if name not in expected:
            raise UserError(f"{where}: tensor {name} has no place in the model ({len(expected)} trainable tensors); "
                            f"the checkpoint belongs to another model or version")
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(expected[name].shape):
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise UserError(f"{where}: tensor {name} has shape {shape}, the model's is "
                            f"{tuple(expected[name].shape)}; the checkpoint is damaged or belongs to another model")
    missing = sorted(expected.keys() - state.keys())
    if missing:
        raise UserError(f"{where}: tensor {missing[0]} is missing ({len(missing)} in all); the checkpoint is "
                        f"damaged or belongs to another model")


def run_folder_of(checkpoint_path) -> Path | None:
    """RUN for RUN/checkpoints/NAME.pt (train.py's layout), else None."""
    path = Path(checkpoint_path).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else None


def prompt_tokens(vlm_config: dict, clip_path, llm_path) -> int:
    """Tokens of the chat prompt with a video's visual tokens, from the base folders' config.json and tokenizer.json
    alone (no weights read), so a caption limit the LM cannot hold is refused before anything loads."""
    tower = read_tower_config(clip_path)
    projector = ProjectorConfig(**{**vlm_config["projector"], "vision_dim": tower.hidden_size, "llm_dim": 1})
    visual = projector.output_tokens(vlm_config["num_frames"], tower.num_patches)
    if vlm_config.get("token_reduction", "none") != "none":  # the tokens kept per video (vlm.VLM.num_visual_tokens)
        visual = min(visual, vlm_config["visual_tokens"])
    instruction = vlm_config.get("instruction", VLMConfig.instruction)
    return len(ChatTemplate(load_tokenizer(llm_path), instruction).prompt_ids(visual))


def check_bases(vlm_config: dict, clip_path, llm_path, max_new_tokens: int) -> None:
    """Before a model loads: the base folders' weight files whole, and prompt + --max-new-tokens within the LM."""
    for folder, flag in ((clip_path, "--vision"), (llm_path, "--llm")):
        if not Path(folder).is_dir():
            raise UserError(f"{folder}: no such model folder ({flag}, or the one the checkpoint names)")
        check_snapshot_files(folder, flag)
    options.check_positions(prompt_tokens(vlm_config, clip_path, llm_path), max_new_tokens,
                            options.position_limit(llm_path))
