"""One small real cache (the tiny Llama teacher of tests/conftest.py, 3 train shards + 1 eval shard of 16
sequences of 32 tokens) shared by the reliability tests, the fork server that runs killable sad-pipe
processes, and the counts of the fuzz tests (--runslow or SAD_PIPE_KILLS raise them)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import cache_config, cli, write_jsonl

from sad_pipe.pipeline.data import is_eval

from .forkserver import ForkServer

MAX_LENGTH, PER_SHARD, PER_CHUNK, EVAL_FRACTION = 32, 16, 8, 0.1


def fuzz_count(request, env: str, fast: int, slow: int) -> int:
    """How many iterations a fuzz test runs: the env var if set, else `slow` under --runslow, else `fast`."""
    if os.environ.get(env):
        return int(os.environ[env])
    return slow if request.config.getoption("--runslow") else fast


@pytest.fixture(scope="session")
def rel_docs(assets, tmp_path_factory) -> str:
    """Five 600-character train documents and one held-out one: ~48 train and ~10 eval sequences."""
    short = [d[:600] for d in assets["docs"]]
    train = [d for d in short if not is_eval(d, EVAL_FRACTION)][:5]
    held = [d for d in short if is_eval(d, EVAL_FRACTION)][:1]
    path = tmp_path_factory.mktemp("rel_data") / "docs.jsonl"
    return write_jsonl(str(path), train[:2] + held + train[2:])


def writer_config(root: Path, assets, docs: str, **sections) -> str:
    """A cache-teacher config under `root` (cache in root/cache) for the shared small cache; `sections`
    update keys section by section."""
    base = {"teacher": {"layers": [1, 2], "device": "cpu"},
            "data": {"path": docs, "max_length": MAX_LENGTH, "eval_fraction": EVAL_FRACTION},
            # Every target form and the low-rank, subsampled hidden states with their stored basis: the kill,
            # crash-point, repair and corruption campaigns cover the draws, hidden_basis.safetensors and kept_positions.
            "cache": {"top_k": 16, "temperatures": [1.0, 2.0], "sequences_per_shard": PER_SHARD,
                      "sequences_per_chunk": PER_CHUNK, "targets": ["topk", "sampled", "hybrid"], "samples": 8,
                      "hidden_rank": 8, "hidden_positions": "every:2"}}
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    root.mkdir(parents=True, exist_ok=True)
    return cache_config(root, assets, **base)


def cache_of(config: str) -> str:
    return json.loads(Path(config).read_text())["cache"]["path"]


@pytest.fixture(scope="session")
def reference(assets, rel_docs, tmp_path_factory, request) -> str:
    """The uninterrupted run every interrupted, crashed or repaired cache must equal byte for byte."""
    if any("forkserver" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("forkserver")  # start its imports now, alongside this build
    config = writer_config(tmp_path_factory.mktemp("reference"), assets, rel_docs)
    cli("-q", "cache-teacher", "--config", config)
    return cache_of(config)


@pytest.fixture(scope="session")
def forkserver(tmp_path_factory):
    server = ForkServer(str(tmp_path_factory.mktemp("forkserver")))
    yield server
    server.close()
