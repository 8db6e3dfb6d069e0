"""metrics.py against its references: NLTK's meteor_score, pycocoevalcap's Cider and its Meteor (the Meteor 1.5 jar's
scores kept in tests/data/meteor_jar.json, and the jar itself when Java is installed), sacrebleu; plus the edge cases.
The references are imported inside the tests only. `PYTHONPATH=. python tests/test_metrics.py` rewrites the jar's
stored scores (Java needed)."""
import random
import re
import shutil
from pathlib import Path

import pytest
from test_bertscore import BERT_CANDIDATES, BERT_REFERENCES, MALFORMED_CAPTIONS

import metrics


def korean_like_corpus(seed, videos, syllables="고양이가다는에서", max_words=10):
    """Captions of 1-3 syllable words drawn from a few syllables: heavy token repetition stresses the alignments
    and chunk counting. Also punctuation, digits the jar's paraphrase table does not link (0, 9, 12, 25), empty
    hypotheses and references, hypotheses equal to a reference, and 1 to 4 references per video."""
    rng = random.Random(seed)

    def caption():
        words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(rng.randint(1, max_words))]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words) + 1), rng.choice(["0", "9", "12", "25"]))
        return " ".join(words) + rng.choice(["", "", ".", " .", ",", "!", "?"])

    refs = [[caption() for _ in range(rng.randint(1, 4))] for _ in range(videos)]
    hyps = [caption() for _ in range(videos)]
    hyps[0], refs[1][0] = "", ""
    for i in range(2, videos, 5):
        hyps[i] = rng.choice(refs[i])
    return hyps, refs


CORPORA = [dict(seed=0, videos=40), dict(seed=1, videos=30, syllables="가나다", max_words=20),
           dict(seed=2, videos=30, syllables="이다", max_words=25), dict(seed=3, videos=40, syllables="고양이 소파에서잔다")]

# Normaliser paths of the jar (quotes, abbreviations, runs of dots, numbers with commas, dashes, contractions, wide
# spaces, emoji, Cyrillic, '|||' inside captions) and a java.lang.String.hashCode collision ('000' and '먰').
# No Latin words that the jar's English stem/synonym modules could relate, which `meteor_coco` leaves out.
JAR_EDGE_CASES = [
    ("고양이가 소파 위에서 잔다.", ["고양이 한 마리가 소파 위에서 자고 있다."]),
    ("000 고양이", ["먰 고양이"]),
    ("\"고양이\"가 (소파) 위에서, 1,000원... 잔다!", ["“고양이”가 ‘소파’ 위에서 1,000 원 잔다?"]),
    ("U.S. Dr. Kim은 No. 9 자리에, Art. 12 조항. 끝", ["미국 dr. kim이 No. 9 에 art 12 조항 . 끝."]),
    ("The cat's toy – 고양이--장난감 well-known 0-9명", ["the cat 's toy - 고양이 장난감 well known 0 9 명"]),
    ("don't won't 1990's rock'n'roll 'quoted'", ["don 't won 't 1990 's rock 'n 'roll ' quoted '"]),
    ("a...b.. c. D. e.g. i.e. vs. 3.14 .5 5.", ["a ... b .. c . d e.g. ie vs. 3.14 .5 5 ."]),
    ("DOTMULTI 가 DOTDOTMULTI 나", ["dotmulti 가 . 나"]),
    ("tab\t구분\u3000전각\u00a0공백 끝 \x01", ["tab 구분 전각 공백 끝"]),
    ("이모지 😀 와 漢字 — … Привет", ["이모지 😀 와 漢 字 — ... привет"]),
    ("hyp with ||| pipes 고양이", ["ref a ||| ref b 고양이", "다른 참조"]),
    ("a the of 고양이 is $5 #1 100%", ["the a of is 고양이 $ 5 # 1 100 %"]),
    ("고 고 고 고 고 고", ["고 고 고"]),
    ("", ["고양이가 잔다"]),
]


class IdentityStemmer:
    def stem(self, word):
        return word


class NoWordNet:
    def synsets(self, word):
        return []


