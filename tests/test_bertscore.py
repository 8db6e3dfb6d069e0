"""bertscore.py against the bert-score package on a tiny random BERT folder (tests/test_bert.py writes it), plus the
input check every caption metric shares. bert_score and transformers are imported inside the tests only."""
import pytest

from scoring import bertscore

# Malformed (hyps, refs) and the one-line error each gets; tests/test_metrics.py runs them through every metric.
MALFORMED_CAPTIONS = [
    (["가", "나"], [["가"]], "got 2 hypotheses but 1 reference lists"),
    ([], [], "no captions to score"),
    (["가", "나"], [["가"], "나"], r"refs\[1\] must be a list of reference captions, got str"),
    (["가"], [[]], r"refs\[0\] is empty"),
    ([None], [["가"]], r"hyps\[0\] must be one caption string, got NoneType"),
    (["가"], [["가", 3]], r"refs\[0\]\[1\] must be a caption string, got int"),
    ("가", [["가"]], "hyps must be a list with one entry per video, got str"),
]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from test_bert import save_tiny_bert
    return save_tiny_bert(tmp_path_factory.mktemp("bert"), max_length=16)


@pytest.fixture
def package_bertscore(monkeypatch):
    """bert_score.score as it runs with transformers 4, where an empty caption is encoded as [CLS] [SEP]: under
    transformers 5 the package's sent_encode calls build_inputs_with_special_tokens, which BertTokenizer lost."""
    import bert_score
    from transformers import BertTokenizer
    monkeypatch.setattr(BertTokenizer, "build_inputs_with_special_tokens",
                        lambda self, ids: [self.cls_token_id] + ids + [self.sep_token_id], raising=False)

    def score(cands, refs, folder, layer, **options):
        return [values.tolist() for values in bert_score.score(cands, refs, model_type=str(folder), num_layers=layer,
                                                                nthreads=0, **options)]
    return score


BERT_CANDIDATES = ["빨간 원이 움직인다!", "파란 배경에서 빨간 원이 왼쪽으로 이동한다.", "", "고양이가 소파 위에서 잔다",
                   "노란 삼각형이 검은 배경에서 위로 올라간다. " * 4, "Café 뷁 강아지", "   "]
BERT_REFERENCES = [["빨간 원이 왼쪽으로 간다", "파란 배경", "원이 움직인다."], ["파란 배경에서 빨간 원이 왼쪽으로 이동한다."],
                   ["고양이가 잔다"], ["고양이 한 마리가 소파 위에서 자고 있다.", ""], ["노란 삼각형이 위로 올라간다."],
                   ["강아지가 공원에서 공을 쫓아 달린다.", "개"], ["흰 배경"]]


@pytest.mark.parametrize("layer", [1, 3])
@pytest.mark.parametrize("idf", [False, True])
def test_bertscore_equals_the_bert_score_package(bert_dir, package_bertscore, layer, idf):
    """Several and single references, an empty candidate and reference, a whitespace-only one, one longer than
    model_max_length (16), idf from the references; batch_size 3 so batches pad and split groups of references."""
    expected = package_bertscore(BERT_CANDIDATES, BERT_REFERENCES, bert_dir, layer, idf=idf, batch_size=3)
    ours = bertscore.bertscore(BERT_CANDIDATES, BERT_REFERENCES, bert_dir, layer, idf=idf, batch_size=3)
    for name, values in zip(("precision", "recall", "f1"), expected):
        assert ours[name] == pytest.approx(values, abs=1e-5), name
    assert ours["f1"][2] == ours["precision"][2] == ours["f1"][6] == 0.0  # empty candidates score 0, as there
    assert 0.5 < ours["f1"][1] and all(value < 1.0 for value in ours["f1"][2:])


def test_bertscore_with_one_reference_each_and_baseline_rescaling_equals_the_package(bert_dir, package_bertscore,
                                                                                     tmp_path):
    baseline = tmp_path / "baseline.tsv"
    baseline.write_text("LAYER,P,R,F\n0,0.1,0.2,0.3\n1,0.5,0.55,0.52\n2,0.6,0.61,0.62\n")
    hyps, refs = BERT_CANDIDATES[:2] + BERT_CANDIDATES[3:6], [[r[0]] for r in BERT_REFERENCES[:2] + BERT_REFERENCES[3:6]]
    plain = package_bertscore(hyps, [r[0] for r in refs], bert_dir, 1)
    expected = package_bertscore(hyps, [r[0] for r in refs], bert_dir, 1, lang="ko", rescale_with_baseline=True,
                                 baseline_path=str(baseline))
    ours = bertscore.bertscore(hyps, refs, bert_dir, 1, baseline=baseline)
    for name, values, unscaled in zip(("precision", "recall", "f1"), expected, plain):
        assert ours[name] == pytest.approx(values, abs=1e-5) and values != pytest.approx(unscaled, abs=1e-3)


@pytest.mark.parametrize("text, message", [
    ("LAYER,P,R\n0,1,2\n", r"baseline.tsv:1: expected the header LAYER,P,R,F"),
    ("LAYER,P,R,F\n0,0.1,0.2,0.3\n", r"baseline.tsv: no row for layer 1 \(the file has 1 layers\)"),
    ("LAYER,P,R,F\n0,0.1,0.2,0.3\n1,0.1,x,0.3\n", r"baseline.tsv:3: could not convert string to float: 'x'"),
    ("LAYER,P,R,F\n0,0.1,0.2,0.3\n1,0.1,0.3\n", r"baseline.tsv:3: expected LAYER,P,R,F, got '1,0.1,0.3'"),
])
def test_a_malformed_baseline_file_is_refused_naming_its_line(tmp_path, text, message):
    (tmp_path / "baseline.tsv").write_text(text)
    with pytest.raises(ValueError, match=message):
        bertscore.read_baseline(tmp_path / "baseline.tsv", 1)


@pytest.mark.parametrize("hyps, refs, message", MALFORMED_CAPTIONS)
def test_malformed_input_is_refused_before_any_model_is_read(tmp_path, hyps, refs, message):
    with pytest.raises(ValueError, match=message):
        bertscore.bertscore(hyps, refs, tmp_path / "absent", 1)  # a missing folder would be a FileNotFoundError
