"""Evaluate a checkpoint on a labelled set: batched KV-cache captions, corpus and per-caption scores, report.html.

Metrics: METEOR, METEOR-coco, CIDEr-D, BLEU-4, chrF (and BERTScore P/R/F1 with --bertscore-model); each caption
also keeps its own METEOR and CIDEr-D, so failures can be sorted and studied.

    python evaluate.py runs/perceiver_dora/checkpoints/best_model.pt [--split test] [--batch-size 16]
    python evaluate.py CKPT --manifest other.jsonl [--split val]  # any labelled manifest: all samples, or a split
    torchrun --nproc-per-node 4 evaluate.py CKPT        # ranks split the videos; rank 0 gathers and scores

The model is rebuilt from the checkpoint's own config (base folders, projector, adapters); a checkpoint that does not
match the bases it is loaded onto is refused, naming the field (or the first tensor of another shape). Run by hand,
it writes predictions.json (text, references, per-caption scores), metrics.json and report.html into a folder of
its own for each split / manifest and settings, RUN/eval/{split}[-settings]/ or
RUN/eval/{manifest stem}-{hash}-{split}[-settings]/ (the hash covers the manifest's resolved path and content, so two
manifests named alike never share a folder), or --output-dir (train.py's layout). It never writes over the run's
own files (RUN/samples/, RUN/logs/, checkpoints, config.json: only train.py's final test writes them), whatever path
spelling leads there, and never over an earlier evaluation without --overwrite. Every flag, the checkpoint, the base
folders' files and the output files are checked before a model is loaded; the table is printed before anything is
written.
"""
import argparse
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from data import load_splits
from features import FeatureCache, batch_features, collate_features, prepare_splits, video_dataset
from formats.manifests import read_manifest
from infra import options
from infra.checkpoint import atomic_write_text, base_identity_today, load_checkpoint, peak_memory
from infra.distributed import Distributed, compute_dtype, default_device, gather, setup_distributed, shard, \
    teardown_distributed
from infra.errors import UserError, user_errors
from infra.paths import check_output_file, file_problem
from infra.preflight import check_bases, check_checkpoint, check_trainable_shapes, run_folder_of
from metrics import format_metrics_table, score_captions
from pruning import REDUCTIONS
from report import render_report
from vlm import VLMConfig, build_vlm, describe_mismatch, merged_for_eval

DEFAULT_DECODING = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0,
                    "no_repeat_ngram_size": 0}
SETTING_NAMES = {"do_sample": "sample", "temperature": "t", "top_p": "p", "repetition_penalty": "rp",
                 "no_repeat_ngram_size": "nr"}


@torch.no_grad()
def generate_captions(model, samples, cache: FeatureCache | None, *, batch_size: int, max_new_tokens: int, run,
                      with_loss: bool, decoding: dict) -> tuple[list[dict], float, int, float]:
    """This rank's caption rows (and summed first-reference loss and its token count), and the seconds taken."""
    dataset = video_dataset(samples, cache, num_frames=model.config.num_frames, processing=model.vision.processing)
    mine = shard(list(range(len(samples))), run.rank, run.world)
    rows, loss_sum, loss_tokens, started = [], 0.0, 0, time.perf_counter()
    device = next(model.projector.parameters()).device
    for first in range(0, len(mine), batch_size):
        chunk = mine[first:first + batch_size]
        batch = collate_features([dataset[index] for _, index in chunk])
        features = batch_features(model, batch, device)  # (B, F, P, Dv)
        captions = model.generate(features, max_new_tokens=max_new_tokens, **decoding)
        if with_loss:
            first_refs = [refs[0] for refs in batch["captions"]]
            tokens = model.count_label_tokens(first_refs)
            loss_sum += float(model(features, first_refs)) * tokens
            loss_tokens += tokens
        rows += [{"index": index, "id": batch["ids"][i], "video": batch["videos"][i], **span(samples[index]),
                  "prediction": captions[i], "references": batch["captions"][i]} for i, (_, index) in enumerate(chunk)]
    return rows, loss_sum, loss_tokens, time.perf_counter() - started


def span(sample) -> dict:
    """{"start", "end"} of a segment sample, {} for a whole video."""
    return {} if sample.start is None else {"start": sample.start, "end": sample.end}


