"""bert.py against transformers' BertModel and BertTokenizer on tiny random BERT folders with a Korean WordPiece
vocabulary (trained here, tied to nothing else in kovlm). transformers is imported inside the tests only."""
import json
from pathlib import Path

import pytest
import torch

from scoring import bert

KOREAN_CORPUS = [
    "빨간 원이 파란 배경 위에서 왼쪽으로 움직인다.", "파란 배경에서 빨간 원이 왼쪽으로 이동한다.",
    "초록색 사각형이 흰 배경 위를 오른쪽으로 지나간다.", "노란 삼각형이 검은 배경에서 위로 올라간다.",
    "고양이 한 마리가 소파 위에서 자고 있다.", "강아지가 공원에서 공을 쫓아 달린다.",
]
# Captions the tokenizer and the encoder are checked on: sub-words, unknown syllables, Latin letters in both cases
# and with accents, punctuation, a literal special token, runs of spaces, an empty and an over-long caption.
TEXTS = ["빨간 원이 움직인다!", "고양이가 소파 위에서 잔다.", "Café ABC 파란 배경, (위로) 간다?", "개 [SEP] 고양이",
         "  초록색\t사각형이   지나간다  ", "", "   ", " ".join(KOREAN_CORPUS * 3), "뷁 똠양꿍"]
TOLERANCE = 1e-5  # fp32: our SDPA and transformers' attention round differently (measured max 4e-7)


def save_tiny_bert(path, *, layers=3, hidden_size=32, heads=4, vocab_size=160, lowercase=False, max_length=24,
                   seed=0) -> Path:
    """A random transformers BertModel with a WordPiece vocabulary trained on KOREAN_CORPUS: config.json,
    model.safetensors, tokenizer.json, vocab.txt, tokenizer_config.json (model_max_length = max_length)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizer
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    wordpiece = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=None if lowercase else False)
    wordpiece.train_from_iterator(KOREAN_CORPUS * 4, vocab_size=vocab_size, min_frequency=2, show_progress=False)
    wordpiece.save_model(str(path))
    BertTokenizer(str(path / "vocab.txt"), do_lower_case=lowercase, model_max_length=max_length).save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=wordpiece.get_vocab_size(), hidden_size=hidden_size, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden_size, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


def reference_hidden_states(folder, token_ids: list[list[int]]) -> list[tuple[torch.Tensor, ...]]:
    from transformers import BertModel
    model = BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return [model(torch.tensor([ids]), output_hidden_states=True).hidden_states for ids in token_ids]


def test_hidden_states_equal_bert_model_at_every_layer_in_padded_batches(bert_dir):
    tokenizer = bert.load_bert_tokenizer(bert_dir)
    token_ids = [tokenizer.encode(text) for text in TEXTS]
    assert len({len(ids) for ids in token_ids}) > 3  # batches really pad
    expected = reference_hidden_states(bert_dir, token_ids)
    for layer in range(4):
        model = bert.load_bert(bert_dir, layer)
        assert len(model.encoder.layer) == layer  # only the layers BERTScore reads are built
        states = bert.embed_token_ids(model, token_ids, tokenizer.pad_id, batch_size=3)
        for ids, ours, theirs in zip(token_ids, states, expected):
            assert ours.shape == (len(ids), 32) and ours.dtype == torch.float32
            torch.testing.assert_close(ours, theirs[layer][0], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("lowercase", [False, True])
@pytest.mark.parametrize("files", ["tokenizer.json", "vocab.txt"])
def test_tokenizer_equals_transformers_bert_tokenizer_as_bert_score_calls_it(tmp_path, lowercase, files):
    from transformers import AutoTokenizer
    folder = save_tiny_bert(tmp_path / "bert", lowercase=lowercase, layers=1)
    reference = AutoTokenizer.from_pretrained(folder)  # before tokenizer.json goes: it is read from vocab.txt then
    if files == "vocab.txt":
        (folder / "tokenizer.json").unlink()
        reference = AutoTokenizer.from_pretrained(folder)
    ours = bert.load_bert_tokenizer(folder)
    for text in TEXTS:
        stripped = text.strip()  # bert-score's sent_encode; an empty caption is [CLS] [SEP] there
        expected = reference.encode(stripped, add_special_tokens=True, max_length=reference.model_max_length,
                                    truncation=True) if stripped else [reference.cls_token_id, reference.sep_token_id]
        assert ours.encode(text) == expected, text
    assert len(ours.encode(TEXTS[7])) == 24 and ours.encode(TEXTS[7])[-1] == ours.sep_id  # cut, [SEP] kept
    assert (ours.cls_id, ours.sep_id, ours.pad_id) == (reference.cls_token_id, reference.sep_token_id,
                                                       reference.pad_token_id)


def test_pretraining_and_tf_era_checkpoints_load_the_same_encoder(bert_dir, tmp_path):
    """BertForPreTraining's `bert.` prefix and heads, and a pytorch_model.bin with LayerNorm gamma / beta names."""
    from safetensors.torch import load_file
    state = load_file(bert_dir / "model.safetensors")
    renamed = {"bert." + key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"):
               tensor for key, tensor in state.items()}
    renamed |= {"cls.predictions.bias": torch.zeros(3), "bert.pooler.dense.weight": torch.zeros(32, 32),
                "bert.embeddings.position_ids": torch.arange(64)}
    folder = tmp_path / "pretraining"
    folder.mkdir()
    (folder / "config.json").write_text((bert_dir / "config.json").read_text())
    torch.save(renamed, folder / "pytorch_model.bin")
    ours, theirs = bert.load_bert(folder, 3), bert.load_bert(bert_dir, 3)
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name


