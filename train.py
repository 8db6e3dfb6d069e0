"""Train a video captioner in two stages, in one visible loop.

    stage 1: the projector alone learns (LLM frozen, no adapters yet)      lr 1e-3, 2 epochs
    stage 2: projector + LoRA / DoRA adapters on the 4-bit LLM             lr 5e-5, 5 epochs

Each optimizer step sees one window of batch_size x grad_accum x world_size videos (one of each video's reference
captions, drawn per epoch); the loss is the summed caption cross-entropy over the window divided by the window's
number of supervised tokens (torchtune's normalisation), so accumulation and data parallelism change nothing but
speed. The learning rate warms up linearly, then decays on a cosine, per stage. After each epoch: validation loss
and METEOR on the val split, and the best stage-2 model kept, by val METEOR, or first by a score its caller hands
over (ValScore: the demo's share of val captions that name every attribute right). Stage 1's frozen LM writes in
its pretraining's style, which can score a higher METEOR while naming less of the video right, so its projector is
kept apart as stage1_projector.pt. At the end the best model is evaluated on the test split. Run without model or
data paths, `python train.py` hands its command line to the embedded default (demo.py), which builds its assets and
calls this trainer with its own defaults.

    python train.py --projector perceiver --peft dora                      # the demo, on the CPU
    python train.py --vision TOWER_DIR --llm QWEN3_DIR --train-manifest m.jsonl --projector perceiver --peft dora
    torchrun --nproc-per-node 4 train.py ...                               # DDP, one process per GPU
"""
import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from data import check_splits, load_splits
from evaluate import evaluate_checkpoint, evaluate_split
from features import batch_features, collate_features, prepare_splits, video_dataset
from infra import checkpoint, options
from infra.distributed import Distributed, all_reduce_mean, compute_dtype, seed_everything, setup_distributed, \
    teardown_distributed, wrap_ddp
from infra.errors import UserError, user_errors
from infra.paths import check_snapshot_files
from infra.schedule import epoch_caption_choice, epoch_windows, get_lr
from lora import ATTENTION_LINEARS, QWEN3_LINEARS, AdapterConfig, after_optimizer_step, parameter_counts, \
    parameter_report
from projectors import PROJECTORS
from pruning import MERGE_THRESHOLD, REDUCTIONS
from vlm import VLM, VLMConfig, build_vlm, check_token_reduction, load_tokenizer


