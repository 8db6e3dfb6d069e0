"""Train a video captioner in two stages, in one visible loop.

    stage 1: the projector alone learns (LLM frozen, no adapters yet)      lr 1e-3, 2 epochs
    stage 2: projector + LoRA / DoRA adapters on the 4-bit LLM             lr 5e-5, 5 epochs

Each optimizer step sees one window of batch_size x grad_accum x world_size videos (one of each video's reference
captions, drawn per epoch); the loss is the summed caption cross-entropy over the window divided by the window's
number of supervised tokens (torchtune's normalisation), so accumulation and data parallelism change nothing but
speed. The learning rate warms up linearly, then decays on a cosine, per stage. After each epoch: validation loss
and METEOR on the val split, the best model by val METEOR kept; at the end the best model is evaluated on the test
split. Run without model or data paths, it trains the embedded demo (demo.py).

    python train.py --projector perceiver --peft dora                      # the demo, on the CPU
    python train.py --clip CLIP_DIR --llm QWEN3_DIR --train-manifest m.jsonl --projector perceiver --peft dora
    torchrun --nproc-per-node 4 train.py ...                               # DDP, one process per GPU
"""
import argparse
import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint
from data import load_splits
from distributed import Distributed, all_reduce_mean, compute_dtype, seed_everything, setup_distributed, \
    teardown_distributed, wrap_ddp
from evaluate import evaluate_checkpoint, evaluate_split
from features import batch_features, collate_features, prepare_splits, video_dataset
from lora import AdapterConfig, after_optimizer_step, parameter_report
from projectors import PROJECTORS
from schedule import epoch_caption_choice, epoch_windows, get_lr
from vlm import VLMConfig, build_vlm


