"""Address pair files: ``address1<TAB>address2[<TAB>label[<TAB>kind]]``, one reader for evaluation,
training and ``mgeo-service predict --file``."""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Iterable, Iterator

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


def pair_rows(lines: Iterable[str], source: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each line that holds a pair: blank lines and a header (a first line
    naming its columns: ``address1``..., or a label column called ``label`` or ``same_place``) are
    skipped, and either address without a visible character (``is_blank``) is refused."""
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DatasetError(f"{source}:{number}: expected address1<TAB>address2")
        if number == 1 and (fields[0].strip().lower() == "address1"
                            or len(fields) > 2 and fields[2].strip().lower() in ("label", "same_place")):
            continue
        if is_blank(fields[0]) or is_blank(fields[1]):
            raise DatasetError(f"{source}:{number}: an address has no visible character")
        yield number, fields


def read_pairs(path: str) -> list[LabelledPair]:
    """All labelled pairs of a TSV file."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, fields in pair_rows(f, path):
            if len(fields) not in (3, 4):
                raise DatasetError(f"{path}:{number}: expected 3 or 4 tab-separated fields, got {len(fields)}")
            address1, address2, label, kind = fields if len(fields) == 4 else (*fields, "")
            try:
                pairs.append(LabelledPair(address1, address2, parse_label(label), kind.strip()))
            except ValueError as exc:
                raise DatasetError(f"{path}:{number}: {exc}") from None
    if not pairs:
        raise DatasetError(f"{path}: no pairs")
    return pairs
