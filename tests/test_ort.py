"""The ONNX Runtime engine: transformers' probabilities in float32, batched and alone; int8 close to them, the same
for a pair in any batch, and served only where it measures faster."""
import logging
import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from mgeo_service.checkpoint import load_checkpoint
from mgeo_service.dataset import read_pairs
from mgeo_service.engines.onnx_export import FLOAT_FILE, INT8_FILE, SHIPPED_FOLDER, onnx_files
from mgeo_service.engines.ort import (INT8_MIN_SPEEDUP, INT8_NOT_FASTER, RUN_PADDING, int8_speedup, padded,
                                      session)
from mgeo_service.evaluation import classification_report
from mgeo_service.matcher import DEFAULT_MODEL_DIR, Matcher
from onnx import TensorProto, helper, numpy_helper

from conftest import DATA
from test_packed import assert_batches_match_alone, assert_transformers_agrees, mgeo_layout_copy, real_pairs

# ONNX Runtime's padded batch gives each pair exactly what it gives alone (the padding is masked
# and rows never mix): measured 0.0 on these pairs, float32 and int8 alike. Against transformers: 5e-6.
TOLERANCE = 1e-6
# int8 against float32 on the project's real pairs, each alone (measured on 711 pairs with mgeo-default@caaa5318734a:
# 0.997 of labels kept, a pair's largest probability change 2.8e-4 at the median, 0.16 at most; the macro-F1 of the
# labelled ones 0.9475 against 0.9449). MODEL_CARD.md has the held-out figures.
INT8_AGREEMENT, INT8_MEDIAN, INT8_LARGEST, INT8_F1_LOSS = 0.99, 5e-4, 0.25, 0.01


