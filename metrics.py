"""Caption metrics, each equal to a named reference implementation: METEOR (two of them), CIDEr-D, BLEU-4, chrF,
BERTScore (bertscore.py, with our BERT). `python metrics.py FILE [--json] [--bertscore-model DIR]` scores a
predictions file: evaluate.py's predictions.json or JSON lines {"id", "prediction", "references": [...]} from any
system.

Users compare kovlm's numbers with published ones, so each metric reproduces one reference and says which;
tests/test_metrics.py checks it against that reference. Every metric takes `hyps: list[str]` (one caption per
video) and `refs: list[list[str]]` (that video's reference captions, one or more, any number per video).

Why two METEORs: papers report both, and on Korean they are different numbers.
- `meteor` is NLTK's `meteor_score` (what the common Python caption-evaluation code calls) on whitespace tokens,
  i.e. Korean eojeol. NLTK's Porter stemmer and WordNet never match Hangul, so only its exact stage counts (Latin
  words in a caption get no stem/synonym credit here, unlike NLTK's default). A word earns credit only when the
  whole inflected form matches (고양이가 is not 고양이). Score per caption, mean over captions.
- `meteor_coco` is the COCO caption toolkit's METEOR (pycocoevalcap runs the Meteor 1.5 jar, `-l en -norm`). Its
  English normaliser puts spaces around every character that is not a Latin/Cyrillic letter, a digit or one of
  . ' ` , - ‘ ’ so each Hangul syllable becomes a word (고양이가 -> 고 양 이 가) and partial words earn credit;
  the corpus score comes from statistics summed over captions, not from a mean.
  Examples: "고양이가 소파 위에서 잔다." against "고양이 한 마리가 소파 위에서 자고 있다." scores 0.2799 with
  `meteor` and 0.3563 with `meteor_coco`; "빨간 원이 파란 배경 위에서 왼쪽으로 움직인다." against "파란 배경에서
  빨간 원이 왼쪽으로 이동한다." scores 0.5174 and 0.4351 (more words, in more chunks, for the jar).

BERTScore is bertscore.py's (imported here), which also holds the input check every metric shares.
"""
import argparse
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import sacrebleu

from formats.labels import read_text
from infra import options
from infra.errors import UserError, user_errors
from infra.paths import file_problem
from scoring.bertscore import BERTSCORE_REFERENCE, bertscore, check_caption, check_captions
from scoring.meteor_coco import corpus_meteor

BLEU_TOKENIZE = "char"  # sacrebleu tokenizer for BLEU; see `bleu` for why


# ---------------------------------------------------------------------------------------------- METEOR (NLTK)

def _nltk_exact_matches(hyp: list[str], ref: list[str]) -> list[tuple[int, int]]:
    """NLTK's exact stage (`_match_enums`): walking the hypothesis from its last word back, each word takes the
    last still-unused reference position holding the same word. (hyp, ref) index pairs in hypothesis order."""
    positions = defaultdict(list)
    for j, word in enumerate(ref):
        positions[word].append(j)
    matches = [(i, positions[hyp[i]].pop()) for i in reversed(range(len(hyp))) if positions.get(hyp[i])]
    return matches[::-1]


def _nltk_single_meteor(hyp: list[str], ref: list[str], alpha=0.9, beta=3.0, gamma=0.5) -> float:
    """nltk.translate.meteor_score.single_meteor_score, same formula in the same floating-point order."""
    matches = _nltk_exact_matches(hyp, ref)
    if not matches:  # NLTK returns 0 where its formula divides by zero: no match or an empty side
        return 0.0
    precision, recall = len(matches) / len(hyp), len(matches) / len(ref)
    fmean = (precision * recall) / (alpha * precision + (1 - alpha) * recall)
    # _count_chunks: a new chunk wherever the next match is not adjacent on both sides
    chunks = 1 + sum((h1, r1) != (h0 + 1, r0 + 1) for (h0, r0), (h1, r1) in zip(matches, matches[1:]))
    return (1 - gamma * (chunks / len(matches)) ** beta) * fmean


def meteor_sentence(hyp: str, refs: list[str]) -> float:
    """NLTK `meteor_score(refs, hyp)` on whitespace tokens (lower-cased, as NLTK's default preprocess does):
    exact stage only, alpha 0.9, beta 3, gamma 0.5, the best score over the references."""
    check_caption(hyp, refs, "hyp", "refs")
    hyp_words = [word.lower() for word in hyp.split()]
    return max(_nltk_single_meteor(hyp_words, [word.lower() for word in ref.split()]) for ref in refs)


def meteor(hyps: list[str], refs: list[list[str]]) -> float:
    """Mean over captions of `meteor_sentence`: NLTK's METEOR on Korean eojeol (see the module docstring)."""
    check_captions(hyps, refs)
    return sum(meteor_sentence(hyp, references) for hyp, references in zip(hyps, refs)) / len(hyps)


