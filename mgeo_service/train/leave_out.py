"""How the CCKS data labels pairs in which one address is the other with one part left out
(issue 21), and pairs on one road that differ in one numbered part (issue 35):
`python -m mgeo_service.train.leave_out ../shared/data` prints the model card's two tables.

A pair counts when the longer address is the shorter with one contiguous span added; the span
is classed by what it is: a detail at the end, a development zone or park, the province or
city at the start, a street or township, a district or county, or another middle part.
"""
from __future__ import annotations

import os
import re
import sys
from collections import Counter, defaultdict

from ..checkpoint import LABELS
from ..dataset import read_pairs
from .contrast import Gazetteer
from .data import CCKS_FILE

KINDS = ("detail at the end", "zone or park", "province or city", "street or township", "district or county",
         "other middle part")
_ZONE = re.compile("开发区|高新区|工业园|科技园|产业园|园区|经济区|新区|工业区")
_STREET = re.compile("(街道办事处|街道|镇|乡)$")
_DISTRICT = re.compile("[区县市]$")
_ROAD = re.compile(r"[\u4e00-\u9fff]{2,6}?(?:大道|大街|路|街)")
# A numbered part of an address: its one number in each address of a pair.
NUMBERED_PARTS = {"house number": r"(?<!\d)(\d+)号(?!楼)", "room": r"(\d+)室", "floor": r"(\d+)(?:楼(?!\d)|层|F)",
                  "building": r"(\d+)(?:栋|幢|座|号楼)", "unit": r"(\d+)单元"}


def left_out(longer: str, shorter: str) -> tuple[str, bool, bool] | None:
    """(the span, whether it starts the longer address, whether it ends it), when ``longer`` is
    ``shorter`` with one span added; else None."""
    if len(longer) <= len(shorter):
        return None
    start = 0
    while start < len(shorter) and longer[start] == shorter[start]:
        start += 1
    end = 0
    while end < len(shorter) - start and longer[-1 - end] == shorter[-1 - end]:
        end += 1
    if start + end != len(shorter):
        return None
    return longer[start:len(longer) - end], start == 0, end == 0


def part_kind(span: str, at_start: bool, at_end: bool, divisions: tuple[str, ...]) -> str:
    if at_end:
        return KINDS[0]
    if _ZONE.search(span):
        return KINDS[1]
    if at_start and span.startswith(divisions):
        return KINDS[2]
    if _STREET.search(span):
        return KINDS[3]
    if _DISTRICT.search(span):
        return KINDS[4]
    return KINDS[5]


def label_counts(data_dir: str) -> dict[str, Counter]:
    gazetteer = Gazetteer(data_dir)
    divisions = tuple({name for d in (*gazetteer.provinces.values(), *gazetteer.cities.values())
                       for name in (d.name, d.short) if name})
    counts: dict[str, Counter] = defaultdict(Counter)
    for pair in read_pairs(os.path.join(data_dir, CCKS_FILE)):
        a, b = pair.address1, pair.address2
        found = left_out(a, b) or left_out(b, a)
        if found:
            counts[part_kind(*found, divisions)][LABELS[pair.label]] += 1
    return counts


def number_change(first: str, second: str) -> str:
    """same, digits added or removed (1 / 11), or other: how one number differs between two addresses."""
    if first == second:
        return "same"
    return "digits added or removed" if first in second or second in first else "other"


def number_counts(data_dir: str) -> dict[str, Counter]:
    """Labels of the CCKS pairs that share a road, by numbered part and how its number differs."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for pair in read_pairs(os.path.join(data_dir, CCKS_FILE)):
        a, b = pair.address1, pair.address2
        if not set(_ROAD.findall(a)) & set(_ROAD.findall(b)):
            continue
        for part, pattern in NUMBERED_PARTS.items():
            x, y = re.findall(pattern, a), re.findall(pattern, b)
            if len(x) == 1 and len(y) == 1:
                counts[f"{part}: {number_change(x[0], y[0])}"][LABELS[pair.label]] += 1
    return counts


def print_table(title: str, counts: dict[str, Counter], rows) -> None:
    print(f"| {title} | " + " | ".join(LABELS) + " | pairs |")
    print("|---|" + "---|" * (len(LABELS) + 1))
    for row in rows:
        total = sum(counts[row].values())
        cells = [f"{counts[row][label]} ({counts[row][label] / total:.0%})" if total else "0" for label in LABELS]
        print(f"| {row} | " + " | ".join(cells) + f" | {total} |")


def main(data_dir: str) -> int:
    print_table("left out", label_counts(data_dir), KINDS)
    print()
    numbers = number_counts(data_dir)
    print_table("one road, numbered part", numbers, sorted(numbers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else os.path.join("..", "shared", "data")))
