"""The ONNX Runtime engine: transformers' probabilities in float32, batched and alone; int8 close to them, and
served only where it measures faster."""
import logging

import torch
from mgeo_service.checkpoint import load_checkpoint
from mgeo_service.engines.onnx_export import onnx_files
from mgeo_service.engines.ort import INT8_MIN_SPEEDUP, INT8_NOT_FASTER, padded, session
from mgeo_service.matcher import DEFAULT_MODEL_DIR, Matcher

from test_packed import assert_transformers_agrees, mgeo_layout_copy, real_pairs

# ONNX Runtime's padded batch gives each pair exactly what it gives alone (the padding is masked
# and rows never mix): measured 0.0 on these pairs. Against transformers: 5e-6.
TOLERANCE = 1e-6
# int8 against float32, each pair alone: the share of labels kept and the median pair's largest
# probability change (measured: 0.988 and 1.1e-4; MODEL_CARD.md has the held-out figures).
INT8_AGREEMENT, INT8_MEDIAN = 0.95, 0.005


def test_cpu_forwards_run_on_onnx_runtime_by_default(default_matcher):
    assert (default_matcher.backend, default_matcher.precision, default_matcher.note) == \
        ("onnxruntime", "float32", "")


def test_default_model_batches_give_transformers_probabilities_of_each_pair_alone(default_matcher):
    assert_transformers_agrees(default_matcher, real_pairs(), TOLERANCE)


def test_mgeo_layout_checkpoint_gives_transformers_probabilities(tmp_path):
    matcher = Matcher(mgeo_layout_copy(tmp_path / "mgeo"), device="cpu", backend="onnxruntime")
    assert (matcher.layout, matcher.backend) == ("modelscope", "onnxruntime")
    assert_transformers_agrees(matcher, real_pairs(), TOLERANCE)


def test_int8_keeps_the_labels_of_float32(default_matcher):
    _, int8_file = onnx_files(load_checkpoint(DEFAULT_MODEL_DIR), "")
    int8 = session(int8_file, threads=1)
    encoded = default_matcher.encode(real_pairs())
    in_float = torch.cat([default_matcher.forward([pair]) for pair in encoded])
    alone = torch.cat([torch.from_numpy(int8.run(None, padded([pair]))[0]) for pair in encoded])
    difference = (alone - in_float).abs().max(-1).values
    assert difference.max().item() > 0 and difference.median().item() <= INT8_MEDIAN  # close, not equal
    assert (alone.argmax(-1) == in_float.argmax(-1)).float().mean().item() >= INT8_AGREEMENT


def test_int8_is_served_only_where_it_measures_clearly_faster_and_the_fallback_says_why(caplog):
    with caplog.at_level(logging.WARNING, logger="mgeo_service.engines.ort"):
        matcher = Matcher(device="cpu", int8=True)
    speedup = matcher.engine.int8_speedup
    assert speedup > 0
    warned = [r for r in caplog.records if "MGEO_INT8" in r.getMessage()]
    if speedup >= INT8_MIN_SPEEDUP:
        assert (matcher.precision, matcher.note, warned) == ("int8", "", [])
    else:
        assert (matcher.precision, matcher.note, len(warned)) == ("float32", INT8_NOT_FASTER, 1)
        # float32 served: the same probabilities as without MGEO_INT8
        encoded = matcher.encode(real_pairs()[:16])
        assert torch.equal(matcher.forward(encoded), Matcher(device="cpu").forward(encoded))
    assert Matcher(device="cpu").engine.int8_speedup is None  # float32 measures nothing
