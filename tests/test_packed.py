"""The torch engine's padding-free forward gives, for every pair of any batch, the probabilities of scoring it
alone, and transformers' own; shared helpers for the ONNX Runtime engine's tests (test_ort.py)."""
import random

import pytest
import torch
from mgeo_service.checkpoint import CheckpointError, build_model, load_checkpoint
from mgeo_service.dataset import read_pairs
from mgeo_service.evaluation import classification_report, evaluate
from mgeo_service.matcher import DEFAULT_MODEL_DIR, Matcher

from conftest import DATA
from test_checkpoint import save_huggingface, save_modelscope, tiny_model

TOLERANCE = 1e-5  # a pair's probabilities in any batch against the same pair scored alone
# Against transformers' own BertForSequenceClassification: the same arithmetic in another order (one
# fused query/key/value multiply, attention without padding) moves a probability by up to ~2e-5.
TRANSFORMERS_TOLERANCE = 1e-4
LONG = "广东省深圳市南山区粤海街道科技园南区高新南七道" * 8  # truncated to max_length


def real_pairs() -> list[tuple[str, str]]:
    """The project's real pairs, of every length from a few tokens to truncated, in a seeded shuffle."""
    pairs = [(p.address1, p.address2) for name in ("address_pairs.tsv", "contrast_pairs.tsv")
             for p in read_pairs(f"{DATA}/{name}")]
    pairs += [(LONG, "深圳南山"), ("北京", LONG), ("北", "京")]
    random.Random(0).shuffle(pairs)
    return pairs


def transformers_alone(matcher: Matcher, encoded) -> torch.Tensor:
    """Each pair scored by itself through transformers' own BertForSequenceClassification: no padding."""
    model = build_model(load_checkpoint(matcher.model_dir))
    with torch.inference_mode():
        rows = [model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits[0]
                for ids, types in encoded]
    return torch.softmax(torch.stack(rows).float(), dim=-1)


def assert_batches_match_alone(matcher: Matcher, pairs, tolerance=TOLERANCE) -> tuple[list, torch.Tensor]:
    """The pairs encoded, and their probabilities scored alone, which every batch gives too."""
    encoded = matcher.encode(pairs)
    lengths = {len(ids) for ids, _ in encoded}
    assert min(lengths) < 10 and max(lengths) == matcher.max_length  # mixed lengths, truncation included
    reference = torch.cat([matcher.forward([pair]) for pair in encoded])
    for size in (3, 8, 32, len(encoded)):
        for start in range(0, len(encoded), size):
            batch = matcher.forward(encoded[start:start + size])
            difference = (batch - reference[start:start + size]).abs().max().item()
            assert difference <= tolerance, f"batch of {size} at {start}: {difference}"
    return encoded, reference


def assert_transformers_agrees(matcher: Matcher, pairs, tolerance=TOLERANCE):
    encoded, alone = assert_batches_match_alone(matcher, pairs, tolerance)
    assert (alone - transformers_alone(matcher, encoded)).abs().max().item() <= TRANSFORMERS_TOLERANCE


@pytest.fixture(scope="module")
def torch_matcher():
    return Matcher(device="cpu", backend="torch")


def test_default_model_batches_give_the_probabilities_of_each_pair_alone(torch_matcher):
    assert torch_matcher.backend == "torch"
    assert_transformers_agrees(torch_matcher, real_pairs())


def mgeo_layout_copy(folder) -> str:
    """The default model's weights saved as ModelScope saves MGeo (bert.text_encoder.*, GIS extras)."""
    with open(f"{DEFAULT_MODEL_DIR}/vocab.txt", encoding="utf-8") as f:
        vocab = f.read().splitlines()
    return save_modelscope(build_model(load_checkpoint(DEFAULT_MODEL_DIR)), folder, vocab=vocab)


def test_mgeo_layout_checkpoint_batches_give_the_probabilities_of_each_pair_alone(tmp_path):
    matcher = Matcher(mgeo_layout_copy(tmp_path / "mgeo"), device="cpu", backend="torch")
    assert matcher.layout == "modelscope"
    assert_transformers_agrees(matcher, real_pairs())


def test_evaluate_scores_with_the_same_forward(default_matcher):
    pairs = list(read_pairs(f"{DATA}/address_pairs.tsv"))
    encoded = default_matcher.encode([(p.address1, p.address2) for p in pairs])
    reference = torch.cat([default_matcher.forward([pair]) for pair in encoded])
    expected = classification_report([p.label for p in pairs], reference.argmax(-1).tolist())
    report = evaluate(default_matcher, pairs)
    assert report["confusion"] == expected["confusion"] and report["macro_f1"] == expected["macro_f1"]


def test_an_activation_it_does_not_implement_is_refused_at_load(tmp_path):
    model = tiny_model()
    model.config.hidden_act = "silu"
    with pytest.raises(CheckpointError, match="hidden_act 'silu' is not supported"):
        Matcher(save_huggingface(model, tmp_path / "silu"), device="cpu", backend="torch")
