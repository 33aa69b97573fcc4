"""Labelled address pairs: ``address1<TAB>address2<TAB>label[<TAB>kind]`` files."""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from .checkpoint import LABELS


def is_blank(address: str) -> bool:
    """Whether an address has no visible character: only spaces, controls and format characters (a
    zero-width space alone is empty). The API and the command line refuse such an address alike."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in address)


@dataclass(frozen=True)
class LabelledPair:
    address1: str
    address2: str
    label: int  # index into LABELS
    kind: str = ""  # what the pair tests, e.g. "other_district"; empty when unknown


class DatasetError(ValueError):
    """A malformed file; the message names the line."""


def parse_label(text: str) -> int:
    text = text.strip()
    if text in LABELS:
        return LABELS.index(text)
    if text in ("0", "1", "2"):
        return int(text)
    raise ValueError(f"label {text!r} is not 0/1/2 or one of {', '.join(LABELS)}")


def read_pairs(path: str) -> list[LabelledPair]:
    """All pairs of a TSV file; the first line may be a header."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) not in (3, 4):
                raise DatasetError(f"{path}:{number}: expected 3 or 4 tab-separated fields, got {len(fields)}")
            address1, address2, label, kind = fields if len(fields) == 4 else (*fields, "")
            if number == 1 and label.strip().lower() in ("label", "same_place"):
                continue
            if not address1.strip() or not address2.strip():
                raise DatasetError(f"{path}:{number}: empty address")
            try:
                pairs.append(LabelledPair(address1, address2, parse_label(label), kind.strip()))
            except ValueError as exc:
                raise DatasetError(f"{path}:{number}: {exc}") from None
    if not pairs:
        raise DatasetError(f"{path}: no pairs")
    return pairs
