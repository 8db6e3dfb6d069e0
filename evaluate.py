"""Evaluate a checkpoint: batched KV-cache captions over a split, then METEOR, METEOR-coco, CIDEr-D, BLEU-4, chrF.

    python evaluate.py runs/perceiver_dora/checkpoints/best_model.pt [--split test] [--batch-size 16]
    torchrun --nproc-per-node 4 evaluate.py CKPT        # ranks split the videos; rank 0 gathers and scores

The model is rebuilt from the checkpoint's own config (base folders, projector, adapters); a checkpoint that does not
match the bases it is loaded onto is refused, naming the field. Writes samples/predictions.json and
logs/final_metrics.json next to the checkpoint's run folder (or under --output-dir).
"""
import argparse
import json
import time
from pathlib import Path

import torch

from checkpoint import load_checkpoint, peak_memory
from data import load_splits
from distributed import Distributed, compute_dtype, default_device, gather, setup_distributed, shard, \
    teardown_distributed
from features import FeatureCache, batch_features, collate_features, prepare_splits, video_dataset
from metrics import evaluate_captions, meteor_sentence
from vlm import VLMConfig, build_vlm, describe_mismatch


@torch.no_grad()
def evaluate_split(model, samples, cache: FeatureCache | None, *, batch_size: int = 16, max_new_tokens: int = 64,
                   run=None, with_loss: bool = False, decoding: dict | None = None) -> dict:
    """Captions for every sample (and the teacher-forced loss on each first reference when with_loss), scored.
    Without a cache, the vision tower encodes each batch's frames."""
    run = run or Distributed()
    was_training = model.training
    model.eval()
    dataset = video_dataset(samples, cache, num_frames=model.config.num_frames,
                            image_size=model.vision.config.image_size)
    mine = shard(list(range(len(samples))), run.rank, run.world)
    rows, loss_sum, loss_tokens, started = [], 0.0, 0, time.perf_counter()
    device = next(model.projector.parameters()).device
    for first in range(0, len(mine), batch_size):
        chunk = mine[first:first + batch_size]
        batch = collate_features([dataset[index] for _, index in chunk])
        features = batch_features(model, batch, device)  # (B, F, P, Dv)
        captions = model.generate(features, max_new_tokens=max_new_tokens, **(decoding or {}))
        if with_loss:
            first_refs = [refs[0] for refs in batch["captions"]]
            tokens = model.count_label_tokens(first_refs)
            loss_sum += float(model(features, first_refs)) * tokens
            loss_tokens += tokens
        rows += [{"index": index, "id": batch["ids"][i], "video": batch["videos"][i], "prediction": captions[i],
                  "references": batch["captions"][i]} for i, (_, index) in enumerate(chunk)]
    seconds = time.perf_counter() - started
    unique = {row["index"]: row for row in gather(rows, run)}
    predictions = [unique[i] for i in sorted(unique)]
    losses = gather([(loss_sum, loss_tokens)], run)
    model.train(was_training)
    hyps, refs = [p["prediction"] for p in predictions], [p["references"] for p in predictions]
    for p in predictions:
        p["meteor"] = meteor_sentence(p["prediction"], p["references"])
    return {"predictions": predictions, "metrics": evaluate_captions(hyps, refs) if predictions else {},
            "loss": sum(s for s, _ in losses) / max(1, sum(n for _, n in losses)) if with_loss else None,
            "speed": {"captions_per_s": len(rows) * run.world / seconds if seconds else 0.0,
                      "mean_latency_s": seconds / max(1, len(rows)), "device": str(device),
                      "peak_memory": peak_memory(device)},
            "decoding": {"max_new_tokens": max_new_tokens, "greedy": not (decoding or {}).get("do_sample", False),
                         **(decoding or {})}}


def rebuild_model(checkpoint: dict, *, clip: str | None, llm: str | None, device, dtype):
    """The model a checkpoint was trained as, on its own bases (or --clip / --llm), refusing any mismatch."""
    saved = VLMConfig(**checkpoint["vlm_config"])
    config = VLMConfig(**{**checkpoint["vlm_config"], "clip_path": clip or saved.clip_path,
                          "llm_path": llm or saved.llm_path})
    model = build_vlm(config, device=device, dtype=dtype)
    for name in ("base_identity", "projector", "adapter", "vision_layer", "num_frames", "quant"):
        difference = describe_mismatch({name: getattr(saved, name)}, {name: getattr(model.config, name)})
        if difference:
            raise ValueError(f"checkpoint does not match the model: {difference}")
    model.load_trainable_state_dict(checkpoint["trainable"])
    return model