def option(default, help, **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    projector: str = option("perceiver", "vision-to-LLM projector", choices=sorted(PROJECTORS))
    peft: str = option("dora", "adapters on the 4-bit LLM in stage 2", choices=["lora", "dora", "none"])
    # The vision tower's folder: kept under the name `clip` (run configs and checkpoints record it so), given as
    # --vision or its older alias --clip. vision.load_vision picks the family from the folder's config.json.
    clip: str | None = option(None, "vision tower snapshot folder (CLIP, SigLIP / SigLIP 2 at fixed resolution, "
                              "DINOv2 or DINOv3: its config.json tells which); --clip is an alias of --vision; "
                              "none: the demo's tiny CLIP", flags=("--vision", "--clip"), metavar="DIR")
    vision_layer: int = option(-2, "tower layer whose patch tokens the projector reads, as an index into "
                               "transformers' hidden_states (-2: the penultimate block, LLaVA's choice)")
    llm: str | None = option(None, "Qwen3 snapshot folder with tokenizer.json (default: the demo's tiny LM)")
    train_manifest: str | None = option(None, "JSONL / CSV / JSON manifest or a folder of label files (its split "
                                        "field, else a seeded split)")
    val_manifest: str | None = option(None, "separate validation manifest")
    test_manifest: str | None = option(None, "separate test manifest")
    val_fraction: float = option(0.1, "validation share when the manifest has no split")
    test_fraction: float = option(0.1, "test share when the manifest has no split")
    max_samples: int = option(0, "keep a seeded subset of this many samples, stratified by split (0: all)")
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
    lora_targets: str = option("auto", "comma-separated linears to adapt, from " + ",".join(QWEN3_LINEARS) +
                               " (auto: all seven for a dense Qwen3; q_proj,k_proj,v_proj,o_proj for a Qwen3-MoE, "
                               "whose experts stay frozen unless gate_proj,up_proj,down_proj are named; the router "
                               "is never adapted)")
    router_aux_coef: float = option(0.0, "Qwen3-MoE: weight of the router's load-balancing loss added to the "
                                    "caption loss (Switch Transformer's; the config's router_aux_loss_coef is 0.001)")
    num_frames: int = option(8, "frames sampled per video")
    num_queries: int = option(64, "visual tokens of the resampling projectors (cabstractor, crossattn, perceiver)")
    token_reduction: str = option("none", "fewer visual tokens before the LM, chosen on the projector's output "
                                  "(pruning.py): DivPrune, adjacent-frame merging, or merging then DivPrune (merge: "
                                  "per-patch projectors only); kept in the checkpoint, so evaluation reduces alike",
                                  choices=list(REDUCTIONS))
    visual_tokens: int | None = option(None, "visual tokens kept per video with --token-reduction")
    merge_threshold: float = option(MERGE_THRESHOLD, "merge+divprune: adjacent-frame tokens at least this "
                                    "cosine-similar merge before DivPrune (FrameFusion's 0.6)")
    seed: int = option(42, "seed of the initialisation, data order, caption draws and splits")
    warmup_ratio: float = option(0.03, "share of each stage's steps spent warming up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    max_caption_tokens: int = option(128, "training captions longer than this many tokens are cut (one warning "
                                     "counts them)")
    quant: str = option("nf4", "storage of the frozen LLM's decoder-layer linears (nf4: 4-bit NormalFloat; int8: "
                        "LLM.int8, outlier threshold 6; none: the compute dtype)", choices=["nf4", "int8", "none"])
    grad_checkpointing: str = option("auto", "activation checkpointing per decoder layer (auto: on for long "
                                     "sequences, i.e. per-patch projectors)", choices=["auto", "on", "off"])
    dtype: str = option("auto", "compute dtype (auto: bf16 on CUDA, fp32 on the CPU)", choices=["auto", "bf16", "fp32"])
    resume: str | None = option(None, "training state to continue from, or 'auto' for the run folder's latest")
    start_over: bool = option(False, "when the run folder already holds a run, move it aside and start anew")
    skip_bad: bool = option(False, "skip unreadable or missing videos (reported by path) instead of stopping")
    max_bad_fraction: float = option(0.05, "abort when more than this share of videos is bad")
    max_new_tokens: int = option(64, "caption length limit at validation and test time")
    eval_batch_size: int = option(16, "videos per generation batch")
    save_every: int = option(200, "optimizer steps between resumable training states")
    max_steps: int = option(0, "stop (saving a resumable state) after this many optimizer steps in all; 0: no limit")
    cache_dir: str | None = option(None, "feature cache folder (default .cache/features)")
    feature_cache: bool = option(True, "encode each video once and train from cached features")
    num_workers: int = option(2, "DataLoader workers for video decoding")

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = f"runs/{self.projector}_{self.peft}"
        if self.cache_dir is None:
            self.cache_dir = str(Path(".cache") / "features")


@dataclass(frozen=True)
class ValScore:
    """A caller's score of the val captions that picks best_model.pt before val METEOR does (a tie goes to METEOR):
    score(val predictions, val samples) -> higher is better, logged as val_<name>; check(val samples) refuses, before
    anything loads, samples it cannot score."""
    name: str
    score: Callable[[list[dict], list], float]
    check: Callable[[list], None] | None = None

    def __post_init__(self):
        if f"val_{self.name}" not in checkpoint.LOG_COLUMNS:
            raise ValueError(f"the training log has no column val_{self.name} (checkpoint.LOG_COLUMNS)")


def config_parser(config_class=TrainConfig, **parser_options) -> argparse.ArgumentParser:
    """An option per field of `config_class` (TrainConfig, or a caller's extension of it), its default in its help;
    options not given are left out of the parsed namespace."""
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS, **parser_options)
    for f in fields(config_class):
        extra = dict(f.metadata)
        flags = extra.pop("flags", ("--" + f.name.replace("_", "-"),))
        extra["help"] += f" (default: {f.default})"
        if isinstance(f.default, bool):
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, **extra)
        else:
            kind = type(f.default) if f.default is not None else int if f.type == int | None else str
            parser.add_argument(*flags, dest=f.name, type=kind, **extra)
    return parser


