"""The assembled model on tiny random bases: prompt and label mask, label-only loss vs full logits, accumulation,
batched / KV-cache generation, trainable state, and the frozen-feature cache."""
import pytest
import torch
import torch.nn.functional as F
from conftest import write_noise_video

from features import FeatureCache, fill_feature_cache
from infra.errors import UserError
from lora import AdapterConfig
from vlm import IGNORE_INDEX, VLMConfig, build_vlm, caption_loss, describe_mismatch, merged_for_eval, \
    splice_visual_tokens

CAPTIONS = ["빨간 원이 왼쪽으로 움직인다.", "파란 배경에서 노란 삼각형이 위로 올라간다.", "초록색 사각형이 지나간다.",
            "노란 삼각형이 검은 배경에서 위로 올라간다."]


@pytest.fixture(scope="module")
def bases(tiny_bases):
    return tiny_bases


def make_model(bases, projector="perceiver", adapter=None, quant=None, seed=0):
    torch.manual_seed(seed)
    config = VLMConfig(clip_path=str(bases[0]), llm_path=str(bases[1]), num_frames=3, quant=quant,
                       projector={"name": projector, "num_queries": 4}, adapter=adapter)
    return build_vlm(config, dtype=torch.float32)


def splice(model, input_ids, visual):
    return splice_visual_tokens(model.llm.model.embed_tokens, input_ids, visual, model.template.video_pad_id)


def features(batch=4, frames=3, patches=16, width=32, seed=1):
    return torch.randn(batch, frames, patches, width, generator=torch.Generator().manual_seed(seed))


def test_label_mask_covers_exactly_the_caption_and_im_end(bases):
    model = make_model(bases)
    input_ids, labels = model.tokenize_batch(CAPTIONS[:2], num_visual=4)
    for b, caption in enumerate(CAPTIONS[:2]):
        supervised = labels[b][labels[b] != IGNORE_INDEX].tolist()
        assert supervised[-1] == model.template.im_end_id
        assert model.template.tokenizer.decode(supervised[:-1]) == caption
        start = (labels[b] != IGNORE_INDEX).nonzero()[0].item()
        assert input_ids[b, start:start + len(supervised)].tolist() == supervised  # labels sit on their own tokens
        prompt = model.template.tokenizer.decode(input_ids[b, :start].tolist(), skip_special_tokens=False)
        assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert prompt.count("<|video_pad|>") == 4
    assert model.count_label_tokens(CAPTIONS[:2]) == int((labels != IGNORE_INDEX).sum())


