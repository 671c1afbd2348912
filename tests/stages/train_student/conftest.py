"""Caches built once for the train-student tests (real ones: the tiny Llama teacher of tests/conftest.py
through `sad-pipe cache-teacher`). Five documents packed at 32 tokens give ~230 train sequences.
(Torch runs on one thread for the whole suite: see tests/conftest.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cache_config, cli


def _build(root: Path, assets, teacher_layers: list[int], **sections) -> str:
    config = Path(cache_config(root, assets, teacher={"layers": teacher_layers}, **sections))
    cli("-q", "cache-teacher", "--config", str(config))
    return json.loads(config.read_text())["cache"]["path"]


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
