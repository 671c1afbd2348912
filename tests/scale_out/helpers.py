"""Helpers of the scale-out tests: torchrun as a subprocess, the small cache they all build, and a comparison
of two caches by content (not by who wrote it).

Every multi-process run is the real thing: `python -m torch.distributed.run --standalone --nproc-per-node N
-m sad_pipe.cli ...`, the launch line the README gives, each rank a fresh interpreter with gloo.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cache_config

from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.manifest import read_commits
from sad_pipe.storage.reader import CacheReader

REPO = Path(__file__).resolve().parents[2]
BUCKET = "sad-pipe-tests"
# One thread per rank: two ranks already fill CI's two cores (see tests/conftest.py).
RANK_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# Five documents at 32 tokens: 228 train and 4 eval sequences, in 4 + 1 shards of 64 (chunks of 16); with two
# ranks, rank 0 writes train 0, 2 and eval 0, rank 1 train 1, 3. Top-16, lse at T=1,2, teacher layer 1.
DATA = {"max_documents": 5, "max_length": 32, "eval_fraction": 0.2}
CACHE = {"top_k": 16, "temperatures": [1.0, 2.0], "sequences_per_shard": 64, "sequences_per_chunk": 16,
         "targets": ["topk", "sampled", "hybrid"], "samples": 8,  # the draws too: seeded per sequence, rank-independent
         "hidden_rank": 8, "hidden_positions": "random:0.5"}  # rank 0 fits the basis, every rank encodes with it


def torchrun(nproc: int, *args: str, expect: int | None = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node nproc -m sad_pipe.cli -q ARGS` (or a script instead of -m when
    args[0] ends in .py); checks the exit code and shows the tail of the output when it is wrong."""
    target = [args[0]] if args[0].endswith(".py") else ["-m", "sad_pipe.cli", "-q", args[0]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *target, *args[1:]]
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, **RANK_ENV}, capture_output=True, text=True, timeout=timeout)
    if expect is not None:
        assert result.returncode == expect, (f"torchrun exit {result.returncode}, expected {expect}:\n"
                                             f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


def scale_cache_config(tmp_path: Path, assets, url: str) -> str:
    """A cache-teacher config for the tiny Llama teacher writing to `url` (a path or an s3:// URL)."""
    return cache_config(tmp_path, assets, teacher={"layers": [1]}, data=DATA, cache={**CACHE, "path": url})


def cache_contents(url: str) -> dict:
    """Everything a cache holds, independent of who wrote it: the identity, every array of every shard decoded
    through CacheReader, and the size and sha256 of every committed file (shard directories carry a random
    suffix, so records are compared file by file, not by directory)."""
    reader = CacheReader(url)
    groups = reader.groups
    arrays = {}
    for split, info in reader.plan.splits.items():
        for shard, (a, b) in enumerate(info["shards"]):
            arrays[(split, shard)] = reader.read(split, a, b, groups)
    commits = read_commits(CacheFS(url))
    return {
        "identity": reader.identity,
        "splits": {s: {k: v for k, v in info.items()} for s, info in reader.plan.splits.items()},
        "arrays": arrays,
        "files": {key: record["files"] for key, record in commits.items()},
        "sequences": {key: record["sequences"] for key, record in commits.items()},
        "stats": {key: record["stats"] for key, record in commits.items()},
        "writers": {key: record["writer"]["rank"] for key, record in commits.items()},
    }


def assert_same_cache(got: dict, want: dict) -> None:
    assert got["identity"] == want["identity"]
    assert got["splits"] == want["splits"]
    assert got["arrays"].keys() == want["arrays"].keys() and len(want["arrays"]) >= 2
    for key, arrays in want["arrays"].items():
        assert got["arrays"][key].keys() == arrays.keys()
        for name, value in arrays.items():
            np.testing.assert_array_equal(got["arrays"][key][name], value, err_msg=f"{key} {name}")
    assert got["files"] == want["files"]  # byte for byte: same sizes and sha256 of every file
    assert got["sequences"] == want["sequences"]
    for key, stats in want["stats"].items():  # figures summed in a different order may differ in the last bit
        assert got["stats"][key] == pytest.approx(stats, rel=1e-9), key
