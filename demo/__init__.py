"""The embedded default: tiny, generated, self-contained assets, and a run of the trainer on them.

It is one caller of train.py: `python train.py` without --vision, --llm or --train-manifest hands its command line
to `python -m demo` (demo/__main__.py), whose main here reads train.py's options and the demo's own (DemoConfig), fills in the demo's defaults
(demo_defaults) for the options not given, builds the assets, trains with train.main and prints the test table
(report(), also kept as logs/demo_table.json).

Real CLIP / Qwen3 weights and real datasets cannot be fetched offline, so the demo builds its own with our own code,
once per (scale, held-out kind, seed, VERSION), into .cache/demo/{scale}-seed{seed}-v{VERSION}/ (with
--demo-heldout pairs: .cache/demo/{scale}-pairs-seed{seed}-v{VERSION}/):

    data/   synthetic Korean videos (synth.synth_dataset): val and test hold attribute combinations never trained on
            (--demo-heldout pairs: colour-shape pairs never trained on);
            each video has 2-5 captions in different templates of synth.py's grammar, each attribute named by one
            word (plain_caption: METEOR counts a synonym as a miss, so with synth.py's synonyms even a perfect
            captioner would score low; results/README.md#why-the-demos-defaults-are-what-they-are)
    clip/   a CLIP-architecture vision tower (demo_tower.py: ViT, 64 px, patch 8, width 128, 3 layers), pretrained
            on the training frames with supervised heads (colour, shape, background, position; per token: which
            patch holds the object and what it is), heads discarded: a tower that "knows" these images, as CLIP
            knows photos
    llm/    a Qwen3 (width 256, 4 layers, tied embeddings) pretrained on "keywords -> caption": the chat prompt that
            vlm.py builds, with the attribute words, shuffled, as tokens in the <|video_pad|> slots, loss on the
            caption only; plus tokenizer.json (byte-level BPE with Qwen3's chat tokens)

Why the LM is pretrained that way: the LM is frozen in stage 1, so the projector can only learn to speak a language
the LM already reads. An LM pretrained on captions alone ignores its prefix and writes the most frequent caption;
one that learned to describe whatever sits in the video slots lets the projector put the video there.

    python train.py --projector perceiver --peft dora            # builds the assets, trains, prints report()
    python -m demo --demo-heldout pairs --seed 7 --demo-seed 42  # the same entry, named directly
"""
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from data import read_manifest, write_manifest
from demo.synth import ATTRIBUTES, CAPTION_TEMPLATES, attribute_scores, caption_choices, make_caption, \
    parse_caption_attributes, synth_dataset
from demo.tower import pretrain_tower, save_clip
from evaluate import evaluate_split, rebuild_model, run_splits
from features import prepare_splits
from infra.checkpoint import atomic_write_text, load_checkpoint
from infra.distributed import compute_dtype, default_device
from infra.errors import UserError
from infra.schedule import get_lr
from qwen3 import Qwen3, Qwen3Config
from train import TrainConfig, ValScore, config_parser, option
from train import main as train_main
from vlm import DEFAULT_INSTRUCTION, IGNORE_INDEX, ChatTemplate

# The special tokens of Qwen3's tokenizer that kovlm's prompt uses. `<think>` / `</think>` are ordinary added
# tokens in Qwen3 (decoding with skip_special_tokens keeps them), so they are added the same way here.
QWEN3_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                        "<|video_pad|>"]
QWEN3_THINK_TOKENS = ["<think>", "</think>"]
VERSION = 4  # part of the asset folder's name: bump it when the builder changes, so old assets are not reused


@dataclass(frozen=True)
class DemoScale:
    num_videos: int    # all splits
    num_val: int
    num_test: int
    frames: int        # frames per video (all of them reach the projector)
    tower_steps: int   # vision tower pretraining: steps x frames per step
    tower_batch: int
    lm_steps: int      # LM pretraining: steps x captions per step
    lm_batch: int


SCALES = {"full": DemoScale(num_videos=3060, num_val=100, num_test=400, frames=8, tower_steps=1000, tower_batch=64,
                            lm_steps=300, lm_batch=32),
          "ci": DemoScale(num_videos=192, num_val=24, num_test=24, frames=8, tower_steps=40, tower_batch=32,
                          lm_steps=40, lm_batch=32)}
LM_LR = 2e-3  # AdamW peak of the LM pretraining
UNSEEN = {"combinations": "attribute combinations never seen in training",
          "pairs": "colour-shape pairs never seen together in training"}
NUM_SLOTS = 16  # visual tokens of the resampling projectors in the demo (num_queries), and the LM's keyword slots