def test_meteor_equals_nltk_meteor_score_with_the_exact_stage_only():
    from nltk.translate.meteor_score import meteor_score
    for corpus in CORPORA:
        hyps, refs = korean_like_corpus(**corpus)
        hyps[3] = "ABC 고양이 Def"  # NLTK lower-cases each token
        refs[3] = ["abc 고양이 DEF 고양이", "Abc"]
        expected = [meteor_score([ref.split() for ref in references], hyp.split(), stemmer=IdentityStemmer(),
                                 wordnet=NoWordNet()) for hyp, references in zip(hyps, refs)]
        for hyp, references, nltk_score in zip(hyps, refs, expected):
            assert metrics.meteor_sentence(hyp, references) == pytest.approx(nltk_score, abs=1e-9)
        assert metrics.meteor(hyps, refs) == pytest.approx(sum(expected) / len(expected), abs=1e-9)


# Where the jar's English modules fire, it gives credit that meteor_coco (exact module only) does not:
# a WordNet synonym ("mr." / "mr") and digit strings linked in its paraphrase table ("102" / "100").
JAR_ONLY_MATCHES = [("Mr. Kim 이 왔다", ["mr kim 이 왔다"]), ("고양이 102 마리가 잔다", ["고양이 100 마리가 잔다"])]
JAR_SCORES = Path(__file__).parent / "data" / "meteor_jar.json"  # `PYTHONPATH=. python tests/test_metrics.py`


def jar_cases() -> tuple[list[str], list[list[str]]]:
    """The captions the jar scored: the normaliser's edge cases, then the four Korean-like corpora."""
    hyps, refs = map(list, zip(*JAR_EDGE_CASES))
    for corpus in CORPORA:
        corpus_hyps, corpus_refs = korean_like_corpus(**corpus)
        hyps, refs = hyps + corpus_hyps, refs + corpus_refs
    return hyps, refs


def score_with_the_jar() -> dict:
    """The Meteor 1.5 jar's scores of jar_cases() and JAR_ONLY_MATCHES, through pycocoevalcap's wrapper (one jar
    process: `java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm`), in the layout of JAR_SCORES."""
    import pycocoevalcap.meteor.meteor as coco_meteor
    hyps, refs = jar_cases()
    scorer = coco_meteor.Meteor()
    corpus, segments = scorer.compute_score(dict(enumerate(refs)), {i: [hyp] for i, hyp in enumerate(hyps)})
    _, known = scorer.compute_score({i: known_refs for i, (_, known_refs) in enumerate(JAR_ONLY_MATCHES)},
                                    {i: [hyp] for i, (hyp, _) in enumerate(JAR_ONLY_MATCHES)})
    return {"corpus": corpus,
            "segments": [{"hyp": h, "refs": r, "jar": s} for h, r, s in zip(hyps, refs, map(float, segments))],
            "jar_only_matches": [{"hyp": h, "refs": r, "jar": float(s)} for (h, r), s in zip(JAR_ONLY_MATCHES, known)]}


def assert_meteor_coco_equals(jar: dict) -> None:
    # Within 1e-12: the JVM's Math.pow can round the fragmentation penalty one ulp away from C's pow.
    for case in jar["segments"]:
        assert metrics.meteor_coco([case["hyp"]], [case["refs"]]) == pytest.approx(case["jar"], abs=1e-12), case
    hyps, refs = [case["hyp"] for case in jar["segments"]], [case["refs"] for case in jar["segments"]]
    assert metrics.meteor_coco(hyps, refs) == pytest.approx(jar["corpus"], abs=1e-12)
    for case in jar["jar_only_matches"]:
        assert metrics.meteor_coco([case["hyp"]], [case["refs"]]) < case["jar"] - 0.05, case


def test_meteor_coco_equals_the_meteor_jars_stored_scores():
    """Runs without Java: the jar's scores as JAR_SCORES keeps them (its `source` names the versions)."""
    import json
    stored = json.loads(JAR_SCORES.read_text(encoding="utf-8"))
    hyps, refs = jar_cases()
    assert [(case["hyp"], case["refs"]) for case in stored["segments"]] == list(zip(hyps, refs))  # the same cases
    assert [(case["hyp"], case["refs"]) for case in stored["jar_only_matches"]] == \
        [(hyp, refs) for hyp, refs in JAR_ONLY_MATCHES]
    assert_meteor_coco_equals(stored)


