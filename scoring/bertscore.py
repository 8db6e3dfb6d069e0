"""BERTScore (Zhang et al. 2020, arXiv 1904.09675) from our BERT encoder (bert.py), equal to the bert-score
package's (0.3) numbers; `metrics.bertscore` is this `bertscore`.

Each caption is cut into WordPiece sub-words (an eojeol splits into pieces, so 고양이가 and 고양이 share pieces:
partial credit), embedded by one hidden layer of a BERT (layer 9 of bert-base-multilingual-cased, the package's
choice for Korean), and each token is matched to its most similar token on the other side (cosine): P averages
over the candidate's tokens, R over the reference's, with idf weights from the references when asked (rare pieces
count more than endings). tests/test_bertscore.py checks it against the package on a tiny random BERT.

This file also holds the input contract every caption metric checks (`check_captions`): it sits below metrics.py,
which imports it from here, so neither module imports the other.

Shape legend: B (candidate, reference) pairs in a batch, Th / Tr candidate / reference tokens (with [CLS] and
[SEP]), C the BERT's hidden_size.
"""
import math
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from torch.nn.utils.rnn import pad_sequence

from infra.errors import UserError
from scoring.bert import embed_token_ids, load_bert, load_bert_tokenizer

BERTSCORE_REFERENCE = ("bert-score 0.3 (score with model_type=FOLDER, num_layers={layer}, idf={idf}{baseline}): "
                       "greedy cosine matching of layer-{layer} token embeddings, mean over captions")


def check_caption(hyp, references, hyp_name: str, refs_name: str) -> None:
    if not isinstance(hyp, str):
        raise ValueError(f"{hyp_name} must be one caption string, got {type(hyp).__name__}")
    if isinstance(references, str) or not isinstance(references, (list, tuple)):
        raise ValueError(f"{refs_name} must be a list of reference captions, got {type(references).__name__}")
    if not references:
        raise ValueError(f"{refs_name} is empty; every video needs at least one reference caption")
    for k, ref in enumerate(references):
        if not isinstance(ref, str):
            raise ValueError(f"{refs_name}[{k}] must be a caption string, got {type(ref).__name__}")


def check_captions(hyps, refs) -> None:
    """One-line ValueErrors naming the offending entry: metrics over malformed input would be silently wrong."""
    for name, value in (("hyps", hyps), ("refs", refs)):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list with one entry per video, got {type(value).__name__}")
    if len(hyps) != len(refs):
        raise ValueError(f"got {len(hyps)} hypotheses but {len(refs)} reference lists; "
                         f"pass one list of reference captions per hypothesis")
    if not hyps:
        raise ValueError("no captions to score: hyps and refs are empty")
    for i, (hyp, references) in enumerate(zip(hyps, refs)):
        check_caption(hyp, references, f"hyps[{i}]", f"refs[{i}]")


def token_weights(reference_ids: list[list[int]], cls_id: int, sep_id: int, idf: bool) -> Callable[[int], float]:
    """bert-score's idf_dict. Without idf every token weighs 1 and [CLS] / [SEP] 0. With idf (get_idf_dict), each
    reference is a document: log((M + 1) / (df + 1)) over the M references (a token in none: log(M + 1)), so
    [CLS] and [SEP], in every reference, weigh log(1) = 0."""
    if not idf:
        return lambda token: 0.0 if token in (cls_id, sep_id) else 1.0
    document_frequency = Counter(token for ids in reference_ids for token in set(ids))
    return lambda token: math.log((len(reference_ids) + 1) / (document_frequency[token] + 1))


def _unit_padded(states: list[torch.Tensor]) -> torch.Tensor:
    """Token vectors scaled to length 1, padded with zeros: [(T_i, C)] -> (B, T, C)."""
    return pad_sequence([state / state.norm(dim=-1, keepdim=True) for state in states], batch_first=True)


def _weight_shares(weights: list[torch.Tensor]) -> torch.Tensor:
    """Token weights as shares of their caption's total, padded with zeros: [(T_i,)] -> (B, T)."""
    padded = pad_sequence(weights, batch_first=True)  # (B, T)
    return padded / padded.sum(dim=1, keepdim=True)


