"""cache-teacher under torchrun: ranks split the shards by id, the cache equals a single process's byte for
byte, and a rank that dies leaves only uncommitted work that a re-run with another number of ranks finishes."""

from __future__ import annotations

import pytest
from conftest import cli

from sad_pipe.errors import CacheError
from sad_pipe.pipeline import distributed
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.manifest import missing_shards, read_commits, read_plan

from .helpers import REPO, assert_same_cache, cache_contents, scale_cache_config, torchrun


def test_two_ranks_fill_an_object_store_cache_equal_to_one_process_on_disk(s3_cache, reference_cache):
    got, want = cache_contents(s3_cache), cache_contents(reference_cache)
    assert_same_cache(got, want)
    # The work really was split by shard id: shard i was committed by rank i % 2, both ranks took part.
    assert got["writers"] == {(split, i): i % 2 for split, i in got["writers"]}
    assert set(got["writers"].values()) == {0, 1}
    assert set(want["writers"].values()) == {0}
    assert cli("verify", s3_cache).exit_code == 0


@pytest.mark.slow
def test_two_ranks_fill_a_local_cache_equal_to_one_process(tmp_path, assets, reference_cache):
    url = str(tmp_path / "cache")
    torchrun(2, "cache-teacher", "--config", scale_cache_config(tmp_path, assets, url))
    got = cache_contents(url)
    assert_same_cache(got, cache_contents(reference_cache))
    assert set(got["writers"].values()) == {0, 1}


def _leftovers(url: str) -> list[str]:
    """Shard directories no commit record names, and anything in _tmp/."""
    cache = CacheFS(url)
    named = {r["dir"] for r in read_commits(cache).values()}
    dirs = [f"shards/{s}/{n}" for s in ("train", "eval") for n in cache.listdir(f"shards/{s}")]
    return [d for d in dirs if d not in named] + [f"_tmp/{n}" for n in cache.listdir("_tmp")]


def test_a_missing_rank_leaves_its_shards_to_a_rerun_with_another_world_size(tmp_path, assets, reference_cache, monkeypatch):
    """Rank 0 of 3 runs alone (its peers died before writing anything): it plans, commits exactly its shards
    (id % 3 == 0), refuses to finalize, and one process then finishes the job: the same cache as the reference."""
    url = str(tmp_path / "cache")
    config = scale_cache_config(tmp_path, assets, url)
    with monkeypatch.context() as mp:
        mp.setattr(distributed, "rank", lambda: 0)
        mp.setattr(distributed, "world_size", lambda: 3)
        result = cli("-q", "cache-teacher", "--config", config, expect=1)
    assert "shards are still missing (another rank failed?); re-run to finish" in result.output
    cache = CacheFS(url)
    assert sorted(read_commits(cache)) == [("eval", 0), ("train", 0), ("train", 3)]
    assert not cache.exists("manifest.json")
    with pytest.raises(CacheError, match="is incomplete"):
        cache_contents(url)
    cli("-q", "cache-teacher", "--config", config)
    assert_same_cache(cache_contents(url), cache_contents(reference_cache))


DYING_RANK = REPO / "tests" / "scale_out" / "dying_rank.py"


@pytest.mark.slow
def test_a_rank_killed_mid_run_is_finished_by_a_rerun_with_one_process(tmp_path, assets, reference_cache):
    """A real death: torchrun rank 1 is SIGKILLed between moving its second shard into place and committing it;
    torchrun stops rank 0. The re-run (one process) discards the leftovers, writes what is missing, and the cache
    equals the reference."""
    url = str(tmp_path / "cache")
    config = scale_cache_config(tmp_path, assets, url)
    result = torchrun(2, str(DYING_RANK), "cache-teacher", "--config", config, expect=None)
    assert result.returncode != 0
    cache = CacheFS(url)
    commits = read_commits(cache)
    assert ("train", 1) in commits and ("train", 3) not in commits  # rank 1's first shard is in, its second not
    assert missing_shards(read_plan(cache), commits) and not cache.exists("manifest.json")
    assert _leftovers(url), "the killed rank's moved but uncommitted shard directory should be left behind"
    cli("-q", "cache-teacher", "--config", config)
    assert _leftovers(url) == []
    assert_same_cache(cache_contents(url), cache_contents(reference_cache))
