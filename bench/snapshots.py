"""The model benchmark's sizes and the random snapshot folders both stacks load.

A Preset names the shapes of a random Qwen3 and CLIP vision tower and the workloads run on them (batch sizes,
caption length, repeats). write_snapshots writes those models once as ordinary Hugging Face snapshot folders
(config.json, sharded safetensors with an index, tokenizer.json), so kovlm's loaders and transformers'
from_pretrained read the same files the normal way.
"""
import json
import math
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from infra.shards import write_safetensors, write_shards
from moe import split_fused_experts


@dataclass(frozen=True)
class Preset:
    """One benchmark size: the shapes of the random Qwen3 and CLIP written to disk, and the workloads run on them."""
    name: str
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int               # patches per frame P = (image_size // patch_size)^2: 576 at ViT-L/14-336
    vocab_size: int = 151936      # Qwen3's: the reference's full logits cost T x V
    frames: int = 8
    queries: int = 64             # visual tokens of the resampler (perceiver)
    short_batch: int = 4          # videos per step at the resampler shape (train.py's default batch)
    long_batch: int = 1           # videos per step at the per-patch shape (frames x P visual tokens each)
    caption_tokens: int = 60      # each caption's supervised tokens (caption + <|im_end|>), about
    loss_patches: int = 576       # the loss measurement's patches per frame: T = 8 x 576 + prompt + caption ≈ 4700
    generate_batch: int = 8
    new_tokens: int = 64
    videos: int = 8               # the vision side: videos per epoch
    warmup: int = 1               # untimed repeats first
    step_repeats: int = 5         # timed training steps (the median is reported)
    repeats: int = 3              # timed generations and loss computations (long on a CPU; the median)
    experts: int = 0              # Qwen3-MoE: experts in each decoder layer's MLP (0: a dense Qwen3)
    experts_per_token: int = 8    # ... of which each token uses this many
    expert_intermediate: int = 0  # ... each a SwiGLU this wide

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


PRESETS = {
    # Qwen/Qwen3-8B and openai/clip-vit-large-patch14-336.
    "qwen3-8b": Preset("qwen3-8b", 4096, 12288, 36, 32, 8, 128, 1024, 4096, 24, 16, 336, 14),
    # Qwen3's vocabulary on a narrow 2-layer decoder and a small tower with a 12 x 12 patch grid (8 x 144 = 1152
    # visual tokens at the per-patch shape instead of 8 x 576): a few minutes on a 2-core CPU.
    "cpu-small": Preset("cpu-small", 512, 1536, 2, 8, 4, 64, 256, 1024, 4, 4, 168, 14),
}
# cpu-small's decoder as a Qwen3-MoE with Qwen/Qwen3-30B-A3B's proportions: 8 active experts, each 3/8 of the width
# wide (768 at 2048), no shared expert, every layer MoE; 32 experts instead of 128 keep the snapshot small
PRESETS["cpu-small-moe"] = replace(PRESETS["cpu-small"], name="cpu-small-moe", experts=32, experts_per_token=8,
                                   expert_intermediate=192)
QUICK = dict(hidden_size=64, intermediate_size=128, layers=1, heads=2, kv_heads=1, head_dim=32, vision_hidden=32,
             vision_intermediate=64, vision_layers=2, vision_heads=2, image_size=28, patch_size=14, vocab_size=2048,
             queries=4, short_batch=2, caption_tokens=8, loss_patches=4, generate_batch=2, new_tokens=3, videos=2,
             warmup=0, step_repeats=1, repeats=1)  # toy sizes: every code path once, in seconds
# the tokenizer is trained on these, and the benchmark's captions are drawn from their words
CAPTION_TEXTS = ["빨간 원이 파란 배경 위에서 왼쪽으로 천천히 움직인다.",
                 "초록색 사각형이 흰 배경 위를 오른쪽으로 지나간다.",
                 "노란 삼각형이 검은 배경에서 위로 빠르게 올라간다.",
                 "작은 보라색 별이 회색 바닥 근처에서 빙글빙글 돈다."]


