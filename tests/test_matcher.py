"""The shipped default model through the matcher: outputs, ordering, truncation, quality floor."""
import os

import pytest
import torch

from mgeo_service.checkpoint import LABELS, CheckpointError, canonical_order
from mgeo_service.dataset import read_pairs
from mgeo_service.evaluation import evaluate
from mgeo_service.matcher import DEFAULT_MODEL_DIR, Matcher, length_sorted_chunks

from conftest import DATA

# Set from what the shipped model measured (see MODEL_CARD.md), a little below it so that
# retraining noise does not fail the build.
MACRO_F1_FLOOR = 0.60  # tests/data/address_pairs.tsv
CONTRAST_ACCURACY_FLOOR = 0.90  # tests/data/contrast_pairs.tsv, all pairs
CONTRAST_KIND_FLOOR = 0.75  # and each kind of change
# The numbers inside an address (issue 35: another room or floor is another part of one place, 1号 is not
# 11号): a digit added to a house number is the one kind the shipped model has not learnt yet (0.78 here, one
# pair above the floor, 0.77 on the generator's held-out set: MODEL_CARD.md), so it is held to the floor once a
# model that has learnt it ships.
NOT_YET_LEARNT = ("house_digits",)
# The README's examples, answered as a person would.
README_EXAMPLES = [
    (("北京市朝阳区建国路88号", "北京市海淀区建国路88号"), "not_match"),  # two districts, two places
    (("北京市海淀区中关村大街1号", "北京海淀中关村大街1号"), "exact_match"),
]


def test_prediction_fields(default_matcher):
    result = default_matcher.predict([("北京市海淀区中关村大街1号", "北京海淀中关村街1号")])[0].as_dict()
    assert result["label"] in LABELS
    assert list(result["scores"]) == list(LABELS)
    assert sum(result["scores"].values()) == pytest.approx(1.0, abs=1e-4)
    expected = result["scores"]["exact_match"] + 0.5 * result["scores"]["partial_match"]
    assert result["similarity"] == pytest.approx(expected, abs=1e-5)
    assert result["label"] == max(result["scores"], key=result["scores"].get)


def test_batched_results_keep_input_order(default_matcher):
    pairs = [(p.address1, p.address2) for p in read_pairs(f"{DATA}/address_pairs.tsv")][:20]
    one_by_one = [default_matcher.predict([pair])[0] for pair in pairs]
    batched = default_matcher.predict(pairs)
    for single, batch in zip(one_by_one, batched):
        assert single.label == batch.label
        for label in LABELS:
            assert single.scores[label] == pytest.approx(batch.scores[label], abs=1e-4)


def test_length_sorted_chunks_cover_every_index_once():
    encoded = [([0] * n, [0] * n) for n in (5, 1, 9, 3, 7)]
    chunks = length_sorted_chunks(encoded, 2)
    assert chunks == [[1, 3], [0, 4], [2]]


def test_a_token_budget_cuts_chunks_of_long_pairs_and_runs_a_longer_pair_alone():
    encoded = [([0] * n, [0] * n) for n in (60, 5, 70, 6, 200, 7)]
    chunks = length_sorted_chunks(encoded, 4, max_tokens=100)
    assert chunks == [[1, 3, 5, 0], [2], [4]]  # 78 tokens; 130 would be over; 200 alone
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(encoded)))
    assert length_sorted_chunks(encoded, 4, max_tokens=None) == [[1, 3, 5, 0], [2, 4]]


def test_forwards_cut_by_tokens_give_each_pair_what_it_gets_alone():
    matcher = Matcher(DEFAULT_MODEL_DIR, device="cpu", batch_size=32, batch_tokens=96)
    pairs = [(p.address1, p.address2) for p in read_pairs(f"{DATA}/address_pairs.tsv")][:24]
    calls = []
    forward = matcher.forward
    matcher.forward = lambda encoded: calls.append(sum(len(ids) for ids, _ in encoded)) or forward(encoded)
    batched = matcher.predict(pairs)
    assert len(calls) > 1 and all(tokens <= 96 for tokens in calls)  # the budget, not 32 pairs, cut them
    for pair, result in zip(pairs, batched):
        alone = matcher.predict([pair])[0]
        for label in LABELS:
            assert result.scores[label] == pytest.approx(alone.scores[label], abs=1e-5)


def test_long_addresses_are_truncated_to_max_length(default_matcher):
    long_address = "北京市海淀区中关村大街" * 200
    ids, types = default_matcher.encode([(long_address, long_address)])[0]
    assert len(ids) == default_matcher.max_length == 128
    assert 1 in types  # the second address keeps its share
    assert default_matcher.predict([(long_address, "北京")])[0].label in LABELS


