"""What a run keeps on disk: model checkpoints, the resumable training state, and the training log.

Every file is written to a temporary name, fsynced and renamed (atomic on POSIX), so a crash mid-save leaves the
previous file loadable. Everything is loaded with `torch.load(..., weights_only=True)`: tensors, numbers, strings,
lists and dicts only, never pickled code. A checkpoint holds only trainable weights (projector + adapters), the
configs that rebuild the model, and the bases' fingerprints, never the frozen bases.
"""
import csv
import json
import os
import random
import resource
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

MODEL_FORMAT = "kovlm-model-1"
STATE_FORMAT = "kovlm-training-state-1"
STATE_FILE = "training_state.pt"
# Options that may change between an interrupted run and its resumption without changing the result.
RESUMABLE_CHANGES = {"resume", "max_steps", "num_workers", "eval_batch_size", "save_every", "output_dir"}


def atomic_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def load_checkpoint(path: str | Path, expected_format: str = MODEL_FORMAT) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a readable kovlm checkpoint ({str(error).splitlines()[0]})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") not in (MODEL_FORMAT, STATE_FORMAT):
        raise ValueError(f"{path}: not a kovlm checkpoint (no '{expected_format}' format field)")
    return checkpoint


def save_model(path: Path, model, train_config, info: dict) -> None:
    atomic_save({"format": MODEL_FORMAT, "vlm_config": asdict(model.config), "train_config": asdict(train_config),
                 "trainable": model.trainable_state_dict(), "info": info}, path)


# ---- resumable training state ------------------------------------------------------------------------------------
def rng_states() -> dict:
    numpy_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()),
                                                  *numpy_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def save_training_state(out: Path, model, optimizer, train_config, position: dict) -> None:
    """Everything `--resume` needs to continue bit for bit: weights, optimizer, position in the data order, RNGs."""
    atomic_save({"format": STATE_FORMAT, "vlm_config": asdict(model.config), "train_config": asdict(train_config),
                 "trainable": model.trainable_state_dict(), "optimizer": optimizer.state_dict(),
                 "rng": rng_states(), **position}, Path(out) / "checkpoints" / STATE_FILE)


def load_training_state(resume: str, out: Path) -> dict:
    path = Path(out) / "checkpoints" / STATE_FILE if resume == "auto" else Path(resume)
    if resume == "auto" and not path.exists():
        raise FileNotFoundError(f"--resume auto: no {STATE_FILE} in {path.parent}; start without --resume")
    state = load_checkpoint(path, STATE_FORMAT)
    if state["format"] != STATE_FORMAT:
        raise ValueError(f"{path} is a model checkpoint, not a training state; resume from {STATE_FILE}")
    return state


def check_same_run(state: dict, train_config) -> None:
    """Resuming with other settings would not continue the same run: refuse, naming the first differing option."""
    current = asdict(train_config)
    for key, saved in state["train_config"].items():
        if key not in RESUMABLE_CHANGES and current.get(key) != saved:
            raise ValueError(f"cannot resume: --{key.replace('_', '-')} was {saved!r} in the saved run, "
                             f"now {current.get(key)!r}")


def restore_training_state(state: dict, model, optimizer) -> None:
    model.load_trainable_state_dict(state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_states(state["rng"])


# ---- the training log --------------------------------------------------------------------------------------------
LOG_COLUMNS = ["step", "epoch", "stage", "loss", "lr", "grad_norm", "step_seconds", "tokens_per_s", "val_loss",
               "val_meteor"]


class TrainingLog:
    """logs/training_log.csv, one row per optimizer step and per validation. On resume, rows after the resumed
    step are dropped, so the log reads as one uninterrupted run."""

    def __init__(self, path: Path, *, enabled: bool, keep_until: int | None = None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.rows() if keep_until is not None and self.path.exists() else []
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(r for r in rows if int(r["step"]) <= keep_until)

    def write(self, **row) -> None:
        if self.enabled:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, LOG_COLUMNS).writerow(row)

    def rows(self) -> list[dict]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def write_summary(self, path: Path, model, device: torch.device) -> None:
        """logs/train_summary.json: parameters, median step time and tokens/s of the last stage, peak memory."""
        from lora import parameter_counts
        rows = [r for r in self.rows() if r["step_seconds"]]
        last_stage = [r for r in rows if r["stage"] == rows[-1]["stage"]] if rows else []
        trainable, total = parameter_counts(model)
        summary = {"trainable_parameters": trainable, "total_parameters": total, "steps": len(rows),
                   "median_step_seconds": statistics.median(float(r["step_seconds"]) for r in last_stage)
                   if last_stage else None,
                   "median_tokens_per_s": statistics.median(float(r["tokens_per_s"]) for r in last_stage)
                   if last_stage else None,
                   "peak_memory_gib": peak_memory_gib(device), "device": str(device)}
        path.write_text(json.dumps(summary, indent=1))

    def plot(self, path: Path) -> None:
        """logs/training_curves.png: training loss and learning rate per step, validation METEOR per epoch."""
        if not self.enabled:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows = self.rows()
        steps = [(int(r["step"]), float(r["loss"]), float(r["lr"])) for r in rows if r["loss"]]
        val = [(int(r["step"]), float(r["val_loss"]), float(r["val_meteor"])) for r in rows if r["val_meteor"]]
        figure, axes = plt.subplots(1, 3, figsize=(15, 4))
        axes[0].plot([s for s, _, _ in steps], [l for _, l, _ in steps], label="train")
        axes[0].plot([s for s, _, _ in val], [l for _, l, _ in val], "o-", label="val")
        axes[0].set(title="caption loss", xlabel="step", yscale="log")
        axes[0].legend()
        axes[1].plot([s for s, _, _ in steps], [lr for _, _, lr in steps])
        axes[1].set(title="learning rate", xlabel="step")
        axes[2].plot([s for s, _, _ in val], [m for _, _, m in val], "o-")
        axes[2].set(title="val METEOR", xlabel="step")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA's peak allocated memory on a GPU; the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def peak_memory(device: torch.device) -> str:
    kind = "peak GPU memory" if device.type == "cuda" else "peak RSS"
    return f"{kind} {peak_memory_gib(device):.2f} GiB"