def preset_for(name: str, quick: bool, layers: int | None = None) -> Preset:
    """The preset `name`, or with quick its toy-size variant (the same workloads, every code path once); layers
    keeps the first `layers` decoder layers of its Qwen3 (same widths: per-layer costs and ratios stay, in less
    time; the name says so)."""
    preset = PRESETS[name]
    if quick:
        moe = dict(experts=4, experts_per_token=2, expert_intermediate=32) if preset.experts else {}
        preset = replace(preset, name=f"{name} (quick)", **QUICK, **moe)
    if layers and layers != preset.layers:
        preset = replace(preset, name=f"{preset.name}, {layers} of {preset.layers} layers", layers=layers)
    return preset


def write_tokenizer(folder: Path, vocab_size: int) -> Tokenizer:
    """demo.train_tokenizer's byte-level BPE with Qwen3's chat tokens, its vocabulary filled with unused entries up
    to vocab_size, so every id the random LLM emits decodes (Qwen3's own tokenizer.json covers its vocab alike)."""
    from demo import train_tokenizer
    path = train_tokenizer(CAPTION_TEXTS * 10, folder, vocab_size=500)
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    first_free = 1 + max([*vocab.values(), *(token["id"] for token in spec["added_tokens"])])
    vocab.update({f"<unused{i}>": i for i in range(first_free, vocab_size)})
    path.write_text(json.dumps(spec, ensure_ascii=False))
    return Tokenizer.from_file(str(path))


