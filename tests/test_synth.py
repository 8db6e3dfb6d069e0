"""synth.py: the caption grammar reads back (every template, value and synonym), the dataset is deterministic and
holds out attribute combinations (or colour-shape pairs), and `python -m demo.synth` writes it."""
import numpy as np

from data import read_frames, read_manifest
from demo.synth import ATTRIBUTES, CAPTION_TEMPLATES, CAPTION_WORDS, attribute_combinations, caption_choices, \
    heldout_combinations, heldout_pairs, main, make_caption, parse_caption_attributes, synth_dataset


def test_parse_inverts_every_template_value_and_synonym():
    combinations = attribute_combinations()
    assert len(combinations) == 6 * 5 * 4 * 4
    for template in CAPTION_TEMPLATES:
        for n, attributes in enumerate(combinations):  # every value, and every pair of values, in every template
            choices = caption_choices(attributes)
            words = {slot: options[n % len(options)] for slot, options in choices.items()}
            assert parse_caption_attributes(make_caption(template, words)) == attributes
        for attributes in combinations[:: len(combinations) // 24]:  # and every synonym of every slot
            choices = caption_choices(attributes)
            for slot, options in choices.items():
                for option in options:
                    words = {s: option if s == slot else o[0] for s, o in choices.items()}
                    assert parse_caption_attributes(make_caption(template, words)) == attributes


def test_parse_says_none_when_unsure():
    assert parse_caption_attributes("빨간 원과 파란 별이 검은 배경에서 움직인다.") == {
        "colour": None, "shape": None, "motion": None, "background": "black"}
    assert set(parse_caption_attributes("영상이 나온다.").values()) == {None}
    assert all(set(CAPTION_WORDS[name]) == set(values) for name, values in ATTRIBUTES.items())


def test_synth_is_deterministic_and_holds_out_combinations(tmp_path):
    options = dict(num=24, num_val=6, num_test=6, size=32, frames=8)
    first = synth_dataset(tmp_path / "a", seed=3, **options)
    second = synth_dataset(tmp_path / "b", seed=3, **options)
    assert first.read_text(encoding="utf-8") == second.read_text(encoding="utf-8")
    samples = read_manifest(first)
    for sample in samples[::5]:
        assert np.array_equal(read_frames(sample.video, 8), read_frames(tmp_path / "b" / "videos" /
                                                                        sample.video.name, 8))
    assert synth_dataset(tmp_path / "c", seed=4, **options).read_text(encoding="utf-8") != first.read_text(
        encoding="utf-8")
    combos = {name: {tuple(s.attributes.values()) for s in samples if s.split == name} for name in
              ("train", "val", "test")}
    assert [len([s for s in samples if s.split == name]) for name in ("train", "val", "test")] == [12, 6, 6]
    assert not combos["train"] & combos["val"] and not combos["train"] & combos["test"]
    assert not combos["val"] & combos["test"]
    for sample in samples:
        assert 2 <= len(sample.captions) <= 5 and len(set(sample.captions)) == len(sample.captions)
        assert all(parse_caption_attributes(caption) == sample.attributes for caption in sample.captions)
        assert read_frames(sample.video, 8).shape == (8, 32, 32, 3)


def test_synth_heldout_is_the_same_for_any_size(tmp_path):
    """The held-out combinations depend on the seed only, so a bigger run tests on the same combinations."""
    small = read_manifest(synth_dataset(tmp_path / "s", 10, 5, num_val=0, num_test=5, size=16, frames=2))
    big = read_manifest(synth_dataset(tmp_path / "b", 20, 5, num_val=0, num_test=10, size=16, frames=2))
    assert [s.attributes for s in small if s.split == "test"] == [s.attributes for s in big if s.split == "test"][:5]


def test_heldout_pairs_never_meet_in_train():
    """--heldout pairs: 6 colour-shape pairs (one per colour, each shape losing at most two colours) appear only in
    val (3) or test (3), every colour and shape still trains, and 20% of the combinations leave train as in the
    standard split."""
    for seed in range(5):
        pools = heldout_pairs(seed)
        pairs = {name: {(c["colour"], c["shape"]) for c in pool} for name, pool in pools.items()}
        assert len(pairs["val"]) == len(pairs["test"]) == 3 and len(pairs["train"]) == 24
        assert not pairs["train"] & pairs["val"] and not pairs["train"] & pairs["test"]
        assert not pairs["val"] & pairs["test"]
        held = pairs["val"] | pairs["test"]
        assert sorted(colour for colour, _ in held) == sorted(ATTRIBUTES["colour"])
        assert max(sum(shape == s for _, s in held) for shape in ATTRIBUTES["shape"]) <= 2
        assert {c["colour"] for c in pools["train"]} == set(ATTRIBUTES["colour"])
        assert {c["shape"] for c in pools["train"]} == set(ATTRIBUTES["shape"])
        assert [len(pools[n]) for n in ("train", "val", "test")] == [len(heldout_combinations(seed)[n])
                                                                     for n in ("train", "val", "test")]
        assert sorted(map(str, sum(pools.values(), []))) == sorted(map(str, attribute_combinations()))
    assert heldout_pairs(0) == heldout_pairs(0) and heldout_pairs(0) != heldout_pairs(1)


def test_synth_command_line(tmp_path):
    main([str(tmp_path / "pairs"), "--num", "10", "--seed", "1", "--size", "32", "--frames", "8", "--heldout", "pairs"])
    test = [s.attributes for s in read_manifest(tmp_path / "pairs" / "manifest.jsonl") if s.split == "test"]
    assert (test[0]["colour"], test[0]["shape"]) in {(c["colour"], c["shape"]) for c in heldout_pairs(1)["test"]}
    main([str(tmp_path / "out"), "--num", "10", "--seed", "1", "--size", "32", "--frames", "8"])
    samples = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert [s.split for s in samples] == ["train"] * 8 + ["val", "test"]
    assert all(read_frames(s.video, 8).shape == (8, 32, 32, 3) for s in samples)
    again = read_manifest(synth_dataset(tmp_path / "again", 10, 1, size=32, frames=8))
    assert [(s.id, s.captions, s.attributes) for s in again] == [(s.id, s.captions, s.attributes) for s in samples]