# ------------------------------------------------------------------------------------- METEOR (COCO, jar)
# The transcription of the jar lives in scoring/meteor_coco.py.

def meteor_coco(hyps: list[str], refs: list[list[str]]) -> float:
    """pycocoevalcap's `Meteor().compute_score` corpus score (Meteor 1.5 jar, `-l en -norm`) without Java: the
    jar's normaliser (each Hangul syllable a word), exact matching, its beam-search alignment, its English
    function words, alpha 0.85, beta 0.20, gamma 0.60, delta 0.75, statistics summed over captions.

    On Hangul, punctuation and numbers it equals the jar: bit for bit on almost every caption, otherwise within
    one ulp (the JVM's Math.pow rounds differently from C's pow), except where the jar's English-only modules
    fire: Latin words (stems, WordNet synonyms such as "mr." / "mr") and the 453 pairs of digit strings its
    paraphrase table links: "고양이 102 마리가 잔다" against "고양이 100 마리가 잔다" is 0.9556 for the jar (102 ~ 100
    counts as a paraphrase match, weight 0.6) and 0.4847 here. tests/test_metrics.py checks both cases.
    """
    check_captions(hyps, refs)
    return corpus_meteor(hyps, refs)


# ------------------------------------------------------------------------------------------------- CIDEr-D

def _ngram_counts(caption: str) -> Counter:
    """precook in pycocoevalcap's cider_scorer.py: 1- to 4-gram counts of whitespace tokens, in its order."""
    words = caption.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, 5) for i in range(len(words) - k + 1))


def _tfidf(counts: Counter, document_frequency: Counter, log_videos: float):
    """counts2vec: tf-idf vector and norm per n-gram order, and the caption's length, which the reference
    measures in bigrams (its `length` counts n-grams of index 1), so a one-word caption has length 0."""
    vectors, norms = [{} for _ in range(4)], [0.0] * 4
    for ngram, tf in counts.items():
        weight = tf * (log_videos - np.log(max(1.0, document_frequency[ngram])))
        vectors[len(ngram) - 1][ngram] = weight
        norms[len(ngram) - 1] += weight ** 2
    bigrams = sum(tf for ngram, tf in counts.items() if len(ngram) == 2)
    return vectors, [np.sqrt(norm) for norm in norms], bigrams


def _clipped_similarity(hyp, ref, sigma: float = 6.0) -> list[float]:
    """sim: per n-gram order, the cosine with the hypothesis weights clipped at the reference's (the "-D"),
    times a Gaussian penalty on the length difference."""
    (hyp_vectors, hyp_norms, hyp_length), (ref_vectors, ref_norms, ref_length) = hyp, ref
    delta = float(hyp_length - ref_length)
    length_penalty = math.e ** (-(delta ** 2) / (2 * sigma ** 2))
    similarities = []
    for hyp_vector, ref_vector, hyp_norm, ref_norm in zip(hyp_vectors, ref_vectors, hyp_norms, ref_norms):
        value = 0.0
        for ngram, weight in hyp_vector.items():
            value += min(weight, ref_vector.get(ngram, 0.0)) * ref_vector.get(ngram, 0.0)
        if hyp_norm != 0 and ref_norm != 0:
            value /= hyp_norm * ref_norm
        similarities.append(value * length_penalty)
    return similarities


def cider_scores(hyps: list[str], refs: list[list[str]]) -> list[float]:
    """Per-video CIDEr-D equal to pycocoevalcap's `Cider().compute_score` (its second output) on whitespace tokens,
    no lower-casing: document frequencies from the references, idf log(#videos / df), n = 1..4, sigma 6, clipping,
    mean over n and over a video's references, x10. The COCO pipeline first runs the Java PTBTokenizer (English
    punctuation removal); kovlm does not. CIDEr over a single video is 0 by construction: every reference n-gram
    then has df = #videos = 1, so its idf is log(1) = 0."""
    check_captions(hyps, refs)
    ref_counts = [[_ngram_counts(ref) for ref in references] for references in refs]
    document_frequency = Counter(ngram for counts in ref_counts for ngram in set().union(*counts))
    log_videos = np.log(float(len(hyps)))
    scores = []
    for hyp, counts in zip(hyps, ref_counts):
        hyp_tfidf = _tfidf(_ngram_counts(hyp), document_frequency, log_videos)
        total = np.zeros(4)
        for ref in counts:
            total += _clipped_similarity(hyp_tfidf, _tfidf(ref, document_frequency, log_videos))
        scores.append(float(np.mean(total) / len(counts) * 10.0))
    return scores


def cider(hyps: list[str], refs: list[list[str]]) -> float:
    """Corpus CIDEr-D: the mean of `cider_scores`, pycocoevalcap's first output (0 for a single video)."""
    return float(np.mean(cider_scores(hyps, refs)))