def test_meteor_coco_equals_the_meteor_jar_of_pycocoevalcap():
    """The same against the jar itself, when Java is installed; and the stored scores are the jar's."""
    import json

    import pycocoevalcap.meteor.meteor as coco_meteor
    jar = Path(coco_meteor.__file__).parent / coco_meteor.METEOR_JAR
    if shutil.which("java") is None or not jar.exists():
        pytest.skip(f"needs java on the PATH and {jar} (pycocoevalcap runs the Meteor 1.5 jar)")
    live = score_with_the_jar()
    assert_meteor_coco_equals(live)
    stored = json.loads(JAR_SCORES.read_text(encoding="utf-8"))
    for key in ("segments", "jar_only_matches"):
        assert [case["jar"] for case in stored[key]] == pytest.approx([case["jar"] for case in live[key]], abs=1e-12)
    assert stored["corpus"] == pytest.approx(live["corpus"], abs=1e-12)


def test_cider_equals_pycocoevalcap_cider_per_video_and_for_the_corpus():
    from pycocoevalcap.cider.cider import Cider
    for corpus in CORPORA:
        hyps, refs = korean_like_corpus(**corpus)
        coco_corpus, coco_videos = Cider().compute_score(dict(enumerate(refs)), {i: [h] for i, h in enumerate(hyps)})
        assert metrics.cider_scores(hyps, refs) == pytest.approx(list(coco_videos), abs=1e-6)
        assert metrics.cider(hyps, refs) == pytest.approx(coco_corpus, abs=1e-6)


def test_cider_of_a_single_video_is_zero_as_in_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider
    hyps, refs = ["고양이가 소파 위에서 잔다"], [["고양이가 소파 위에서 잔다", "고양이 한 마리가 잔다"]]
    coco_corpus, coco_videos = Cider().compute_score({0: refs[0]}, {0: hyps[0:1]})
    assert metrics.cider_scores(hyps, refs) == [coco_videos[0]] == [0.0]
    assert metrics.cider(hyps, refs) == coco_corpus == 0.0


def test_bleu_and_chrf_take_any_number_of_references_per_video():
    import sacrebleu
    hyps, refs = korean_like_corpus(seed=4, videos=30)
    # sacrebleu needs as many reference streams as the longest list, so metrics pads shorter lists with None,
    # which sacrebleu skips. Repeating one of a video's references instead changes neither BLEU nor chrF.
    most = max(len(references) for references in refs)
    repeated = [[references[min(k, len(references) - 1)] for references in refs] for k in range(most)]
    assert metrics.bleu(hyps, refs) == pytest.approx(
        sacrebleu.corpus_bleu(hyps, repeated, tokenize=metrics.BLEU_TOKENIZE).score, abs=1e-9)
    assert metrics.chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, repeated).score, abs=1e-9)


def test_evaluate_captions_reports_each_metric_with_its_reference():
    hyps, refs = korean_like_corpus(seed=5, videos=12)
    report = metrics.evaluate_captions(hyps, refs)
    assert list(report) == ["meteor", "meteor_coco", "cider_d", "bleu4", "chrf"]
    for name, compute in [("meteor", metrics.meteor), ("meteor_coco", metrics.meteor_coco),
                          ("cider_d", metrics.cider), ("bleu4", metrics.bleu), ("chrf", metrics.chrf)]:
        assert report[name]["value"] == compute(hyps, refs)
        assert report[name]["reference"] == metrics.METRIC_REFERENCES[name]
    assert f"tok:{metrics.BLEU_TOKENIZE}" in report["bleu4"]["signature"]
    assert "nrefs:var" in report["bleu4"]["signature"] and "nrefs:var" in report["chrf"]["signature"]


def test_captions_equal_to_a_reference_and_empty_captions():
    refs = [["고양이가 소파 위에서 잔다", "개가 달린다"], ["빨간 원이 움직인다"]]
    exact = [references[0] for references in refs]
    assert metrics.meteor_coco(exact, refs) == 1.0  # the jar scores a perfect single-chunk match as exactly 1
    assert metrics.bleu(exact, refs) == pytest.approx(100.0) and metrics.chrf(exact, refs) == pytest.approx(100.0)
    empty = ["", ""]
    assert metrics.meteor(empty, refs) == metrics.meteor_coco(empty, refs) == metrics.cider(empty, refs) == 0.0
    assert metrics.bleu(empty, refs) == metrics.chrf(empty, refs) == 0.0


