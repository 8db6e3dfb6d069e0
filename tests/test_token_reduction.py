"""--token-reduction / --visual-tokens through the commands: the checkpoint records the setting and evaluate.py and
caption.py read videos with it (the LM's prompt holds K visual slots), a batch of different videos stays
rectangular, a reduction a projector cannot use is one line, and a checkpoint written before reductions loads as
none. pruning.py's own rules are tests/test_pruning.py's."""
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import caption
import evaluate
import vlm
from infra.checkpoint import atomic_save, load_checkpoint
from infra.distributed import setup_distributed
from infra.errors import user_errors
from pruning import reduce_tokens
from train import TrainConfig, check_positions, train
from vlm import VLMConfig, build_vlm

FRAMES, PATCHES, KEEP = 3, 16, 20  # the tiny tower's 28 px / patch 7 grid: 3 x 16 = 48 tokens from linear, 20 kept


@pytest.fixture(scope="module")
def trained(tiny_bases, tiny_manifest, tmp_path_factory):
    """1 + 1 epochs of linear + LoRA keeping 20 of 48 tokens by merging, then DivPrune."""
    clip, llm = tiny_bases
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(clip=str(clip), llm=str(llm), train_manifest=str(tiny_manifest), output_dir=str(out),
                      cache_dir=str(out / "cache"), projector="linear", peft="lora", stage1_epochs=1,
                      stage2_epochs=1, batch_size=4, grad_accum=1, lora_r=4, num_frames=FRAMES, max_new_tokens=4,
                      eval_batch_size=4, num_workers=0, dtype="fp32", token_reduction="merge+divprune",
                      visual_tokens=KEEP)
    assert train(cfg, setup_distributed()) is not None
    return out / "checkpoints" / "best_model.pt"


@pytest.fixture
def visual_slots(monkeypatch):
    """The <|video_pad|> slots of every prompt row the LM receives, and the visual tokens written over them."""
    seen = []

    def recording_splice(embed_tokens, input_ids, visual, video_pad_id):
        seen.append(((input_ids == video_pad_id).sum(1).tolist(), visual.shape[1]))
        return splice(embed_tokens, input_ids, visual, video_pad_id)
    splice = vlm.splice_visual_tokens
    monkeypatch.setattr(vlm, "splice_visual_tokens", recording_splice)
    return seen


def test_the_checkpoint_records_the_reduction_and_evaluate_and_caption_use_it(trained, tiny_manifest, tmp_path,
                                                                             visual_slots):
    saved = load_checkpoint(trained)
    assert {k: saved["vlm_config"][k] for k in ("token_reduction", "visual_tokens", "merge_threshold")} == \
        {"token_reduction": "merge+divprune", "visual_tokens": KEEP, "merge_threshold": 0.6}
    results = evaluate.evaluate_checkpoint(trained, split="test", batch_size=3, max_new_tokens=3, show=False,
                                           output_dir=tmp_path / "eval")
    assert len(results["predictions"]) == 4 and visual_slots  # batches of 3 and 1
    assert all(slots == [KEEP] * len(slots) and tokens == KEEP for slots, tokens in visual_slots)
    visual_slots.clear()
    videos = [tiny_manifest.parent / f"v{i}.mp4" for i in (16, 17)]
    assert caption.main([str(trained), *map(str, videos), "--max-new-tokens", "3", "--token-reduction",
                         "merge+divprune", "--visual-tokens", str(KEEP)]) == 0
    assert visual_slots == [([KEEP, KEEP], KEEP)]


def test_an_exported_folder_reduces_as_its_checkpoint(trained, tmp_path):
    from export import export_checkpoint, load_exported
    model, _ = load_exported(export_checkpoint(trained, tmp_path / "exported"))
    assert (model.config.token_reduction, model.config.visual_tokens) == ("merge+divprune", KEEP)
    features = torch.randn(2, FRAMES, PATCHES, model.projector.config.vision_dim)
    assert model.project(features).shape[1] == KEEP


@pytest.mark.parametrize("command", [evaluate.main, caption.main])
@pytest.mark.parametrize("flags", [["--visual-tokens", "8"], ["--token-reduction", "divprune"]])
def test_a_reduction_other_than_the_checkpoints_is_refused_in_one_line(trained, tiny_manifest, command, flags):
    extra = [str(tiny_manifest.parent / "v16.mp4")] if command is caption.main else []
    with pytest.raises(SystemExit) as refused:
        command([str(trained), *extra, *flags])
    assert str(refused.value.code) == f"error: this model was trained with --token-reduction merge+divprune " \
        f"--visual-tokens {KEEP} and always reads videos so; drop --token-reduction / --visual-tokens or give those"