def test_the_direct_tokenizer_gives_the_wrappers_ids(default_matcher):
    """``Matcher.encode`` calls the Rust tokenizer itself (``pair_tokenizer``): the same ids, types and
    truncation as the transformers tokenizer it was made from, long pairs, full-width and odd text included."""
    pairs = [(p.address1, p.address2) for p in read_pairs(f"{DATA}/contrast_pairs.tsv")]
    pairs += [("北京市海淀区中关村大街" * 30, "上海" * 90), ("ＡＢＣ１２３　大街", "abc123 大街"), ("a" * 300, "北")]
    ordered = [canonical_order(a, b) if default_matcher.pair_order == "canonical" else (a, b) for a, b in pairs]
    wrapped = default_matcher.tokenizer([a for a, _ in ordered], [b for _, b in ordered], truncation="longest_first",
                                        max_length=default_matcher.max_length, return_token_type_ids=True)
    assert default_matcher.encode(pairs) == list(zip(wrapped["input_ids"], wrapped["token_type_ids"]))


def test_a_prediction_takes_the_first_of_equal_maxima(default_matcher):
    assert default_matcher.prediction([0.4, 0.4, 0.2]).label == default_matcher.labels[0]
    assert default_matcher.prediction([0.2, 0.4, 0.4]).label == default_matcher.labels[1]


def test_cuda_needs_a_gpu():
    if torch.cuda.is_available():
        assert Matcher(device="cuda").device.type == "cuda"
        return
    with pytest.raises(CheckpointError) as info:
        Matcher(device="cuda")
    assert info.value.reason == "cuda_unavailable"


def test_auto_device_is_cpu_here(default_matcher):
    assert Matcher(device="auto").device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_default_model_is_named_and_small():
    matcher = Matcher(DEFAULT_MODEL_DIR, device="cpu")
    assert matcher.name == "mgeo-default"
    assert matcher.model_id == f"mgeo-default@{matcher.version}"
    size = sum(os.path.getsize(os.path.join(DEFAULT_MODEL_DIR, f)) for f in os.listdir(DEFAULT_MODEL_DIR)
               if f.endswith(".safetensors"))
    assert size <= 25 * 1024 * 1024


def test_default_model_meets_its_floor_on_the_project_test_set(default_matcher):
    report = evaluate(default_matcher, read_pairs(f"{DATA}/address_pairs.tsv"))
    assert report["pairs"] >= 60
    assert report["macro_f1"] >= MACRO_F1_FLOOR, report


def test_default_model_meets_its_floors_on_the_contrast_set(default_matcher):
    pairs = read_pairs(f"{DATA}/contrast_pairs.tsv")
    report = evaluate(default_matcher, pairs)
    assert report["pairs"] >= 280 and len(report["by_kind"]) == 16 and set(NOT_YET_LEARNT) <= set(report["by_kind"])
    held = {kind: figures for kind, figures in report["by_kind"].items() if kind not in NOT_YET_LEARNT}
    right = sum(figures["accuracy"] * figures["pairs"] for figures in held.values())
    assert right / sum(figures["pairs"] for figures in held.values()) >= CONTRAST_ACCURACY_FLOOR, held
    for kind, figures in held.items():
        assert figures["accuracy"] >= CONTRAST_KIND_FLOOR, (kind, held)


def test_the_default_model_answers_the_same_whichever_address_comes_first(default_matcher):
    pairs = [(p.address1, p.address2) for name in ("address_pairs.tsv", "contrast_pairs.tsv")
             for p in read_pairs(f"{DATA}/{name}")]
    assert default_matcher.pair_order == "canonical"  # config.json's mgeo_pair_order
    swapped = default_matcher.predict([(b, a) for a, b in pairs])
    assert [p.as_dict() for p in default_matcher.predict(pairs)] == [p.as_dict() for p in swapped]


@pytest.mark.parametrize("pair, label", README_EXAMPLES)
def test_readme_examples_answer_what_a_person_would(default_matcher, pair, label):
    assert default_matcher.predict([pair])[0].label == label


def model_with_pair_order(tmp_path, order):
    """The shipped weights, with config.json's ``mgeo_pair_order`` set to ``order``."""
    import json
    import shutil
    folder = tmp_path / f"order-{order}"
    shutil.copytree(DEFAULT_MODEL_DIR, folder, ignore=shutil.ignore_patterns("onnx"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mgeo_pair_order": order}))
    return str(folder)


def test_a_model_in_canonical_order_answers_the_same_whichever_address_comes_first(tmp_path):
    pairs = [(p.address1, p.address2) for p in read_pairs(f"{DATA}/address_pairs.tsv")][:40]
    swapped = [(b, a) for a, b in pairs]
    canonical = Matcher(model_with_pair_order(tmp_path, "canonical"), device="cpu", backend="torch")
    assert [p.as_dict() for p in canonical.predict(pairs)] == [p.as_dict() for p in canonical.predict(swapped)]
    # The same weights scoring pairs as given: the order shows in the scores (so the check above can fail).
    given = Matcher(model_with_pair_order(tmp_path, "given"), device="cpu", backend="torch")
    assert [p.scores for p in given.predict(pairs)] != [p.scores for p in given.predict(swapped)]


def test_an_unknown_pair_order_is_refused_at_load(tmp_path):
    with pytest.raises(CheckpointError, match="mgeo_pair_order"):
        Matcher(model_with_pair_order(tmp_path, "sorted"), device="cpu", backend="torch")
