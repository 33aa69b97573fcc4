"""`mgeo-service evaluate` and `predict` on the command line, and the figures behind them."""
import json
import os
import subprocess
import sys

import pytest

from mgeo_service.checkpoint import LABELS
from mgeo_service.dataset import DatasetError, LabelledPair, read_pairs
from mgeo_service.evaluation import classification_report, ranking_report

from conftest import DATA


def run_cli(*args, **environment):
    return subprocess.run([sys.executable, "-m", "mgeo_service", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **environment})


def test_classification_report_by_hand():
    report = classification_report([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0])
    assert report["confusion"]["rows_truth_columns_predicted"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert report["per_label"]["not_match"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert report["per_label"]["partial_match"]["f1"] == pytest.approx(0.6667, abs=1e-4)
    assert report["per_label"]["exact_match"]["f1"] == 0.8
    assert report["macro_f1"] == pytest.approx((0.5 + 0.6667 + 0.8) / 3, abs=1e-4)
    assert report["accuracy"] == pytest.approx(4 / 6, abs=1e-4)


def test_ranking_report_by_hand():
    pairs = [LabelledPair("q1", "a", 0), LabelledPair("q1", "b", 2), LabelledPair("q1", "c", 1),  # best: exact
             LabelledPair("q2", "d", 1), LabelledPair("q2", "e", 0),  # best: partial
             LabelledPair("q3", "f", 0), LabelledPair("q3", "g", 0),  # one label only: not ranked
             LabelledPair("q4", "h", 2), LabelledPair("q4", "i", 0)]  # a tie: the worse order counts
    similarities = [0.9, 0.8, 0.1, 0.7, 0.2, 0.5, 0.4, 0.6, 0.6]
    report = ranking_report(pairs, similarities)
    assert report == {"queries": 3, "top1": round(1 / 3, 4), "mrr": round((1 / 2 + 1 + 1 / 2) / 3, 4)}
    assert ranking_report(pairs[5:7], similarities[5:7]) == {"queries": 0, "top1": None, "mrr": None}


def test_evaluate_prints_one_json_object():
    result = run_cli("evaluate", f"{DATA}/address_pairs.tsv", "--batch-size", "16")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("macro_f1", "accuracy", "per_label", "confusion", "pairs", "pairs_per_second"):
        assert key in report
    assert 0 <= report["order_agreement"] <= 1 and set(report["ranking"]) == {"queries", "top1", "mrr"}
    assert report["pairs"] == len(read_pairs(f"{DATA}/address_pairs.tsv"))
    assert set(report["per_label"]) == {"not_match", "partial_match", "exact_match"}
    assert all(set(v) >= {"precision", "recall", "f1"} for v in report["per_label"].values())
    assert report["batch_size"] == 16 and report["precision"] == "float32"


def test_evaluate_says_which_engine_and_precision_it_ran_in():
    result = run_cli("evaluate", f"{DATA}/address_pairs.tsv", MGEO_INT8="1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["backend"] == "onnxruntime" and report["pairs"] == len(read_pairs(f"{DATA}/address_pairs.tsv"))
    # int8 where it measured faster at load; else float32, and the note says why
    assert (report["precision"], report["note"]) in {("int8", ""), ("float32", "int8_not_faster_here")}


def test_evaluate_names_the_malformed_line(tmp_path):
    data = tmp_path / "bad.tsv"
    data.write_text("address1\taddress2\tlabel\n北京\t北京市\t2\n北京\t上海\n", encoding="utf-8")
    result = run_cli("evaluate", str(data))
    assert result.returncode == 2
    assert f"{data}:3" in result.stderr and "3 or 4 tab-separated fields" in result.stderr
    assert result.stdout == ""


def test_a_kind_column_gives_accuracy_per_kind(tmp_path):
    data = tmp_path / "kinds.tsv"
    data.write_text("address1\taddress2\tlabel\tkind\n北京市海淀区1号\t北京海淀1号\t2\tdrop_suffixes\n"
                    "北京市海淀区1号\t北京市朝阳区1号\t0\tother_district\n北京\t上海\t0\t\n", encoding="utf-8")
    assert [p.kind for p in read_pairs(str(data))] == ["drop_suffixes", "other_district", ""]
    result = run_cli("evaluate", str(data))
    assert result.returncode == 0, result.stderr
    by_kind = json.loads(result.stdout)["by_kind"]
    assert set(by_kind) == {"drop_suffixes", "other_district"}
    assert all(v["pairs"] == 1 and v["accuracy"] in (0.0, 1.0) for v in by_kind.values())


def test_labels_may_be_names_or_numbers(tmp_path):
    data = tmp_path / "names.tsv"
    data.write_text("北京\t北京市\texact_match\n北京\t上海\t0\n", encoding="utf-8")
    assert [p.label for p in read_pairs(str(data))] == [2, 0]
    data.write_text("北京\t北京市\tsame\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r":1: label 'same'"):
        read_pairs(str(data))


def test_predict_prints_json():
    result = run_cli("predict", "北京市海淀区中关村大街1号", "北京海淀中关村街1号")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["label"] in ("not_match", "partial_match", "exact_match")
    assert answer["model"].startswith("mgeo-default@")
    assert 0.0 <= answer["similarity"] <= 1.0


def test_evaluate_writes_every_pair_s_answer_beside_its_input(tmp_path):
    predictions = tmp_path / "predictions.tsv"
    result = run_cli("evaluate", f"{DATA}/contrast_pairs.tsv", "--predictions", str(predictions))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    pairs = read_pairs(f"{DATA}/contrast_pairs.tsv")
    header, *rows = [line.split("\t") for line in predictions.read_text(encoding="utf-8").splitlines()]
    assert header == ["address1", "address2", "truth", "label", "similarity", "not_match", "partial_match",
                      "exact_match", "kind"]
    assert [(r[0], r[1], r[2], r[8]) for r in rows] == [(p.address1, p.address2, LABELS[p.label], p.kind)
                                                       for p in pairs]
    confusion = [[0] * 3 for _ in LABELS]
    for row in rows:
        confusion[LABELS.index(row[2])][LABELS.index(row[3])] += 1
        scores = [float(v) for v in row[5:8]]
        assert row[3] == LABELS[scores.index(max(scores))]
        assert float(row[4]) == pytest.approx(scores[2] + 0.5 * scores[1], abs=2e-6)
    assert confusion == report["confusion"]["rows_truth_columns_predicted"]


def test_predict_reads_pairs_from_a_file_or_standard_input(tmp_path):
    pairs = read_pairs(f"{DATA}/address_pairs.tsv")[:5]
    # The reader evaluation uses: a header is skipped, not scored as a pair.
    lines = "address1\taddress2\n" + "".join(f"{p.address1}\t{p.address2}\n" for p in pairs)
    listed = tmp_path / "pairs.tsv"
    listed.write_text(lines, encoding="utf-8")
    from_file = run_cli("predict", "--file", str(listed))
    from_stdin = subprocess.run([sys.executable, "-m", "mgeo_service", "predict", "--file", "-"], input=lines,
                                capture_output=True, text=True, timeout=300)
    assert from_file.returncode == 0 and from_stdin.returncode == 0, from_file.stderr + from_stdin.stderr
    assert from_file.stdout == from_stdin.stdout
    answers = [json.loads(line) for line in from_file.stdout.splitlines()]
    singles = [json.loads(run_cli("predict", p.address1, p.address2).stdout) for p in pairs[:2]]
    assert len(answers) == 5 and answers[:2] == singles  # in input order, as each pair alone


@pytest.mark.parametrize("args", [("", "北京"), ("北京", "  "), ("\u200b", "北京"), ("北京",), ()])
def test_predict_refuses_a_blank_or_missing_address_as_the_api_does(args):
    result = run_cli("predict", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert "mgeo-service predict:" in result.stderr
