"""The BERT encoder (Devlin et al. 2019, arXiv 1810.04805) that BERTScore reads, loaded from a Hugging Face snapshot.

BERTScore (bertscore.py) embeds every caption with one hidden layer of a BERT model and matches the token
vectors of a candidate and a reference. This file gives those vectors: the tokenizer (WordPiece, `[CLS] ... [SEP]`),
and an encoder equal to transformers' `BertModel` hidden states (reference: transformers/models/bert/
modeling_bert.py, v5.25). A BERT layer is post-LN, unlike CLIP's and Qwen3's pre-norm blocks:
x = LN(x + attn(x)), then x = LN(x + mlp(x)). Module names are transformers', so loading is a prefix strip.
Only the layers BERTScore reads are built and loaded (layer 9 of bert-base-multilingual-cased's 12).

    python -m scoring.bert --bench   # captions/s of a random 110M-parameter BERT shape (12 layers, width 768), CPU

Shape legend: B sentences in a batch, T tokens (with [CLS] and [SEP]), C hidden_size, nh heads, hs head dim,
I intermediate_size, V vocab.
"""
import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from infra import snapshot
from infra.errors import UserError

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_hf(cls, config: dict) -> "BertConfig":
        """From a BertModel `config.json`; refuses, by name, what this encoder does not compute."""
        if config.get("model_type", "bert") != "bert":
            raise UserError(f"model_type '{config['model_type']}' is not BERT (expected 'bert')")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise UserError(f"position_embedding_type '{config['position_embedding_type']}' is not supported "
                             f"(only 'absolute', BERT's learned positions)")
        if config.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise UserError(f"hidden_act '{config['hidden_act']}' is not supported ({', '.join(ACTIVATIONS)})")
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [name for name in required if name not in config]
        if missing:
            raise UserError(f"no {', '.join(missing)}; a BERT config.json names them all")
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


class BertEmbeddings(nn.Module):
    """Token + position + token-type (always type 0: one sentence) embeddings, then LayerNorm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]  # (B, T, C) + (C,)
        return self.LayerNorm(x + self.position_embeddings.weight[:T])  # (B, T, C) + (T, C): token t, position t


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        C, self.nh = config.hidden_size, config.num_attention_heads
        self.query, self.key, self.value = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.nh, C // self.nh).transpose(1, 2)  # (B, T, C) -> (B, nh, T, hs)
                   for proj in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # keep (B, 1, 1, T): no padded key is seen
        return y.transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, nh, hs) -> (B, T, C)


class BertDenseLayerNorm(nn.Module):
    """transformers' BertSelfOutput / BertOutput: the post-LN residual LN(residual + dense(x))."""

    def __init__(self, in_features: int, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dense(x))  # (B, T, C)


class BertLayer(nn.Module):
    """The ModuleDicts only carry transformers' names (attention.self, attention.output, intermediate.dense), so
    checkpoint keys map 1:1 without a class for each."""

    def __init__(self, config: BertConfig):
        super().__init__()
        C, I = config.hidden_size, config.intermediate_size
        self.attention = nn.ModuleDict({"self": BertSelfAttention(config), "output": BertDenseLayerNorm(C, config)})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(C, I)})
        self.output = BertDenseLayerNorm(I, config)
        self.activation = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attention.output(self.attention.self(x, keep), x)  # (B, T, C)
        return self.output(self.activation(self.intermediate.dense(x)), x)  # (B, T, C) -> (B, T, I) -> (B, T, C)