def evaluate_split(model, samples, cache: FeatureCache | None, *, batch_size: int = 16, max_new_tokens: int = 64,
                   run=None, with_loss: bool = False, decoding: dict | None = None, bertscore_model=None,
                   bertscore_layer: int = 9) -> dict:
    """Captions for every sample (and the teacher-forced loss on each first reference when with_loss), scored as a
    corpus and one by one. Without a cache, the vision tower encodes each batch's frames."""
    run = run or Distributed()
    was_training = model.training
    model.eval()
    decoding = DEFAULT_DECODING | (decoding or {})
    rows, loss_sum, loss_tokens, seconds = generate_captions(model, samples, cache, batch_size=batch_size,
                                                             max_new_tokens=max_new_tokens, run=run,
                                                             with_loss=with_loss, decoding=decoding)
    unique = {row["index"]: row for row in gather(rows, run)}
    predictions = [unique[i] for i in sorted(unique)]
    losses = gather([(loss_sum, loss_tokens)], run)
    model.train(was_training)
    metrics = {}
    if predictions:
        metrics, per_caption = score_captions([p["prediction"] for p in predictions],
                                              [p["references"] for p in predictions],
                                              bertscore_model=bertscore_model, bertscore_layer=bertscore_layer)
        for p, scores in zip(predictions, per_caption):
            p |= scores
    device = next(model.projector.parameters()).device
    return {"predictions": predictions, "metrics": metrics,
            "loss": sum(s for s, _ in losses) / max(1, sum(n for _, n in losses)) if with_loss else None,
            "speed": {"captions_per_s": len(rows) * run.world / seconds if seconds else 0.0,
                      "mean_latency_s": seconds / max(1, len(rows)), "device": str(device),
                      "peak_memory": peak_memory(device)},
            "decoding": {"max_new_tokens": max_new_tokens, "greedy": not decoding["do_sample"], **decoding}}


def rebuild_model(checkpoint: dict, *, clip: str | None, llm: str | None, device, dtype, where: str = "checkpoint"):
    """The model a checkpoint was trained as, on its own bases (or --vision / --llm), refusing any mismatch."""
    saved = VLMConfig(**checkpoint["vlm_config"])
    config = VLMConfig(**{**checkpoint["vlm_config"], "clip_path": clip or saved.clip_path,
                          "llm_path": llm or saved.llm_path})
    model = build_vlm(config, device=device, dtype=dtype)
    check_rebuilt(saved, model, checkpoint["trainable"], where)
    model.load_trainable_state_dict(checkpoint["trainable"])
    return model


def check_rebuilt(saved: VLMConfig, model, trainable: dict, where: str) -> None:
    """The rebuilt model is the one the checkpoint was trained as: the same bases (as they are today), projector,
    adapters, vision layer, frames and quantization, and trainable tensors of its shapes; else one line."""
    saved = replace(saved, base_identity=base_identity_today(saved.base_identity, model.config.base_identity,
                                                             {"vision": model.config.clip_path,
                                                              "llm": model.config.llm_path}))
    for name in ("base_identity", "projector", "adapter", "vision_layer", "num_frames", "quant"):
        difference = describe_mismatch({name: getattr(saved, name)}, {name: getattr(model.config, name)})
        if difference:
            raise UserError(f"checkpoint does not match the model: {difference}")
    check_trainable_shapes(trainable, model, where)


def run_splits(train_config: dict) -> dict[str, list]:
    """The splits a checkpoint's run trained and validated on, from its saved options."""
    return load_splits(train_config["train_manifest"], val_manifest=train_config["val_manifest"],
                       test_manifest=train_config["test_manifest"], seed=train_config["seed"],
                       val_fraction=train_config["val_fraction"], test_fraction=train_config["test_fraction"])


def select_samples(train_config: dict, split: str | None, manifest) -> tuple[list, str]:
    """(samples, a name for them): a manifest's samples (of one split, or all), else the run's own split."""
    if manifest is None:
        split = split or "test"
        samples = run_splits(train_config)[split]
        if not samples:
            raise UserError(f"the run's {split} split is empty; choose another --split or give --manifest")
        return samples, split
    samples = read_manifest(manifest)
    if split:
        found = sorted({str(s.split) for s in samples})
        samples = [s for s in samples if s.split == split]
        if not samples:
            raise UserError(f"{manifest}: no sample has split {split!r} (its splits: {', '.join(found)}); leave "
                             f"out --split to evaluate all its samples")
    return samples, samples_name(manifest, split)