def parse_config(argv=None) -> TrainConfig:
    parser = config_parser(description=__doc__.split("\n")[0], epilog="Without --vision/--llm/--train-manifest, "
                           "`python train.py` runs the embedded default (demo.py) with its own defaults.")
    return TrainConfig(**vars(parser.parse_args(argv)))


def names_paths(argv: list[str]) -> bool:
    """Whether a command line gives --vision (--clip), --llm or --train-manifest (abbreviated too, as argparse reads
    it)."""
    paths = argparse.ArgumentParser(add_help=False)
    for flags in (("--vision", "--clip"), ("--llm",), ("--train-manifest",)):
        paths.add_argument(*flags, nargs="?")
    given, _ = paths.parse_known_args(argv)
    return any(value is not None for value in vars(given).values())


def check_config(cfg: TrainConfig) -> None:
    """Flags that cannot work, refused before anything is loaded."""
    positive = ["stage1_epochs", "stage2_epochs", "batch_size", "grad_accum", "lora_r", "num_frames", "num_queries",
                "max_new_tokens", "eval_batch_size", "save_every", "max_caption_tokens"]
    non_negative = ["stage1_lr", "stage2_lr", "lora_alpha", "weight_decay", "max_grad_norm", "max_steps",
                    "num_workers", "max_samples", "router_aux_coef"]
    fractions = ["val_fraction", "test_fraction", "warmup_ratio", "max_bad_fraction", "lora_dropout"]
    for name in positive:
        options.positive(name, getattr(cfg, name))
    for name in non_negative:  # NaN and inf refused too
        options.non_negative(name, getattr(cfg, name))
    for name in fractions:
        options.fraction(name, getattr(cfg, name))
    if cfg.resume and cfg.start_over:
        raise UserError("--resume continues the run folder's run, --start-over moves it aside: give one")
    if cfg.quant not in ("nf4", "int8", "none"):
        raise UserError(f"--quant {cfg.quant}: use nf4, int8 or none")
    unknown = [name for name in cfg.lora_targets.split(",") if name not in QWEN3_LINEARS]
    if cfg.lora_targets != "auto" and unknown:
        raise UserError(f"--lora-targets: {', '.join(unknown)} is not one of {','.join(QWEN3_LINEARS)} (or auto)")
    if cfg.val_fraction + cfg.test_fraction >= 1:
        raise UserError("--val-fraction + --test-fraction must leave samples to train on")
    check_token_reduction(cfg.projector, cfg.token_reduction, cfg.visual_tokens, cfg.merge_threshold)
    if not (cfg.clip and cfg.llm and cfg.train_manifest):
        raise UserError("give --vision, --llm and --train-manifest together, or none of them for the embedded demo")


# ---- before any model is loaded ----------------------------------------------------------------------------------
def read_splits(cfg: TrainConfig, tokenizer: Tokenizer, select_by: ValScore | None = None) -> dict[str, list]:
    """The run's splits, every one present with captions (and val scorable by select_by), training captions cut to
    --max-caption-tokens."""
    splits = load_splits(cfg.train_manifest, val_manifest=cfg.val_manifest, test_manifest=cfg.test_manifest,
                         seed=cfg.seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                         max_samples=cfg.max_samples or None)
    check_splits(splits)
    if select_by and select_by.check:
        select_by.check(splits["val"])
    return splits | {"train": cut_long_captions(splits["train"], tokenizer, cfg.max_caption_tokens)}