def test_dtype_is_respected_and_states_come_back_in_float32(bert_dir):
    tokenizer = bert.load_bert_tokenizer(bert_dir)
    token_ids = [tokenizer.encode(text) for text in TEXTS[:4]]
    half = bert.load_bert(bert_dir, 2, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in half.parameters())
    full = bert.embed_token_ids(bert.load_bert(bert_dir, 2), token_ids, tokenizer.pad_id)
    for a, b in zip(bert.embed_token_ids(half, token_ids, tokenizer.pad_id), full):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)  # bf16 keeps 8 bits of mantissa


def edit_folder(source: Path, target: Path, *, drop=(), add=None, config=None) -> Path:
    from safetensors.torch import load_file, save_file
    target.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (target / name).write_bytes((source / name).read_bytes())
    (target / "config.json").write_text(json.dumps({**json.loads((source / "config.json").read_text()),
                                                    **(config or {})}))
    state = {k: v for k, v in load_file(source / "model.safetensors").items() if k not in drop}
    save_file(state | (add or {}), target / "model.safetensors")
    return target


@pytest.mark.parametrize("edit, layers, message", [
    (dict(drop=["encoder.layer.1.output.dense.bias"]), 3, r"missing weights 'encoder.layer.1.output.dense.bias'"),
    (dict(add={"encoder.layer.7.output.dense.bias": torch.zeros(32)}), 3, r"unexpected weights 'encoder.layer.7"),
    (dict(add={"embeddings.extra.weight": torch.zeros(2)}), 3,
     r"unexpected weights 'embeddings.extra.weight'; Bert has no place for them"),
    (dict(config={"intermediate_size": 48}), 3,
     r"'encoder.layer.0.intermediate.dense.bias' has shape \(64,\), but config.json implies \(48,\)"),
    (dict(config={"position_embedding_type": "relative_key"}), 3, r"config.json: position_embedding_type"),
    (dict(config={"model_type": "roberta"}), 3, r"model_type 'roberta' is not BERT"),
    (dict(), 4, r"layer 4 does not exist; this BERT has layers 0 \(the embeddings\) to 3"),
])
def test_a_folder_that_does_not_match_is_refused_naming_the_weight(bert_dir, tmp_path, edit, layers, message):
    with pytest.raises(ValueError, match=message):
        bert.load_bert(edit_folder(bert_dir, tmp_path / "edited", **edit), layers)


def test_a_layer_past_the_one_asked_is_neither_loaded_nor_required(bert_dir, tmp_path):
    folder = edit_folder(bert_dir, tmp_path / "cut", drop=[k for k in bert.load_bert(bert_dir, 3).state_dict()
                                                           if k.startswith("encoder.layer.2.")])
    assert len(bert.load_bert(folder, 2).encoder.layer) == 2
    with pytest.raises(ValueError, match="missing weights 'encoder.layer.2."):
        bert.load_bert(folder, 3)


def test_missing_files_are_named(bert_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        bert.load_bert(tmp_path, 1)
    folder = edit_folder(bert_dir, tmp_path / "no_tokenizer")
    (folder / "tokenizer.json").unlink()
    (folder / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.txt"):
        bert.load_bert_tokenizer(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights; expected model.safetensors or pytorch_model.bin"):
        bert.load_bert(folder, 1)


def test_bench_runs_the_bert_base_shape_up_to_the_layer_asked():
    result = bert.bench(layer=1, batch_size=2, sentences=2)  # a smoke test: the figure comes from `python -m scoring.bert --bench`
    assert result["sentences_per_s"] > 0 and result["layer"] == 1 and 12 <= result["mean_tokens"] <= 32
