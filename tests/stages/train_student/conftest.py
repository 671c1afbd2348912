"""Caches built once for the train-student tests (real ones: the tiny Llama teacher of tests/conftest.py
through `sad-pipe cache-teacher`); `kd_cache`, which other tests share, is in tests/conftest.py.
(Torch runs on one thread for the whole suite: see tests/conftest.py.)
"""

from __future__ import annotations

import pytest
from conftest import build_cache


@pytest.fixture(scope="session")
def no_hidden_cache(tmp_path_factory, assets) -> str:
    """Top-k and lse only: no teacher layers cached."""
    root = tmp_path_factory.mktemp("no_hidden_cache")
    return build_cache(root, assets, [], data={"max_documents": 2, "max_length": 32, "eval_fraction": 0.0},
                       cache={"top_k": 8, "sequences_per_shard": 32, "sequences_per_chunk": 8})