def write_random_weights(folder: Path, shapes: dict, dtype: torch.dtype, device, shard_bytes: int = 2 << 30):
    """Normal(0, 0.02) weights (transformers' initializer_range), ones for norm scales, zeros for biases, written
    shard by shard with an index as a Hugging Face snapshot: Qwen3-8B never sits whole in memory."""
    generator = torch.Generator(device).manual_seed(0)
    weight_map, shard, names = {}, {}, list(shapes)
    for i, name in enumerate(names):
        shape = shapes[name]
        if name.endswith(".bias"):
            tensor = torch.zeros(shape)
        elif "norm" in name and len(shape) == 1:
            tensor = torch.ones(shape)
        else:  # drawn in the stored dtype on the device (a GPU draws 16 GB of bf16 in well under a second)
            tensor = torch.randn(shape, generator=generator, device=device, dtype=dtype).mul_(0.02)
        shard[name] = tensor.to(dtype).cpu()
        if i == len(names) - 1 or sum(t.nbytes for t in shard.values()) >= shard_bytes:
            file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, folder / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            shard = {}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_snapshots(preset: Preset, root: Path, device, shard_bytes: int = 2 << 30) -> dict[str, Path]:
    """The preset's random Qwen3 or Qwen3-MoE (bf16, with tokenizer.json; experts in the hub's per-expert layout)
    and CLIP vision tower (fp32) as snapshot folders, written once; a root already holding this preset's folders is
    reused."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, \
        Qwen3MoeForCausalLM
    folders = {"llm": root / "llm", "clip": root / "clip"}
    marker = root / "preset.json"
    if marker.exists() and json.loads(marker.read_text()) == asdict(preset):
        return folders
    tokenizer = write_tokenizer(folders["llm"], preset.vocab_size)
    # no eos_token_id: transformers' generate then never stops early, as ours is told not to (equal work)
    decoder = dict(vocab_size=preset.vocab_size, hidden_size=preset.hidden_size, head_dim=preset.head_dim,
                   intermediate_size=preset.intermediate_size, num_hidden_layers=preset.layers,
                   num_attention_heads=preset.heads, num_key_value_heads=preset.kv_heads, rope_theta=1e6,
                   max_position_embeddings=40960, tie_word_embeddings=False, dtype="bfloat16",
                   pad_token_id=tokenizer.token_to_id("<|endoftext|>"))
    llm_class = Qwen3MoeForCausalLM if preset.experts else Qwen3ForCausalLM
    llm = Qwen3MoeConfig(**decoder, num_experts=preset.experts, num_experts_per_tok=preset.experts_per_token,
                         moe_intermediate_size=preset.expert_intermediate, norm_topk_prob=True) \
        if preset.experts else Qwen3Config(**decoder)
    clip = CLIPVisionConfig(hidden_size=preset.vision_hidden, intermediate_size=preset.vision_intermediate,
                            num_hidden_layers=preset.vision_layers, num_attention_heads=preset.vision_heads,
                            image_size=preset.image_size, patch_size=preset.patch_size)
    for folder, config, model_class, dtype in ((folders["llm"], llm, llm_class, torch.bfloat16),
                                               (folders["clip"], clip, CLIPVisionModel, torch.float32)):
        config.save_pretrained(folder)
        with torch.device("meta"):  # transformers 5's fused experts split into the hub's names, as checkpoints have
            shapes = {split: t.shape for name, fused in model_class(config).state_dict().items()
                      for split, t in split_fused_experts(name, fused)}
        write_random_weights(folder, shapes, dtype, device, shard_bytes)
    marker.write_text(json.dumps(asdict(preset)))
    return folders


# ---- the published shapes, at real size (python -m bench rehearse) -----------------------------------------------
# Qwen/Qwen3-8B's config.json as published (num_hidden_layers is the one field the rehearsal may lower).
QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
            "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 40960,
            "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
            "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
# The keys transformers 4.2x wrote into each sub-config of openai/clip-vit-large-patch14-336's config.json (the
# published file spells them all out; kovlm's loader must read past them).
_PRETRAINED_KEYS = {
    "add_cross_attention": False, "architectures": None, "bad_words_ids": None, "chunk_size_feed_forward": 0,
    "cross_attention_hidden_size": None, "decoder_start_token_id": None, "diversity_penalty": 0.0, "do_sample": False,
    "early_stopping": False, "encoder_no_repeat_ngram_size": 0, "exponential_decay_length_penalty": None,
    "finetuning_task": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_decoder": False, "is_encoder_decoder": False,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "length_penalty": 1.0, "max_length": 20, "min_length": 0,
    "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1, "num_return_sequences": 1,
    "output_attentions": False, "output_hidden_states": False, "output_scores": False, "prefix": None,
    "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False, "repetition_penalty": 1.0,
    "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None, "task_specific_params": None,
    "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False, "tie_word_embeddings": True,
    "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torch_dtype": None, "torchscript": False, "typical_p": 1.0,
    "use_bfloat16": False}
_CLIP_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
              "projection_dim": 768}
_CLIP_VISION = {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "num_attention_heads": 16,
                "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}
CLIP_L_336 = {
    "_name_or_path": "openai/clip-vit-large-patch14-336", "architectures": ["CLIPModel"], "initializer_factor": 1.0,
    "logit_scale_init_value": 2.6592, "model_type": "clip", "projection_dim": 768,
    "text_config": _PRETRAINED_KEYS | _CLIP_TEXT | {
        "_name_or_path": "", "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
        "hidden_act": "quick_gelu", "initializer_factor": 1.0, "initializer_range": 0.02, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77, "model_type": "clip_text_model", "pad_token_id": 1, "transformers_version":
        "4.21.3", "vocab_size": 49408},
    "text_config_dict": _CLIP_TEXT, "torch_dtype": "float32", "transformers_version": None,
    "vision_config": _PRETRAINED_KEYS | _CLIP_VISION | {
        "_name_or_path": "", "attention_dropout": 0.0, "bos_token_id": None, "dropout": 0.0, "eos_token_id": None,
        "hidden_act": "quick_gelu", "initializer_factor": 1.0, "initializer_range": 0.02, "layer_norm_eps": 1e-05,
        "model_type": "clip_vision_model", "num_channels": 3, "pad_token_id": None, "transformers_version": "4.21.3"},
    "vision_config_dict": _CLIP_VISION}
CLIP_L_336_PROCESSOR = {"crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                        "feature_extractor_type": "CLIPFeatureExtractor",
                        "image_mean": [0.48145466, 0.4578275, 0.40821073],
                        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336}
# Qwen3's added tokens (tokenizer_config.json's added_tokens_decoder): (id, content, special). The byte-level BPE
# vocabulary holds ids 0-151642; the embedding has 151,936 rows, the last 267 never produced by the tokenizer.
QWEN3_ADDED_TOKENS = [(151643 + i, token, i < 14) for i, token in enumerate([
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>"])]
QWEN3_BPE_SIZE = 151643


def write_qwen3_tokenizer(folder: Path, texts: list[str]) -> Tokenizer:
    """tokenizer.json (+ tokenizer_config.json) laid out as Qwen3's: a byte-level BPE trained on `texts` (so Korean
    encodes in a few tokens a word), its vocabulary filled with unused entries up to id 151642, then Qwen3's 26
    added tokens at their real ids (151643 <|endoftext|> ... 151656 <|video_pad|>, 151667 <think>, 151668
    </think>)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["user\n", "assistant\n", *texts], trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), QWEN3_BPE_SIZE)})
    spec["added_tokens"] = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": special} for i, token, special in QWEN3_ADDED_TOKENS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    config = {"added_tokens_decoder": {str(i): {"content": token, "lstrip": False, "normalized": False,
                                                "rstrip": False, "single_word": False, "special": special}
                                       for i, token, special in QWEN3_ADDED_TOKENS},
              "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "errors": "replace",
              "model_max_length": 131072, "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    loaded = Tokenizer.from_file(str(folder / "tokenizer.json"))
    wrong = [(token, i) for i, token, _ in QWEN3_ADDED_TOKENS if loaded.token_to_id(token) != i]
    if wrong:
        raise RuntimeError(f"tokenizer.json: added tokens not at Qwen3's ids: {wrong[:3]}")
    return loaded


