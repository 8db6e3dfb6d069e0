"""evaluate.py end to end on a tiny trained checkpoint: the files, per-caption scores, the report, any manifest, a
folder of its own per evaluation (the run's test results untouched, by any path spelling; two manifests of one name
apart), a refused mismatch, flags and damaged inputs refused before loading, torchrun == one process."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_clip

import evaluate
from evaluate import evaluate_checkpoint
from infra.distributed import setup_distributed
from metrics import cider_scores, meteor_sentence
from train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tiny_bases, tiny_manifest, tmp_path_factory):
    clip, llm = tiny_bases
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(clip=str(clip), llm=str(llm), train_manifest=str(tiny_manifest), output_dir=str(out),
                      cache_dir=str(out / "cache"), projector="crossattn", peft="lora", stage1_epochs=1,
                      stage2_epochs=1, batch_size=4, grad_accum=1, lora_r=4, num_frames=3, num_queries=4,
                      max_new_tokens=5, num_workers=0, dtype="fp32")
    assert train(cfg, setup_distributed()) is not None
    return out / "checkpoints" / "best_model.pt"


def test_evaluate_writes_predictions_and_metrics(trained, tiny_manifest, tmp_path):
    results = evaluate_checkpoint(trained, split="val", batch_size=3, max_new_tokens=5, output_dir=tmp_path,
                                  decoding={"repetition_penalty": 1.2, "no_repeat_ngram_size": 2})
    predictions = json.loads((tmp_path / "samples" / "predictions.json").read_text())
    assert [p["id"] for p in predictions] == ["v12", "v13", "v14", "v15"]  # the val split, in manifest order
    assert [p["prediction"] for p in predictions] == [p["prediction"] for p in results["predictions"]]
    manifest = {row["id"]: row["captions"] for row in map(json.loads, tiny_manifest.read_text().splitlines())}
    assert [p["references"] for p in predictions] == [manifest[p["id"]] for p in predictions]
    metrics = json.loads((tmp_path / "logs" / "final_metrics.json").read_text())
    assert set(metrics["metrics"]) == {"meteor", "meteor_coco", "cider_d", "bleu4", "chrf"}
    assert all(m["reference"] for m in metrics["metrics"].values())
    assert metrics["decoding"] == {"max_new_tokens": 5, "greedy": True, "do_sample": False, "temperature": 1.0,
                                   "top_p": 1.0, "repetition_penalty": 1.2, "no_repeat_ngram_size": 2}
    speed = metrics["speed"]  # one process: captions/s = 4 / seconds and latency = seconds / 4
    assert speed["captions_per_s"] * speed["mean_latency_s"] == pytest.approx(1.0, rel=1e-9)
    assert speed["captions_per_s"] == results["speed"]["captions_per_s"]
    assert metrics["metrics"]["meteor"]["value"] == results["metrics"]["meteor"]["value"]
    assert "--bertscore-model" in metrics["bertscore"]  # absent, and the file says how to add it
    hyps, refs = [p["prediction"] for p in predictions], [p["references"] for p in predictions]
    assert [p["meteor"] for p in predictions] == [meteor_sentence(h, r) for h, r in zip(hyps, refs)]
    assert [p["cider_d"] for p in predictions] == cider_scores(hyps, refs)
    page = (tmp_path / "samples" / "report.html").read_text(encoding="utf-8")
    assert page.count('<tr class="video">') == 4 and page.count("data:image/jpeg") == 4 * 3


def test_any_manifest_all_samples_or_one_split(trained, tiny_manifest, tmp_path):
    lines = [json.loads(line) for line in tiny_manifest.read_text().splitlines()]
    other = tmp_path / "other.jsonl"  # videos of the run's train split, relabelled: another labelled set
    other.write_text("".join(json.dumps(dict(r, video=str(tiny_manifest.parent / r["video"]),
                                             split="val" if i < 2 else "test"), ensure_ascii=False) + "\n"
                             for i, r in enumerate(lines[:5])))
    every = evaluate_checkpoint(trained, split=None, manifest=other, batch_size=4, max_new_tokens=4, show=False,
                                report=False)
    assert [p["id"] for p in every["predictions"]] == ["v0", "v1", "v2", "v3", "v4"]
    folder = trained.parent.parent / "eval" / f"{evaluate.samples_name(other, None)}-n4"
    assert folder.name.startswith("other-") and folder.name.endswith("-all-n4")  # stem, hash, split, settings
    assert json.loads((folder / "metrics.json").read_text())["num_videos"] == 5
    val = evaluate_checkpoint(trained, split="val", manifest=other, batch_size=4, max_new_tokens=4, show=False,
                              report=False)
    assert [p["id"] for p in val["predictions"]] == ["v0", "v1"]
    with pytest.raises(ValueError, match="no sample has split 'train'"):
        evaluate_checkpoint(trained, split="train", manifest=other, show=False)


def test_by_hand_it_writes_its_own_folder_and_leaves_the_test_results(trained, tmp_path):
    run = trained.parent.parent
    evaluate_checkpoint(trained, split="test", batch_size=4, max_new_tokens=5, output_dir=run, show=False)
    owned = [run / "logs" / "final_metrics.json", run / "samples" / "predictions.json"]
    before = [f.read_bytes() for f in owned]
    result = run_evaluate("evaluate.py", str(trained), "--split", "val", "--max-new-tokens", "5",
                          "--repetition-penalty", "1.2")
    assert result.returncode == 0, result.stderr[-2000:]
    folder = run / "eval" / "val-rp1.2-n5"
    assert {f.name for f in folder.iterdir()} == {"predictions.json", "metrics.json", "report.html"}
    assert [f.read_bytes() for f in owned] == before  # the run's own test results are untouched
    assert result.stdout.index("meteor ") < result.stdout.index("wrote ")  # the table comes first


def test_the_table_is_printed_even_when_writing_fails(trained, tmp_path, monkeypatch, capsys):
    def full_disk(path, text):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(evaluate, "atomic_write_text", full_disk)
    with pytest.raises(OSError):
        evaluate_checkpoint(trained, split="val", batch_size=4, max_new_tokens=3, output_dir=tmp_path)
    assert "meteor " in capsys.readouterr().out


def test_help_shows_every_default():
    shown = run_evaluate("evaluate.py", "--help", COLUMNS="200").stdout
    assert "(default: 16)" in shown and "(default: 64)" in shown and "(default: 9)" in shown


def run_evaluate(*args, **env):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **env))


def test_a_checkpoint_on_another_tower_is_refused_in_one_line(trained, tmp_path):
    other = save_tiny_clip(tmp_path / "other_clip", full=False, hidden_size=32, image_size=28, patch_size=7, seed=5)
    result = run_evaluate("evaluate.py", str(trained), "--clip", str(other), "--output-dir", str(tmp_path))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint does not match the model: base_identity.vision.weights: checkpoint has ")
    assert "Traceback" not in result.stderr


def test_not_a_checkpoint_is_refused_in_one_line(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    result = run_evaluate("evaluate.py", str(tmp_path / "notes.pt"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "not a readable kovlm checkpoint" in result.stderr.strip().splitlines()[-1]


def test_three_processes_give_the_single_process_results(trained, tmp_path):
    """4 videos over 3 ranks: one rank repeats a video to keep the batches even; the gather drops the repeat."""
    single = evaluate_checkpoint(trained, split="test", batch_size=3, max_new_tokens=5, output_dir=tmp_path / "one",
                                 show=False)
    result = run_evaluate("-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-port", "29531",
                          "evaluate.py", str(trained), "--batch-size", "1", "--max-new-tokens", "5",
                          "--output-dir", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads((tmp_path / "two" / "samples" / "predictions.json").read_text())
    assert [p["id"] for p in predictions] == [p["id"] for p in single["predictions"]]  # no repeats
    assert [p["prediction"] for p in predictions] == [p["prediction"] for p in single["predictions"]]
    metrics = json.loads((tmp_path / "two" / "logs" / "final_metrics.json").read_text())["metrics"]
    assert metrics["meteor"]["value"] == pytest.approx(single["metrics"]["meteor"]["value"], abs=1e-12)


def test_merged_weights_generate_the_captions_of_the_4bit_path(trained, tmp_path, capsys):
    """--merge-for-eval yes folds the adapters into a bf16 copy of the base (plain GEMMs, no per-token 4-bit
    dequantization): on this tiny model the greedy captions are the 4-bit path's."""
    four_bit = evaluate_checkpoint(trained, split="test", max_new_tokens=5, output_dir=tmp_path / "a", show=False)
    merged = evaluate_checkpoint(trained, split="test", max_new_tokens=5, output_dir=tmp_path / "b",
                                 merge_for_eval="yes")
    assert "generation: merged into a bf16 copy" in capsys.readouterr().out
    assert [p["prediction"] for p in merged["predictions"]] == [p["prediction"] for p in four_bit["predictions"]]