def samples_name(manifest, split: str | None) -> str:
    """The run's split by its name; a manifest by its stem (its first 64 bytes), a short hash of its resolved path and
    content (or a label folder's file names and sizes), and the split: two different manifests never share a name."""
    if manifest is None:
        return split or "test"
    path = Path(manifest).resolve()
    digest = hashlib.sha256(str(path).encode() + b"\0")
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            digest.update(f"{file.relative_to(path)}:{file.stat().st_size if file.is_file() else '-'}\n".encode())
    else:
        digest.update(path.read_bytes())
    stem = Path(manifest).stem.encode()[:64].decode("utf-8", errors="ignore")  # the hash tells long names apart
    return f"{stem}-{digest.hexdigest()[:8]}-{split or 'all'}"


def output_files(checkpoint_path, name: str, output_dir, decoding: dict, max_new_tokens: int) -> tuple[Path, ...]:
    """(predictions, metrics, report): under output_dir in train.py's layout, else in evaluation_folder()."""
    if output_dir is not None:
        out = Path(output_dir)
        return (out / "samples" / "predictions.json", out / "logs" / "final_metrics.json",
                out / "samples" / "report.html")
    out = evaluation_folder(checkpoint_path, name, decoding, max_new_tokens)
    return out / "predictions.json", out / "metrics.json", out / "report.html"


def evaluation_folder(checkpoint_path, name: str, decoding: dict, max_new_tokens: int) -> Path:
    """RUN/eval/[checkpoint-]{name}[-settings]: one folder per checkpoint, samples and decoding settings."""
    run_folder = Path(checkpoint_path).resolve().parent.parent
    stem = Path(checkpoint_path).stem
    settings = [f"{SETTING_NAMES[k]}{v:g}" if not isinstance(v, bool) else SETTING_NAMES[k]
                for k, v in decoding.items() if v != DEFAULT_DECODING[k]]
    settings += [f"n{max_new_tokens}"] if max_new_tokens != 64 else []
    return run_folder / "eval" / "-".join(([] if stem == "best_model" else [stem]) + [name] + settings)


def evaluate_checkpoint(path, *, split: str | None = "test", manifest=None, batch_size: int = 16,
                        max_new_tokens: int = 64, run=None, clip=None, llm=None, output_dir=None, decoding=None,
                        show: bool = True, report: bool = True, bertscore_model=None, bertscore_layer: int = 9,
                        merge_for_eval: str = "no", asked_reduction: dict | None = None, model=None) -> dict:
    """Evaluate a checkpoint on its run's split or on a manifest. With output_dir (train.py's final test), the
    results go to output_dir/samples/ and output_dir/logs/final_metrics.json; else to evaluation_folder().
    merge_for_eval "auto" / "yes" generates with the adapters folded into a bf16 copy of the base (vlm.merged_for_eval;
    "auto" on a CUDA device with room for it only: on a CPU bf16 GEMMs may be emulated); "no" keeps the 4-bit path.
    The visual tokens are reduced as in training (the checkpoint's token_reduction); asked_reduction
    ({"token_reduction", "visual_tokens"}, from the command line) is only checked against it. `model`: the run's own
    model, still in memory (train.py's final test), takes the checkpoint's trainable weights instead of a rebuild."""
    run = run or Distributed(device=default_device())
    checkpoint = check_checkpoint(load_checkpoint(path), path)
    check_asked_reduction(checkpoint["vlm_config"], **(asked_reduction or {}))
    train_config = checkpoint["train_config"]  # plain data: the options the run was trained with
    samples, name = select_samples(train_config, split, manifest)
    if model is None:
        model = rebuild_model(checkpoint, clip=clip, llm=llm, device=run.device,
                              dtype=compute_dtype(train_config["dtype"], run.device), where=str(path))
    else:
        model.load_trainable_state_dict(checkpoint["trainable"])
    if merge_for_eval == "yes" or (merge_for_eval == "auto" and run.device.type == "cuda"):
        model, note = merged_for_eval(model, merge_for_eval)
        if show and run.is_main:
            print(f"generation: {note}")
    cache_dir = train_config["cache_dir"] if train_config["feature_cache"] else None
    splits, cache = prepare_splits(model, {name: samples}, cache_dir=cache_dir, skip_bad=train_config["skip_bad"],
                                   run=run, show_progress=show and run.is_main)
    decoding = DEFAULT_DECODING | (decoding or {})
    results = evaluate_split(model, splits[name], cache, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             run=run, decoding=decoding, bertscore_model=bertscore_model,
                             bertscore_layer=bertscore_layer)
    results |= {"checkpoint": str(path), "split": split, "manifest": str(manifest) if manifest else None,
                "name": name}
    if run.is_main:
        if show:
            print_report(results)
        files = output_files(path, name, output_dir, decoding, max_new_tokens)
        write_outputs(results, *files, num_frames=model.config.num_frames if report else None)
        results["output_files"] = [str(f) for f in files]
        if show:
            print(f"\nwrote {', '.join(str(f) for f in files[:2 + bool(report)])}")
    return results


