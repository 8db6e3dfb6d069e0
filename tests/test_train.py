"""The training loop on tiny bases and a handful of generated videos: exact resume (mid-epoch and across the stage
boundary), atomic checkpoints, accumulation, NaN stops, what each stage trains, DDP == one process, the outputs."""
import csv
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from infra import checkpoint
from infra.distributed import setup_distributed
from infra.errors import UserError
from train import TrainConfig, ValScore, main, train

ROOT = Path(__file__).resolve().parents[1]
# Two batchings of the same examples agree to 1% of one Adam step at lr 1e-3. Not tighter: where a gradient element
# is near zero, Adam's division by sqrt(v) turns fp32 summation order into a few millionths (3.9e-6 seen on
# AVX-512), while a micro-batch or rank weighted wrongly moves the update by a whole step.
STEP_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def setup(tiny_bases, tiny_manifest):
    return tiny_manifest.parent, *tiny_bases


def config(setup, tmp_path, **overrides):
    root, clip, llm = setup
    values = dict(clip=str(clip), llm=str(llm), train_manifest=str(root / "manifest.jsonl"), projector="perceiver",
                  peft="dora", output_dir=str(tmp_path / "run"), cache_dir=str(root / "cache"), stage1_epochs=2,
                  stage2_epochs=2, stage1_lr=1e-2, stage2_lr=1e-2, batch_size=2, grad_accum=2, lora_r=4,
                  lora_alpha=8, lora_dropout=0.1, num_frames=3, num_queries=4, eval_batch_size=4,
                  max_new_tokens=4, num_workers=0, dtype="fp32", save_every=2)
    return TrainConfig(**(values | overrides))