# Each projector's own budget on the full demo, over demo_defaults' (the figures behind each, with their commands
# and files: results/README.md#why-the-demos-defaults-are-what-they-are):
# - cabstractor: 8 stage-1 epochs, not 2. Honeybee's module learns colour more slowly than the perceiver; after 2
#   stage-1 epochs colour is in its tokens too weakly for the frozen LM, and stage 2's adapters then guess colour
#   from the other three attributes, which is wrong for every unseen combination.
# - linear, mlp: they hand the LM 8 x 64 = 512 tokens instead of 16, most of them the same plain background in
#   every frame. They keep a quarter, 128 (--token-reduction merge+divprune --visual-tokens 128, pruning.py):
#   merging folds each background token into the previous frame's while what moves stays, and 128 leaves room for
#   every token that merging at the 0.6 threshold keeps of a video whose only motion is one shape, so DivPrune has
#   little to drop. The cheaper steps buy the 4 stage-2 epochs (more passes over the videos, not more steps) they
#   need to learn motion; 1 stage-1 epoch. `--token-reduction none` trains them on all 512.
PER_PATCH_REDUCTION = dict(token_reduction="merge+divprune", visual_tokens=128)
PROJECTOR_DEFAULTS = {"cabstractor": dict(stage1_epochs=8), "linear": dict(stage1_epochs=1, **PER_PATCH_REDUCTION),
                      "mlp": dict(stage1_epochs=1, **PER_PATCH_REDUCTION)}


def demo_defaults(scale: str = "full", projector: str = "perceiver") -> dict:
    """DemoConfig values of the demo (options given on the command line win). 2560 training videos in windows of
    32 make 80 steps an epoch: stage 1 trains the projector alone for 160 steps at lr 1e-3, stage 2 the projector
    and the adapters for 320 at 2e-3: a tiny LM moves less per step than Qwen3-8B, whose default is 5e-5, and at
    1e-3 the model confused left with up (results/README.md#why-the-demos-defaults-are-what-they-are).
    NUM_SLOTS visual tokens: the slots the LM learned to read. Captions are ~10 tokens: 32 new tokens at most.
    No activation checkpointing: the tiny LM's activations fit even with all 512 of the per-patch projectors' tokens.
    On the full scale a projector's own PROJECTOR_DEFAULTS replace these."""
    full = scale == "full"
    defaults = dict(demo_scale=scale, num_frames=SCALES[scale].frames, num_queries=NUM_SLOTS,
                    batch_size=32 if full else 16, grad_accum=1, stage1_epochs=2, stage1_lr=1e-3,
                    stage2_epochs=4 if full else 1, stage2_lr=2e-3, lora_r=16, lora_alpha=32, lora_dropout=0.0,
                    warmup_ratio=0.05, eval_batch_size=100, max_new_tokens=32, num_workers=0, save_every=1000,
                    grad_checkpointing="off")
    return defaults | (PROJECTOR_DEFAULTS.get(projector, {}) if full else {})


@dataclass
class DemoConfig(TrainConfig):
    """train.py's options and the demo's own. The run records them all (config.json, checkpoints), so --resume
    refuses a changed demo option as it does a changed training option."""
    demo_dir: str = option(".cache/demo", "where the embedded demo's assets are built")
    demo_scale: str = option("full", "size of the embedded demo", choices=["full", "ci"])
    demo_heldout: str = option("combinations", "what the demo's val and test hold that training never shows: "
                               "4-attribute combinations, or colour-shape pairs (harder)",
                               choices=["combinations", "pairs"])
    demo_seed: int | None = option(None, "seed of the demo's assets (videos, tower, LM); default --seed, so "
                                   "--seed S --demo-seed 42 trains anew on the same assets")
    select_by: str = option("attributes", "what picks best_model.pt among the stage-2 epochs: the share of val "
                            "captions that name all four attributes right (ties go to val METEOR), or val METEOR: "
                            "METEOR also rewards wording", choices=["attributes", "meteor"])


@dataclass
class DemoAssets:
    folder: str
    clip: str
    llm: str
    manifest: str
    heldout: str = "combinations"  # what the test split holds that training never showed (synth.HELDOUT)


def assets_folder(demo_dir, scale: str = "full", seed: int = 42, heldout: str = "combinations") -> Path:
    """The assets' folder, keyed by scale, held-out kind, seed and VERSION."""
    kind = "" if heldout == "combinations" else f"-{heldout}"
    return Path(demo_dir) / f"{scale}{kind}-seed{seed}-v{VERSION}"


