"""The model benchmark's sizes and the random snapshot folders both stacks load.

A Preset names the shapes of a random Qwen3 and CLIP vision tower and the workloads run on them (batch sizes,
caption length, repeats). write_snapshots writes those models once as ordinary Hugging Face snapshot folders
(config.json, sharded safetensors with an index, tokenizer.json), so kovlm's loaders and transformers'
from_pretrained read the same files the normal way.
"""
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer


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
    preset = replace(PRESETS[name], name=f"{name} (quick)", **QUICK) if quick else PRESETS[name]
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
    """The preset's random Qwen3 (bf16, with tokenizer.json) and CLIP vision tower (fp32) as snapshot folders,
    written once; a root already holding this preset's folders is reused."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen3Config, Qwen3ForCausalLM
    folders = {"llm": root / "llm", "clip": root / "clip"}
    marker = root / "preset.json"
    if marker.exists() and json.loads(marker.read_text()) == asdict(preset):
        return folders
    tokenizer = write_tokenizer(folders["llm"], preset.vocab_size)
    # no eos_token_id: transformers' generate then never stops early, as ours is told not to (equal work)
    llm = Qwen3Config(vocab_size=preset.vocab_size, hidden_size=preset.hidden_size, head_dim=preset.head_dim,
                      intermediate_size=preset.intermediate_size, num_hidden_layers=preset.layers,
                      num_attention_heads=preset.heads, num_key_value_heads=preset.kv_heads, rope_theta=1e6,
                      max_position_embeddings=40960, tie_word_embeddings=False, dtype="bfloat16",
                      pad_token_id=tokenizer.token_to_id("<|endoftext|>"))
    clip = CLIPVisionConfig(hidden_size=preset.vision_hidden, intermediate_size=preset.vision_intermediate,
                            num_hidden_layers=preset.vision_layers, num_attention_heads=preset.vision_heads,
                            image_size=preset.image_size, patch_size=preset.patch_size)
    for folder, config, model_class, dtype in ((folders["llm"], llm, Qwen3ForCausalLM, torch.bfloat16),
                                               (folders["clip"], clip, CLIPVisionModel, torch.float32)):
        config.save_pretrained(folder)
        with torch.device("meta"):
            shapes = {name: t.shape for name, t in model_class(config).state_dict().items()}
        write_random_weights(folder, shapes, dtype, device, shard_bytes)
    marker.write_text(json.dumps(asdict(preset)))
    return folders
