"""ModelScope's own MGeo classes are the reference for what a real MGeo checkpoint means.

``tests/modelscope_reference.py`` runs in a separate venv with ``modelscope`` and
``transformers<5`` (``make test-tools``), builds random ``MGeoForSequenceClassification``
checkpoints with ModelScope's classes, and writes ModelScope's probabilities; the running
service must give the same ones.
"""
import json
import os
import subprocess

import pytest

from conftest import ROOT, http

MODELSCOPE_PYTHON = os.path.join(ROOT, ".venv-modelscope", "bin", "python")
PAIRS = [  # mixed lengths, so a batch pads, with ASCII, digits, full-width and upper case
    ("北京市海淀区中关村大街1号", "北京海淀中关村街1号"),
    ("上海市浦东新区张杨路560号中融恒瑞国际大厦西楼1103室", "张杨路五百六十号"),
    ("杭州西湖", "Hangzhou West Lake 1号"),
    ("广东省深圳市南山区科技园ＡＢＣ大厦", "深圳南山科技园abc大厦B座"),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("modelscope")
    (out / "pairs.json").write_text(json.dumps(PAIRS, ensure_ascii=False), encoding="utf-8")
    subprocess.run([MODELSCOPE_PYTHON, os.path.join(ROOT, "tests", "modelscope_reference.py"), str(out),
                    str(out / "pairs.json")], check=True, timeout=600)
    return out


def reference(checkpoints, name: str) -> dict:
    with open(checkpoints / name / "reference.json") as f:
        return json.load(f)


def assert_same_probabilities(results, expected):
    assert len(results) == len(expected["probabilities"])
    for result, probabilities in zip(results, expected["probabilities"]):
        for label, p in zip(expected["labels"], probabilities):
            assert abs(result["scores"][label] - p) <= 1e-5, (result["scores"], probabilities)


@pytest.mark.parametrize("name, kept_out", [("text", ".crossattention."), ("multimodal", "bert.gis_encoder.")])
def test_the_service_scores_as_modelscope_does(service_factory, checkpoints, name, kept_out):
    expected = reference(checkpoints, name)
    # the checkpoint holds weights a text forward must skip, or the test would prove nothing
    assert any(kept_out in weight for weight in expected["weights"])
    service = service_factory(MGEO_MODEL_DIR=str(checkpoints / name)).wait_ready()
    status, _, body = http("POST", service.url + "/predict",
                           {"pairs": [{"address1": a, "address2": b} for a, b in PAIRS]})
    assert status == 200, body
    assert_same_probabilities(body["results"], expected)
    singles = [http("POST", service.url + "/predict", {"address1": a, "address2": b})[2] for a, b in PAIRS]
    assert_same_probabilities(singles, expected)
    status, _, ready = http("GET", service.url + "/health/ready")
    assert status == 200, ready
