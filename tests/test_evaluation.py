"""`mgeo-service evaluate` and `predict` on the command line, and the figures behind them."""
import json
import os
import subprocess
import sys

import pytest

from mgeo_service.dataset import DatasetError, read_pairs
from mgeo_service.evaluation import classification_report

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


def test_evaluate_prints_one_json_object():
    result = run_cli("evaluate", f"{DATA}/address_pairs.tsv", "--batch-size", "16")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("macro_f1", "accuracy", "per_label", "confusion", "pairs", "pairs_per_second"):
        assert key in report
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