def cut_long_captions(samples: list, tokenizer: Tokenizer, max_tokens: int) -> list:
    """Each training caption cut at the end of its max_tokens-th token (the tokenizer's character offsets), so one
    pasted paragraph cannot pad its batch to thousands of tokens or dominate its loss window."""
    cut, kept = 0, []
    for sample in samples:
        captions = []
        for caption in sample.captions:
            encoding = tokenizer.encode(caption.strip(), add_special_tokens=False)
            if len(encoding.ids) > max_tokens:
                caption, cut = caption.strip()[:encoding.offsets[max_tokens - 1][1]], cut + 1
            captions.append(caption)
        kept.append(replace(sample, captions=captions))
    if cut:
        print(f"warning: {cut} training captions are longer than {max_tokens} tokens and were cut "
              "(--max-caption-tokens)")
    return kept


def resume_state(cfg: TrainConfig) -> dict | None:
    """The training state to continue from (checked against this run's options), or None for a fresh run."""
    if not cfg.resume:
        return None
    state = checkpoint.load_training_state(cfg.resume, Path(cfg.output_dir))
    checkpoint.check_same_run(state, cfg)
    return state


# ---- the model and the data --------------------------------------------------------------------------------------
def prepare(cfg: TrainConfig, splits: dict, run: Distributed):
    """Bases and projector, and the splits with every video encoded into the feature cache."""
    projector = {"name": cfg.projector, "num_queries": cfg.num_queries}
    vlm_config = VLMConfig(clip_path=cfg.clip, llm_path=cfg.llm, projector=projector, num_frames=cfg.num_frames,
                           vision_layer=cfg.vision_layer, quant=None if cfg.quant == "none" else cfg.quant,
                           token_reduction=cfg.token_reduction, visual_tokens=cfg.visual_tokens,
                           merge_threshold=cfg.merge_threshold)
    model = build_vlm(vlm_config, device=run.device, dtype=compute_dtype(cfg.dtype, run.device))
    long_inputs = cfg.projector in ("linear", "mlp")
    model.llm.gradient_checkpointing = cfg.grad_checkpointing == "on" or (cfg.grad_checkpointing == "auto"
                                                                           and long_inputs)
    check_positions(model, cfg)
    if cfg.router_aux_coef and model.llm.config.moe is None:
        raise UserError(f"--router-aux-coef {cfg.router_aux_coef}: {cfg.llm} is a dense Qwen3, which has no router")
    if run.is_main:
        checkpoint.check_writable(Path(cfg.output_dir), needed_bytes=checkpoint_bytes(model, cfg))
        if not cfg.feature_cache:
            print("feature cache off: the vision tower encodes every batch")
    splits, cache = prepare_splits(model, splits, cache_dir=cfg.cache_dir if cfg.feature_cache else None,
                                   skip_bad=cfg.skip_bad, max_bad_fraction=cfg.max_bad_fraction,
                                   batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers, run=run,
                                   show_progress=run.is_main)
    return model, splits, cache


def check_positions(model, cfg: TrainConfig) -> None:
    """The longest sequence (prompt with its visual tokens + caption or generated tokens) within the LM's limit."""
    visual = model.num_visual_tokens(cfg.num_frames, model.vision.config.num_patches)  # after --token-reduction
    options.check_positions(len(model.template.prompt_ids(visual)), max(cfg.max_caption_tokens, cfg.max_new_tokens),
                            model.llm.config.max_position_embeddings, "--max-caption-tokens / --max-new-tokens",
                            ", use a resampling projector or a --token-reduction")


def checkpoint_bytes(model, cfg: TrainConfig) -> int:
    """About what the run keeps on disk at once: fp32 trainable weights in four files and AdamW's two moments, with
    the adapters' share included (counted at stage 2's size)."""
    trainable, _ = parameter_counts(model)
    targets = adapter_targets(cfg.lora_targets, model.llm.config)
    adapter_share = 0 if cfg.peft == "none" else sum(
        cfg.lora_r * (m.in_features + m.out_features) + m.out_features for name, m in model.llm.named_modules()
        if name.rpartition(".")[2] in targets)  # A, B and DoRA's magnitude of every linear stage 2 adapts
    return (trainable + adapter_share) * 4 * 6


# ---- one optimizer step ------------------------------------------------------------------------------------------
@dataclass
class Position:
    """Where the loop is: what a resumable training state records besides weights, optimizer and RNGs."""
    stage: int = 1
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_score: float = -1.0   # of the best stage-2 epoch so far: its ValScore (its val METEOR without one)
    best_meteor: float = -1.0  # and its val METEOR

    @classmethod
    def of(cls, state: dict | None) -> "Position":
        return cls(**{f.name: state[f.name] for f in fields(cls)}) if state else cls()