PUBLIC_METRICS = [metrics.meteor, metrics.meteor_coco, metrics.cider, metrics.cider_scores, metrics.bleu,
                  metrics.chrf, metrics.evaluate_captions]


@pytest.mark.parametrize("metric", PUBLIC_METRICS, ids=lambda metric: metric.__name__)
@pytest.mark.parametrize("hyps, refs, message", MALFORMED_CAPTIONS)
def test_malformed_input_is_refused_with_a_message_naming_the_entry(metric, hyps, refs, message):
    with pytest.raises(ValueError, match=message):
        metric(hyps, refs)


def test_meteor_sentence_checks_its_input():
    with pytest.raises(ValueError, match="refs must be a list of reference captions"):
        metrics.meteor_sentence("가", "가")
    with pytest.raises(ValueError, match="refs is empty"):
        metrics.meteor_sentence("가", [])


def test_score_captions_gives_the_corpus_report_and_each_captions_own_scores():
    hyps, refs = korean_like_corpus(seed=6, videos=9)
    report, per_caption = metrics.score_captions(hyps, refs)
    assert report == metrics.evaluate_captions(hyps, refs)
    assert [row["meteor"] for row in per_caption] == [metrics.meteor_sentence(h, r) for h, r in zip(hyps, refs)]
    assert [row["cider_d"] for row in per_caption] == metrics.cider_scores(hyps, refs)
    assert all(set(row) == {"meteor", "cider_d"} for row in per_caption)


def test_format_metrics_table_prints_one_line_per_metric_and_how_to_enable_bertscore():
    report = metrics.evaluate_captions(["고양이가 잔다", "개가 달린다"], [["고양이가 잔다"], ["개 한 마리가 달린다"]])
    lines = metrics.format_metrics_table(report).splitlines()
    assert lines[:5] == [f"  {name:<12} {m['value']:.4f}   {m['reference']}" for name, m in report.items()]
    assert len(lines) == 6 and "--bertscore-model DIR" in lines[5] and "bert-base-multilingual-cased" in lines[5]
    with_bert = {**report, "bertscore_f1": {"value": 0.5, "reference": "bert-score"}}
    table = metrics.format_metrics_table(with_bert)
    assert table.splitlines()[-1] == "  bertscore_f1 0.5000   bert-score" and "--bertscore-model" not in table


# ----------------------------------------------------------------------------- BERTScore in the report and CLI

@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from test_bert import save_tiny_bert
    return save_tiny_bert(tmp_path_factory.mktemp("bert"), max_length=16)


def test_score_captions_adds_bertscore_to_the_report_and_to_each_caption(bert_dir):
    hyps, refs = BERT_CANDIDATES[:4], BERT_REFERENCES[:4]
    report, per_caption = metrics.score_captions(hyps, refs, bertscore_model=bert_dir, bertscore_layer=2,
                                                 bertscore_idf=True)
    scores = metrics.bertscore(hyps, refs, bert_dir, 2, idf=True)
    assert list(report) == ["meteor", "meteor_coco", "cider_d", "bleu4", "chrf", "bertscore_p", "bertscore_r",
                            "bertscore_f1"]
    for short, name in (("p", "precision"), ("r", "recall"), ("f1", "f1")):
        assert report[f"bertscore_{short}"]["value"] == pytest.approx(sum(scores[name]) / len(hyps), abs=1e-12)
        assert [row[f"bertscore_{short}"] for row in per_caption] == scores[name]
    assert "num_layers=2, idf=True" in report["bertscore_f1"]["reference"]
    assert "--bertscore-model" not in metrics.format_metrics_table(report)


# ------------------------------------------------------------------------------------- python metrics.py FILE

ROOT = Path(__file__).resolve().parents[1]


def run_metrics_cli(*args):
    import os
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "metrics.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


def write_predictions(folder: Path, hyps, refs) -> tuple[Path, Path]:
    """The same captions as evaluate.py's predictions.json and as JSON lines from another system."""
    import json
    kovlm = folder / "predictions.json"
    kovlm.write_text(json.dumps([{"id": f"v{i}", "video": f"v{i}.mp4", "prediction": hyp, "references": references}
                                 for i, (hyp, references) in enumerate(zip(hyps, refs))], ensure_ascii=False))
    other = folder / "other.jsonl"
    other.write_text("".join(json.dumps({"id": i, "prediction": hyp, "references": references}, ensure_ascii=False)
                             + "\n" * (1 + (i == 2)) for i, (hyp, references) in enumerate(zip(hyps, refs))))
    return kovlm, other


