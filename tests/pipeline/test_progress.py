"""Progress bars: redrawn on a terminal, rate-limited in a log file (one step = one second of a fake clock)."""

from __future__ import annotations

import io
import itertools
import sys

from sad_pipe.pipeline.progress import LOG_INTERVAL, progress_bar

STEPS = 600


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def redraws(stream: io.StringIO, monkeypatch) -> int:
    """How often a bar over STEPS one-second steps draws itself on `stream` (as sys.stderr)."""
    monkeypatch.setattr(sys, "stderr", stream)
    bar = progress_bar(total=STEPS, desc="train", file=stream)
    clock = itertools.count(bar.start_t)
    bar._time = lambda: next(clock)  # tqdm reads its clock through this attribute
    for _ in range(STEPS):
        bar.update(1)
    bar.close()
    return stream.getvalue().count("train:")


def test_a_log_file_gets_a_line_per_interval_and_a_terminal_every_redraw(monkeypatch):
    assert redraws(Terminal(), monkeypatch) >= STEPS // 2  # tqdm's own 0.1 s limit: every one-second step
    assert redraws(io.StringIO(), monkeypatch) <= STEPS / LOG_INTERVAL + 2  # a redirected run: one per 30 s
