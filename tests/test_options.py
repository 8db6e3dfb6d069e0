"""options.py: the flag checks every command shares, one line naming the flag; NaN and inf refused; devices this torch
cannot use; the LM's position limit read from config.json alone."""
import json
import math

import pytest
import torch

from infra import options
from infra.errors import UserError


@pytest.mark.parametrize("check, name, value, words", [
    (options.at_least, "batch_size", 0, "--batch-size must be a whole number >= 1, got 0"),
    (options.positive, "stage2_lr", math.nan, "--stage2-lr must be a finite number, got nan"),
    (options.positive, "stage1_lr", math.inf, "--stage1-lr must be a finite number, got inf"),
    (options.non_negative, "weight_decay", -1e-3, "--weight-decay must not be negative, got -0.001"),
    (options.fraction, "val_fraction", 1.0, "--val-fraction must be in [0, 1), got 1.0"),
])
def test_each_kind_of_flag_is_refused_naming_it(check, name, value, words):
    args = (name, value, 1) if check is options.at_least else (name, value)
    with pytest.raises(UserError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        check(*args)


@pytest.mark.parametrize("max_new_tokens, decoding, words", [
    (0, {}, "--max-new-tokens must be a whole number >= 1"),
    (-1, {}, "--max-new-tokens must be a whole number >= 1"),
    (8, {"do_sample": True, "temperature": 0.0}, "leave out --do-sample"),
    (8, {"temperature": -1.0}, "--temperature must be a finite number above 0"),
    (8, {"do_sample": True, "top_p": 0.0}, r"--top-p must be in \(0, 1\]"),
    (8, {"top_p": 1.5}, r"--top-p must be in \(0, 1\]"),
    (8, {"repetition_penalty": 0.0}, "--repetition-penalty must be positive, got 0.0"),
    (8, {"no_repeat_ngram_size": -1}, "--no-repeat-ngram-size must be a whole number >= 0"),
])
def test_decoding_flags_that_leave_no_token_to_draw_are_refused(max_new_tokens, decoding, words):
    with pytest.raises(UserError, match=words):
        options.check_decoding(max_new_tokens, decoding)


def test_greedy_ignores_temperature_zero_and_good_settings_pass():
    options.check_decoding(64, {"do_sample": False, "temperature": 0.0})
    options.check_decoding(1, {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.2,
                               "no_repeat_ngram_size": 3})


def test_devices_this_torch_cannot_use_are_one_line():
    assert options.check_device(None) is None and options.check_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="--device tpu9: not a device name"):
        options.check_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: this torch sees no CUDA GPU"):
            options.check_device("cuda")
    else:
        with pytest.raises(UserError, match="--device cuda:99: there are"):
            options.check_device("cuda:99")


def test_positions_are_read_from_config_json_and_checked(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    assert options.position_limit(tmp_path) == 512
    options.check_positions(39, 472, 512)  # 39 + 472 + <|im_end|> = 512: fits exactly
    with pytest.raises(UserError, match="--max-new-tokens 600: .* = 640 positions, over the LM's 512; lower "
                                        "--max-new-tokens to at most 472"):
        options.check_positions(39, 600, 512)
    with pytest.raises(UserError, match="cannot read the LM's config"):
        options.position_limit(tmp_path / "missing")


def test_a_training_set_smaller_than_one_step_is_refused():
    options.check_window(8, batch_size=4, grad_accum=2, world=1)
    with pytest.raises(UserError, match=r"the train split has 3 samples, fewer than one optimizer step's 8 "
                                        r"\(--batch-size 4 x --grad-accum 2 x 1 processes\)"):
        options.check_window(3, batch_size=4, grad_accum=2, world=1)
