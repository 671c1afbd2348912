"""Caches built once for the train-student tests (real ones: the tiny Llama teacher of tests/conftest.py
through `sad-pipe cache-teacher`). Five documents packed at 32 tokens give ~230 train sequences.

Everything here runs torch on one thread: with models this small, intra-op threads only spin against
each other and against other test processes (measured: a 57-micro-batch run took 18 s on 2 threads of
a shared 2-core box and 7 s on 1).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import cache_config, cli


@contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    with one_thread():
        yield


def _build(root: Path, assets, teacher_layers: list[int], **sections) -> str:
    config = Path(cache_config(root, assets, **sections))
    raw = json.loads(config.read_text())
    raw["teacher"]["layers"] = teacher_layers  # cache_config's `teacher` argument names the model, not the section
    config.write_text(json.dumps(raw))
    with one_thread():  # session-scoped, so it may be built before the package fixture above applies
        cli("-q", "cache-teacher", "--config", str(config))
    return raw["cache"]["path"]


@pytest.fixture(scope="session")
def kd_cache(tmp_path_factory, assets) -> str:
    """Top-16 + lse at T=1,2 + hidden states of teacher layers 1 and 2 (width 32)."""
    root = tmp_path_factory.mktemp("kd_cache")
    return _build(root, assets, [1, 2], data={"max_documents": 5, "max_length": 32, "eval_fraction": 0.2},
                  cache={"top_k": 16, "temperatures": [1.0, 2.0], "sequences_per_shard": 32, "sequences_per_chunk": 8})


@pytest.fixture(scope="session")
def no_hidden_cache(tmp_path_factory, assets) -> str:
    """Top-k and lse only: no teacher layers cached."""
    root = tmp_path_factory.mktemp("no_hidden_cache")
    return _build(root, assets, [], data={"max_documents": 2, "max_length": 32, "eval_fraction": 0.0},
                  cache={"top_k": 8, "sequences_per_shard": 32, "sequences_per_chunk": 8})
