"""``--stage pretrain``: masked-language pretraining of the student's encoder on address text.

The student starts from e5's bottom layers, which were taught whole SentencePiece pieces of
many languages, not Chinese addresses one character at a time. This stage teaches it the
domain before it learns the task (issue 21; the CCKS 2021 winners' largest lever):

- text: the training side only (never a CCKS validation or test query): the CCKS training
  pairs and all Shenzhen pairs as sentence pairs, the company addresses that are not
  contrast validation sources, and every township of ``admin_divisions`` written out with
  its province, city and district: real text only, not the generated contrast pairs;
- n-gram masking: spans of 1, 2 or 3 characters (probabilities 0.5 / 0.3 / 0.2) until 15%
  of a text's tokens are chosen; of those 80% become [MASK], 10% a random token, 10% stay;
- a fixed number of steps (not a time limit), so that a seeded run is reproducible.

It writes ``encoder.safetensors`` (the BERT encoder and embeddings, float32) and
``pretrain.json`` beside the tokenizer it was made for; ``--stage student --init DIR`` starts from it.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import random
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..dataset import read_pairs
from ..progress import progress_bar
from .data import SHENZHEN_FILE, TrainingData, company_addresses, split_bucket
from .fit import autocast, batches

log = logging.getLogger(__name__)

MASK_SHARE = 0.15
SPAN_LENGTHS, SPAN_WEIGHTS = (1, 2, 3), (0.5, 0.3, 0.2)
ENCODER_FILE = "encoder.safetensors"


def township_texts(data_dir: str) -> list[str]:
    """Every township written out under its divisions: 广东省深圳市南山区粤海街道."""
    folder = os.path.join(data_dir, "admin_divisions")
    names = {}
    for file in ("provinces", "cities", "areas"):
        with open(os.path.join(folder, f"{file}.csv"), encoding="utf-8") as f:
            names.update({r["code"]: r["name"] for r in csv.DictReader(f)})
    with open(os.path.join(folder, "streets.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    # 市辖区 (a municipality's own districts) is not written in an address.
    return ["".join(n for n in (names.get(r["provinceCode"]), names.get(r["cityCode"]), names.get(r["areaCode"]),
                                r["name"]) if n and n != "市辖区") for r in rows]


def pretraining_texts(data: TrainingData, data_dir: str) -> list[tuple[str, str | None]]:
    """(first, second) sentence pairs and (text, None) singles, all real text from the training side.

    The generated contrast pairs are left out: they are fine-tuning's, and the contrast kinds
    can change without pretraining again.
    """
    shenzhen = read_pairs(os.path.join(data_dir, SHENZHEN_FILE))
    pairs = [(p.address1, p.address2) for p in data.splits["train"] + shenzhen]
    singles = [a for a in company_addresses(data_dir) if split_bucket(a) >= 2] + township_texts(data_dir)
    return pairs + [(text, None) for text in singles]


def mask_tokens(ids: list[int], special: set[int], mask_id: int, vocab_size: int, rng: random.Random):
    """(inputs, targets): n-gram spans chosen to MASK_SHARE of the maskable tokens; targets -100 elsewhere."""
    maskable = [i for i, t in enumerate(ids) if t not in special]
    goal = max(1, round(len(maskable) * MASK_SHARE))
    chosen: set[int] = set()
    for _ in range(4 * goal):  # bounded: short texts may not fit another span
        if len(chosen) >= goal:
            break
        length = rng.choices(SPAN_LENGTHS, SPAN_WEIGHTS)[0]
        start = rng.randrange(len(maskable))
        chosen.update(maskable[start:start + min(length, goal - len(chosen))])
    inputs, targets = list(ids), [-100] * len(ids)
    for i in chosen:
        targets[i] = ids[i]
        roll = rng.random()
        if roll < 0.8:
            inputs[i] = mask_id
        elif roll < 0.9:
            inputs[i] = rng.randrange(vocab_size)
    return inputs, targets


class MaskedBatches:
    """Seeded, length-bucketed batches of masked examples, made fresh each epoch."""

    def __init__(self, encoded: list[tuple[list[int], list[int]]], tokenizer, batch_size: int, seed: int):
        self.encoded, self.batch_size = encoded, batch_size
        self.rng = random.Random(seed)
        self.special = set(tokenizer.all_special_ids)
        self.mask_id, self.vocab_size = tokenizer.mask_token_id, len(tokenizer)

    def epoch(self):
        for index in batches(self.encoded, self.batch_size, self.rng):
            yield self.collate(index)

    def collate(self, index):
        width = max(len(self.encoded[i][0]) for i in index)
        ids = torch.zeros((len(index), width), dtype=torch.long)
        types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
        targets = torch.full_like(ids, -100)
        for row, i in enumerate(index):
            token_ids, type_ids = self.encoded[i]
            inputs, labels = mask_tokens(token_ids, self.special, self.mask_id, self.vocab_size, self.rng)
            n = len(inputs)
            ids[row, :n], types[row, :n], mask[row, :n] = torch.tensor(inputs), torch.tensor(type_ids), 1
            targets[row, :n] = torch.tensor(labels)
        return ids, types, mask, targets


def tokenize(tokenizer, firsts: list[str], seconds: list[str] | None, max_length: int) -> list[tuple[list, list]]:
    """(input ids, segment ids) per pair, or per text when ``seconds`` is None; both stages' inputs."""
    enc = tokenizer(firsts, seconds, truncation="longest_first", max_length=max_length,
                    return_token_type_ids=True, return_attention_mask=False)
    return list(zip(enc["input_ids"], enc["token_type_ids"]))


