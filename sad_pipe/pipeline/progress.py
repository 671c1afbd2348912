"""Progress bars that suit both a terminal and a log file.

On a terminal a bar redraws several times a second. Redirected to a file every redraw is a new line
(tqdm writes a carriage return, which a log keeps), so a long run would write thousands of them:
there the bar refreshes at most every LOG_INTERVAL seconds."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_INTERVAL = 30.0


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """tqdm with sad-pipe's defaults (arguments as tqdm's); rate-limited when stderr is not a terminal."""
    kwargs.setdefault("dynamic_ncols", True)
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL)
        kwargs.setdefault("maxinterval", LOG_INTERVAL * 4)
    return tqdm(iterable, **kwargs)