class Bert(nn.Module):
    """`forward(input_ids, attention_mask)` is `BertModel(...).hidden_states[len(self.encoder.layer)]`: the
    embeddings (num_layers 0) or the output of the last layer built."""

    def __init__(self, config: BertConfig, num_layers: int):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(BertLayer(config) for _ in range(num_layers))})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T), attention_mask (B, T) 1 for tokens, 0 for padding -> hidden states (B, T, C)."""
        keep = attention_mask.bool()[:, None, None, :]  # (B, T) -> (B, 1, 1, T)
        x = self.embeddings(input_ids)  # (B, T, C)
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x


# ---- loading a Hugging Face snapshot folder (snapshot.py reads it) ----

def bert_name(key: str, config: BertConfig, num_layers: int) -> str | None:
    """Our name for a checkpoint key, or None for one BERTScore does not use: the pooler, BertForPreTraining's
    `cls.*` heads, the `position_ids` / `token_type_ids` buffers, layers past `num_layers`. BertForPreTraining
    checkpoints prefix the encoder with `bert.`; TF-era ones (bert-base-multilingual-cased's pytorch_model.bin)
    name LayerNorm parameters gamma / beta, as transformers' loader renames too."""
    key = key.removeprefix("bert.")
    if key.startswith(("pooler.", "cls.")) or key.endswith(("position_ids", "token_type_ids")):
        return None
    layer = key.split(".")[2] if key.startswith("encoder.layer.") else ""
    if layer.isdigit() and num_layers <= int(layer) < config.num_hidden_layers:
        return None
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def load_bert(path, num_layers: int, *, dtype: torch.dtype = torch.float32, device="cpu") -> Bert:
    """A frozen Bert with the embeddings and the first `num_layers` layers of a Hugging Face BERT folder.

    Built on the meta device and filled tensor by tensor; every kept key must match a parameter in name and shape,
    and every parameter must be in the checkpoint."""
    folder = Path(path).expanduser()
    config = snapshot.read_config(folder, BertConfig.from_hf)
    if not 0 <= num_layers <= config.num_hidden_layers:
        raise UserError(f"{folder}: layer {num_layers} does not exist; this BERT has layers 0 (the embeddings) "
                         f"to {config.num_hidden_layers}")
    with torch.device("meta"):
        model = Bert(config, num_layers)
    snapshot.load_into(model, folder, lambda key: bert_name(key, config, num_layers), dtype=dtype, device=device)
    return model.requires_grad_(False).eval()


# ---- the tokenizer ----

class BertTokenizer:
    """WordPiece ids with `[CLS]` and `[SEP]`, truncated to `max_length` tokens, as bert-score's `sent_encode`
    gets them from transformers' BertTokenizer: `encode(text.strip(), add_special_tokens=True, truncation=True,
    max_length=model_max_length)`; an empty caption is `[CLS] [SEP]`."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, cls_id: int, sep_id: int, pad_id: int):
        tokenizer.enable_truncation(max_length)  # counts [CLS] and [SEP]: the caption's end is cut
        self.tokenizer, self.max_length = tokenizer, max_length
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id

    def encode(self, text: str) -> list[int]:
        text = text.strip()
        return self.tokenizer.encode(text).ids if text else [self.cls_id, self.sep_id]


SPECIAL_TOKENS = {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                  "mask_token": "[MASK]"}  # transformers' BertTokenizer defaults; tokenizer_config.json may rename


def wordpiece_from_vocab(vocab_file: Path, options: dict, special: dict[str, str]) -> Tokenizer:
    """What transformers' BertTokenizer builds from a vocab.txt (its __init__): BERT's normaliser (lower-casing
    and accent stripping per do_lower_case, default True), punctuation/whitespace pre-splitting, WordPiece,
    `[CLS] $A [SEP]`. Special tokens are added so a literal "[SEP]" in a caption stays one token, as there."""
    lines = vocab_file.read_text(encoding="utf-8").removesuffix("\n").split("\n")  # load_vocab: one token a line
    vocab = {token: i for i, token in enumerate(lines)}
    tokenizer = Tokenizer(WordPiece(vocab, unk_token=special["unk_token"]))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=options.get("tokenize_chinese_chars", True),
        strip_accents=options.get("strip_accents"), lowercase=options.get("do_lower_case", True))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens([token for token in special.values() if token in vocab])
    cls, sep = special["cls_token"], special["sep_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    return tokenizer


def load_bert_tokenizer(path) -> BertTokenizer:
    """The folder's tokenizer.json, or a WordPiece tokenizer built from its vocab.txt and tokenizer_config.json.

    Captions are cut at tokenizer_config.json's model_max_length; without one, at the model's
    max_position_embeddings (where bert-score would fail on a longer caption instead)."""
    folder = Path(path).expanduser()
    options_file = folder / "tokenizer_config.json"
    options = json.loads(options_file.read_text()) if options_file.is_file() else {}
    special = {name: options.get(name, default) for name, default in SPECIAL_TOKENS.items()}
    if (folder / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.txt").is_file():
        tokenizer = wordpiece_from_vocab(folder / "vocab.txt", options, special)
    else:
        raise FileNotFoundError(f"{folder}: no tokenizer.json or vocab.txt; copy the BERT snapshot's tokenizer "
                                f"files into the folder")
    positions = snapshot.read_config(folder, BertConfig.from_hf).max_position_embeddings
    needed = [special[name] for name in ("cls_token", "sep_token", "pad_token")]
    ids = [tokenizer.token_to_id(token) for token in needed]
    if None in ids:
        raise UserError(f"{folder}: the tokenizer has no {needed[ids.index(None)]} token; BERTScore needs "
                         f"{', '.join(needed)}")
    return BertTokenizer(tokenizer, min(options.get("model_max_length", positions), positions), *ids)


@torch.no_grad()
def embed_token_ids(model: Bert, token_ids: list[list[int]], pad_id: int, batch_size: int = 64) -> list[torch.Tensor]:
    """Each sentence's hidden states (T_i, C) in float32, in the order given. Sentences run sorted by length, so a
    batch pads to nearly its own length; padding is masked out and changes no number beyond rounding."""
    device = model.embeddings.word_embeddings.weight.device
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]), reverse=True)
    states = [None] * len(token_ids)
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        input_ids = pad_sequence([torch.tensor(token_ids[i]) for i in batch], batch_first=True, padding_value=pad_id)
        lengths = torch.tensor([len(token_ids[i]) for i in batch])
        attention_mask = torch.arange(input_ids.shape[1]) < lengths[:, None]  # (B, T): True on tokens, not padding
        hidden = model(input_ids.to(device), attention_mask.to(device)).float().cpu()  # (B, T, C)
        for row, i in enumerate(batch):
            states[i] = hidden[row, :len(token_ids[i])]
    return states


def bench(*, layer: int = 9, batch_size: int = 64, sentences: int = 512, dtype=torch.float32, seed: int = 0) -> dict:
    """Sentences/s through embed_token_ids for bert-base's shape (vocab 30522, 12 layers of width 768: 110M
    parameters, random weights; `layer` of them run) on captions of 12-32 WordPiece tokens, on the CPU."""
    import time
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512)
    model = Bert(config, layer).to(dtype).eval()
    lengths = torch.randint(12, 33, (sentences,)).tolist()
    token_ids = [[101] + torch.randint(1000, config.vocab_size, (n - 2,)).tolist() + [102] for n in lengths]
    embed_token_ids(model, token_ids[:batch_size], 0, batch_size)  # warm-up
    started = time.perf_counter()
    embed_token_ids(model, token_ids, 0, batch_size)
    seconds = time.perf_counter() - started
    return {"sentences_per_s": sentences / seconds, "threads": torch.get_num_threads(), "layer": layer,
            "batch_size": batch_size, "mean_tokens": sum(lengths) / sentences, "dtype": str(dtype)}


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Benchmark the BERT encoder as BERTScore runs it (random weights).")
    parser.add_argument("--bench", action="store_true", required=True, help="run the benchmark")
    for flag, default in (("--layer", 9), ("--batch-size", 64), ("--sentences", 512)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights instead of float32")
    args = parser.parse_args()
    result = bench(layer=args.layer, batch_size=args.batch_size, sentences=args.sentences,
                   dtype=torch.bfloat16 if args.bf16 else torch.float32)
    # BERTScore encodes each candidate and each distinct reference once; matching costs little beside the encoder.
    print(f"{result['sentences_per_s']:.1f} sentences/s = {result['sentences_per_s'] / 2:.1f} captions/s with one "
          f"reference each ({result})")