def refused(argv, capsys) -> str:
    """evaluate.py's main in this process: the one `error:` line it exits with."""
    with pytest.raises(SystemExit) as stopped:
        evaluate.main([str(a) for a in argv])
    assert str(stopped.value.code).startswith("error: ") and "\n" not in str(stopped.value.code)
    return str(stopped.value.code)


def files_under(folder: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_runs_own_files_are_refused_by_any_spelling_even_with_overwrite(trained, tmp_path, capsys):
    run = trained.parent.parent
    (tmp_path / "link").symlink_to(run)
    before = files_under(run)
    for spelling in (run, run / "samples" / "..", tmp_path / "link", Path(os.path.relpath(run))):
        message = refused([trained, "--split", "val", "--output-dir", spelling, "--overwrite"], capsys)
        assert f"belongs to the training run in {run.resolve()}" in message
    assert files_under(run) == before  # nothing written, nothing loaded


def test_two_manifests_of_one_name_never_share_a_folder(trained, tiny_manifest, tmp_path):
    lines = tiny_manifest.read_text().splitlines()[:2]
    rows = [json.loads(line) | {"video": str(tiny_manifest.parent / json.loads(line)["video"])} for line in lines]
    for folder in ("setA", "setB"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                              for r in (rows if folder == "setA" else rows[:1])))
    (tmp_path / "setA" / "test.csv").write_text("video,caption\n" + "".join(f"{r['video']},{r['captions'][0]}\n"
                                                                          for r in rows), encoding="utf-8")
    names = {evaluate.samples_name(tmp_path / f, None) for f in ("setA/test.jsonl", "setB/test.jsonl",
                                                                  "setA/test.csv")}
    assert len(names) == 3 and all(n.startswith("test-") and n.endswith("-all") for n in names)
    long = tmp_path / ("긴" * 80 + ".jsonl")  # a 240-byte stem: the folder name still fits in 255 bytes
    long.write_text((tmp_path / "setA" / "test.jsonl").read_text())
    assert len(evaluate.samples_name(long, "val").encode()) <= 80
    for manifest in ("setA/test.jsonl", "setB/test.jsonl"):
        result = run_evaluate("evaluate.py", str(trained), "--manifest", str(tmp_path / manifest),
                              "--max-new-tokens", "3", "--no-report")
        assert result.returncode == 0, result.stderr[-2000:]
    found = [json.loads(p.read_text())["num_videos"] for p in (trained.parent.parent / "eval").glob("test-*-all-n3/"
                                                                                                   "metrics.json")]
    assert sorted(found) == [1, 2]  # both kept
    again = run_evaluate("evaluate.py", str(trained), "--manifest", str(tmp_path / "setB/test.jsonl"),
                         "--max-new-tokens", "3", "--no-report")
    assert again.returncode == 1 and "predictions.json exists; add --overwrite to replace it" in again.stderr
    assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, words", [
    (["--batch-size", "0"], "--batch-size must be a whole number >= 1, got 0"),
    (["--max-new-tokens", "100000"], "--max-new-tokens 100000: the prompt"),
    (["--max-new-tokens", "600"], "positions, over the LM's 512; lower --max-new-tokens to at most"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be a whole number >= 1, got -1"),
    (["--do-sample", "--temperature", "0"], "leave out --do-sample"),
    (["--do-sample", "--top-p", "0"], r"--top-p must be in \(0, 1\], got 0.0"),
    (["--temperature", "-1"], "--temperature must be a finite number above 0"),
])
def test_flags_are_refused_before_anything_loads(trained, flags, words, tmp_path, capsys):
    assert re.search(words, refused([trained, "--output-dir", tmp_path / "out", *flags], capsys))
    assert not (tmp_path / "out").exists()


def test_a_damaged_checkpoint_or_base_is_named_in_one_line(trained, tmp_path, capsys):
    import shutil
    import torch
    saved = torch.load(trained, weights_only=True)
    name = next(iter(saved["trainable"]))
    torch.save(saved | {"trainable": saved["trainable"] | {name: torch.zeros(3, 5)}}, tmp_path / "shape.pt")
    message = refused([tmp_path / "shape.pt", "--output-dir", tmp_path / "a"], capsys)
    assert f"tensor {name} has shape (3, 5), the model's is" in message
    torch.save({k: v for k, v in saved.items() if k != "trainable"}, tmp_path / "none.pt")
    message = refused([tmp_path / "none.pt", "--output-dir", tmp_path / "b"], capsys)
    assert message == f"error: {tmp_path / 'none.pt'}: the checkpoint has no 'trainable' (missing); it is not a " \
                      f"model checkpoint that train.py wrote, or it is damaged"
    llm = shutil.copytree(saved["vlm_config"]["llm_path"], tmp_path / "llm")
    shard = llm / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:50])
    message = refused([trained, "--llm", llm, "--output-dir", tmp_path / "c"], capsys)
    assert message.startswith(f"error: {shard}: truncated")