def masked_lm(student):
    """A ``BertForMaskedLM`` sharing the student's encoder weights (its head tied to the embeddings)."""
    from transformers import BertForMaskedLM

    model = BertForMaskedLM(student.config)
    missing, _ = model.bert.load_state_dict(student.bert.state_dict(), strict=False)
    assert not missing, missing
    model.tie_weights()
    return model


def masked_loss(model, ids, types, mask, targets):
    """Cross-entropy on the masked positions only (the vocabulary projection of the others is skipped)."""
    hidden = model.bert(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
    chosen = targets != -100
    logits = model.cls(hidden[chosen])
    return torch.nn.functional.cross_entropy(logits, targets[chosen]), logits.argmax(-1) == targets[chosen]


@torch.inference_mode()
def masked_accuracy(model, batches) -> dict:
    model.eval()
    losses, right = [], []
    for ids, types, mask, targets in batches:
        loss, hits = masked_loss(model, ids, types, mask, targets)
        losses.append(loss.item())
        right += hits.tolist()
    return {"loss": round(float(np.mean(losses)), 4), "accuracy": round(sum(right) / max(1, len(right)), 4)}


def pretrain(data: TrainingData, data_dir: str, out_dir: str, tokenizer, student, *, steps: int,
             batch_size: int, learning_rate: float, max_length: int, seed: int) -> dict:
    """Pretrain ``student``'s encoder for ``steps`` batches and save it to ``out_dir``."""
    started = time.time()
    texts = pretraining_texts(data, data_dir)
    pairs = [(a, b) for a, b in texts if b is not None]  # first in ``texts``, so the order is kept
    encoded = (tokenize(tokenizer, [a for a, _ in pairs], [b for _, b in pairs], max_length)
               + tokenize(tokenizer, [a for a, b in texts if b is None], None, max_length))
    validation = data.splits["validation"]
    # One fixed masking of the CCKS validation pairs: how well the encoder reads text it never saw.
    held = list(MaskedBatches(tokenize(tokenizer, [p.address1 for p in validation], [p.address2 for p in validation],
                                     max_length), tokenizer, 128, seed + 1).epoch())

    model = masked_lm(student)
    before = masked_accuracy(model, held)
    log.info("pretraining on %d texts (%d pairs), %d steps of %d; validation before: %s",
             len(texts), len(pairs), steps, batch_size, before)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup))))
    source = MaskedBatches(encoded, tokenizer, batch_size, seed)
    model.train()
    bar = progress_bar(total=steps, desc="pretrain", unit="batch", mininterval=30)
    step, running = 0, 0.0
    while step < steps:
        for ids, types, mask, targets in source.epoch():
            with autocast("cpu"):
                loss, _ = masked_loss(model, ids, types, mask, targets)
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            scheduler.step()
            step += 1
            running += loss.item()
            bar.update()
            if step % 100 == 0:
                bar.set_postfix(loss=f"{running / 100:.3f}")
                log.info("pretrain: step %d of %d, loss %.3f", step, steps, running / 100)
                running = 0.0
            if step == steps:
                break
    bar.close()
    after = masked_accuracy(model, held)
    log.info("validation masked accuracy %.4f -> %.4f", before["accuracy"], after["accuracy"])

    state = {k: v.detach().contiguous() for k, v in model.bert.state_dict().items()
             if not k.endswith(("position_ids", "token_type_ids"))}
    save_file(state, os.path.join(out_dir, ENCODER_FILE), metadata={"format": "pt"})
    summary = {"seed": seed, "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
               "max_length": max_length, "texts": len(texts), "pairs": len(pairs),
               "epochs": round(steps * batch_size / len(texts), 2), "validation_before": before,
               "validation_after": after, "pretrain_seconds": round(time.time() - started, 1)}
    with open(os.path.join(out_dir, "pretrain.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def pretrained_vocab(init_dir: str) -> list[str]:
    with open(os.path.join(init_dir, "vocab.txt"), encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


def load_encoder(student, init_dir: str, vocab: list[str]) -> None:
    """Load a pretrained encoder into ``student`` in place; its vocabulary must be the student's."""
    if pretrained_vocab(init_dir) != vocab:
        raise ValueError(f"{init_dir} was pretrained for another vocabulary: re-run --stage pretrain")
    missing, unexpected = student.bert.load_state_dict(load_file(os.path.join(init_dir, ENCODER_FILE)), strict=False)
    assert not unexpected and all(k.startswith("pooler.") for k in missing), (missing, unexpected)
