"""The machine a figure was measured on: the CPU's model and its int8 dot-product instructions (what decides
whether int8 pays: docs/configuration.md "int8")."""
from __future__ import annotations

import re


def cpu() -> dict:
    """The model name and int8 instructions as lscpu names them (an empty list on an AVX2-only CPU)."""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        info = f.read()
    flags = set(re.search(r"^flags\s*:(.*)$", info, re.M).group(1).split())
    return {"model": re.search(r"^model name\s*:\s*(.*)$", info, re.M).group(1),
            "int8_instructions": sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "amx_tile"})}
