"""The embedded demo: its snapshot folders load in transformers with our numbers, its pieces do what they say, its
command line and --select-by reach the trainer, and the shrunken default (scale "ci") runs end to end through
train.main, evaluate.py reloading its checkpoint."""
import csv
import json
import random
import shutil
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

import demo
from clip import CLIPVision, load_clip_vision
from demo import tower as demo_tower
from demo.synth import ATTRIBUTES
from qwen3 import Qwen3, Qwen3Config, load_qwen3
from train import TrainConfig, check_config
from vlm import DEFAULT_INSTRUCTION, ChatTemplate


def test_saved_tower_loads_in_transformers_with_our_features(tmp_path):
    from transformers import CLIPVisionModel
    torch.manual_seed(0)
    tower = CLIPVision(demo_tower.TOWER)
    demo_tower.save_clip(tower, tmp_path / "clip")
    ours = load_clip_vision(tmp_path / "clip")
    reference = CLIPVisionModel.from_pretrained(tmp_path / "clip").eval()
    pixels = torch.randn(2, 3, demo_tower.TOWER.image_size, demo_tower.TOWER.image_size)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states
        for layer in (-1, -2):
            torch.testing.assert_close(ours(pixels, layer=layer), expected[layer], atol=1e-4, rtol=1e-4)


