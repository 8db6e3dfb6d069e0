"""Linear probes: where inside a projector does an attribute of the embedded default's videos get lost or slowed?

    python -m bench probe --projector cabstractor --attribute colour --cut stage1,stage2:in,readout --frozen both

A probe trains a projector up to a cut (any submodule; `name:in` is the submodule's input, e.g. `stage2:in` is the
C-Abstractor's pooled map) together with a linear head on the flattened tensor at that cut, to classify one
attribute of the video (colour, shape, motion or background), on the demo's cached features: the projector gets the
same data as in stage 1 but the head reads the attribute directly instead of through the LM. Accuracy is on the test
split (attribute combinations never seen in training) after each of --steps. `--frozen` keeps the projector at its
random init (head only): what the cut holds before any training. The cut is read with a forward hook, so the
projector is the one train.py builds (`ProjectorConfig` with the demo's options), not a copy.
"""
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from demo import NUM_SLOTS, assets_folder
from demo.synth import ATTRIBUTES
from formats.manifests import read_manifest
from projectors import ProjectorConfig, projector_from_config


def load_demo_features(assets: Path, cache_dir: Path, num_frames: int = 8) -> dict:
    """{split: (features (n, F, P, Dv) fp32, samples)} from the feature cache that a demo run filled."""
    from clip import load_clip_vision
    from features import FeatureCache
    tower = load_clip_vision(assets / "clip")
    cache = FeatureCache(cache_dir, tower=tower.fingerprint, num_frames=num_frames,
                         image_size=tower.config.image_size, layer=-2)
    splits = {}
    for split in ("train", "test"):
        samples = [s for s in read_manifest(assets / "data/manifest.jsonl") if s.split == split]
        loaded = [cache.load(s) for s in samples]
        if any(f is None for f in loaded):
            raise SystemExit(f"{cache_dir} lacks some {split} videos of {assets}: run the demo once "
                             "(python train.py) so that it encodes them")
        splits[split] = (torch.stack(loaded).float(), samples)
    return splits


def attribute_labels(samples, attribute: str) -> torch.Tensor:
    values = list(ATTRIBUTES[attribute])
    return torch.tensor([values.index(s.attributes[attribute]) for s in samples])


def capture(projector: nn.Module, cut: str) -> dict:
    """Register a hook that stores the tensor at `cut` (a submodule's output, or with ':in' its first input)."""
    name, _, side = cut.partition(":")
    module, held = projector.get_submodule(name), {}
    if side == "in":
        module.register_forward_pre_hook(lambda m, args: held.__setitem__("x", args[0]))
    else:
        module.register_forward_hook(lambda m, args, out: held.__setitem__("x", out))
    return held


def probe(splits: dict, projector_config: ProjectorConfig, attribute: str, cut: str, *, steps: list[int],
          frozen: bool, lr: float = 1e-3, batch_size: int = 32, seed: int = 0) -> dict:
    """Test accuracy of the attribute from the tensor at `cut` after each number of steps in `steps`."""
    torch.manual_seed(seed)
    (train_x, train_s), (test_x, test_s) = splits["train"], splits["test"]
    train_y, test_y = attribute_labels(train_s, attribute), attribute_labels(test_s, attribute)
    projector = projector_from_config(projector_config)
    held = capture(projector, cut)
    projector(train_x[:2])
    width = held["x"].numel() // 2  # values per video at the cut
    head = nn.Linear(width, len(ATTRIBUTES[attribute]))
    params = list(head.parameters()) + ([] if frozen else [p for p in projector.parameters()])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    projector.requires_grad_(not frozen)

    def logits(x: torch.Tensor) -> torch.Tensor:
        projector(x)
        return head(held["x"].reshape(len(x), -1))  # the cut's values of each video -> classes

    accuracy, order, start = {}, torch.Generator().manual_seed(seed), time.perf_counter()
    for step in range(1, max(steps) + 1):
        index = torch.randint(len(train_x), (batch_size,), generator=order)
        loss = F.cross_entropy(logits(train_x[index]), train_y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step in steps:
            with torch.no_grad():
                predicted = torch.cat([logits(x).argmax(-1) for x in test_x.split(100)])
            accuracy[step] = float((predicted == test_y).float().mean())
    return {"projector": projector_config.name, "attribute": attribute, "cut": cut, "frozen": frozen,
            "width": width, "accuracy": accuracy, "seconds": round(time.perf_counter() - start, 1)}


def demo_projector_config(name: str, vision_dim: int, llm_dim: int, **options) -> ProjectorConfig:
    """The projector the demo's train.py builds (16 visual tokens for the resamplers, 8 frames)."""
    requested = dict(num_queries=NUM_SLOTS, num_frames=8) | options
    return ProjectorConfig.requested(name, vision_dim, llm_dim, **requested)


def bench_probe(args) -> dict:
    import json
    assets = Path(args.assets)
    splits = load_demo_features(assets, Path(args.cache_dir))
    vision_dim = splits["train"][0].shape[-1]
    llm_dim = json.loads((assets / "llm/config.json").read_text())["hidden_size"]
    options = json.loads(args.options) if args.options else {}
    config = demo_projector_config(args.projector, vision_dim, llm_dim, **options)
    steps = [int(s) for s in args.steps.split(",")]
    frozen = {"both": [True, False], "yes": [True], "no": [False]}[args.frozen]
    results = []
    for cut in args.cut.split(","):
        for is_frozen in frozen:
            result = probe(splits, config, args.attribute, cut, steps=steps, frozen=is_frozen, lr=args.lr)
            results.append(result)
            print(f"{result['projector']:<12} {args.attribute:<10} {cut:<14} "
                  f"{'frozen' if is_frozen else 'trained':<8} width {result['width']:>6}  " +
                  "  ".join(f"{k} steps {v:.3f}" for k, v in result["accuracy"].items()) +
                  f"  ({result['seconds']} s)", flush=True)
    return {"assets": str(assets), "projector_config": config.__dict__, "results": results}


def add_parser(commands) -> None:
    probe_parser = commands.add_parser("probe", help="linear probes of an attribute at cuts inside a projector, on "
                                       "the embedded default's cached features")
    probe_parser.add_argument("--projector", default="cabstractor")
    probe_parser.add_argument("--attribute", choices=list(ATTRIBUTES), default="colour")
    probe_parser.add_argument("--cut", default="readout", help="submodules, comma-separated; NAME:in reads a "
                              "submodule's input (cabstractor: temporal,stage1,stage2:in,stage2,readout)")
    probe_parser.add_argument("--frozen", choices=["both", "yes", "no"], default="both",
                              help="yes: the projector stays at its random init, only the head trains")
    probe_parser.add_argument("--steps", default="40,160,320", help="report the test accuracy after these steps")
    probe_parser.add_argument("--lr", type=float, default=1e-3, help="AdamW, for the head and the projector")
    probe_parser.add_argument("--options", help="projector options as JSON, e.g. '{\"temporal_init_std\": 0.02}'")
    probe_parser.add_argument("--assets", default=str(assets_folder(".cache/demo")), help="a demo assets folder")
    probe_parser.add_argument("--cache-dir", default=".cache/features", help="the feature cache the demo filled")
    probe_parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    probe_parser.set_defaults(run=bench_probe)