def write_outputs(results: dict, predictions_path: Path, metrics_path: Path, report_path: Path, *,
                  num_frames: int | None) -> None:
    """predictions (text, references, per-caption scores), the metrics summary, and the report (num_frames given)."""
    keep = ("id", "video", "start", "end", "prediction", "references", "meteor", "cider_d", "bertscore_p", "bertscore_r",
            "bertscore_f1")
    predictions = [{k: p[k] for k in keep if k in p} for p in results["predictions"]]
    atomic_write_text(predictions_path, json.dumps(predictions, ensure_ascii=False, indent=1))
    summary = {k: results[k] for k in ("checkpoint", "split", "manifest", "metrics", "decoding", "speed")}
    summary["num_videos"] = len(predictions)
    if "bertscore_f1" not in results["metrics"]:
        summary["bertscore"] = "not computed: give --bertscore-model DIR (a BERT snapshot folder) to add it"
    atomic_write_text(metrics_path, json.dumps(summary, ensure_ascii=False, indent=1))
    if num_frames is not None:
        header = {"run": Path(results["checkpoint"]).resolve().parent.parent, "checkpoint": results["checkpoint"],
                  "samples": results["name"] + (f" of {results['manifest']}" if results["manifest"] else ""),
                  "decoding": ", ".join(f"{k}={v}" for k, v in results["decoding"].items()),
                  "speed": f"{results['speed']['captions_per_s']:.2f} captions/s on {results['speed']['device']}, "
                           f"{results['speed']['peak_memory']}"}
        atomic_write_text(report_path, render_report(f"kovlm evaluation: {results['name']}", header,
                                                     results["metrics"], predictions, num_frames=num_frames))


def print_report(results: dict, examples: int = 5) -> None:
    print(f"\n{results['name']}: {len(results['predictions'])} videos "
          f"({results['speed']['captions_per_s']:.1f} captions/s, {results['speed']['peak_memory']})")
    print(format_metrics_table(results["metrics"]))
    ranked = sorted(results["predictions"], key=lambda p: p["meteor"])
    for title, rows in (("worst", ranked[:examples]), ("best", ranked[::-1][:examples])):
        print(f"\n{examples} {title} captions by METEOR:")
        for p in rows:
            print(f"  {p['meteor']:.3f}  {p['prediction']}\n         refs: {' | '.join(p['references'])}")


def add_reduction_checks(parser: argparse.ArgumentParser) -> None:
    """--token-reduction / --visual-tokens of evaluate.py and caption.py: a checkpoint is always read with the
    reduction it was trained with (train.py records it), so these only state what the caller expects."""
    parser.add_argument("--token-reduction", choices=REDUCTIONS, help="refuse a checkpoint not trained with this "
                        "token reduction (default: use the checkpoint's, which is always what is applied)")
    parser.add_argument("--visual-tokens", type=int, help="refuse a checkpoint not trained to keep this many visual "
                        "tokens per video")


def check_asked_reduction(saved: dict, token_reduction: str | None = None, visual_tokens: int | None = None) -> None:
    """Refuse, in one line, a reduction other than the one a model config (a checkpoint's vlm_config) was trained
    with; a config written before reductions existed trained with none."""
    trained = saved.get("token_reduction", "none"), saved.get("visual_tokens")
    if (token_reduction or trained[0], trained[1] if visual_tokens is None else visual_tokens) != trained:
        as_trained = f"--token-reduction {trained[0]}" + (f" --visual-tokens {trained[1]}" if trained[1] else "")
        raise UserError(f"this model was trained with {as_trained} and always reads videos so; drop "
                         "--token-reduction / --visual-tokens or give those")