def random_tensor(name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """One weight as write_random_weights draws it (Normal(0, 0.02), ones for norm scales, zeros for biases; CLIP's
    logit_scale its init value), seeded by its name: the same folder whatever order the tensors are written in."""
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    if "norm" in name and len(shape) == 1:  # Qwen3 RMSNorms, CLIP LayerNorms (pre_layrnorm too)
        return torch.ones(shape, dtype=dtype)
    if name == "logit_scale":
        return torch.full(shape, 2.6592, dtype=dtype)
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator, dtype=dtype).mul_(0.02)


def random_tensors(shapes: dict[str, tuple], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, random_tensor) for each of `shapes` in order, made one at a time as infra.shards writes them: memory
    holds one tensor, never the file."""
    return ((name, random_tensor(name, tuple(shape), dtype)) for name, shape in shapes.items())


def hf_shapes(model_class, config) -> dict[str, tuple]:
    """transformers' tensor names and shapes for a model, built on the meta device (no memory)."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in model_class(config).state_dict().items()}


def write_qwen3_8b(folder: Path, layers: int = 36, shard_bytes: int = 4 * 10**9, texts=CAPTION_TEXTS,
                   overrides: dict | None = None) -> dict:
    """A random-weight Qwen/Qwen3-8B snapshot folder (its config.json, with num_hidden_layers = layers and any
    `overrides`, e.g. a narrower hidden_size), bf16, sharded like the hub's (five files of up to 4 GB at 36
    layers), tokenizer files with Qwen3's ids."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    config = QWEN3_8B | {"num_hidden_layers": layers, "max_window_layers": layers} | (overrides or {})
    folder.mkdir(parents=True, exist_ok=True)
    shapes = hf_shapes(Qwen3ForCausalLM, Qwen3Config(**config))
    write_shards(random_tensors(shapes, torch.bfloat16), shapes, torch.bfloat16, folder, shard_bytes)
    files = sorted({*json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": [151645,
                                                                151643], "pad_token_id": 151643}, indent=2))
    write_qwen3_tokenizer(folder, texts)
    return {"parameters": sum(math.prod(s) for s in shapes.values()), "files": files}


def write_clip_l_336(folder: Path, vision_layers: int = 24) -> dict:
    """A random-weight openai/clip-vit-large-patch14-336 folder: the published config.json (the vision tower cut
    to vision_layers) and preprocessor_config.json, and the full CLIPModel checkpoint (text tower, projections,
    logit_scale too) as one fp32 model.safetensors, as the hub has it."""
    from transformers import CLIPConfig, CLIPModel
    config = json.loads(json.dumps(CLIP_L_336))
    for key in ("vision_config", "vision_config_dict"):
        config[key]["num_hidden_layers"] = vision_layers
    folder.mkdir(parents=True, exist_ok=True)
    shapes = hf_shapes(CLIPModel, CLIPConfig(text_config=config["text_config"], vision_config=config["vision_config"],
                                             projection_dim=768))
    write_safetensors(folder / "model.safetensors", shapes, torch.float32, random_tensors(shapes, torch.float32))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(CLIP_L_336_PROCESSOR, indent=2))
    return {"parameters": sum(math.prod(s) for s in shapes.values()), "files": ["model.safetensors"]}