def build_assets(demo_dir, scale: str = "full", seed: int = 42, is_main: bool = True,
                 heldout: str = "combinations") -> DemoAssets:
    """The demo's data, tokenizer, vision tower and LM, built once into assets_folder (written under a temporary
    name and renamed when complete, so an interrupted build is never reused)."""
    torch.set_flush_denormal(True)  # tiny models hit denormal floats on the CPU, which are slow to compute with
    folder = assets_folder(demo_dir, scale, seed, heldout).resolve()
    assets = DemoAssets(str(folder), str(folder / "clip"), str(folder / "llm"), str(folder / "data/manifest.jsonl"),
                        heldout)
    if folder.is_dir():
        print(f"demo: reusing the assets in {folder}")
        return assets
    if not is_main:  # other processes of a distributed run wait for rank 0's build
        while not folder.is_dir():
            time.sleep(2)
        return assets
    size, building = SCALES[scale], folder.with_name(folder.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    print(f"demo: building the assets in {folder} (once)")
    started = clock = time.perf_counter()

    def done(what: str) -> None:
        nonlocal clock
        print(f"demo: {what} ({time.perf_counter() - clock:.0f} s)")
        clock = time.perf_counter()

    manifest = synth_dataset(building / "data", size.num_videos, seed, num_val=size.num_val, num_test=size.num_test,
                             heldout=heldout, frames=size.frames)
    samples = recaption(manifest, seed)
    done(f"{len(samples)} synthetic videos, {size.frames} frames of 64 x 64, test = {UNSEEN[heldout]}")
    keywords = [word for table in ATTRIBUTES.values() for word in table.values()]
    train_tokenizer([c for s in samples if s.split == "train" for c in s.captions] + keywords + [DEFAULT_INSTRUCTION],
                    building / "llm")
    tokenizer = Tokenizer.from_file(str(building / "llm/tokenizer.json"))
    done(f"tokenizer: byte-level BPE, {tokenizer.get_vocab_size()} tokens with Qwen3's chat tokens")
    tower, accuracy = pretrain_tower(samples, size.tower_steps, size.tower_batch, seed)
    save_clip(tower, building / "clip")
    done(f"vision tower: {size.tower_steps} steps x {size.tower_batch} frames; on unseen frames " +
         ", ".join(f"{name} {value:.2f}" for name, value in accuracy.items()))
    lm, accuracy = pretrain_lm(samples, tokenizer, size, seed)
    save_qwen3(lm, building / "llm")
    done(f"LM: {size.lm_steps} steps x {size.lm_batch} captions; keywords of unseen combinations -> all four "
         f"attributes right in {accuracy:.0%} of captions")
    building.rename(folder)
    print(f"demo: assets built in {time.perf_counter() - started:.0f} s")
    return assets


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


# ---- the language model ----------------------------------------------------------------------------------------
def qwen3_config(tokenizer: Tokenizer) -> dict:
    """config.json of the demo LM, as transformers writes a Qwen3ForCausalLM's."""
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": tokenizer.get_vocab_size(),
            "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "tie_word_embeddings": True, "attention_bias": False, "attention_dropout": 0.0, "use_cache": True,
            "use_sliding_window": False, "layer_types": ["full_attention"] * 4, "dtype": "float32",
            "pad_token_id": tokenizer.token_to_id("<|endoftext|>"), "eos_token_id": tokenizer.token_to_id("<|im_end|>")}


def plain_caption(attributes: dict, template: str) -> str:
    """A caption of synth.py's grammar that names each attribute by one word (the first of its synonyms)."""
    return make_caption(template, {slot: words[0] for slot, words in caption_choices(attributes).items()})


def recaption(manifest: Path, seed: int) -> list:
    """Give every video 2-5 plain captions in different templates (the module docstring says why)."""
    rng, samples = random.Random(seed), read_manifest(manifest)
    for sample in samples:
        templates = rng.sample(CAPTION_TEMPLATES, rng.randint(2, 5))
        sample.captions = [plain_caption(sample.attributes, template) for template in templates]
    write_manifest(samples, manifest)
    return samples


def keyword_prompt(template: ChatTemplate, attributes: dict, rng: random.Random) -> list[int]:
    """vlm.py's prompt with the attribute words, in random order and at random places, in the NUM_SLOTS video slots
    (the rest stay <|video_pad|>): the LM learns to describe whatever the video slots hold."""
    keywords = [template.encode(ATTRIBUTES[name][value]) for name, value in attributes.items()]
    pads = [[template.video_pad_id]] * (NUM_SLOTS - sum(map(len, keywords)))
    pieces = rng.sample(keywords + pads, len(keywords) + len(pads))
    return template.before_video + [token for piece in pieces for token in piece] + template.after_video