@pytest.mark.parametrize("projector", ["perceiver", "linear"])
def test_label_only_loss_equals_full_logits_cross_entropy(bases, projector):
    model = make_model(bases, projector=projector)
    feats = features()
    loss = model(feats, CAPTIONS)
    visual = model.project(feats)
    input_ids, labels = model.tokenize_batch(CAPTIONS, visual.shape[1])
    logits = model.llm(inputs_embeds=splice(model, input_ids, visual))  # (B, T, V): the naive way
    naive = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, naive, atol=1e-5, rtol=1e-5)
    hidden = model.llm.hidden_states(inputs_embeds=splice(model, input_ids, visual))
    # labels on the host (no synchronisation) or on the device: the same positions, the same loss
    torch.testing.assert_close(caption_loss(model.llm, hidden, labels), naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caption_loss(model.llm, hidden, labels.to(hidden.device), num_label_tokens=7),
                               naive * int((labels != IGNORE_INDEX).sum()) / 7, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_elements", [1, 3 * 128, 1 << 23])  # one row, 3 rows, all rows per chunk
def test_chunked_loss_has_the_gradient_of_full_logits_cross_entropy(bases, monkeypatch, chunk_elements):
    """caption_loss forms the logits a few rows at a time and hidden's gradient in the same pass
    (vlm.HeadCrossEntropy): loss and gradient equal F.cross_entropy over the full (B, T, V) logits, fp32, 1e-6."""
    monkeypatch.setattr("vlm.LOSS_CHUNK_ELEMENTS", chunk_elements)
    model = make_model(bases)
    visual = model.project(features()).detach()
    input_ids, labels = model.tokenize_batch(CAPTIONS, visual.shape[1])
    hidden = model.llm.hidden_states(inputs_embeds=splice(model, input_ids, visual)).detach().requires_grad_()
    ours = caption_loss(model.llm, hidden, labels, num_label_tokens=11)
    (grad_ours,) = torch.autograd.grad(ours * 0.7, hidden)
    logits = model.llm.logits_from_hidden(hidden)  # (B, T, V)
    naive = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum") / 11
    (grad_naive,) = torch.autograd.grad(naive * 0.7, hidden)
    torch.testing.assert_close(ours, naive, rtol=1e-6, atol=0)
    assert (grad_ours - grad_naive).norm() <= 1e-6 * grad_naive.norm()  # summation order differs: a few 1e-7
    with torch.no_grad():  # no gradient wanted: none formed, the same loss
        torch.testing.assert_close(caption_loss(model.llm, hidden, labels, num_label_tokens=11), ours.detach())


def test_one_batch_of_four_equals_four_accumulated_batches_of_one(bases):
    model = make_model(bases, adapter={"method": "dora", "r": 4, "alpha": 8, "dropout": 0.0,
                                       "targets": ["q_proj", "v_proj", "down_proj"]})
    with torch.no_grad():  # leave the zero init so the adapters' gradients are not trivially tied to B = 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    feats = features()
    trainable = [p for p in model.parameters() if p.requires_grad]
    model(feats, CAPTIONS).backward()
    whole = [p.grad.clone() for p in trainable]
    model.zero_grad()
    total_tokens = model.count_label_tokens(CAPTIONS)
    accumulated = 0.0
    for i in range(4):
        loss = model(feats[i:i + 1], CAPTIONS[i:i + 1], num_label_tokens=total_tokens)
        loss.backward()
        accumulated += loss.item()
    torch.testing.assert_close(torch.tensor(accumulated), model(feats, CAPTIONS).detach(), atol=1e-5, rtol=1e-5)
    for p, expected in zip(trainable, whole):
        torch.testing.assert_close(p.grad, expected, atol=1e-5, rtol=1e-4)


def greedy_without_cache(model, feats, max_new_tokens):
    """Recompute the whole sequence for every new token: the reference for KV-cache decoding."""
    visual = model.project(feats)
    ids = torch.tensor([model.template.prompt_ids(visual.shape[1])])
    generated = []
    for _ in range(max_new_tokens):
        logits = model.llm(inputs_embeds=splice(model, ids, visual))
        token = int(logits[0, -1].argmax())
        generated.append(token)
        if token in (model.template.im_end_id, model.template.end_of_text_id):
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return model.template.decode(generated)


def test_kv_cache_generation_equals_recomputing_and_batched_equals_single(bases):
    model = make_model(bases, quant="nf4").eval()
    feats = features()
    batched = model.generate(feats, max_new_tokens=8)
    single = [model.generate(feats[i:i + 1], max_new_tokens=8)[0] for i in range(4)]
    assert batched == single
    assert [greedy_without_cache(model, feats[i:i + 1], 8) for i in range(4)] == single
    assert not any("<|" in c or "<think>" in c for c in batched)  # decode() drops the special tokens


def test_generate_runs_no_decoder_forward_after_the_last_token(bases):
    model = make_model(bases).eval()
    model.template.im_end_id = model.template.end_of_text_id = -1  # never stop early: exactly max_new_tokens
    forwards = []
    model.llm.model.norm.register_forward_hook(lambda _m, args, _out: forwards.append(args[0].shape[1]))
    captions = model.generate(features(batch=2), max_new_tokens=5)
    prompt = len(model.template.prompt_ids(4))
    assert forwards == [prompt] + [1] * 4  # prefill, then one step for each token after the first
    assert len(captions) == 2


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_for_eval_generates_the_same_captions(bases, method):
    adapter = {"method": method, "r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj", "down_proj"]}
    model = make_model(bases, adapter=adapter, quant="nf4").eval()
    with torch.no_grad():  # adapters away from their init, or merging would change nothing
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    feats = features()
    expected = model.generate(feats, max_new_tokens=8)
    merged, reason = merged_for_eval(model, "yes")
    assert merged is not model and merged.projector is model.projector and "merged" in reason
    assert not any(type(m).__name__ in ("LoRALinear", "Linear4bit") for m in merged.llm.modules())
    assert any(type(m).__name__ == "LoRALinear" for m in model.llm.modules())  # the model keeps its adapters
    assert merged.generate(feats, max_new_tokens=8) == expected
    assert merged_for_eval(model, "no")[0] is model