def test_cli_scores_both_file_formats_equal_to_evaluate_captions(tmp_path):
    import json
    hyps, refs = korean_like_corpus(seed=7, videos=8)
    expected = {name: metric["value"] for name, metric in metrics.evaluate_captions(hyps, refs).items()}
    for file in write_predictions(tmp_path, hyps, refs):
        result = run_metrics_cli(file, "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {**expected, "captions": 8}  # equal to the last digit
        table = run_metrics_cli(file)
        assert table.returncode == 0 and table.stdout.splitlines()[0] == f"{file}: 8 captions"
        assert table.stdout.rstrip("\n").split("\n", 1)[1] == metrics.format_metrics_table(
            metrics.evaluate_captions(hyps, refs))


def test_cli_adds_bertscore_with_a_bert_folder(tmp_path, bert_dir):
    import json
    hyps, refs = BERT_CANDIDATES[:3], BERT_REFERENCES[:3]
    result = run_metrics_cli(write_predictions(tmp_path, hyps, refs)[1], "--json", "--bertscore-model", bert_dir,
                             "--bertscore-layer", 2, "--bertscore-idf")
    assert result.returncode == 0, result.stderr
    scores = metrics.bertscore(hyps, refs, bert_dir, 2, idf=True)
    assert json.loads(result.stdout)["bertscore_f1"] == pytest.approx(sum(scores["f1"]) / 3, abs=1e-12)


@pytest.mark.parametrize("lines, message", [
    (['{"prediction": "가", "references": ["가"]}', '{"prediction": "나", "references": '],
     r"^error: .*other.jsonl:2: not a JSON object \(Expecting value\)"),
    (['{"prediction": "가", "references": ["가"]}', '', '{"prediction": "나"}'],
     r'^error: .*other.jsonl:3: expected an object with "prediction" and "references"'),
    (['{"prediction": "가", "references": "가"}'],
     r"^error: .*other.jsonl:1: references must be a list of reference captions, got str"),
    ([], r"^error: .*other.jsonl: no predictions"),
])
def test_cli_refuses_a_malformed_line_in_one_line_naming_it(tmp_path, lines, message):
    (tmp_path / "other.jsonl").write_text("\n".join(lines))
    result = run_metrics_cli(tmp_path / "other.jsonl")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and re.match(message, result.stderr), result.stderr


def test_cli_names_a_missing_file_and_a_broken_json_list(tmp_path):
    (tmp_path / "predictions.json").write_text('[{"prediction": "가", "references": ["가"]},\n oops]')
    broken = run_metrics_cli(tmp_path / "predictions.json")
    assert broken.returncode == 1 and re.match(r"^error: .*predictions.json:2: not valid JSON", broken.stderr)
    missing = run_metrics_cli(tmp_path / "absent.jsonl")
    assert missing.returncode == 1 and "absent.jsonl: no such file or folder" in missing.stderr


def write_jar_scores() -> None:
    """Score the cases with the jar (Java needed) and write JAR_SCORES, naming the versions that made it."""
    import json
    import subprocess
    from importlib.metadata import version
    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0]
    source = (f"pycocoevalcap {version('pycocoevalcap')}: its meteor-1.5.jar through pycocoevalcap.meteor.meteor."
              f"Meteor (java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm), {java}")
    scores = {"source": source, "command": "PYTHONPATH=. python tests/test_metrics.py", **score_with_the_jar()}
    JAR_SCORES.parent.mkdir(exist_ok=True)
    lines = [json.dumps({k: scores[k] for k in ("source", "command", "corpus")}, ensure_ascii=False)[:-1] + ","]
    for key in ("segments", "jar_only_matches"):  # one case a line
        cases = [json.dumps(case, ensure_ascii=False) for case in scores[key]]
        lines.append(f' "{key}": [\n  ' + ",\n  ".join(cases) + "]" + ("," if key == "segments" else "}"))
    JAR_SCORES.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {JAR_SCORES}: {len(scores['segments'])} captions, corpus {scores['corpus']}")


if __name__ == "__main__":
    write_jar_scores()