# ---------------------------------------------------------------------------------------- BLEU-4 and chrF

def _reference_streams(refs: list[list[str]]) -> list[list]:
    """sacrebleu wants references as parallel streams; a video with fewer references is padded with None."""
    return [[references[k] if k < len(references) else None for references in refs]
            for k in range(max(len(references) for references in refs))]


def _sacrebleu_score(metric, hyps: list[str], refs: list[list[str]]):
    check_captions(hyps, refs)
    return metric.corpus_score(hyps, _reference_streams(refs)).score, str(metric.get_signature())


def bleu(hyps: list[str], refs: list[list[str]], tokenize: str = BLEU_TOKENIZE) -> float:
    """sacrebleu corpus BLEU-4 on its 0-100 scale. Default tokenize="char": sacrebleu's Korean tokenizer
    "ko-mecab" needs the mecab-ko packages and "flores200" downloads a SentencePiece model, while "13a" leaves
    Korean eojeol whole, so BLEU-4 would need four identical inflected words in a row and is near 0 for short
    captions. Characters (Hangul syllables) are the unit `meteor_coco` and chrF use too. Scores under different
    tokenizers are not comparable; sacrebleu's signature (in `evaluate_captions`) names the one used."""
    return _sacrebleu_score(sacrebleu.BLEU(tokenize=tokenize), hyps, refs)[0]


def chrf(hyps: list[str], refs: list[list[str]]) -> float:
    """sacrebleu corpus chrF (character 6-grams, beta 2, whitespace ignored) on its 0-100 scale; it needs no
    tokenizer, which suits Korean."""
    return _sacrebleu_score(sacrebleu.CHRF(), hyps, refs)[0]


# ------------------------------------------------------------------------------------------------ together

METRIC_REFERENCES = {
    "meteor": "NLTK nltk.translate.meteor_score.meteor_score on whitespace tokens, exact stage (alpha 0.9, beta 3, "
              "gamma 0.5), max over references, mean over captions",
    "meteor_coco": "pycocoevalcap Meteor (Meteor 1.5 jar, -l en -norm: Hangul syllables as words), exact module "
                   "(alpha 0.85, beta 0.2, gamma 0.6, delta 0.75), corpus score from summed statistics",
    "cider_d": "pycocoevalcap Cider (CIDEr-D: n 1-4, sigma 6, clipped tf-idf, x10) on whitespace tokens",
    "bleu4": "sacrebleu corpus BLEU-4, 0-100",
    "chrf": "sacrebleu corpus chrF2 (character 6-grams), 0-100",
}


def evaluate_captions(hyps: list[str], refs: list[list[str]]) -> dict:
    """Every metric with the reference it equals, ready for logs/final_metrics.json:
    {"meteor" | "meteor_coco" | "cider_d" | "bleu4" | "chrf": {"value": float, "reference": str}}, where bleu4
    and chrf also carry sacrebleu's "signature" (tokenizer, number of references, version)."""
    check_captions(hyps, refs)
    bleu_value, bleu_signature = _sacrebleu_score(sacrebleu.BLEU(tokenize=BLEU_TOKENIZE), hyps, refs)
    chrf_value, chrf_signature = _sacrebleu_score(sacrebleu.CHRF(), hyps, refs)
    values = {"meteor": meteor(hyps, refs), "meteor_coco": meteor_coco(hyps, refs), "cider_d": cider(hyps, refs),
              "bleu4": bleu_value, "chrf": chrf_value}
    report = {name: {"value": value, "reference": METRIC_REFERENCES[name]} for name, value in values.items()}
    report["bleu4"]["signature"], report["chrf"]["signature"] = bleu_signature, chrf_signature
    return report


# -------------------------------------------------------------------------------------- a report and its table

def score_captions(hyps: list[str], refs: list[list[str]], *, bertscore_model=None, bertscore_layer: int = 9,
                   bertscore_idf: bool = False, bertscore_baseline=None,
                   batch_size: int = 64) -> tuple[dict, list[dict]]:
    """(corpus metrics, one dict per caption): `evaluate_captions`' report, plus "bertscore_p" / "_r" / "_f1"
    (the mean over captions) when a BERT folder is given; per caption its "meteor" (`meteor_sentence`), its
    "cider_d" within this corpus (`cider_scores`) and, with BERT, its own BERTScore P / R / F1."""
    report = evaluate_captions(hyps, refs)
    per_caption = [{"meteor": meteor_sentence(hyp, references), "cider_d": cider}
                   for hyp, references, cider in zip(hyps, refs, cider_scores(hyps, refs))]
    if bertscore_model is None:
        return report, per_caption
    scores = bertscore(hyps, refs, bertscore_model, bertscore_layer, idf=bertscore_idf, batch_size=batch_size,
                       baseline=bertscore_baseline)
    reference = BERTSCORE_REFERENCE.format(layer=bertscore_layer, idf=bertscore_idf,
                                           baseline=", rescaled with a baseline" if bertscore_baseline else "")
    for short, name in (("p", "precision"), ("r", "recall"), ("f1", "f1")):
        report[f"bertscore_{short}"] = {"value": float(np.mean(scores[name])), "reference": reference}
        for row, value in zip(per_caption, scores[name]):
            row[f"bertscore_{short}"] = value
    return report, per_caption