def test_merge_for_eval_auto_merges_only_when_the_device_has_room(bases, monkeypatch):
    import vlm
    model = make_model(bases, adapter={"method": "lora", "r": 2, "alpha": 4, "dropout": 0.0, "targets": ["q_proj"]},
                       quant="nf4").eval()
    needed = vlm.dense_layer_bytes(model.llm)
    # 2 layers of q 48->64, k 48->32, v 48->32, o 64->48, gate / up 48->64, down 64->48: 18432 weights each, bf16
    assert needed == 2 * 18432 * 2
    monkeypatch.setattr(vlm, "free_memory_bytes", lambda device: needed)  # under the 1.25x margin
    unmerged, reason = merged_for_eval(model, "auto")
    assert unmerged is model and reason.startswith("not merged")
    monkeypatch.setattr(vlm, "free_memory_bytes", lambda device: 2 * needed)
    assert merged_for_eval(model, "auto")[0] is not model
    with pytest.raises(ValueError, match="merge="):
        merged_for_eval(model, "maybe")


def test_build_vlm_and_add_adapters_leave_the_given_configs_alone(bases):
    config = VLMConfig(clip_path=str(bases[0]), llm_path=str(bases[1]), num_frames=3, quant=None,
                       projector={"name": "perceiver", "num_queries": 4})
    model = build_vlm(config, dtype=torch.float32)
    assert config.projector == {"name": "perceiver", "num_queries": 4} and config.base_identity == {}
    assert model.config.base_identity == {"vision": {"model_type": "clip_vision_model",
                                                     "weights": model.vision.weights_fingerprint},
                                          "llm": model.llm.fingerprint}
    assert model.config.projector == {"name": "perceiver", "num_queries": 4, "depth": 2, "width": 32, "heads": 1,
                                      "ffn_mult": 4, "num_frames": 3, "temporal_init_std": 0.5,
                                      "pooled_frames": None, "mlp_depth": None}  # completed: what a checkpoint keeps
    built = model.config
    model.add_adapters(AdapterConfig(r=2, targets=["q_proj"]))
    assert built.adapter is None and model.config.adapter["r"] == 2


@pytest.mark.parametrize("record", [
    {"name": "perceiver", "num_queries": 4, "depth": 2, "width": 32, "heads": 1, "ffn_mult": 4, "num_frames": 3,
     "temporal_init_std": 0.5, "pooled_frames": None, "mlp_depth": None},
    {"name": "linear", "num_queries": None, "depth": None, "width": None, "heads": None, "ffn_mult": None,
     "num_frames": None, "temporal_init_std": None, "pooled_frames": None, "mlp_depth": None},
], ids=["perceiver", "linear"])
def test_a_projector_record_saved_before_rebuilds_and_passes_the_mismatch_check(bases, record):
    """VLMConfig.projector as checkpoints wrote it before the projector options became one dataclass with defaults
    (None for what a projector does not read): build_vlm reads it back to the same record, so evaluate's
    comparison of the saved config with the rebuilt model finds no difference."""
    config = VLMConfig(clip_path=str(bases[0]), llm_path=str(bases[1]), num_frames=3, quant=None, projector=record)
    model = build_vlm(config, dtype=torch.float32)
    assert model.config.projector == record
    assert describe_mismatch({"projector": record}, {"projector": model.config.projector}) is None


def test_decode_drops_special_tokens_and_the_think_block(bases):
    template = make_model(bases).template
    ids = template.encode("<think>\n\n</think>\n\n빨간 원이 움직인다.") + [template.im_end_id] + template.encode("뒤")
    assert template.decode(ids) == "빨간 원이 움직인다."


def test_trainable_state_round_trip_and_mismatch_is_named(bases):
    adapter = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
    model = make_model(bases, adapter=adapter, seed=0)
    state = model.trainable_state_dict()
    adapters = [f"llm.model.layers.{i}.self_attn.{t}.lora_{m}" for i in (0, 1) for t in ("q_proj", "v_proj")
                for m in "AB"]  # 2 layers x 2 targets x (A, B)
    assert sorted(state) == sorted([f"projector.{k}" for k in model.projector.state_dict()] + adapters)
    assert not any(".base." in k for k in state)  # frozen bases never enter a checkpoint
    other = make_model(bases, adapter=adapter, seed=1)
    other.load_trainable_state_dict(state)
    torch.testing.assert_close(other.trainable_state_dict(), state)
    with pytest.raises(UserError, match="no adapters"):
        make_model(bases).load_trainable_state_dict(state)
    message = describe_mismatch({"projector": {"name": "perceiver"}}, {"projector": {"name": "linear"}})
    assert message.startswith("projector.name: checkpoint has \"perceiver\"")