def greedy_matching(hyp_states, hyp_weights, ref_states, ref_weights) -> torch.Tensor:
    """bert-score's greedy_cos_idf over one batch of (candidate, reference) pairs -> (B, 3) P, R, F1.

    Every token (with [CLS] and [SEP]) is a match target; each token's best cosine is weighted by its idf share.
    As there, the batch is padded and a padded position counts as cosine 0, so a token whose best cosine is
    negative scores 0 unless its partner is the batch's longest: never with real BERT layers (cosines > 0), but
    it keeps us equal to the package on random weights too. A caption of only [CLS] [SEP] (empty) on either side
    gets P = R = F1 = 0."""
    similarity = _unit_padded(hyp_states) @ _unit_padded(ref_states).transpose(1, 2)  # (B, Th, C) @ (B, C, Tr)
    precision = (similarity.max(dim=2).values * _weight_shares(hyp_weights)).sum(dim=1)  # (B, Th) -> (B,)
    recall = (similarity.max(dim=1).values * _weight_shares(ref_weights)).sum(dim=1)  # (B, Tr) -> (B,)
    f1 = 2 * precision * recall / (precision + recall)
    empty = torch.tensor([len(h) == 2 or len(r) == 2 for h, r in zip(hyp_states, ref_states)])
    precision, recall = precision.masked_fill(empty, 0.0), recall.masked_fill(empty, 0.0)
    return torch.stack([precision, recall, f1.masked_fill(f1.isnan(), 0.0)], dim=-1)  # (B, 3)


def read_baseline(path, num_layers: int) -> torch.Tensor:
    """(P, R, F1) baselines of one layer from a file in bert-score's rescale_baseline format: a CSV with the header
    LAYER,P,R,F and one row per layer from 0 (the package takes row `num_layers` by position, as here)."""
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines or lines[0] != "LAYER,P,R,F":
        raise UserError(f"{path}:1: expected the header LAYER,P,R,F (bert-score's rescale_baseline format)")
    if num_layers + 1 >= len(lines):
        raise UserError(f"{path}: no row for layer {num_layers} (the file has {len(lines) - 1} layers)")
    try:
        values = [float(value) for value in lines[num_layers + 1].split(",")[1:]]
    except ValueError as error:
        raise UserError(f"{path}:{num_layers + 2}: {error}") from error
    if len(values) != 3:
        raise UserError(f"{path}:{num_layers + 2}: expected LAYER,P,R,F, got {lines[num_layers + 1]!r}")
    return torch.tensor(values, dtype=torch.float32)


def bertscore(candidates: list[str], references: list[list[str]], model_path, num_layers: int, idf: bool = False,
              batch_size: int = 64, baseline=None) -> dict[str, list[float]]:
    """BERTScore P / R / F1 per candidate, equal to bert-score 0.3's `score(candidates, references,
    model_type=model_path, num_layers=num_layers, idf=idf, batch_size=batch_size)` (plus `baseline_path=baseline,
    rescale_with_baseline=True` when a baseline file is given), with our BERT (bert.py) and no transformers.

    Like the package: every (candidate, reference) pair is scored; a candidate with several references keeps the
    largest P, the largest R and the largest F1 among them, each taken separately; idf comes from all references."""
    check_captions(candidates, references)
    tokenizer = load_bert_tokenizer(model_path)
    model = load_bert(model_path, num_layers)
    pairs = [(hyp, ref) for hyp, refs in zip(candidates, references) for ref in refs]  # the package's flat order
    sentences = list(dict.fromkeys(candidates + [ref for refs in references for ref in refs]))
    token_ids = {sentence: tokenizer.encode(sentence) for sentence in sentences}
    states = dict(zip(sentences, embed_token_ids(model, list(token_ids.values()), tokenizer.pad_id, batch_size)))
    weigh = token_weights([token_ids[ref] for _, ref in pairs], tokenizer.cls_id, tokenizer.sep_id, idf)
    weights = {s: torch.tensor([weigh(token) for token in ids], dtype=torch.float32) for s, ids in token_ids.items()}
    scores = torch.cat([greedy_matching([states[h] for h, _ in chunk], [weights[h] for h, _ in chunk],
                                        [states[r] for _, r in chunk], [weights[r] for _, r in chunk])
                        for chunk in (pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size))])  # (pairs, 3)
    groups = scores.split([len(refs) for refs in references])  # each candidate's rows, one per reference
    best = torch.stack([group.max(dim=0).values for group in groups])  # (candidates, 3)
    if baseline is not None:
        base = read_baseline(baseline, num_layers)
        best = (best - base) / (1 - base)
    return {"precision": best[:, 0].tolist(), "recall": best[:, 1].tolist(), "f1": best[:, 2].tolist()}