def format_metrics_table(metrics: dict) -> str:
    """One line per metric (name, value, the reference it equals); without BERTScore, a last line on enabling it."""
    lines = [f"  {name:<12} {metric['value']:.4f}   {metric['reference']}" for name, metric in metrics.items()]
    if "bertscore_f1" not in metrics:
        lines.append("  (BERTScore off: add --bertscore-model DIR, a bert-base-multilingual-cased snapshot folder)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- the command: score a file

def read_predictions(path) -> tuple[list[str], list[list[str]]]:
    """(hyps, refs) from kovlm's predictions.json (a JSON list of {"id", "video", "prediction", "references"})
    or from JSON lines {"id", "prediction", "references": [...]} written by any other system."""
    path = Path(path)
    text = read_text(path)[0]  # UTF-8 with or without a byte-order mark, as manifests are read; else names the file
    if text.lstrip().startswith("["):
        try:
            entries = [(f"{path}: entry {k}", entry) for k, entry in enumerate(json.loads(text))]
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from error
    else:
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise UserError(f"{path}:{number}: not a JSON object ({error.msg}); each line must be "
                                     f'{{"id": ..., "prediction": "...", "references": ["...", ...]}}') from error
    if not entries:
        raise UserError(f"{path}: no predictions; expected a JSON list or JSON lines of "
                         f'{{"prediction": "...", "references": ["...", ...]}}')
    hyps, refs = [], []
    for where, entry in entries:
        if not isinstance(entry, dict) or "prediction" not in entry or "references" not in entry:
            raise UserError(f'{where}: expected an object with "prediction" and "references", got {entry!r:.80}')
        try:
            check_caption(entry["prediction"], entry["references"], "prediction", "references")
        except ValueError as error:
            raise UserError(f"{where}: {error}") from error
        hyps.append(entry["prediction"])
        refs.append(list(entry["references"]))
    return hyps, refs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Score a predictions file: METEOR, METEOR-coco, CIDEr-D, BLEU-4, "
                                                 "chrF and, with a BERT folder, BERTScore.")
    parser.add_argument("file", help="predictions.json (evaluate.py's) or JSON lines "
                                     '{"id", "prediction", "references": [...]}')
    parser.add_argument("--json", action="store_true", help="print one JSON object of plain numbers")
    parser.add_argument("--bertscore-model", metavar="DIR", help="a BERT snapshot folder, e.g. "
                                                                 "bert-base-multilingual-cased")
    parser.add_argument("--bertscore-layer", type=int, default=9, metavar="N",
                        help="hidden layer to match (default 9, bert-score's for bert-base-multilingual-cased)")
    parser.add_argument("--bertscore-idf", action="store_true", help="weigh tokens by idf over the references")
    parser.add_argument("--bertscore-baseline", metavar="FILE", help="rescale with a baseline in bert-score's "
                                                                     "format (LAYER,P,R,F)")
    parser.add_argument("--batch-size", type=int, default=64, help="BERTScore sentences per batch")
    args = parser.parse_args(argv)
    with user_errors():
        check_command(args)
        hyps, refs = read_predictions(args.file)
        report, _ = score_captions(hyps, refs, bertscore_model=args.bertscore_model,
                                   bertscore_layer=args.bertscore_layer, bertscore_idf=args.bertscore_idf,
                                   bertscore_baseline=args.bertscore_baseline, batch_size=args.batch_size)
        if args.json:
            print(json.dumps({name: metric["value"] for name, metric in report.items()} | {"captions": len(hyps)}))
        else:
            print(f"{args.file}: {len(hyps)} captions\n{format_metrics_table(report)}")


def check_command(args: argparse.Namespace) -> None:
    """The flags and files, before any model or text is loaded."""
    options.at_least("batch_size", args.batch_size, 1)
    options.at_least("bertscore_layer", args.bertscore_layer, 0)
    for path, flag in ((args.file, "FILE"), (args.bertscore_baseline, "--bertscore-baseline")):
        if path is not None and (problem := file_problem(path)):
            raise UserError(f"{path}: {problem} ({flag})")
    if args.bertscore_model is not None and not Path(args.bertscore_model).is_dir():
        raise UserError(f"--bertscore-model {args.bertscore_model}: no such folder")


if __name__ == "__main__":
    main()
