"""What the default model learns from, all from ``shared/data`` and all seeded.

- CCKS 2021, split by query into train / validation / held-out test (no query on two sides);
- Shenzhen pairs (same place -> exact_match, different -> not_match), training only;
- contrast pairs (``contrast.py``) from the company addresses and the CCKS training queries;
  company addresses in hash buckets 0-1 make a contrast validation set instead;
- unlabelled pairs that only the teacher labels: each CCKS training query against the most
  similar candidate of another training query (hard, unseen combinations).
"""
from __future__ import annotations

import csv
import hashlib
import os
import random
from dataclasses import dataclass, field

from ..dataset import LabelledPair, read_pairs
from .contrast import ContrastGenerator, Gazetteer

CCKS_FILE = "ccks2021_address_pairs.tsv"
SHENZHEN_FILE = "shenzhen_address_pairs.tsv"
COMPANY_FILE = "raw_company_addresses.csv"
UNLABELLED = -1  # the label of a pair only the teacher labels


def split_bucket(text: str) -> int:
    """A stable bucket 0..9 per text, so a query's candidates stay on one side."""
    return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) % 10


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
        f.write("address1\taddress2\tlabel\tkind\n")
        for p in pairs:
            f.write(f"{p.address1}\t{p.address2}\t{p.label}\t{p.kind}\n")


def shenzhen_pairs(data_dir: str, count: int, seed: int) -> list[LabelledPair]:
    """The first ``count`` of a seeded shuffle, so a smaller count takes a prefix of a larger one."""
    pairs = [LabelledPair(p.address1, p.address2, 2 if p.label == 1 else 0, "shenzhen")
             for p in read_pairs(os.path.join(data_dir, SHENZHEN_FILE))]
    random.Random(seed).shuffle(pairs)
    return pairs[:count]


def company_addresses(data_dir: str) -> list[str]:
    with open(os.path.join(data_dir, COMPANY_FILE), encoding="utf-8") as f:
        return [row["原始地址"].strip() for row in csv.DictReader(f) if row["原始地址"].strip()]


def _chars(text: str) -> set[str]:
    return set(text)


def unlabelled_pairs(train: list[LabelledPair], count: int, seed: int) -> list[LabelledPair]:
    """Queries against the most character-similar of 30 other queries' candidates."""
    rng = random.Random(seed)
    queries = sorted({p.address1 for p in train})
    candidates = sorted({(p.address1, p.address2) for p in train})
    rng.shuffle(queries)
    out = []
    for query in queries[:count]:
        chars = _chars(query)
        pool = [c for q, c in rng.sample(candidates, 30) if q != query]
        best = max(pool, key=lambda c: len(chars & _chars(c)) / len(chars | _chars(c)))
        out.append(LabelledPair(query, best, UNLABELLED, "unlabelled"))
    return out


@dataclass
class TrainingData:
    splits: dict[str, list[LabelledPair]]  # CCKS train / validation / test
    shenzhen: list[LabelledPair] = field(default_factory=list)
    contrast: list[LabelledPair] = field(default_factory=list)
    contrast_validation: list[LabelledPair] = field(default_factory=list)
    unlabelled: list[LabelledPair] = field(default_factory=list)

    @property
    def train(self) -> list[LabelledPair]:
        """Everything the models train on, unlabelled pairs included."""
        return self.splits["train"] + self.shenzhen + self.contrast + self.unlabelled

    def sizes(self) -> dict[str, int]:
        return {**{f"ccks_{k}": len(v) for k, v in self.splits.items()}, "shenzhen": len(self.shenzhen),
                "contrast": len(self.contrast), "contrast_validation": len(self.contrast_validation),
                "unlabelled": len(self.unlabelled)}


def training_data(data_dir: str, seed: int, shenzhen: int, contrast: int, unlabelled: int,
                  limit: int | None = None) -> TrainingData:
    splits = split_pairs(read_pairs(os.path.join(data_dir, CCKS_FILE)))
    if limit:
        splits = {name: pairs[:limit] for name, pairs in splits.items()}
    gazetteer = Gazetteer(data_dir)
    companies = company_addresses(data_dir)
    held_out = [a for a in companies if split_bucket(a) < 2]
    sources = [a for a in companies if split_bucket(a) >= 2] + sorted({p.address1 for p in splits["train"]})
    return TrainingData(
        splits=splits,
        shenzhen=shenzhen_pairs(data_dir, shenzhen, seed) if shenzhen else [],
        contrast=ContrastGenerator(gazetteer, sources, seed).pairs(contrast) if contrast else [],
        contrast_validation=ContrastGenerator(gazetteer, held_out, seed + 1).pairs(900),
        unlabelled=unlabelled_pairs(splits["train"], unlabelled, seed) if unlabelled else [],
    )