def keyword_batch(template: ChatTemplate, combinations: list[dict], rng: random.Random):
    """input_ids (B, T), right-padded, and labels (B, T): IGNORE_INDEX except on the caption and its <|im_end|>."""
    rows = []
    for attributes in combinations:
        prompt = keyword_prompt(template, attributes, rng)
        caption = template.caption_ids(plain_caption(attributes, rng.choice(CAPTION_TEMPLATES)))
        rows.append((prompt + caption, [IGNORE_INDEX] * len(prompt) + caption))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [template.end_of_text_id] * (width - len(ids)) for ids, _ in rows])
    return input_ids, torch.tensor([labels + [IGNORE_INDEX] * (width - len(labels)) for _, labels in rows])


def pretrain_lm(samples, tokenizer: Tokenizer, size: DemoScale, seed: int) -> tuple[Qwen3, float]:
    """A Qwen3 trained on keyword prompts -> captions of the training combinations, loss on the caption only;
    returns it and the share of unseen (test) combinations it captions with all four attributes right."""
    torch.manual_seed(seed)
    rng, template = random.Random(seed), ChatTemplate(tokenizer, DEFAULT_INSTRUCTION)
    model = Qwen3(Qwen3Config.from_hf(qwen3_config(tokenizer)))
    for module in model.modules():  # transformers' init: N(0, 0.02) for every linear and the embedding
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
    # sorted: a set's order follows Python's string hashing, which is salted per process
    combinations = [dict(t) for t in sorted({tuple(s.attributes.items()) for s in samples if s.split == "train"})]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LM_LR, weight_decay=0.01)
    for step in range(size.lm_steps):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, size.lm_steps, max(1, size.lm_steps // 20), LM_LR)
        input_ids, labels = keyword_batch(template, rng.choices(combinations, k=size.lm_batch), rng)
        hidden = model.hidden_states(input_ids)[:, :-1]  # (B, T-1, C): position t predicts token t + 1
        supervised = labels[:, 1:] != IGNORE_INDEX
        loss = F.cross_entropy(model.logits_from_hidden(hidden[supervised]), labels[:, 1:][supervised])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    unseen = [s.attributes for s in samples if s.split == "test"]
    prompts = torch.tensor([keyword_prompt(template, attributes, rng) for attributes in unseen])
    captions = greedy_captions(model.eval(), template, prompts)
    right = [parse_caption_attributes(c) == a for c, a in zip(captions, unseen)]
    return model.requires_grad_(False), sum(right) / len(right)


@torch.no_grad()
def greedy_captions(model: Qwen3, template: ChatTemplate, prompts: torch.Tensor, max_new: int = 32) -> list[str]:
    """Greedy decoding with the KV cache of prompts of one length (B, T)."""
    cache = model.new_kv_cache(len(prompts), prompts.shape[1] + max_new)
    tokens = [model(prompts, kv_cache=cache)[:, -1].argmax(-1)]  # (B,)
    for _ in range(max_new - 1):
        tokens.append(model(tokens[-1][:, None], kv_cache=cache)[:, -1].argmax(-1))
    return [template.decode(row) for row in torch.stack(tokens, 1).tolist()]


def save_qwen3(model: Qwen3, folder: Path) -> None:
    """A transformers-style Qwen3ForCausalLM folder (config.json + model.safetensors) next to tokenizer.json."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps(qwen3_config(tokenizer), indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors",
              metadata={"format": "pt"})


# ---- the final table -------------------------------------------------------------------------------------------
class OtherVideosFeatures:
    """A feature cache whose load(video) returns another video's features (one random cycle through all videos,
    so none keeps its own): the blind baseline sees real features, only not those of the video it describes."""

    def __init__(self, cache, videos: list, seed: int):
        order = random.Random(seed).sample([str(v) for v in videos], len(videos))
        self.other = {video: order[(i + 1) % len(order)] for i, video in enumerate(order)}
        self.cache, self.root = cache, cache.root

    def load(self, item):
        """`item` is a Sample (what CachedFeatureDataset passes) or a video path; the demo's videos are whole."""
        return self.cache.load(self.other[str(getattr(item, "video", item))])


