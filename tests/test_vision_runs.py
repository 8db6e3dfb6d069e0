"""Each tower family end to end on the tiny fixture: `--vision` at a SigLIP, DINOv2 (+ registers) or DINOv3 folder and
no other tower flag trains 1 + 1 epochs, evaluates and captions; the projector and the cached features take the
tower's width and grid; the checkpoint records the tower and refuses another one in one line. CLIP's runs are the
other test files' (test_train.py, test_evaluate.py, test_caption.py)."""
import json

import pytest
import torch
from conftest import save_dinov2, save_dinov3, save_siglip

import caption
from data import read_frames
from evaluate import evaluate_checkpoint, rebuild_model
from export import export_checkpoint, load_exported
from features import feature_cache_for
from formats.manifests import read_manifest
from infra import snapshot
from infra.checkpoint import load_checkpoint
from infra.distributed import setup_distributed
from train import parse_config, train

# family: (writer, model_type, width Dv, patches P, projector, --vision-layer). Widths and grids differ from the
# tiny CLIP's (32, 4 x 4) and from each other, so nothing sized for CLIP passes by chance.
FAMILIES = {
    "siglip": (lambda folder: save_siglip(folder, size=35, image_size=35, hidden_size=40), "siglip_vision_model",
               40, 25, "cabstractor", -2),  # 5 x 5 patches, pooled to 4 x 2 x 2 tokens
    "dinov2": (lambda folder: save_dinov2(folder, hidden_size=16), "dinov2", 16, 16, "mlp", -2),  # CLS dropped
    "dinov2_registers": (lambda folder: save_dinov2(folder, registers=True, hidden_size=24), "dinov2_with_registers",
                         24, 16, "linear", -2),  # CLS + 4 registers dropped; F x P = 48 tokens
    "dinov3": (lambda folder: save_dinov3(folder, hidden_size=48), "dinov3_vit", 48, 16, "perceiver", -1),
}
ANOTHER = {"siglip": "dinov2", "dinov2": "dinov2_registers", "dinov2_registers": "dinov3", "dinov3": "siglip"}


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    return {family: write(tmp_path_factory.mktemp(family)) for family, (write, *_) in FAMILIES.items()}


@pytest.fixture(scope="module")
def trained(towers, tiny_bases, tiny_manifest, tmp_path_factory):
    """run(family) -> its run folder: 1 + 1 epochs with --vision at the family's folder (once per family)."""
    runs = {}

    def run(family):
        if family not in runs:
            projector, layer = FAMILIES[family][4:]
            out = tmp_path_factory.mktemp(f"run_{family}")
            cfg = parse_config(["--vision", str(towers[family]), "--llm", str(tiny_bases[1]), "--train-manifest",
                                str(tiny_manifest), "--output-dir", str(out), "--cache-dir", str(out / "cache"),
                                "--projector", projector, "--peft", "lora", "--stage1-epochs", "1",
                                "--stage2-epochs", "1", "--batch-size", "4", "--grad-accum", "1", "--lora-r", "4",
                                "--num-frames", "3", "--num-queries", "16", "--max-new-tokens", "4",
                                "--num-workers", "0", "--dtype", "fp32", "--vision-layer", str(layer)])
            assert train(cfg, setup_distributed())
            runs[family] = out
        return runs[family]
    return run


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tower_family_trains_evaluates_and_captions(family, towers, trained, tiny_manifest, tmp_path):
    _, model_type, width, patches, projector, layer = FAMILIES[family]
    out = trained(family)
    best = out / "checkpoints" / "best_model.pt"
    saved = load_checkpoint(best)
    assert saved["vlm_config"]["base_identity"]["vision"] == {"model_type": model_type,
                                                              "weights": snapshot.fingerprint(towers[family])}
    assert saved["vlm_config"]["vision_layer"] == saved["train_config"]["vision_layer"] == layer
    assert json.loads((out / "config.json").read_text())["clip"] == str(towers[family])  # the run's config

    model = rebuild_model(saved, clip=None, llm=None, device="cpu", dtype=torch.float32)
    assert model.vision.config.model_type == model_type and model.projector.config.vision_dim == width
    video = read_manifest(tiny_manifest)[0]
    cached = feature_cache_for(model, out / "cache").load(video)  # the key training wrote, found again
    assert cached.shape == (3, patches, width)
    direct = model.encode_video(model.vision.preprocess(read_frames(video.video, 3))[None])[0]  # (F, P, Dv)
    torch.testing.assert_close(cached.float(), direct, atol=2e-3, rtol=1e-3)  # fp16 storage

    results = evaluate_checkpoint(best, split="test", batch_size=4, max_new_tokens=4, output_dir=tmp_path / "eval",
                                  show=False, report=False)
    assert len(results["predictions"]) == 4 and (tmp_path / "eval" / "logs" / "final_metrics.json").is_file()
    captions_file = tmp_path / "captions.jsonl"
    assert caption.main([str(best), str(video.video), "--output", str(captions_file), "--max-new-tokens", "4",
                         "--device", "cpu", "--workers", "1"]) == 0
    header, record = map(json.loads, captions_file.read_text().splitlines())
    assert "decoding" in header["header"] and record["video"] == str(video.video) and "caption" in record

    exported = export_checkpoint(best, tmp_path / "exported", dtype="fp32")  # the tower's folder copied beside
    from_export, _ = load_exported(exported)
    assert from_export.vision.config.model_type == model_type
    assert from_export.vision.fingerprint == model.vision.fingerprint  # a byte-identical copy of the tower


@pytest.mark.parametrize("family", FAMILIES)
def test_a_checkpoint_refuses_another_tower_in_one_line(family, towers, trained, tiny_manifest):
    """The saved tower's family is named first: a SigLIP checkpoint on a DINO tower says so, in one line."""
    other = ANOTHER[family]
    with pytest.raises(SystemExit) as stopped:
        caption.main([str(trained(family) / "checkpoints" / "best_model.pt"), str(tiny_manifest.parent / "v0.mp4"),
                      "--vision", str(towers[other]), "--device", "cpu"])
    assert str(stopped.value.code) == (
        f'error: checkpoint does not match the model: base_identity.vision.model_type: checkpoint has '
        f'"{FAMILIES[family][1]}", this model has "{FAMILIES[other][1]}"')
