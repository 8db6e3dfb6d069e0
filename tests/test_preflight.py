"""preflight.py: the prompt length counted from config.json and tokenizer.json alone equals the built model's, for a
resampler and a per-patch projector; a checkpoint's missing field and mis-shaped tensor are named."""
from dataclasses import asdict

import pytest
import torch

from infra.errors import UserError
from infra.preflight import check_checkpoint, check_trainable_shapes, prompt_tokens
from vlm import VLMConfig, build_vlm


@pytest.mark.parametrize("projector", [{"name": "crossattn", "num_queries": 4}, {"name": "linear"}])
def test_the_prompt_counted_before_loading_is_the_models(tiny_bases, projector):
    clip, llm = tiny_bases
    model = build_vlm(VLMConfig(clip_path=str(clip), llm_path=str(llm), projector=projector, num_frames=3),
                      dtype=torch.float32)
    patches = (model.vision.config.image_size // model.vision.config.patch_size) ** 2
    visual = model.projector.config.output_tokens(3, patches)
    assert prompt_tokens(asdict(model.config), clip, llm) == len(model.template.prompt_ids(visual))
    state = model.trainable_state_dict()
    name = next(iter(state))
    check_trainable_shapes(state, model)
    with pytest.raises(UserError, match=f"best.pt: tensor {name} has shape \\(2, 2\\), the model's is"):
        check_trainable_shapes(state | {name: torch.zeros(2, 2)}, model, "best.pt")
    with pytest.raises(UserError, match=f"best.pt: tensor {name} is missing \\(1 in all\\)"):
        check_trainable_shapes({k: v for k, v in state.items() if k != name}, model, "best.pt")
    with pytest.raises(UserError, match="best.pt: the checkpoint has no 'trainable' \\(missing\\)"):
        check_checkpoint({"vlm_config": {}, "train_config": {}}, "best.pt")