def ensure_finite(value: float, what: str, step: int, sample_ids: list) -> None:
    """Stop on a NaN / inf before it reaches the weights; the last good checkpoint stays as it is."""
    if not math.isfinite(value):
        raise UserError(f"non-finite {what} at step {step + 1} (samples {', '.join(map(str, sample_ids))}); "
                                 "stopping without saving. Lower the learning rate or check these samples")


def optimizer_step(model, wrapped, optimizer, trainable, window: list[int], captions: list[str], train_set,
                   cfg: TrainConfig, run: Distributed, global_step: int) -> dict:
    """One window: grad_accum micro-batches per process, each rank its slice, then clip and step. The loss of each
    micro-batch is its summed cross-entropy over the whole window's supervised tokens. The host reads the losses
    and the gradient norm once, after the last backward: one wait for the device per step, not one per micro-batch."""
    num_label_tokens = model.count_label_tokens(captions)
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16,
                              enabled=compute_dtype(cfg.dtype, run.device) == torch.bfloat16)
    started, losses, sample_ids = time.perf_counter(), [], []
    for micro in range(cfg.grad_accum):
        first = (micro * run.world + run.rank) * cfg.batch_size
        batch = collate_features([train_set[i] for i in window[first:first + cfg.batch_size]])
        mine = captions[first:first + cfg.batch_size]
        # DDP all-reduces gradients after the window's last micro-batch only; it averages over ranks, so each
        # rank's loss is scaled by world (the normaliser already counts the whole window).
        with wrapped.no_sync() if run.world > 1 and micro < cfg.grad_accum - 1 else nullcontext():
            with autocast:
                features = batch_features(model, batch, run.device)  # (B, F, P, Dv)
            loss = wrapped(features, mine, num_label_tokens, router_aux_coef=cfg.router_aux_coef) * run.world
            loss.backward()
        losses.append(loss.detach() / run.world)
        sample_ids.append(batch["ids"])
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
    *loss_values, norm = torch.stack([*losses, grad_norm.to(losses[0].device)]).tolist()  # the step's one sync
    for value, ids in zip(loss_values, sample_ids):
        ensure_finite(value, "loss", global_step, ids)
    ensure_finite(norm, "gradient norm", global_step, [i for ids in sample_ids for i in ids])
    optimizer.step()
    after_optimizer_step(model)  # DoRA: the detached weight norms changed with the weights
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    return {"loss": all_reduce_mean(sum(loss_values), run), "grad_norm": norm, "step_seconds": seconds,
            "tokens_per_s": num_label_tokens / run.world / seconds}


# ---- the end of an epoch, of a stage, of the run -----------------------------------------------------------------
def end_of_epoch(model, optimizer, splits, cache, cfg: TrainConfig, run: Distributed, log, position: Position,
                 epoch: int, select_by: ValScore | None = None) -> Position:
    """Validation loss and METEOR (and select_by's score), the best model by them, and a resumable state at the
    epoch boundary."""
    val = evaluate_split(model, splits["val"], cache, batch_size=cfg.eval_batch_size,
                         max_new_tokens=cfg.max_new_tokens, run=run, with_loss=True)
    meteor = val["metrics"]["meteor"]["value"]
    chosen_by = select_by.score(val["predictions"], splits["val"]) if select_by else None
    log.write(step=position.global_step, epoch=epoch + 1, stage=position.stage, val_loss=val["loss"],
              val_meteor=meteor, **({f"val_{select_by.name}": chosen_by} if select_by else {}))
    score = (meteor if chosen_by is None else chosen_by, meteor)  # a tie on select_by's score goes to METEOR
    improved = score > (position.best_score, position.best_meteor)
    best_score, best_meteor = score if improved else (position.best_score, position.best_meteor)
    position = replace(position, epoch=epoch + 1, step_in_epoch=0, best_score=best_score, best_meteor=best_meteor)
    if run.is_main:
        chosen = f", val {select_by.name.replace('_', ' ')} {chosen_by:.3f}" if select_by else ""
        print(f"stage {position.stage} epoch {epoch + 1}: val loss {val['loss']:.4f}, val METEOR {meteor:.4f}{chosen}")
        out = Path(cfg.output_dir) / "checkpoints"
        if improved:
            checkpoint.save_model(out / "best_model.pt", model, cfg,
                                  {"stage": position.stage, "epoch": epoch + 1, "val": val["metrics"]})
        checkpoint.save_training_state(cfg.output_dir, model, optimizer, cfg, asdict(position))
    return position