def slowed(path: str, folder) -> str:
    """A copy of the graph at ``path`` that also multiplies a 1024x1024 matrix eight times, fed by the input so
    that nothing is folded at load: several times the work of the model's own forward, the same outputs."""
    model = onnx.load_model(path)
    graph = model.graph
    matrix = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32) / 32
    graph.initializer.extend([numpy_helper.from_array(matrix, "slow/matrix"),
                              numpy_helper.from_array(np.array(0, np.float32), "slow/zero")])
    nodes = [helper.make_node("Cast", ["attention_mask"], ["slow/mask"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMax", ["slow/mask"], ["slow/one"], keepdims=0),
             helper.make_node("Mul", ["slow/matrix", "slow/one"], ["slow/0"])]
    nodes += [helper.make_node("MatMul", [f"slow/{i}", "slow/matrix"], [f"slow/{i + 1}"]) for i in range(8)]
    output = graph.output[0].name
    producer = next(node for node in graph.node if output in node.output)
    producer.output[list(producer.output).index(output)] = "slow/probabilities"
    nodes += [helper.make_node("ReduceMax", ["slow/8"], ["slow/largest"], keepdims=0),
              helper.make_node("Mul", ["slow/largest", "slow/zero"], ["slow/nothing"]),
              helper.make_node("Add", ["slow/probabilities", "slow/nothing"], [output])]
    graph.node.extend(nodes)
    slow = os.path.join(folder, "slowed.onnx")
    onnx.save_model(model, slow)
    return slow


def default_model_with(tmp_path, name: str, graph: str) -> str:
    """A copy of the default model whose shipped export has ``graph`` in place of the file ``name``."""
    copy = str(tmp_path / "model")
    shutil.copytree(DEFAULT_MODEL_DIR, copy)
    shutil.copy(graph, os.path.join(copy, SHIPPED_FOLDER, name))
    return copy


def int8_served(shipped_files, folder) -> Matcher:
    """The default model with int8 served (its float32 graph made slow), one thread."""
    matcher = Matcher(default_model_with(folder, FLOAT_FILE, slowed(shipped_files[0], folder)), device="cpu",
                      int8=True, threads=1)
    assert (matcher.precision, matcher.note) == ("int8", "")
    return matcher


def each_alone(graph, encoded) -> torch.Tensor:
    """The graph's probabilities for each encoded pair, run by itself."""
    return torch.cat([torch.from_numpy(graph.run(None, padded([pair]))[0]) for pair in encoded])


@pytest.fixture(scope="module")
def shipped_files():
    return onnx_files(load_checkpoint(DEFAULT_MODEL_DIR), "")


def test_cpu_forwards_run_on_onnx_runtime_by_default(default_matcher):
    assert (default_matcher.backend, default_matcher.precision, default_matcher.note) == \
        ("onnxruntime", "float32", "")


def test_default_model_batches_give_transformers_probabilities_of_each_pair_alone(default_matcher):
    assert_transformers_agrees(default_matcher, real_pairs(), TOLERANCE)


def test_mgeo_layout_checkpoint_gives_transformers_probabilities(tmp_path):
    matcher = Matcher(mgeo_layout_copy(tmp_path / "mgeo"), device="cpu", backend="onnxruntime")
    assert (matcher.layout, matcher.backend) == ("modelscope", "onnxruntime")
    assert_transformers_agrees(matcher, real_pairs(), TOLERANCE)


def test_int8_keeps_the_answers_of_float32_on_the_shipped_pairs(default_matcher, shipped_files):
    float32, int8 = (session(path, threads=1) for path in shipped_files)
    labelled = [p for name in ("address_pairs.tsv", "contrast_pairs.tsv") for p in read_pairs(f"{DATA}/{name}")]
    encoded = default_matcher.encode(real_pairs() + [(p.address1, p.address2) for p in labelled])
    in_float, in_int8 = each_alone(float32, encoded), each_alone(int8, encoded)
    difference = (in_int8 - in_float).abs().max(-1).values
    assert 0 < difference.median().item() <= INT8_MEDIAN and difference.max().item() <= INT8_LARGEST
    assert (in_int8.argmax(-1) == in_float.argmax(-1)).float().mean().item() >= INT8_AGREEMENT
    truth = [p.label for p in labelled]
    f1 = [classification_report(truth, rows[-len(labelled):].argmax(-1).tolist())["macro_f1"]
          for rows in (in_float, in_int8)]
    assert f1[1] >= f1[0] - INT8_F1_LOSS


def test_int8_speedup_says_which_graph_is_faster(shipped_files, tmp_path):
    float32 = session(shipped_files[0], threads=1)
    slow = session(slowed(shipped_files[0], tmp_path), threads=1)
    vocab_size = load_checkpoint(DEFAULT_MODEL_DIR).config.vocab_size
    assert int8_speedup(slow, float32, vocab_size) < 1 / INT8_MIN_SPEEDUP
    assert int8_speedup(float32, slow, vocab_size) > INT8_MIN_SPEEDUP


def test_int8_is_served_where_it_measures_faster_and_gives_each_pair_its_answer_alone_in_any_batch(
        shipped_files, tmp_path):
    matcher = int8_served(shipped_files, tmp_path)  # float32 made slow: int8 is what this machine should serve
    assert matcher.engine.int8_speedup >= INT8_MIN_SPEEDUP
    # the pair's own scale, whatever shares its forward: the same probabilities alone and in batches of
    # 3, 8, 32 and all pairs, mixed lengths and truncation included
    _, alone = assert_batches_match_alone(matcher, real_pairs(), TOLERANCE)
    assert torch.equal(alone, each_alone(session(shipped_files[1], threads=1), matcher.encode(real_pairs())))


def test_int8_slower_than_float32_is_not_served_and_the_fallback_says_why(shipped_files, tmp_path, caplog):
    model = default_model_with(tmp_path, INT8_FILE, slowed(shipped_files[1], tmp_path))
    with caplog.at_level(logging.WARNING, logger="mgeo_service.engines.ort"):
        matcher = Matcher(model, device="cpu", int8=True, threads=1)
    assert (matcher.precision, matcher.note) == ("float32", INT8_NOT_FASTER)
    assert matcher.engine.int8_speedup < 1 / INT8_MIN_SPEEDUP
    assert len([r for r in caplog.records if "MGEO_INT8" in r.getMessage()]) == 1
    encoded = matcher.encode(real_pairs()[:16])  # float32 served: the answers without MGEO_INT8
    assert torch.equal(matcher.forward(encoded), Matcher(device="cpu").forward(encoded))
    assert Matcher(device="cpu").engine.int8_speedup is None  # float32 measures nothing


class CountedRuns:
    """A real session that notes the shape of each batch it runs."""

    def __init__(self, graph):
        self.graph, self.shapes = graph, []

    def run(self, outputs, feeds):
        self.shapes.append(feeds["input_ids"].shape)
        return self.graph.run(outputs, feeds)


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_a_forward_runs_its_pairs_in_groups_of_similar_length(default_matcher, shipped_files, tmp_path, precision):
    matcher = default_matcher if precision == "float32" else int8_served(shipped_files, tmp_path)
    encoded = matcher.encode(real_pairs()[:64])
    engine = matcher.engine
    counted = CountedRuns(engine._session)
    engine._session = counted
    try:
        engine.probabilities(encoded)
    finally:
        engine._session = counted.graph
    real = sum(len(ids) for ids, _ in encoded)
    padded_area = sum(pairs * longest for pairs, longest in counted.shapes)
    assert sum(pairs for pairs, _ in counted.shapes) == len(encoded) and 1 < len(counted.shapes) < len(encoded)
    assert padded_area <= RUN_PADDING[precision] * real  # one padded batch of these pairs: 1.47x their real tokens
    if precision == "int8":  # it pays for every padded token: only pairs of one length share a run
        assert padded_area == real