def assert_png(path, min_bytes=1000):
    """A real PNG image: its 8-byte signature and a plausible size (an empty or text file fails)."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= min_bytes, (path, len(data))


def trainable_of(run_dir, name="final_model.pt"):
    return checkpoint.load_checkpoint(Path(run_dir) / "checkpoints" / name)["trainable"]


def test_resume_mid_epoch_and_across_stages_is_bit_exact(setup, tmp_path):
    straight = config(setup, tmp_path / "a")
    train(straight, setup_distributed())
    for stop_at in (2, 4):  # 3 steps per epoch, 2 epochs a stage: step 2 is mid-epoch, step 4 is in epoch 2 ...
        for_resume = config(setup, tmp_path / f"b{stop_at}", max_steps=stop_at)
        assert train(for_resume, setup_distributed()) is None
        resumed = config(setup, tmp_path / f"b{stop_at}", resume="auto")
        assert train(resumed, setup_distributed()) is not None  # both stages finished
        expected, got = trainable_of(straight.output_dir), trainable_of(resumed.output_dir)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), key
    stage2 = config(setup, tmp_path / "c", max_steps=7)  # stage 1 has 6 steps: stop inside stage 2
    train(stage2, setup_distributed())
    assert checkpoint.load_training_state("auto", stage2.output_dir)["stage"] == 2
    resumed = config(setup, tmp_path / "c", resume="auto")
    train(resumed, setup_distributed())
    expected_state = checkpoint.load_checkpoint(Path(straight.output_dir) / "checkpoints" / "training_state.pt")
    got_state = checkpoint.load_checkpoint(Path(resumed.output_dir) / "checkpoints" / "training_state.pt")
    torch.testing.assert_close(got_state["optimizer"], expected_state["optimizer"], atol=0, rtol=0)
    for key, value in trainable_of(straight.output_dir).items():
        assert torch.equal(value, trainable_of(resumed.output_dir)[key]), key


def test_outputs_exist_and_parse(setup, tmp_path):
    cfg = config(setup, tmp_path, stage1_epochs=1, stage2_epochs=1)
    results = main(cfg)
    run = Path(cfg.output_dir)
    adapted = set(trainable_of(run, "final_model.pt"))
    projector_only = {k for k in adapted if k.startswith("projector.")}
    assert projector_only and any(".lora_A" in k for k in adapted) and any(".magnitude" in k for k in adapted)
    assert set(trainable_of(run, "stage1_projector.pt")) == projector_only  # stage 1: the projector alone
    assert set(trainable_of(run, "best_model.pt")) == adapted
    assert set(checkpoint.load_checkpoint(run / "checkpoints" / "training_state.pt")["trainable"]) == adapted
    assert checkpoint.load_checkpoint(run / "checkpoints" / "best_model.pt")["info"]["stage"] == 2  # the adapted LM
    rows = list(csv.DictReader(open(run / "logs" / "training_log.csv")))
    step_rows = [r for r in rows if r["loss"]]
    assert [int(r["step"]) for r in step_rows] == list(range(1, 7))  # 3 steps a stage, one row each
    assert len([r for r in rows if r["val_meteor"]]) == 2  # one validation per epoch
    assert_png(run / "logs" / "training_curves.png")
    metrics = json.loads((run / "logs" / "final_metrics.json").read_text())
    assert metrics["split"] == "test" and "meteor" in metrics["metrics"]
    predictions = json.loads((run / "samples" / "predictions.json").read_text())
    assert [p["prediction"] for p in predictions] == [p["prediction"] for p in results["predictions"]]
    assert len(predictions) == 4 and all(p["references"] for p in predictions)
    assert results["metrics"]["meteor"]["value"] == metrics["metrics"]["meteor"]["value"]


def test_accumulation_equals_one_big_batch(setup, tmp_path):
    """batch 4 x accum 1 == batch 1 x accum 4 after the same optimizer steps (fp32, within 1% of a step), here with
    the plan's learning rates: through stage 1 and one step of stage 2."""
    common = dict(grad_accum=1, stage1_epochs=1, stage2_epochs=1, lora_dropout=0.0, max_steps=4, stage1_lr=1e-3,
                  stage2_lr=5e-5)
    big = config(setup, tmp_path / "big", batch_size=4, **common)
    small = config(setup, tmp_path / "small", batch_size=1, **common | {"grad_accum": 4})
    train(big, setup_distributed())
    train(small, setup_distributed())
    a = checkpoint.load_training_state("auto", big.output_dir)["trainable"]
    b = checkpoint.load_training_state("auto", small.output_dir)["trainable"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=STEP_TOLERANCE, rtol=0)


def test_each_stage_trains_only_its_weights(setup, tmp_path, monkeypatch):
    """Stage 1: the projector alone; stage 2: projector + adapters; the frozen bases stay bit for bit."""
    import vlm
    built = {}
    real_build = vlm.build_vlm

    def keep(config, **kwargs):
        built["model"] = model = real_build(config, **kwargs)
        built["frozen"] = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("projector.")}
        return model
    monkeypatch.setattr("train.build_vlm", keep)
    cfg = config(setup, tmp_path, stage1_epochs=1, stage2_epochs=1)
    train(cfg, setup_distributed())
    stage1 = trainable_of(cfg.output_dir, "stage1_projector.pt")
    final = trainable_of(cfg.output_dir)
    assert all(k.startswith("projector.") for k in stage1)
    assert any("lora_A" in k for k in final) and any("magnitude" in k for k in final)
    assert any(not torch.equal(stage1[k], final[k]) for k in stage1)  # stage 2 moved the projector too
    state = built["model"].state_dict()
    for key, value in built["frozen"].items():
        if key in state:  # a wrapped linear's weight moved to `.base.`; it is checked under its new name
            assert torch.equal(state[key], value), key
    for key, value in built["frozen"].items():
        wrapped = key.replace(".weight", ".base.weight")
        if key not in state and wrapped in state:
            assert torch.equal(state[wrapped], value), key