def test_a_checkpoint_written_before_reductions_loads_as_none(trained, tmp_path):
    old = load_checkpoint(trained)
    for key in ("token_reduction", "visual_tokens", "merge_threshold"):
        del old["vlm_config"][key], old["train_config"][key]
    atomic_save(old, tmp_path / "old.pt")
    model = evaluate.rebuild_model(load_checkpoint(tmp_path / "old.pt"), clip=None, llm=None, device="cpu",
                                   dtype=torch.float32)
    assert model.config.token_reduction == "none" and model.config.visual_tokens is None
    features = torch.randn(2, FRAMES, PATCHES, model.projector.config.vision_dim)
    assert model.project(features).shape[1] == FRAMES * PATCHES
    evaluate.check_asked_reduction(old["vlm_config"], "none")  # as trained
    with pytest.raises(ValueError, match="trained with --token-reduction none and"):
        evaluate.check_asked_reduction(old["vlm_config"], "divprune", 8)


@pytest.fixture(scope="module")
def linear_model(tiny_bases):
    clip, llm = tiny_bases
    config = VLMConfig(clip_path=str(clip), llm_path=str(llm), projector={"name": "linear"}, num_frames=FRAMES,
                       token_reduction="merge+divprune", visual_tokens=KEEP)
    return build_vlm(config, dtype=torch.float32)


def test_a_batch_of_different_videos_stays_rectangular_and_each_row_is_reduced_alone(linear_model):
    """A static video (everything merges), a noise video (nothing does) and one half static: K tokens each, equal to
    reducing each video by itself, and the loss and the captions take the batch as it is."""
    torch.manual_seed(0)
    dim = linear_model.projector.config.vision_dim
    static = torch.randn(1, PATCHES, dim).expand(FRAMES, -1, -1)
    half = torch.cat([static[:, :PATCHES // 2], torch.randn(FRAMES, PATCHES // 2, dim)], dim=1)
    features = torch.stack([static, torch.randn(FRAMES, PATCHES, dim), half])  # (3, F, P, Dv)
    with torch.no_grad():
        batched = linear_model.project(features)
        alone = [linear_model.project(video[None])[0] for video in features]
        projected = linear_model.projector(features)
    assert batched.shape == (3, KEEP, linear_model.llm.config.hidden_size)
    torch.testing.assert_close(batched, torch.stack(alone), rtol=0, atol=0)
    expected, _ = reduce_tokens(projected, "merge+divprune", KEEP, frames=FRAMES)
    torch.testing.assert_close(batched, expected, rtol=0, atol=0)
    loss = linear_model(features, ["빨간 원이 움직인다.", "파란 원이 지나간다.", "노란 원"])
    assert torch.isfinite(loss)
    assert len(linear_model.generate(features, max_new_tokens=2)) == 3


def test_check_positions_counts_the_kept_tokens(linear_model):
    """The longest sequence is counted with K visual tokens: a caption budget that fits K but not all 48 passes."""
    limit = linear_model.llm.config.max_position_embeddings
    fits_kept = limit - len(linear_model.template.prompt_ids(KEEP)) - 1
    cfg = SimpleNamespace(num_frames=FRAMES, max_caption_tokens=fits_kept, max_new_tokens=4)
    check_positions(linear_model, cfg)
    unreduced = replace(linear_model.config, token_reduction="none", visual_tokens=None)
    whole = vlm.VLM(linear_model.vision, linear_model.projector, linear_model.llm, linear_model.template.tokenizer,
                    unreduced)
    with_all = len(linear_model.template.prompt_ids(FRAMES * PATCHES))  # the prompt with all 48 visual tokens
    with pytest.raises(ValueError, match=f"the prompt \\({with_all} tokens with the video's\\)"):
        check_positions(whole, cfg)


@pytest.mark.parametrize("projector, method, keep, message", [
    ("perceiver", "merge", 8, "--token-reduction merge: the perceiver projector's query tokens have no frames to "
                              "merge across; use divprune"),
    ("cabstractor", "merge+divprune", 8, "--token-reduction merge+divprune: the cabstractor projector's query tokens "
                                         "have no frames to merge across; use divprune"),
    ("linear", "none", 8, "--visual-tokens 8 needs a --token-reduction (divprune, merge or merge+divprune); without "
                          "one every visual token is kept"),
    ("linear", "divprune", None, "--token-reduction divprune needs --visual-tokens K >= 1, the tokens kept per video"),
])
def test_a_reduction_the_projector_cannot_use_is_one_line_before_anything_loads(tiny_bases, tmp_path, projector,
                                                                               method, keep, message):
    clip, llm = tiny_bases
    cfg = TrainConfig(clip=str(clip), llm=str(llm), train_manifest=str(tmp_path / "absent.jsonl"), projector=projector,
                      output_dir=str(tmp_path / "run"), token_reduction=method, visual_tokens=keep)
    with pytest.raises(SystemExit) as refused, user_errors():  # as train.py's command line runs it
        train(cfg, setup_distributed())
    assert str(refused.value.code) == f"error: {message}"
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError) as refused:  # a hand-made config too, before the bases load
        build_vlm(VLMConfig(clip_path="absent", llm_path="absent", projector={"name": projector},
                            token_reduction=method, visual_tokens=keep))
    assert str(refused.value) == message