def evaluate_checkpoint(path, *, split: str = "test", batch_size: int = 16, max_new_tokens: int = 64, run=None,
                        clip=None, llm=None, output_dir=None, decoding=None, show: bool = True) -> dict:
    run = run or Distributed(device=default_device())
    checkpoint = load_checkpoint(path)
    train_config = checkpoint["train_config"]  # plain data: the options the run was trained with
    model = rebuild_model(checkpoint, clip=clip, llm=llm, device=run.device,
                          dtype=compute_dtype(train_config["dtype"], run.device))
    cache_dir = train_config["cache_dir"] if train_config["feature_cache"] else None
    splits, cache = prepare_splits(model, {split: run_splits(train_config)[split]}, cache_dir=cache_dir,
                                   skip_bad=train_config["skip_bad"], run=run, show_progress=show and run.is_main)
    samples = splits[split]
    results = evaluate_split(model, samples, cache, batch_size=batch_size, max_new_tokens=max_new_tokens, run=run,
                             decoding=decoding)
    results |= {"checkpoint": str(path), "split": split}
    if run.is_main:
        out = Path(output_dir) if output_dir else Path(path).resolve().parent.parent
        write_outputs(results, out)
        if show:
            print_report(results)
    return results


def run_splits(train_config: dict) -> dict[str, list]:
    """The splits a checkpoint's run trained and validated on, from its saved options."""
    return load_splits(train_config["train_manifest"], val_manifest=train_config["val_manifest"],
                       test_manifest=train_config["test_manifest"], seed=train_config["seed"],
                       val_fraction=train_config["val_fraction"], test_fraction=train_config["test_fraction"])


def write_outputs(results: dict, out: Path) -> None:
    (out / "samples").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    predictions = [{k: p[k] for k in ("id", "video", "prediction", "references")} for p in results["predictions"]]
    (out / "samples" / "predictions.json").write_text(json.dumps(predictions, ensure_ascii=False, indent=1))
    summary = {k: results[k] for k in ("checkpoint", "split", "metrics", "decoding", "speed")}
    summary["num_videos"] = len(predictions)
    (out / "logs" / "final_metrics.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1))


def print_report(results: dict, examples: int = 5) -> None:
    print(f"\n{results['split']} split, {len(results['predictions'])} videos "
          f"({results['speed']['captions_per_s']:.1f} captions/s, {results['speed']['peak_memory']})")
    for name, metric in results["metrics"].items():
        print(f"  {name:<12} {metric['value']:.4f}   {metric['reference']}")
    ranked = sorted(results["predictions"], key=lambda p: p["meteor"])
    for title, rows in (("worst", ranked[:examples]), ("best", ranked[::-1][:examples])):
        print(f"\n{examples} {title} captions by METEOR:")
        for p in rows:
            print(f"  {p['meteor']:.3f}  {p['prediction']}\n         refs: {' | '.join(p['references'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a model checkpoint (best_model.pt, final_model.pt, ...)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--clip", help="CLIP folder instead of the one the checkpoint names")
    parser.add_argument("--llm", help="Qwen3 folder instead of the one the checkpoint names")
    parser.add_argument("--output-dir", help="where samples/ and logs/ go (default: the checkpoint's run folder)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0)
    args = parser.parse_args()
    run = setup_distributed()
    decoding = {"do_sample": args.do_sample, "temperature": args.temperature, "top_p": args.top_p,
                "repetition_penalty": args.repetition_penalty, "no_repeat_ngram_size": args.no_repeat_ngram_size}
    try:
        evaluate_checkpoint(args.checkpoint, split=args.split, batch_size=args.batch_size, run=run,
                            max_new_tokens=args.max_new_tokens, clip=args.clip, llm=args.llm,
                            output_dir=args.output_dir, decoding=decoding)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")
    teardown_distributed(run)


if __name__ == "__main__":
    main()