def finish(model, cfg: TrainConfig, run: Distributed, log) -> None:
    if run.is_main:
        out = Path(cfg.output_dir)
        checkpoint.save_model(out / "checkpoints" / "final_model.pt", model, cfg, {"stage": 2})
        log.plot(out / "logs" / "training_curves.png")
        log.write_summary(out / "logs" / "train_summary.json", model, run.device, run.world)


def adapter_targets(lora_targets: str, llm_config) -> tuple[str, ...]:
    """--lora-targets as module names; auto: every linear of a dense Qwen3, the attention projections of a
    Qwen3-MoE (adapting its experts, 128 per layer at 30B-A3B, multiplies the adapters by ~50 and each expert sees
    few tokens)."""
    if lora_targets == "auto":
        return ATTENTION_LINEARS if llm_config.moe else QWEN3_LINEARS
    return tuple(lora_targets.split(","))


def start_stage(model, stage: int, peak_lr: float, cfg: TrainConfig, run: Distributed):
    """Stage 2 wraps the LLM's linears with adapters first; each stage has its own AdamW over what it trains."""
    if stage == 2 and cfg.peft != "none":
        model.add_adapters(AdapterConfig(method=cfg.peft, r=cfg.lora_r, alpha=cfg.lora_alpha,
                                         dropout=cfg.lora_dropout,
                                         targets=adapter_targets(cfg.lora_targets, model.llm.config)))
        model.to(run.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=peak_lr, weight_decay=cfg.weight_decay)
    return trainable, optimizer, wrap_ddp(model) if run.world > 1 else model


# ---- the loop ----------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, run: Distributed, select_by: ValScore | None = None) -> VLM | None:
    """Both stages; the trained model when they finished (None when stopped early by --max-steps)."""
    check_config(cfg)
    check_snapshot_files(cfg.clip, "--vision")  # a truncated weight file named before anything loads
    check_snapshot_files(cfg.llm, "--llm")
    out = Path(cfg.output_dir)
    splits = read_splits(cfg, load_tokenizer(cfg.llm), select_by)  # refused before the run folder is claimed or written
    options.check_window(len(splits["train"]), cfg.batch_size, cfg.grad_accum, run.world)
    lock = checkpoint.claim_run_folder(out, resume=cfg.resume, start_over=cfg.start_over) if run.is_main else None
    try:
        state = resume_state(cfg)
        seed_everything(cfg.seed)
        model, splits, cache = prepare(cfg, splits, run)
        options.check_window(len(splits["train"]), cfg.batch_size, cfg.grad_accum, run.world)  # after --skip-bad
        return model if train_stages(model, splits, cache, cfg, run, state, select_by) else None
    finally:
        if lock:
            lock.release()