def test_stage_two_adds_adapters_to_the_frozen_llm(bases):
    model = make_model(bases, quant="nf4")
    names = model.add_adapters(AdapterConfig(method="dora", r=4, alpha=8, dropout=0.0, targets=["q_proj", "o_proj"]))
    assert len(names) == 2 * 2  # 2 layers x 2 targets
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {f"llm.model.layers.{i}.self_attn.{t}.{p}" for i in (0, 1) for t in ("q_proj", "o_proj")
                for p in ("lora_A", "lora_B", "magnitude")}  # 2 layers x 2 targets x 3 for DoRA
    assert trainable == {f"projector.{n}" for n, _ in model.projector.named_parameters()} | adapters


# ---- the feature cache -------------------------------------------------------------------------------------------
@pytest.fixture
def videos(tmp_path):
    from data import Sample
    return [Sample(id=str(i), video=write_noise_video(tmp_path / f"v{i}.mp4", seed=i), captions=["캡션"]) for i in range(3)]


def cache_for(model, root, num_frames=3, tower=None):
    return FeatureCache(root, tower=tower or model.vision.fingerprint, num_frames=num_frames,
                        image_size=model.vision.config.image_size, layer=model.config.vision_layer)


def test_feature_cache_equals_uncached_and_runs_the_tower_once(bases, videos, tmp_path):
    from data import preprocess, read_frames
    model = make_model(bases)
    cache = cache_for(model, tmp_path / "cache")
    calls = []
    model.vision.register_forward_hook(lambda *args: calls.append(1))
    good, encoded = fill_feature_cache(model, videos, cache, batch_size=2, show_progress=False)
    assert (len(good), encoded, len(calls)) == (3, 3, 2)  # batches of 2: two tower forwards for three videos
    for sample in videos:
        direct = model.encode_video(preprocess(read_frames(sample.video, 3), 28)[None])[0]
        torch.testing.assert_close(cache.load(sample.video).float(), direct, atol=2e-3, rtol=1e-3)  # fp16 storage
    calls.clear()
    _, encoded = fill_feature_cache(model, videos, cache, show_progress=False)
    assert encoded == 0 and not calls  # the second pass runs zero tower forwards


def test_feature_cache_is_invalidated_by_video_frames_or_tower(bases, videos, tmp_path):
    model = make_model(bases)
    cache = cache_for(model, tmp_path / "cache")
    fill_feature_cache(model, videos, cache, show_progress=False)
    assert all(cache.holds(s.video) for s in videos)
    assert not any(cache_for(model, tmp_path / "cache", num_frames=4).holds(s.video) for s in videos)
    assert not any(cache_for(model, tmp_path / "cache", tower="another tower").holds(s.video) for s in videos)
    write_noise_video(videos[0].video, seed=99)  # the same path, new content
    fresh = cache_for(model, tmp_path / "cache")
    assert not fresh.holds(videos[0].video) and fresh.holds(videos[1].video)


def test_corrupt_cache_entry_is_recomputed_with_a_warning(bases, videos, tmp_path):
    model = make_model(bases)
    cache = cache_for(model, tmp_path / "cache")
    fill_feature_cache(model, videos, cache, show_progress=False)
    expected = cache.load(videos[0].video)
    cache.path_for(videos[0].video).write_bytes(b"\x00torn write")
    with pytest.warns(UserWarning, match="unreadable"):
        _, encoded = fill_feature_cache(model, videos, cache, show_progress=False)
    assert encoded == 1
    torch.testing.assert_close(cache.load(videos[0].video), expected)


@pytest.mark.parametrize("layer", [4, -5])
def test_a_layer_the_tower_lacks_is_refused_when_the_model_is_built(bases, layer):
    config = VLMConfig(clip_path=str(bases[0]), llm_path=str(bases[1]), num_frames=3, quant=None,
                       projector={"name": "linear"}, vision_layer=layer)  # the tiny CLIP: 3 layers, states -4..3
    with pytest.raises(ValueError, match=rf"vision layer {layer} is out of range: .* has 3 layers, so hidden states "
                                         r"-4\.\.3 \(--vision-layer\)"):
        build_vlm(config, dtype=torch.float32)