def test_nan_stops_with_the_step_and_samples_and_keeps_the_last_checkpoint(setup, tmp_path, monkeypatch):
    cfg = config(setup, tmp_path, stage1_epochs=1, stage2_epochs=1, save_every=1)
    import vlm
    real_forward = vlm.VLM.forward
    calls = {"n": 0}

    def poisoned(self, features, captions, num_label_tokens=None, **options):
        calls["n"] += 1
        loss = real_forward(self, features, captions, num_label_tokens, **options)
        return loss * float("nan") if calls["n"] == 5 else loss  # step 3's first micro-batch
    monkeypatch.setattr(vlm.VLM, "forward", poisoned)
    with pytest.raises(UserError, match=r"non-finite loss at step 3 \(samples v\d+, v\d+\)"):
        train(cfg, setup_distributed())
    state = checkpoint.load_training_state("auto", cfg.output_dir)
    assert state["global_step"] == 2 and all(torch.isfinite(v).all() for v in state["trainable"].values())


def test_resume_with_other_settings_is_refused(setup, tmp_path):
    cfg = config(setup, tmp_path, max_steps=1)
    train(cfg, setup_distributed())
    with pytest.raises(ValueError, match="--stage1-lr was 0.01 in the saved run, now 0.5"):
        train(config(setup, tmp_path, resume="auto", stage1_lr=0.5), setup_distributed())


def test_two_gloo_processes_equal_one_process(setup, tmp_path):
    """torchrun with 2 CPU processes x batch 2 == 1 process x batch 4 (weights after 4 steps, within 1% of a step)."""
    common = dict(stage1_epochs=1, stage2_epochs=1, lora_dropout=0.0, grad_accum=1, max_steps=4, stage1_lr=1e-3,
                  stage2_lr=5e-5)
    single = config(setup, tmp_path / "single", batch_size=4, **common)
    train(single, setup_distributed())
    ddp = config(setup, tmp_path / "ddp", batch_size=2, **common)
    flags = []
    for key, value in asdict(ddp).items():
        if value is not None and not isinstance(value, bool):
            flags += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", "29517", str(ROOT / "train.py"), *flags],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a = checkpoint.load_training_state("auto", single.output_dir)["trainable"]
    b = checkpoint.load_training_state("auto", ddp.output_dir)["trainable"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=STEP_TOLERANCE, rtol=0)


def test_a_malformed_manifest_line_is_one_line_naming_it(setup, tmp_path):
    root, clip, llm = setup
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text((root / "manifest.jsonl").read_text().replace('"v3.mp4", "captions": [', '"v3.mp4", "captions": ["", ', 1))
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--clip", str(clip), "--llm", str(llm),
                             "--train-manifest", str(manifest), "--output-dir", str(tmp_path / "run")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {manifest}:4:")


def test_without_the_feature_cache_the_tower_encodes_every_batch(setup, tmp_path, monkeypatch):
    import vlm
    calls = []
    real_encode = vlm.VLM.encode_video
    monkeypatch.setattr(vlm.VLM, "encode_video", lambda self, pixels: calls.append(len(pixels)) or
                        real_encode(self, pixels))
    cfg = config(setup, tmp_path, feature_cache=False, max_steps=2)
    assert train(cfg, setup_distributed()) is None
    assert calls == [2, 2, 2, 2]  # 2 steps x 2 micro-batches of 2 videos


# ---- a run folder is never lost; every user error is one line, early ------------------------------------------
def run_train(*flags, cwd=ROOT, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *flags], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def folder_bytes(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != checkpoint.LOCK_FILE}