def blind_baseline(checkpoint_path) -> dict:
    """evaluate_split on the test split with each video's features replaced by another video's (the test features
    go through the feature cache here even in a run without one, since they are swapped there)."""
    checkpoint = load_checkpoint(checkpoint_path)
    config = checkpoint["train_config"]
    device = default_device()
    model = rebuild_model(checkpoint, clip=None, llm=None, device=device, dtype=compute_dtype(config["dtype"], device))
    splits, cache = prepare_splits(model, {"test": run_splits(config)["test"]}, cache_dir=config["cache_dir"],
                                   skip_bad=config["skip_bad"], show_progress=False)
    others = OtherVideosFeatures(cache, [s.video for s in splits["test"]], config["seed"])
    return evaluate_split(model, splits["test"], others, batch_size=config["eval_batch_size"],
                          max_new_tokens=config["max_new_tokens"])


def caption_scores(results: dict, attributes: dict[str, dict]) -> dict[str, float]:
    """METEOR, CIDEr-D, and the share of captions that name each attribute right (and all four)."""
    scores = {"METEOR": results["metrics"]["meteor"]["value"], "CIDEr-D": results["metrics"]["cider_d"]["value"]}
    return scores | attribute_scores(results["predictions"], attributes)


def report(results: dict, assets: DemoAssets) -> dict:
    """Print the test table (the model vs the blind baseline) and five captions; return the numbers."""
    started = time.perf_counter()
    attributes = {s.id: s.attributes for s in read_manifest(assets.manifest)}
    table = {"model": caption_scores(results, attributes),
             "blind": caption_scores(blind_baseline(results["checkpoint"]), attributes)}
    print(f"\nthe embedded demo, test split: {len(results['predictions'])} videos, {UNSEEN[assets.heldout]}"
          f"\n  blind = the same model given another video's features ({time.perf_counter() - started:.0f}"
          f" s)\n\n  {'':<12}{'model':>8}{'blind':>8}")
    for name in table["model"]:
        print(f"  {name:<12}{table['model'][name]:>8.3f}{table['blind'][name]:>8.3f}")
    print("\n  five test captions and their references:")
    for p in results["predictions"][:5]:
        print(f"  {p['prediction']}\n      refs: {' | '.join(p['references'])}")
    return table


# ---- the command line: the demo as a caller of train.py ----------------------------------------------------------
def all_four_right(predictions: list[dict], samples: list) -> float:
    """The share of captions that name every attribute of their video right."""
    return attribute_scores(predictions, {s.id: s.attributes for s in samples})["all four"]


def check_attributes(samples: list) -> None:
    unlabelled = [s.id for s in samples if not s.attributes]
    if unlabelled:
        raise UserError(f"--select-by attributes needs `attributes` on every val sample, and {len(unlabelled)} have "
                         f"none (first: {unlabelled[0]}); use --select-by meteor")


# What --select-by hands the trainer; val_all_four is the training log's column (and training_curves.png's line).
SELECT_BY = {"attributes": ValScore("all_four", all_four_right, check_attributes), "meteor": None}


def command_line_config(argv=None) -> DemoConfig:
    """The options given, over the demo's defaults (for its scale and projector)."""
    parser = config_parser(DemoConfig, description="the embedded default: builds tiny generated assets, then trains "
                           "on them with train.py", epilog="The defaults shown are train.py's; the demo replaces "
                           "them with its own (demo.demo_defaults) for the options not given.")
    given = vars(parser.parse_args(argv))
    if {"clip", "llm", "train_manifest"} & set(given):
        parser.error("the embedded default builds its own bases and data: give --clip, --llm and "
                     "--train-manifest to train.py instead")
    chosen = DemoConfig(**given)
    defaults = demo_defaults(chosen.demo_scale, chosen.projector)
    if given.get("token_reduction") == "none":  # all the tokens: the K of the projector's default reduction goes too
        defaults.pop("visual_tokens", None)
    return DemoConfig(**defaults | given)


def run_demo(cfg: DemoConfig) -> dict | None:
    """Build the assets, train on them, and on rank 0 print the test table and keep it in logs/demo_table.json."""
    is_main = int(os.environ.get("RANK", "0")) == 0  # torchrun's rank; train.main sets up the process group
    seed = cfg.seed if cfg.demo_seed is None else cfg.demo_seed
    assets = build_assets(cfg.demo_dir, scale=cfg.demo_scale, seed=seed, is_main=is_main, heldout=cfg.demo_heldout)
    cfg = replace(cfg, clip=assets.clip, llm=assets.llm, train_manifest=assets.manifest)
    results = train_main(cfg, select_by=SELECT_BY[cfg.select_by])
    if results is not None and is_main:
        table = report(results, assets)
        atomic_write_text(Path(cfg.output_dir) / "logs" / "demo_table.json", json.dumps(table, indent=2))
    return results


def main(argv=None) -> dict | None:
    return run_demo(command_line_config(argv))
