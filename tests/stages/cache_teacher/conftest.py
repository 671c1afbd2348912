"""Shared by the stage-one tests: the documents they cache, one torch thread."""

from __future__ import annotations

import json

import pytest
import torch

from sad_pipe.pipeline.data import is_eval

MAX_LENGTH, BATCH, PER_SHARD, EVAL_FRACTION = 32, 4, 16, 0.25


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine an OpenMP team of two
    waits at every barrier for whichever thread another process has preempted."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def docs_path(assets, tmp_path_factory) -> str:
    """Twelve short documents, three of them held out by the hash rule: ~50 train and ~15 eval sequences
    (4 + 1 or 2 shards)."""
    short = [d[:400] for d in assets["docs"]]
    train = [d for d in short if not is_eval(d, EVAL_FRACTION)][:9]
    held = [d for d in short if is_eval(d, EVAL_FRACTION)][:3]
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in held[:1] + train[:5] + held[1:] + train[5:]))
    return str(path)