def add_decoding_options(parser: argparse.ArgumentParser) -> None:
    """The decoding flags evaluate.py and caption.py share."""
    parser.add_argument("--batch-size", type=int, default=16, help="videos per generation batch")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="caption length limit in tokens")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL's penalty on repeated tokens")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0, help="forbid repeating n-grams of this size")


def decoding_from_args(args: argparse.Namespace) -> dict:
    return {"do_sample": args.do_sample, "temperature": args.temperature, "top_p": args.top_p,
            "repetition_penalty": args.repetition_penalty, "no_repeat_ngram_size": args.no_repeat_ngram_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a model checkpoint (best_model.pt, final_model.pt, ...)")
    parser.add_argument("--manifest", help="a labelled manifest to evaluate on instead of the run's own splits")
    parser.add_argument("--split", choices=["train", "val", "test"],
                        help="which split (default: test of the run's splits; all samples of --manifest)")
    parser.add_argument("--vision", "--clip", dest="clip", metavar="DIR", help="vision tower folder instead of the "
                        "one the checkpoint names (--clip is an alias of --vision)")
    parser.add_argument("--llm", help="Qwen3 folder instead of the one the checkpoint names")
    parser.add_argument("--output-dir", help="write samples/ and logs/ here (train.py's layout) instead of RUN/eval/")
    parser.add_argument("--no-report", action="store_true", help="skip report.html")
    parser.add_argument("--bertscore-model", help="a BERT snapshot folder: adds BERTScore P/R/F1 (absent without)")
    parser.add_argument("--bertscore-layer", type=int, default=9, help="BERT layer whose embeddings BERTScore uses")
    parser.add_argument("--merge-for-eval", choices=["auto", "yes", "no"], default="auto",
                        help="generate with the adapters folded into a bf16 copy of the base (auto: on a CUDA GPU "
                             "with room for it; no: the 4-bit path, as training validates)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier evaluation")
    add_decoding_options(parser)
    add_reduction_checks(parser)
    args = parser.parse_args(argv)
    with user_errors():
        check_command(args)
        run = setup_distributed()
        evaluate_checkpoint(args.checkpoint, split=args.split, manifest=args.manifest, batch_size=args.batch_size,
                            run=run, max_new_tokens=args.max_new_tokens, clip=args.clip, llm=args.llm,
                            output_dir=args.output_dir, decoding=decoding_from_args(args), report=not args.no_report,
                            bertscore_model=args.bertscore_model, bertscore_layer=args.bertscore_layer,
                            merge_for_eval=args.merge_for_eval, asked_reduction={
                                "token_reduction": args.token_reduction, "visual_tokens": args.visual_tokens})
        teardown_distributed(run)


def check_command(args: argparse.Namespace) -> None:
    """Everything evaluate.py can check before a model loads: the flags, the inputs, the checkpoint's fields, the
    base folders' files and token limit, and the three output files (see the module docstring)."""
    options.at_least("batch_size", args.batch_size, 1)
    options.at_least("bertscore_layer", args.bertscore_layer, 0)
    options.check_decoding(args.max_new_tokens, decoding_from_args(args))
    for path, what in ((args.checkpoint, "checkpoint"), (args.manifest, "--manifest")):
        if path is not None and (problem := file_problem(path)) and not (what == "--manifest" and Path(path).is_dir()):
            raise UserError(f"{path}: {problem} ({what})")
    if args.bertscore_model is not None and not Path(args.bertscore_model).is_dir():
        raise UserError(f"--bertscore-model {args.bertscore_model}: no such folder")
    checkpoint = check_checkpoint(load_checkpoint(args.checkpoint), args.checkpoint)
    vlm_config = checkpoint["vlm_config"]
    check_bases(vlm_config, args.clip or vlm_config["clip_path"], args.llm or vlm_config["llm_path"],
                args.max_new_tokens)
    name = samples_name(args.manifest, args.split)
    files = output_files(args.checkpoint, name, args.output_dir, DEFAULT_DECODING | decoding_from_args(args),
                         args.max_new_tokens)
    run = [folder] if (folder := run_folder_of(args.checkpoint)) else []
    for file in files[:2] if args.no_report else files:
        check_output_file(file, overwrite=args.overwrite, flag="--output-dir" if args.output_dir else "",
                          runs=run)


if __name__ == "__main__":
    main()