def option(default, help, **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    projector: str = option("perceiver", "vision-to-LLM projector", choices=sorted(PROJECTORS))
    peft: str = option("dora", "adapters on the 4-bit LLM in stage 2", choices=["lora", "dora", "none"])
    clip: str | None = option(None, "CLIP snapshot folder (default: the demo's tiny tower)")
    llm: str | None = option(None, "Qwen3 snapshot folder with tokenizer.json (default: the demo's tiny LM)")
    train_manifest: str | None = option(None, "JSONL / CSV / JSON manifest (its split field, else a seeded split)")
    val_manifest: str | None = option(None, "separate validation manifest")
    test_manifest: str | None = option(None, "separate test manifest")
    val_fraction: float = option(0.1, "validation share when the manifest has no split")
    test_fraction: float = option(0.1, "test share when the manifest has no split")
    output_dir: str | None = option(None, "run folder (default runs/{projector}_{peft})")
    stage1_epochs: int = option(2, "stage 1 epochs (projector only)")
    stage1_lr: float = option(1e-3, "stage 1 peak learning rate")
    stage2_epochs: int = option(5, "stage 2 epochs (projector + adapters)")
    stage2_lr: float = option(5e-5, "stage 2 peak learning rate")
    batch_size: int = option(4, "videos per micro-batch per process")
    grad_accum: int = option(2, "micro-batches per optimizer step")
    lora_r: int = option(16, "adapter rank")
    lora_alpha: float = option(32, "adapter alpha (scale alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the adapter branch")
    num_frames: int = option(8, "frames sampled per video")
    num_queries: int = option(64, "visual tokens of the resampling projectors (cabstractor, crossattn, perceiver)")
    seed: int = option(42, "seed of the initialisation, data order, caption draws and splits")
    warmup_ratio: float = option(0.03, "share of each stage's steps spent warming up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    quant: str = option("nf4", "storage of the frozen LLM (nf4: 4-bit NormalFloat, none: the compute dtype)",
                        choices=["nf4", "none"])
    grad_checkpointing: str = option("auto", "activation checkpointing per decoder layer (auto: on for long "
                                     "sequences, i.e. per-patch projectors)", choices=["auto", "on", "off"])
    dtype: str = option("auto", "compute dtype (auto: bf16 on CUDA, fp32 on the CPU)", choices=["auto", "bf16", "fp32"])
    resume: str | None = option(None, "training state to continue from, or 'auto' for the run folder's latest")
    skip_bad: bool = option(False, "skip unreadable videos (reported by path) instead of stopping")
    max_bad_fraction: float = option(0.05, "abort when more than this share of videos is bad")
    max_new_tokens: int = option(64, "caption length limit at validation and test time")
    eval_batch_size: int = option(16, "videos per generation batch")
    save_every: int = option(200, "optimizer steps between resumable training states")
    max_steps: int = option(0, "stop (saving a resumable state) after this many optimizer steps in all; 0: no limit")
    cache_dir: str | None = option(None, "feature cache folder (default .cache/features)")
    feature_cache: bool = option(True, "encode each video once and train from cached features")
    num_workers: int = option(2, "DataLoader workers for video decoding")
    demo_dir: str = option(".cache/demo", "where the embedded demo's assets are built")
    demo_scale: str = option("full", "size of the embedded demo", choices=["full", "ci"])

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = f"runs/{self.projector}_{self.peft}"
        if self.cache_dir is None:
            self.cache_dir = str(Path(".cache") / "features")


def parse_config(argv=None) -> tuple[TrainConfig, set[str]]:
    """TrainConfig from the command line, and the names of the options the user set explicitly."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS)
    for f in fields(TrainConfig):
        flag, extra = "--" + f.name.replace("_", "-"), dict(f.metadata)
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=extra["help"])
        else:
            kind = type(f.default) if f.default is not None else str
            parser.add_argument(flag, type=kind, **extra)
    explicit = vars(parser.parse_args(argv))
    return TrainConfig(**explicit), set(explicit)


# ---- setup -------------------------------------------------------------------------------------------------------
def ensure_finite(value: torch.Tensor, what: str, step: int, sample_ids: list) -> None:
    """Stop on a NaN / inf before it reaches the weights; the last good checkpoint stays as it is."""
    if not torch.isfinite(value).all():
        raise FloatingPointError(f"non-finite {what} at step {step + 1} (samples {', '.join(map(str, sample_ids))}); "
                                 "stopping without saving. Lower the learning rate or check these samples")


def prepare(cfg: TrainConfig, run: Distributed):
    """Bases, projector, and the splits with every video encoded into the feature cache."""
    dtype = compute_dtype(cfg.dtype, run.device)
    projector = {"name": cfg.projector, "num_queries": cfg.num_queries}
    vlm_config = VLMConfig(clip_path=cfg.clip, llm_path=cfg.llm, projector=projector, num_frames=cfg.num_frames,
                           quant=None if cfg.quant == "none" else cfg.quant)
    model = build_vlm(vlm_config, device=run.device, dtype=dtype)
    long_inputs = cfg.projector in ("linear", "mlp")
    model.llm.gradient_checkpointing = cfg.grad_checkpointing == "on" or (cfg.grad_checkpointing == "auto"
                                                                           and long_inputs)
    if run.is_main and not cfg.feature_cache:
        print("feature cache off: the vision tower encodes every batch")
    splits, cache = prepare_splits(model, load_splits(cfg.train_manifest, val_manifest=cfg.val_manifest, test_manifest=cfg.test_manifest, seed=cfg.seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction), cache_dir=cfg.cache_dir if cfg.feature_cache else None,
                                   skip_bad=cfg.skip_bad, max_bad_fraction=cfg.max_bad_fraction,
                                   batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers, run=run,
                                   show_progress=run.is_main)
    return model, splits, cache


# ---- the loop ----------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, run: Distributed) -> bool:
    """Both stages; True when they finished (False when stopped early by --max-steps)."""
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    model, splits, cache = prepare(cfg, run)
    train_set = video_dataset(splits["train"], cache, num_frames=cfg.num_frames,
                              image_size=model.vision.config.image_size)
    adapter = AdapterConfig(method=cfg.peft, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout) \
        if cfg.peft != "none" else None
    window = cfg.batch_size * cfg.grad_accum * run.world
    state = checkpoint.load_training_state(cfg.resume, out) if cfg.resume else None
    if state:
        checkpoint.check_same_run(state, cfg)
    log = checkpoint.TrainingLog(out / "logs" / "training_log.csv", enabled=run.is_main,
                                 keep_until=state["global_step"] if state else None)
    best_meteor = state["best_meteor"] if state else -1.0
    global_step = state["global_step"] if state else 0
    if run.is_main:
        print(f"config: {asdict(cfg)}\ndevice: {run.device} x {run.world}, {checkpoint.peak_memory(run.device)}")
    stages = [(1, cfg.stage1_epochs, cfg.stage1_lr), (2, cfg.stage2_epochs, cfg.stage2_lr)]
    for stage, epochs, peak_lr in stages:
        if state and state["stage"] > stage:
            continue
        if stage == 2 and adapter is not None:
            model.add_adapters(adapter)
            model.to(run.device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        autocast = torch.autocast(run.device.type, dtype=torch.bfloat16,
                                  enabled=compute_dtype(cfg.dtype, run.device) == torch.bfloat16)
        optimizer = torch.optim.AdamW(trainable, lr=peak_lr, weight_decay=cfg.weight_decay)
        wrapped = wrap_ddp(model) if run.world > 1 else model
        start_epoch, start_step = 0, 0
        if state and state["stage"] == stage:
            checkpoint.restore_training_state(state, model, optimizer)
            start_epoch, start_step = state["epoch"], state["step_in_epoch"]
        steps_per_epoch = len(epoch_windows(len(train_set), window, cfg.seed, stage, 0))
        total_steps = epochs * steps_per_epoch
        warmup_steps = max(1, round(cfg.warmup_ratio * total_steps))
        if run.is_main:
            print(f"stage {stage}: {parameter_report(model)}; {total_steps} steps of {window} videos, lr {peak_lr}")
        for epoch in range(start_epoch, epochs):
            windows = epoch_windows(len(train_set), window, cfg.seed, stage, epoch)
            choice = epoch_caption_choice([len(s.captions) for s in splits["train"]], cfg.seed, stage, epoch)
            progress = tqdm(range(start_step, len(windows)), desc=f"stage {stage} epoch {epoch + 1}/{epochs}",
                            disable=not run.is_main)
            model.train()
            for step_in_epoch in progress:
                step = epoch * steps_per_epoch + step_in_epoch
                lr = get_lr(step, total_steps, warmup_steps, peak_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                indices = windows[step_in_epoch]
                num_label_tokens = model.count_label_tokens(
                    [splits["train"][i].captions[choice[i]] for i in indices])
                started, loss_total = time.perf_counter(), 0.0
                for micro in range(cfg.grad_accum):
                    first = (micro * run.world + run.rank) * cfg.batch_size
                    mine = indices[first:first + cfg.batch_size]
                    batch = collate_features([train_set[i] for i in mine])
                    captions = [caps[choice[i]] for caps, i in zip(batch["captions"], mine)]
                    last_micro = micro == cfg.grad_accum - 1
                    # DDP all-reduces gradients after the window's last micro-batch only; it averages over ranks,
                    # so each rank's loss is scaled by world (the normaliser already counts the whole window).
                    with wrapped.no_sync() if run.world > 1 and not last_micro else nullcontext():
                        with autocast:
                            features = batch_features(model, batch, run.device)  # (B, F, P, Dv)
                        loss = wrapped(features, captions, num_label_tokens) * run.world
                        ensure_finite(loss, "loss", global_step, batch["ids"])
                        loss.backward()
                    loss_total += loss.item() / run.world
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                ensure_finite(grad_norm, "gradient norm", global_step, [splits["train"][i].id for i in indices])
                optimizer.step()
                after_optimizer_step(model)
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                step_seconds = time.perf_counter() - started
                tokens_per_s = num_label_tokens / run.world / step_seconds
                loss_total = all_reduce_mean(loss_total, run)
                progress.set_postfix(loss=f"{loss_total:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
                log.write(step=global_step, epoch=epoch + 1, stage=stage, loss=loss_total, lr=lr,
                          grad_norm=float(grad_norm), step_seconds=step_seconds, tokens_per_s=tokens_per_s)
                position = dict(stage=stage, epoch=epoch, step_in_epoch=step_in_epoch + 1, global_step=global_step,
                                best_meteor=best_meteor)
                stop = cfg.max_steps and global_step >= cfg.max_steps
                if run.is_main and (global_step % cfg.save_every == 0 or stop):
                    checkpoint.save_training_state(out, model, optimizer, cfg, position)
                if stop:
                    if run.is_main:
                        print(f"stopped after {global_step} steps (--max-steps); continue with --resume auto")
                    return False
            start_step = 0
            val = evaluate_split(model, splits["val"], cache, batch_size=cfg.eval_batch_size,
                                 max_new_tokens=cfg.max_new_tokens, run=run, with_loss=True)
            log.write(step=global_step, epoch=epoch + 1, stage=stage, val_loss=val["loss"],
                      val_meteor=val["metrics"]["meteor"]["value"])
            if run.is_main:
                print(f"stage {stage} epoch {epoch + 1}: val loss {val['loss']:.4f}, "
                      f"val METEOR {val['metrics']['meteor']['value']:.4f}")
                if val["metrics"]["meteor"]["value"] > best_meteor:
                    best_meteor = val["metrics"]["meteor"]["value"]
                    checkpoint.save_model(out / "checkpoints" / "best_model.pt", model, cfg,
                                          {"stage": stage, "epoch": epoch + 1, "val": val["metrics"]})
                position = dict(stage=stage, epoch=epoch + 1, step_in_epoch=0, global_step=global_step,
                                best_meteor=best_meteor)
                checkpoint.save_training_state(out, model, optimizer, cfg, position)
        if stage == 1 and run.is_main:
            checkpoint.save_model(out / "checkpoints" / "stage1_projector.pt", model, cfg, {"stage": 1})
        state = None
    if run.is_main:
        checkpoint.save_model(out / "checkpoints" / "final_model.pt", model, cfg, {"stage": 2})
        log.plot(out / "logs" / "training_curves.png")
        log.write_summary(out / "logs" / "train_summary.json", model, run.device)
    return True


def main(cfg: TrainConfig) -> dict | None:
    """Train, then evaluate the best model on the test split (the same code as evaluate.py)."""
    run = setup_distributed()
    demo_assets = None
    if cfg.clip is None and cfg.llm is None and cfg.train_manifest is None:
        import demo
        demo_assets = demo.build_assets(cfg.demo_dir, scale=cfg.demo_scale, seed=cfg.seed, is_main=run.is_main)
        cfg.clip, cfg.llm, cfg.train_manifest = demo_assets.clip, demo_assets.llm, demo_assets.manifest
    elif not (cfg.clip and cfg.llm and cfg.train_manifest):
        raise SystemExit("give --clip, --llm and --train-manifest together, or none of them for the embedded demo")
    results = None
    if train(cfg, run):
        best = Path(cfg.output_dir) / "checkpoints" / "best_model.pt"
        results = evaluate_checkpoint(best, split="test", batch_size=cfg.eval_batch_size,
                                      max_new_tokens=cfg.max_new_tokens, run=run)
        if demo_assets is not None and run.is_main:
            import demo
            table = demo.report(results, demo_assets)  # also kept beside the run's other metrics
            (Path(cfg.output_dir) / "logs" / "demo_table.json").write_text(json.dumps(table, indent=2))
    teardown_distributed(run)
    return results


if __name__ == "__main__":
    config, explicit = parse_config()
    if config.clip is None and config.llm is None and config.train_manifest is None:
        import demo
        config = TrainConfig(**(demo.demo_defaults(config.demo_scale) | {k: getattr(config, k) for k in explicit}))
    try:
        main(config)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:  # bad input: one line, not a traceback
        raise SystemExit(f"error: {error}")
