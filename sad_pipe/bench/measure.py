"""How the benchmarks measure: paired repetitions, medians with their spread, timers, isolated runs.

Every headline figure is a ratio of two things measured in the same run. Variants are interleaved
within each repetition (A B, then B A, ...), so a change in machine load during the run hits both
sides of a ratio alike; the ratio is taken per repetition (paired) and its median reported with the
min-max spread over the repetitions.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# "within": a ratio within b of 1 (a projection against what it projects).
OPS = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "within": lambda a, b: abs(a - 1) <= b}


@dataclass
class Figure:
    """One reported number: its per-repetition values, what it divides by what, and its target."""

    name: str
    values: list[float]
    unit: str  # "x" for ratios; otherwise the unit of an absolute figure (B/token, nats)
    numerator: str
    denominator: str = ""
    target: tuple[str, float] | None = None  # (">=" | "<=" | "within", threshold), compared with the median

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def met(self) -> bool | None:
        if self.target is None or not self.values:
            return None
        op, threshold = self.target
        return bool(OPS[op](self.median, threshold))

    def to_json(self) -> dict:
        return {"name": self.name, "median": self.median, "min": min(self.values), "max": max(self.values),
                "values": self.values, "unit": self.unit, "numerator": self.numerator,
                "denominator": self.denominator, "target": list(self.target) if self.target else None,
                "met": self.met}


@dataclass
class Table:
    """A detail table of one benchmark (rows of already formatted cells)."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"title": self.title, "columns": self.columns, "rows": self.rows}


@dataclass
class Result:
    """What a benchmark returns: headline figures, detail tables, notes for the reader, raw data."""

    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)


def paired(numerators: list[float], denominators: list[float]) -> list[float]:
    """Per-repetition ratios of two interleaved series."""
    return [a / b for a, b in zip(numerators, denominators)]


def interleaved(repeats: int, variants: dict[str, Callable[[], object]]) -> dict[str, list]:
    """Run each variant once per repetition, reversing the order every other repetition."""
    out: dict[str, list] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(variants[name]())
    return out


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class Timer:
    """`with Timer(device) as t: ...` then `t.seconds`; synchronizes the GPU on both edges."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its children that have exited.

    On a busy machine wall time stretches but CPU time barely does: CPU seconds ÷ cores is a floor
    for the wall time the same work takes on an idle machine."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def spread(values: list[float], fmt: str = "{:.3g}") -> str:
    """'median (min-max)' of a series; a single value is shown alone."""
    med = statistics.median(values)
    if len(values) == 1 or min(values) == max(values):
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


# -- isolated runs: one subprocess per measurement, so peak memory of one variant never mixes with another's

class IsolatedRunError(RuntimeError):
    pass


def run_isolated(target: str, args: dict, device: str, workdir: Path) -> dict:
    """Run `target` ("module:function") in a fresh interpreter through sad_pipe.bench.worker.

    Returns {"result": what the function returned, "memory": the worker's MemoryMeter report}.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"target": target, "args": args, "device": device}))
        env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "sad_pipe.bench.worker", str(job), str(out)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise IsolatedRunError(f"{target} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


@dataclass
class Context:
    """What every benchmark gets: where to work, the device, the repetitions, the size profile, the assets."""

    work: Path
    device: str
    repeats: int
    quick: bool
    assets: object  # sad_pipe.bench.assets.Assets

    def pick(self, sizes: dict) -> dict:
        """A benchmark's sizes for this run: sizes["quick"] or sizes["full"]."""
        return sizes["quick" if self.quick else "full"]
