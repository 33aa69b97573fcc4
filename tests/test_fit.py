"""The training loop's pieces: examples with and without the teacher's soft labels, and their losses."""
import math
import re

import numpy as np
import pytest
import torch

from mgeo_service.dataset import LabelledPair
from mgeo_service.train.fit import collate, encode, example_losses

TEACHER = {("甲", "乙"): np.array([2.0, 0.0, -1.0], dtype=np.float32),
           ("丙", "丁"): np.array([0.0, 1.0, 0.0], dtype=np.float32)}


def encode_pairs(firsts, seconds):
    return [([2, 10 + i, 3, 20 + i, 3], [0, 0, 0, 1, 1]) for i, _ in enumerate(zip(firsts, seconds))]


def test_a_pair_the_teacher_never_scored_keeps_its_label_only():
    pairs = [LabelledPair("甲", "乙", 0, "ccks"), LabelledPair("丙", "丁", -1, "unlabelled"),
             LabelledPair("戊", "己", 2, "contrast")]
    examples = encode(encode_pairs, pairs, "given", soft=lambda a, b: TEACHER.get((a, b)))
    _, _, _, labels, soft = collate(examples, [0, 1, 2], "cpu")
    assert soft[:2].tolist() == [t.tolist() for t in TEACHER.values()] and soft[2].isnan().all()

    logits = torch.tensor([[0.5, 0.1, -0.2], [0.0, 0.3, 0.1], [0.2, 0.0, 0.4]])
    weights = torch.tensor([0.5, 1.0, 1.5])
    alpha, temperature = 0.8, 2.0
    losses = example_losses(logits, labels, soft, weights, alpha, temperature)

    def kl(row):
        teacher = torch.softmax(soft[row] / temperature, -1)
        return float((teacher * (teacher.log() - torch.log_softmax(logits[row] / temperature, -1))).sum()) \
            * temperature ** 2

    def ce(row, label):
        return -float(torch.log_softmax(logits[row], -1)[label]) * float(weights[label])

    assert losses[0].item() == pytest.approx(alpha * kl(0) + (1 - alpha) * ce(0, 0), rel=1e-5)
    assert losses[1].item() == pytest.approx(alpha * kl(1), rel=1e-5)  # unlabelled: the teacher only
    assert losses[2].item() == pytest.approx(ce(2, 2), rel=1e-5)  # never scored: its label, at full weight
    assert all(math.isfinite(x) for x in losses.tolist())

    # --undistilled-weight scales the never-scored pair's loss only
    weighted = example_losses(logits, labels, soft, weights, alpha, temperature, undistilled_weight=0.3)
    assert weighted[:2].tolist() == losses[:2].tolist()
    assert weighted[2].item() == pytest.approx(0.3 * ce(2, 2), rel=1e-5)


@pytest.mark.parametrize("order, read", [("given", [("甲", "乙"), ("丙", "丁")]),
                                         ("both", [("甲", "乙"), ("丙", "丁"), ("乙", "甲"), ("丁", "丙")]),
                                         ("canonical", [("乙", "甲"), ("丁", "丙")])])
def test_pairs_are_read_in_the_order_asked_for(order, read):
    seen = []

    def recording(firsts, seconds):
        seen.extend(zip(firsts, seconds))
        return encode_pairs(firsts, seconds)

    pairs = [LabelledPair("甲", "乙", 1, "ccks"), LabelledPair("丙", "丁", 0, "ccks")]
    examples = encode(recording, pairs, order, soft=lambda a, b: TEACHER.get((a, b)))
    assert seen == read and "乙" < "甲" and "丁" < "丙"  # canonical: the smaller string first, as served
    assert [e[2] for e in examples] == [p.label for p in pairs] * (len(read) // len(pairs))
    assert [e[3] is TEACHER.get(pair) for e, pair in zip(examples, read)] == [True] * len(read)  # read order's


def test_an_unlabelled_pair_needs_a_soft_label():
    with pytest.raises(KeyError, match="--stage teacher"):
        encode(encode_pairs, [LabelledPair("戊", "己", -1, "unlabelled")], "both",
               soft=lambda a, b: TEACHER.get((a, b)))


def test_without_distillation_every_loss_is_the_label_s():
    examples = encode(encode_pairs, [LabelledPair("甲", "乙", 1, "ccks")], "both")
    _, _, _, labels, soft = collate(examples, [0, 1], "cpu")
    logits = torch.tensor([[0.5, 0.1, -0.2], [0.0, 0.3, 0.1]])
    losses = example_losses(logits, labels, soft, torch.ones(3), alpha=0.0, temperature=2.0)
    assert losses.tolist() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels, reduction="none").tolist())


# A run cut off (as a session's end or a pre-empted node cuts one) and started again.
RESUMABLE_RUN = """
import logging, sys, torch
from transformers import BertConfig, BertForSequenceClassification
from mgeo_service.train.fit import fit

logging.basicConfig(level=logging.INFO)  # its progress lines: stderr is a pipe here, so no bar is drawn

torch.manual_seed(0)
torch.set_num_threads(1)
model = BertForSequenceClassification(BertConfig(
    vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3))
examples = [([2] + [5 + (i * 7 + j) % 30 for j in range(4 + i % 9)] + [3], [0] * (6 + i % 9), i % 3, None)
            for i in range(1500)]
fit(model, examples, examples[:60], [e[2] for e in examples[:60]], epochs=3, batch_size=16,
    learning_rate=1e-3, seed=7, resume=sys.argv[1], save_every=20)
torch.save(model.state_dict(), sys.argv[2])
"""


def test_a_run_cut_off_goes_on_from_where_it_was_to_the_same_weights(tmp_path):
    import subprocess
    import sys
    import time

    def start(progress, weights):
        return subprocess.Popen([sys.executable, "-c", RESUMABLE_RUN, str(progress), str(weights)],
                                stderr=subprocess.PIPE, text=True)

    whole = start(tmp_path / "whole.pt", tmp_path / "whole.weights")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()
    assert not (tmp_path / "whole.pt").exists()  # removed once the run is done

    progress = tmp_path / "cut.pt"
    cut = start(progress, tmp_path / "cut.weights")
    while not progress.exists() and cut.poll() is None:
        time.sleep(0.01)
    cut.kill()
    cut.wait()
    assert progress.exists(), "the run ended before it could be cut off"
    saved = torch.load(progress, weights_only=False)
    epoch, step = saved["epoch"] + 1, saved["step"]  # the epoch it was in, and its batches done
    assert epoch <= 3
    again = start(progress, tmp_path / "cut.weights")
    _, log = again.communicate(timeout=600)
    assert again.returncode == 0, log
    # It went on from there (a line every 20 batches names the epoch and the batch), not from the start: an
    # earlier epoch is not trained again, nor the saved one from its first batch.
    assert f"resuming at epoch {epoch}, batch {step}," in log
    trained = [(int(e), int(b)) for e, b in re.findall(r"model epoch (\d)/3: batch (\d+) of 94", log)]
    assert min(trained) > (epoch, step) and (3, 80) in trained

    expected, resumed = torch.load(tmp_path / "whole.weights"), torch.load(tmp_path / "cut.weights")
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