def test_saved_lm_loads_in_transformers_with_our_logits(tmp_path, tokenizer_dir):
    from transformers import Qwen3ForCausalLM
    (tmp_path / "llm").mkdir()
    shutil.copy(tokenizer_dir / "tokenizer.json", tmp_path / "llm" / "tokenizer.json")
    tokenizer = Tokenizer.from_file(str(tmp_path / "llm" / "tokenizer.json"))
    torch.manual_seed(0)
    model = Qwen3(Qwen3Config.from_hf(demo.qwen3_config(tokenizer)))
    for module in model.modules():  # a random model at the scale of trained weights, not nn defaults
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, std=0.05)
    demo.save_qwen3(model, tmp_path / "llm")
    ours = load_qwen3(tmp_path / "llm", dtype=torch.float32)
    reference = Qwen3ForCausalLM.from_pretrained(tmp_path / "llm").eval()
    assert reference.config.tie_word_embeddings and reference.config.vocab_size == tokenizer.get_vocab_size()
    ids = torch.randint(tokenizer.get_vocab_size(), (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_frame_targets_find_the_object_patch():
    frames = np.full((2, 64, 64, 3), 128, np.uint8)
    frames[0, 40:50, 8:18] = (220, 40, 40)   # centre (y 44.5, x 12.5): patch row 5, column 1
    frames[1, 2:12, 50:60] = (40, 80, 225)   # centre (y 6.5, x 54.5): patch row 0, column 6
    targets = demo_tower.frame_targets(frames, patch=8)
    assert targets["y"].tolist() == [5, 0] and targets["x"].tolist() == [1, 6]
    assert targets["centre"].tolist() == [5 * 8 + 1, 6]
    with pytest.raises(RuntimeError, match="no object"):
        demo_tower.frame_targets(np.full((1, 64, 64, 3), 128, np.uint8), patch=8)


def test_recolour_permutes_the_channels_of_half_the_frames_and_hides_their_colour():
    """The tower's recoloured frames: the second half of a batch in another RGB order (never the identity), with no
    colour or background label there; the first half, the shape labels and the caller's arrays stay as they were."""
    frames = np.full((6, 8, 8, 3), 128, np.uint8)
    frames[:, 2:5, 2:5] = (220, 40, 90)  # one red-ish object, three distinct channel values
    labels = {"colour": torch.arange(6), "background": torch.arange(6) + 10, "shape": torch.arange(6) + 20}
    pixels, targets = demo_tower.recolour(frames, labels, torch.Generator().manual_seed(0))
    assert np.array_equal(pixels[:3], frames[:3]) and (frames[:, 3, 3] == (220, 40, 90)).all()
    for frame in pixels[3:]:
        assert sorted(frame[3, 3]) == [40, 90, 220] and tuple(frame[3, 3]) != (220, 40, 90)
        assert (frame[0, 0] == 128).all()  # grey stays grey
    assert targets["colour"].tolist() == [0, 1, 2, -100, -100, -100] and labels["colour"].tolist() == list(range(6))
    assert targets["background"][3:].eq(-100).all() and torch.equal(targets["shape"], labels["shape"])


def test_keyword_prompt_is_the_vlm_prompt_with_the_keywords_in_the_video_slots(tokenizer_dir):
    template = ChatTemplate(Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")), DEFAULT_INSTRUCTION)
    attributes = {"colour": "red", "shape": "circle", "motion": "left", "background": "white"}
    prompt = demo.keyword_prompt(template, attributes, random.Random(0))
    reference = template.prompt_ids(demo.NUM_SLOTS)
    slots = slice(len(template.before_video), len(template.before_video) + demo.NUM_SLOTS)
    assert len(prompt) == len(reference) and prompt[:slots.start] == reference[:slots.start]
    assert prompt[slots.stop:] == reference[slots.stop:]
    words = template.tokenizer.decode([t for t in prompt[slots] if t != template.video_pad_id])
    assert sorted(words) == sorted("".join(ATTRIBUTES[name][value] for name, value in attributes.items()))


def test_other_videos_features_never_returns_a_videos_own():
    class Cache:
        root = "cache"

        def load(self, video):
            return video

    videos = [f"v{i}.mp4" for i in range(50)]
    others = demo.OtherVideosFeatures(Cache(), videos, seed=3)
    assert sorted(others.load(v) for v in videos) == sorted(videos)  # a permutation ...
    assert all(others.load(v) != v for v in videos)          # ... with no fixed point


def test_caption_scores_read_the_attributes_back_from_the_captions():
    truth = {"a": {"colour": "red", "shape": "circle", "motion": "left", "background": "white"},
             "b": {"colour": "blue", "shape": "star", "motion": "up", "background": "black"}}
    predictions = [{"id": "a", "prediction": "빨간 원이 흰 배경 위에서 왼쪽으로 움직인다."},
                   {"id": "b", "prediction": "노란 별이 검은 배경 위에서 위로 움직인다."}]  # colour wrong
    results = {"predictions": predictions, "metrics": {"meteor": {"value": 0.5}, "cider_d": {"value": 1.5}}}
    scores = demo.caption_scores(results, truth)
    assert scores == {"METEOR": 0.5, "CIDEr-D": 1.5, "colour": 0.5, "shape": 1.0, "motion": 1.0,
                      "background": 1.0, "all four": 0.5}


@pytest.mark.parametrize("scale", sorted(demo.SCALES))
def test_demo_defaults_are_train_options(scale):
    config = demo.DemoConfig(**demo.demo_defaults(scale))
    assert config.demo_scale == scale and config.num_frames == demo.SCALES[scale].frames
    assert set(demo.demo_defaults(scale)) - {f.name for f in fields(TrainConfig)} == {"demo_scale"}


@pytest.mark.parametrize("flags, asset_seed", [(["--seed", "7"], 7), (["--seed", "7", "--demo-seed", "42"], 42)])
def test_demo_seed_picks_the_assets_and_seed_the_training(tmp_path, monkeypatch, flags, asset_seed):
    """--demo-seed keeps the demo's videos, tower and LM while --seed draws a new training run (run-to-run spread)."""
    built = {}

    def build_assets(demo_dir, scale, seed, is_main, heldout):
        built.update(seed=seed, heldout=heldout)
        raise SystemExit("assets recorded")

    monkeypatch.setattr(demo, "build_assets", build_assets)
    cfg = demo.command_line_config([*flags, "--demo-scale", "ci", "--output-dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="assets recorded"):
        demo.run_demo(cfg)
    assert built == {"seed": asset_seed, "heldout": "combinations"} and cfg.seed == 7


def test_the_demo_takes_its_defaults_and_refuses_paths_of_its_own(capsys):
    cfg = demo.command_line_config(["--projector", "linear", "--batch-size", "8"])
    assert (cfg.batch_size, cfg.stage1_epochs, cfg.select_by) == (8, 1, "attributes")  # given, linear's, its own
    with pytest.raises(SystemExit):
        demo.command_line_config(["--clip", "models/clip"])
    assert "give --clip, --llm and --train-manifest to train.py" in capsys.readouterr().err


@pytest.mark.parametrize("flags, reduction", [
    (["--projector", "linear"], ("merge+divprune", 128, 4)),  # the per-patch projectors' full-demo default
    (["--projector", "mlp", "--visual-tokens", "64"], ("merge+divprune", 64, 4)),
    (["--projector", "linear", "--token-reduction", "none"], ("none", None, 4)),  # all 512, no K left over
    (["--projector", "linear", "--demo-scale", "ci"], ("none", None, 1)),
    (["--projector", "perceiver"], ("none", None, 4)),
])
def test_the_per_patch_projectors_reduce_their_tokens_on_the_full_demo(flags, reduction):
    cfg = demo.command_line_config(flags)
    assert (cfg.token_reduction, cfg.visual_tokens, cfg.stage2_epochs) == reduction
    check_config(replace(cfg, clip="c", llm="l", train_manifest="m"))  # a setting train.py accepts


def test_without_attributes_on_val_select_by_attributes_is_refused_before_the_bases_load(tiny_bases, tiny_manifest,
                                                                                         tmp_path, monkeypatch):
    clip, llm = tiny_bases
    assets = demo.DemoAssets(str(tmp_path), str(clip), str(llm), str(tiny_manifest))
    monkeypatch.setattr(demo, "build_assets", lambda *args, **kwargs: assets)
    monkeypatch.setattr("train.build_vlm", lambda *a, **k: pytest.fail("the bases were loaded"))
    with pytest.raises(ValueError, match=r"--select-by attributes needs `attributes` on every val sample.*"
                                         r"--select-by meteor"):
        demo.main(["--demo-scale", "ci", "--output-dir", str(tmp_path / "run")])


@pytest.mark.parametrize("select_by, kept", [("meteor", [1, 2]), ("attributes", [1, 3])])
def test_best_model_is_the_epoch_that_scores_best_by_select_by(tmp_path, monkeypatch, select_by, kept):
    """Epoch 1 names the attributes right, epoch 2 writes a higher-METEOR caption with the wrong colour, epoch 3
    names them right with a higher METEOR than epoch 1: METEOR keeps epoch 2, the attributes epoch 3 (a tie on the
    attributes goes to METEOR)."""
    from data import Sample
    from infra import checkpoint
    from infra.distributed import setup_distributed
    from train import Position, end_of_epoch
    val = [Sample(id="v0", video=Path("v0.mp4"), captions=["빨간 원이 흰 배경 위에서 오른쪽으로 움직인다."],
                  attributes={"colour": "red", "shape": "circle", "motion": "right", "background": "white"})]
    epochs = iter([("빨간 원이 흰 배경 위에서 오른쪽으로 움직인다.", 0.5), ("파란 원이 흰 배경 위에서 오른쪽으로 움직인다.", 0.9),
                   ("빨간 원이 흰 배경 위에서 오른쪽으로 움직인다.", 0.6)])

    def evaluate_split(*args, **kwargs):
        caption, meteor = next(epochs)
        return {"predictions": [{"id": "v0", "prediction": caption}], "metrics": {"meteor": {"value": meteor}},
                "loss": 1.0}
    saved = []
    monkeypatch.setattr("train.evaluate_split", evaluate_split)
    monkeypatch.setattr("train.checkpoint.save_model", lambda path, model, cfg, info: saved.append(info["epoch"]))
    monkeypatch.setattr("train.checkpoint.save_training_state", lambda *args: None)
    cfg = demo.DemoConfig(output_dir=str(tmp_path / "run"), select_by=select_by)
    log = checkpoint.TrainingLog(tmp_path / "log.csv", enabled=True)
    position = Position(stage=2)
    for epoch in range(3):
        position = end_of_epoch(None, None, {"val": val}, None, cfg, setup_distributed(), log, position, epoch,
                                demo.SELECT_BY[cfg.select_by])
    assert saved == kept
    all_four = [row["val_all_four"] for row in log.rows()]
    assert all_four == (["", "", ""] if select_by == "meteor" else ["1.0", "0.0", "1.0"])


@pytest.fixture
def one_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs, two OpenMP threads that wait for each other
    ran this test 5x slower (300 s against 60 s measured); on an idle machine one thread costs less than 2x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ci_demo_runs_end_to_end_and_evaluate_reloads_it(tmp_path, capsys, one_thread):
    from evaluate import evaluate_checkpoint
    config = demo.DemoConfig(**demo.demo_defaults("ci") | dict(demo_dir=str(tmp_path / "demo"),
                                                                output_dir=str(tmp_path / "run"),
                                                                cache_dir=str(tmp_path / "features")))
    results = demo.run_demo(config)
    run = tmp_path / "run"
    printed = capsys.readouterr().out
    assert "demo: building the assets" in printed and "blind" in printed
    rows = list(csv.DictReader(open(run / "logs" / "training_log.csv")))
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    assert np.mean(losses[-5:]) < 0.85 * losses[0], losses  # the projector learns to address the frozen LM
    for name in ("best_model.pt", "final_model.pt", "stage1_projector.pt"):
        assert (run / "checkpoints" / name).is_file()
    curves = (run / "logs" / "training_curves.png").read_bytes()
    assert curves[:8] == b"\x89PNG\r\n\x1a\n" and len(curves) > 1000
    metrics = json.loads((run / "logs" / "final_metrics.json").read_text())
    predictions = json.loads((run / "samples" / "predictions.json").read_text())
    assert metrics["split"] == "test" and metrics["num_videos"] == len(predictions) == demo.SCALES["ci"].num_test
    assert all(p["prediction"] and p["references"] for p in predictions)
    again = evaluate_checkpoint(run / "checkpoints" / "best_model.pt", output_dir=tmp_path / "again", show=False)
    assert [p["prediction"] for p in again["predictions"]] == [p["prediction"] for p in results["predictions"]]
    assets = demo.build_assets(tmp_path / "demo", scale="ci", seed=config.seed)
    assert "reusing" in capsys.readouterr().out
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["clip"] == assets.clip and recorded["demo_scale"] == "ci"  # replaced, not mutated, its config
    assert config.clip is None
    assert {row["val_all_four"] != "" for row in rows if row["val_meteor"]} == {True}  # --select-by attributes
    table = json.loads((run / "logs" / "demo_table.json").read_text())  # the table report() printed
    assert set(table["model"]) == {"METEOR", "CIDEr-D", *ATTRIBUTES, "all four"}
    assert table["model"]["METEOR"] == pytest.approx(results["metrics"]["meteor"]["value"])
    assert set(table["blind"]) == set(table["model"])
    assert table["model"]["all four"] <= min(table["model"][name] for name in ATTRIBUTES) <= 1
