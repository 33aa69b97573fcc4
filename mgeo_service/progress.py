"""Progress bars for the long commands (evaluate, predict --file, export, train): drawn on stderr when it is
a terminal, and nothing at all otherwise, so pipes, CI logs and the JSON on stdout stay clean."""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(shown: bool = True, **options) -> tqdm:
    """A tqdm bar (``options`` as tqdm takes them) on stderr, drawn if ``shown`` and stderr is a terminal."""
    return tqdm(file=sys.stderr, disable=not (shown and sys.stderr.isatty()), dynamic_ncols=True, **options)