def test_rerunning_in_a_folder_that_holds_a_run_is_refused_and_changes_nothing(setup, tmp_path):
    cfg = config(setup, tmp_path, max_steps=2)
    train(cfg, setup_distributed())
    before = folder_bytes(Path(cfg.output_dir))
    assert Path("checkpoints/training_state.pt") in before and Path("logs/training_log.csv") in before
    with pytest.raises(ValueError, match="already holds a run .*--resume auto.*--start-over"):
        train(config(setup, tmp_path, max_steps=2), setup_distributed())
    assert folder_bytes(Path(cfg.output_dir)) == before
    train(config(setup, tmp_path, max_steps=1, start_over=True), setup_distributed())
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and folder_bytes(aside[0]) == before
    assert json.loads((Path(cfg.output_dir) / "config.json").read_text())["max_steps"] == 1


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "--batch-size must be positive, got 0"),
    ("--grad-accum", "0", "--grad-accum must be positive, got 0"),
    ("--save-every", "0", "--save-every must be positive, got 0"),
    ("--stage1-epochs", "0", "--stage1-epochs must be positive, got 0"),
    ("--stage2-lr", "-1e-4", r"--stage2-lr must not be negative, got -0\.0001"),
    ("--val-fraction", "1.5", r"--val-fraction must be in \[0, 1\), got 1\.5"),
    ("--lora-targets", "q_proj,qkv_proj", r"--lora-targets: qkv_proj is not one of q_proj,k_proj,v_proj,o_proj,"
                                          r"gate_proj,up_proj,down_proj \(or auto\)"),
    ("--router-aux-coef", "-0.1", r"--router-aux-coef must not be negative, got -0\.1"),
])
def test_a_bad_flag_is_one_line_before_anything_loads(setup, tmp_path, flag, value, message):
    root, clip, llm = setup
    result = run_train("--clip", str(clip), "--llm", str(llm), "--train-manifest", str(root / "manifest.jsonl"),
                       "--output-dir", str(tmp_path / "run"), f"{flag}={value}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.fullmatch(f"error: {message}", result.stderr.strip().splitlines()[-1])
    assert not (tmp_path / "run").exists()  # refused before the run folder was even claimed


def test_a_read_only_run_folder_is_one_line_naming_it(setup, tmp_path):
    """A read-only file system (a tmpfs remounted read-only: root writes anywhere else) refuses the run at once."""
    root, clip, llm = setup
    disk = tmp_path / "ro"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs (needs root / CAP_SYS_ADMIN)")
    try:
        (disk / "run").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        result = run_train("--clip", str(clip), "--llm", str(llm), "--train-manifest", str(root / "manifest.jsonl"),
                           "--output-dir", str(disk / "run"))
    finally:
        subprocess.run(["umount", str(disk)])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: {disk / 'run' / checkpoint.LOCK_FILE}: the file system is read-only: choose a writable folder"


def test_a_missing_val_split_is_refused_before_the_bases_load(setup, tmp_path, monkeypatch):
    root, _, _ = setup
    manifest = tmp_path / "no_val.jsonl"
    lines = [line.replace('"video": "', f'"video": "{root}/') for line in
             (root / "manifest.jsonl").read_text().splitlines() if '"val"' not in line]
    manifest.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr("train.build_vlm", lambda *a, **k: pytest.fail("the bases were loaded"))
    with pytest.raises(ValueError, match="val"):
        train(config(setup, tmp_path, train_manifest=str(manifest)), setup_distributed())


def test_an_over_long_caption_is_cut_with_one_warning(setup, tmp_path, capsys):
    from dataclasses import replace as replaced

    from data import Sample
    from train import cut_long_captions
    from vlm import load_tokenizer
    _, _, llm = setup
    tokenizer = load_tokenizer(str(llm))
    long = "빨간 원이 움직인다. " * 400  # thousands of tokens
    samples = [Sample(id="a", video="a.mp4", captions=[long, "짧은 캡션."]), Sample(id="b", video="b.mp4",
                                                                                   captions=["파란 원."])]
    kept = cut_long_captions(samples, tokenizer, max_tokens=12)
    assert len(tokenizer.encode(kept[0].captions[0], add_special_tokens=False).ids) <= 12
    assert long.strip().startswith(kept[0].captions[0]) and kept[0].captions[1:] == ["짧은 캡션."]
    assert kept[1] == replaced(samples[1])
    assert capsys.readouterr().out.count("1 training captions are longer than 12 tokens") == 1


def test_a_scorer_names_a_column_of_the_training_log():
    assert ValScore("all_four", lambda predictions, samples: 1.0).name == "all_four"
    with pytest.raises(ValueError, match="no column val_colour"):
        ValScore("colour", lambda predictions, samples: 1.0)


@pytest.mark.parametrize("argv, gives_paths", [([], False), (["--projector", "linear", "--demo-scale", "ci"], False),
                                               (["--clip", "c"], True), (["--train-manifest=m.jsonl"], True),
                                               (["--seed", "1", "--ll", "q"], True), (["--vision", "v"], True),
                                               (["--vision-layer", "-1", "--projector", "mlp"], False)])
def test_names_paths_reads_the_path_options_as_argparse_does(argv, gives_paths):
    from train import names_paths
    assert names_paths(argv) == gives_paths


def test_help_without_paths_is_the_demos_and_with_paths_the_trainers():
    """Every option with its default in both; without --clip/--llm/--train-manifest train.py hands the command line
    over to the embedded default, whose help adds its own options."""
    def shown(*flags):
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, "--help"], capture_output=True,
                                text=True, timeout=60, cwd="/")
        assert result.returncode == 0, result.stderr[-2000:]
        return " ".join(result.stdout.split())
    from dataclasses import fields

    from demo import DemoConfig
    demo_help, train_help = shown(), shown("--clip", "x")
    for f in fields(TrainConfig):
        assert f"(default: {f.default})" in demo_help and f"(default: {f.default})" in train_help, f.name
    trainer_options = {f.name for f in fields(TrainConfig)}
    for f in fields(DemoConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name not in trainer_options:  # the demo's own
            assert f"{flag} " in demo_help and f"(default: {f.default})" in demo_help and flag not in train_help


# ---- other language models and quantizations: a tiny Qwen3-MoE and an int8 base, end to end ---------------------
@pytest.fixture(scope="module")
def moe_llm(tiny_bases, tmp_path_factory):
    """A tiny Qwen3-MoE beside the tiny bases, with the same tokenizer: layer 0 dense (mlp_only_layers), layer 1 a
    router and 4 experts, 2 active."""
    import shutil

    from conftest import save_tiny_qwen3_moe
    from tokenizers import Tokenizer
    _, llm = tiny_bases
    vocab = Tokenizer.from_file(str(llm / "tokenizer.json")).get_vocab_size()
    folder = save_tiny_qwen3_moe(tmp_path_factory.mktemp("moe") / "llm", vocab_size=vocab, hidden_size=48,
                                 intermediate_size=64, head_dim=16, experts=4, active=2, expert_size=24,
                                 mlp_only_layers=(0,))
    shutil.copy(llm / "tokenizer.json", folder / "tokenizer.json")
    return folder


def run_then_caption_and_export(cfg: TrainConfig, tmp_path):
    """Train 1 + 1 epochs (then the test split's evaluation), caption the test videos from the best checkpoint, and
    export it: (checkpoint dict, the rebuilt adapted model, the export folder)."""
    from caption import Clip, caption_videos, load_captioner
    from evaluate import rebuild_model
    from export import export_checkpoint
    results = main(cfg)
    best = Path(cfg.output_dir) / "checkpoints" / "best_model.pt"
    saved = checkpoint.load_checkpoint(best)
    model, features_dtype, _ = load_captioner(best, device=torch.device("cpu"))
    records, failures = caption_videos(model, [Clip(Path(p["video"])) for p in results["predictions"]],
                                       batch_size=4, max_new_tokens=cfg.max_new_tokens, features_dtype=features_dtype)
    assert failures == [] and len(records) == 4
    assert [r["caption"] for r in records] == [p["prediction"] for p in results["predictions"]]
    exported = export_checkpoint(best, tmp_path / "exported", dtype="fp32")
    return saved, rebuild_model(saved, clip=None, llm=None, device="cpu", dtype=torch.float32), exported


def test_a_tiny_moe_trains_evaluates_captions_and_exports(setup, moe_llm, tmp_path):
    """Qwen3-MoE with NF4 experts, DoRA on the attention projections (the MoE default), the load-balancing loss on;
    the export loads in transformers' Qwen3MoeForCausalLM with the adapted logits."""
    from transformers import Qwen3MoeForCausalLM

    from lora import ATTENTION_LINEARS
    from moe import load_balancing_loss
    from qwen3 import load_qwen3
    from vlm import IGNORE_INDEX
    cfg = config(setup, tmp_path, llm=str(moe_llm), stage1_epochs=1, stage2_epochs=1, router_aux_coef=0.01)
    saved, model, exported = run_then_caption_and_export(cfg, tmp_path)
    assert saved["vlm_config"]["quant"] == "nf4" and saved["train_config"]["router_aux_coef"] == 0.01
    assert tuple(saved["vlm_config"]["adapter"]["targets"]) == ATTENTION_LINEARS
    adapters = [k for k in saved["trainable"] if k.startswith("llm.")]
    assert adapters and not any(".mlp." in k for k in adapters)  # experts and router frozen
    ids = torch.randint(0, model.llm.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    model.eval()  # adapter dropout off
    with torch.no_grad():
        expected = model.llm(ids)
        hf = Qwen3MoeForCausalLM.from_pretrained(exported, dtype=torch.float32, experts_implementation="eager")
        torch.testing.assert_close(hf.eval()(ids).logits, expected, atol=1e-4, rtol=1e-4)
        assert (expected - load_qwen3(moe_llm, quant="nf4", dtype=torch.float32)(ids)).abs().max() > 1e-2
        # the coefficient adds its share of the load-balancing loss over the real (unpadded) tokens
        features = torch.randn(2, 3, 16, 32, generator=torch.Generator().manual_seed(1))  # (B, F, P, Dv)
        captions = ["빨간 원", "파란 원이 왼쪽으로 지나간다. 노란 원이 위로 움직인다."]
        plain, balanced = model(features, captions), model(features, captions, router_aux_coef=0.5)
        input_ids, labels = model.tokenize_batch(captions, 4)
        embeds = model.llm.model.embed_tokens(input_ids)
        embeds[input_ids == model.template.video_pad_id] = model.project(features).flatten(0, 1)
        router_logits = []
        model.llm.hidden_states(inputs_embeds=embeds, router_logits=router_logits)
        real = input_ids != model.template.end_of_text_id
        assert (labels != IGNORE_INDEX).sum() > 0 and not real.all()  # one row is padded
        torch.testing.assert_close(balanced - plain, 0.5 * load_balancing_loss(router_logits, 2, real))


def test_an_int8_base_trains_evaluates_captions_and_exports(setup, tmp_path):
    """LLM.int8 base (every decoder-layer linear a Linear8bitLt), DoRA on all seven targets; the checkpoint records
    int8 and caption / export rebuild it so. On the CPU bitsandbytes' training-mode forward multiplies by the
    dequantized weight (nf4.py), which is what the exported W + sBA reproduces."""
    import bitsandbytes as bnb
    from transformers import Qwen3ForCausalLM

    from qwen3 import load_qwen3
    cfg = config(setup, tmp_path, quant="int8", stage1_epochs=1, stage2_epochs=1, lora_dropout=0.0)
    saved, model, exported = run_then_caption_and_export(cfg, tmp_path)
    assert saved["vlm_config"]["quant"] == "int8" and len(saved["vlm_config"]["adapter"]["targets"]) == 7
    assert isinstance(model.llm.get_submodule("model.layers.0.mlp.down_proj.base"), bnb.nn.Linear8bitLt)
    ids = torch.randint(0, model.llm.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.llm.train()(ids)
        hf = Qwen3ForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()(ids).logits
        unadapted = load_qwen3(model.config.llm_path, dtype=torch.float32)(ids)
    assert (expected - unadapted).abs().max() > 1e-2  # adapters and int8 rounding: a dropped merge would show
    torch.testing.assert_close(hf, expected, atol=1e-4, rtol=1e-4)