def train_stages(model, splits, cache, cfg: TrainConfig, run: Distributed, state: dict | None,
                 select_by: ValScore | None = None) -> bool:
    train_set = video_dataset(splits["train"], cache, num_frames=cfg.num_frames, processing=model.vision.processing)
    position = Position.of(state)
    log = checkpoint.TrainingLog(Path(cfg.output_dir) / "logs" / "training_log.csv", enabled=run.is_main,
                                 keep_until=position.global_step if state else None)
    window = cfg.batch_size * cfg.grad_accum * run.world
    if run.is_main:
        checkpoint.write_config(cfg.output_dir, asdict(cfg))
        print(f"device: {run.device} x {run.world}, {checkpoint.peak_memory(run.device)}")
    for stage, epochs, peak_lr in [(1, cfg.stage1_epochs, cfg.stage1_lr), (2, cfg.stage2_epochs, cfg.stage2_lr)]:
        if position.stage > stage:
            continue
        trainable, optimizer, wrapped = start_stage(model, stage, peak_lr, cfg, run)
        if state and state["stage"] == stage:
            checkpoint.restore_training_state(state, model, optimizer)
        steps_per_epoch = len(epoch_windows(len(train_set), window, cfg.seed, stage, 0))
        total_steps = epochs * steps_per_epoch
        warmup_steps = max(1, round(cfg.warmup_ratio * total_steps))
        if run.is_main:
            print(f"stage {stage}: {parameter_report(model)}; {total_steps} steps of {window} videos, lr {peak_lr}")
        for epoch in range(position.epoch, epochs):
            windows = epoch_windows(len(train_set), window, cfg.seed, stage, epoch)
            choice = epoch_caption_choice([len(s.captions) for s in splits["train"]], cfg.seed, stage, epoch)
            model.train()
            progress = tqdm(range(position.step_in_epoch, len(windows)), disable=not run.is_main,
                            desc=f"stage {stage} epoch {epoch + 1}/{epochs}")
            for step_in_epoch in progress:
                lr = get_lr(epoch * steps_per_epoch + step_in_epoch, total_steps, warmup_steps, peak_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                captions = [splits["train"][i].captions[choice[i]] for i in windows[step_in_epoch]]
                stats = optimizer_step(model, wrapped, optimizer, trainable, windows[step_in_epoch], captions,
                                       train_set, cfg, run, position.global_step)
                position = replace(position, step_in_epoch=step_in_epoch + 1, global_step=position.global_step + 1)
                log.write(step=position.global_step, epoch=epoch + 1, stage=stage, lr=lr, **stats)
                progress.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}",
                                     caption_tok_s=f"{stats['tokens_per_s']:.3g}")  # 3 digits: never 0
                if not keep_going(model, optimizer, cfg, run, position):
                    return False
            position = end_of_epoch(model, optimizer, splits, cache, cfg, run, log, position, epoch, select_by)
        if stage == 1 and run.is_main:
            checkpoint.save_model(Path(cfg.output_dir) / "checkpoints" / "stage1_projector.pt", model, cfg,
                                  {"stage": 1})
        position, state = Position(stage=2, global_step=position.global_step), None
    finish(model, cfg, run, log)
    return True


def keep_going(model, optimizer, cfg: TrainConfig, run: Distributed, position: Position) -> bool:
    """Save a resumable state every --save-every steps, and stop (saved) at --max-steps."""
    stop = bool(cfg.max_steps) and position.global_step >= cfg.max_steps
    if run.is_main and (position.global_step % cfg.save_every == 0 or stop):
        checkpoint.save_training_state(cfg.output_dir, model, optimizer, cfg, asdict(position))
    if stop and run.is_main:
        print(f"stopped after {position.global_step} steps (--max-steps); continue with --resume auto")
    return not stop


def main(cfg: TrainConfig, select_by: ValScore | None = None) -> dict | None:
    """Train, then evaluate the best model on the test split (the same code as evaluate.py)."""
    run = setup_distributed()
    results = None
    if (model := train(cfg, run, select_by)) is not None:
        best = Path(cfg.output_dir) / "checkpoints" / "best_model.pt"
        results = evaluate_checkpoint(best, split="test", batch_size=cfg.eval_batch_size,
                                      max_new_tokens=cfg.max_new_tokens, run=run, output_dir=cfg.output_dir,
                                      model=model)  # the bases already in memory: the LM is never read twice
    teardown_distributed(run)
    return results


if __name__ == "__main__":
    if not names_paths(sys.argv[1:]):
        # The embedded default (demo/) builds its assets and calls this trainer; the trainer knows nothing of it. exec
        # keeps the process and its environment (so torchrun's too); PYTHONPATH lets `-m demo` run from any folder.
        here = str(Path(__file__).resolve().parent)
        path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
        os.execve(sys.executable, [sys.executable, "-m", "demo", *sys.argv[1:]], os.environ | {"PYTHONPATH": path})
    with user_errors():
        main(parse_config())
