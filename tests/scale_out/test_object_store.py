"""The cache on an object store (S3 API, moto on loopback): the commit protocol's operations without a rename,
a hand-built cache written, read, verified and garbage-collected there, and the tokenizer fetched for
transformers. The two stages themselves run against the store in test_distributed_cache/_training."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import s3fs
import torch
from conftest import cli
from storage.builders import make_identity, plan_cache, shard_rows, stored_names, write_missing, write_shard
from torch.utils.data import DataLoader

from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.manifest import read_commits
from sad_pipe.storage.reader import CacheDataset, CacheReader, FieldSchedule
from sad_pipe.storage.verify import collect_garbage
from sad_pipe.storage.writer import ShardWriter, finalize

IDENTITY = make_identity(sequences_per_shard=8, sequences_per_chunk=4)
SIZES = {"train": 24, "eval": 8}


def other_process(url: str) -> tuple[s3fs.S3FileSystem, str]:
    """A client with its own state, as another rank or host has (fsspec shares one instance per process)."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    return fs, url.removeprefix("s3://")


def test_create_if_absent_has_exactly_one_winner_among_concurrent_writers(s3):
    url = s3("create-race")
    cache = CacheFS(url)
    for trial in range(3):
        results, start = {}, threading.Barrier(8)

        def commit(i: int, trial=trial, results=results, start=start) -> None:
            start.wait()
            results[i] = cache.create_if_absent(f"commits/train-{trial:05d}.json", f"writer {i}\n".encode())

        threads = [threading.Thread(target=commit, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, won in results.items() if won]
        assert len(winners) == 1, results
        assert cache.read_bytes(f"commits/train-{trial:05d}.json") == f"writer {winners[0]}\n".encode()
    assert cache.listdir("commits") == [f"train-{t:05d}.json" for t in range(3)]  # no temporary objects


@pytest.mark.parametrize("landed_first", ["ours", "theirs"])
def test_a_put_whose_answer_is_lost_is_judged_by_what_the_store_holds(s3, monkeypatch, landed_first):
    """A conditional PUT that fails without saying why (a timeout after the write, a 409): the record is ours
    only if the store holds our bytes. Never both writers winning, never a winner deleting its own shard."""
    url = s3(f"lost-answer-{landed_first}")
    cache = CacheFS(url)
    real = cache.fs.pipe_file  # fsspec binds its sync methods per instance: patch the instance

    def pipe_file(path, data, mode="overwrite", **kwargs):
        real(path, data if landed_first == "ours" else b"the other writer\n", mode=mode, **kwargs)
        raise OSError("connection reset")

    monkeypatch.setattr(cache.fs, "pipe_file", pipe_file)
    won = cache.create_if_absent("commits/train-00000.json", b"ours\n")
    monkeypatch.undo()
    assert won is (landed_first == "ours")
    assert cache.read_bytes("commits/train-00000.json") == (b"ours\n" if won else b"the other writer\n")


def test_listings_show_what_other_processes_wrote_since(s3):
    """Rank 0 lists commits/, the other ranks commit, rank 0 lists again before finalizing: fsspec's listing
    cache would answer the second time from memory and report those shards missing."""
    url = s3("listings")
    cache = CacheFS(url)
    cache.write_atomic("commits/train-00000.json", b"{}")
    assert cache.listdir("commits") == ["train-00000.json"]
    assert cache.exists("commits/train-00000.json") and not cache.exists("commits/train-00001.json")
    fs, root = other_process(url)
    fs.pipe_file(f"{root}/commits/train-00001.json", b"{}")
    assert cache.listdir("commits") == ["train-00000.json", "train-00001.json"]
    assert cache.exists("commits/train-00001.json")
    assert sorted(cache.walk_files("commits")) == ["train-00000.json", "train-00001.json"]


def test_move_publishes_every_object_of_a_directory_under_its_new_name(s3):
    cache = CacheFS(s3("move"))
    cache.write_atomic("_tmp/train-00000-abcd1234/zarr.json", b"{}")
    cache.write_atomic("_tmp/train-00000-abcd1234/topk_ids/c/0/0/0", b"data")
    cache.write_atomic("_tmp/train-00000-abcd12345/other", b"x")  # a sibling sharing the prefix stays put
    cache.move("_tmp/train-00000-abcd1234", "shards/train/00000-abcd1234")
    assert cache.walk_files("shards/train/00000-abcd1234") == {"zarr.json": 2, "topk_ids/c/0/0/0": 4}
    assert cache.read_bytes("shards/train/00000-abcd1234/topk_ids/c/0/0/0") == b"data"
    assert cache.listdir("_tmp") == ["train-00000-abcd12345"]


def test_local_dir_fetches_a_directory_for_libraries_that_open_only_local_paths(s3, tmp_path):
    cache = CacheFS(s3("local-dir"))
    cache.write_atomic("tokenizer/tokenizer.json", b'{"a": 1}')
    cache.write_atomic("tokenizer/sub/vocab.txt", b"w0\nw1\n")
    with cache.local_dir("tokenizer") as local:
        with open(f"{local}/tokenizer.json", "rb") as f:
            assert f.read() == b'{"a": 1}'
        with open(f"{local}/sub/vocab.txt", "rb") as f:
            assert f.read() == b"w0\nw1\n"
    assert not os.path.exists(local)  # a temporary copy, gone after use
    with CacheFS(str(tmp_path)).local_dir("tokenizer") as here:  # a local cache is used in place
        assert here == str(tmp_path / "tokenizer")


@pytest.mark.slow
def test_a_cache_written_read_verified_and_collected_on_the_object_store(s3, monkeypatch):
    """Tokens, plan, shards (one lost to a second writer, one left uncommitted by a crash), gc, the rest, the
    manifest; then every row reads back exactly and verify --full passes."""
    url = s3("whole-cache")
    plan, data = plan_cache(url, IDENTITY, SIZES)
    names = stored_names(IDENTITY)
    cache = CacheFS(url)
    first, second = (ShardWriter(CacheFS(url), plan, "train", 1) for _ in range(2))
    for w in (first, second):
        w.write(shard_rows(data["train"], 8, 16, names))
    won, lost = first.finish(), second.finish()
    assert won is not None and lost is None
    assert read_commits(cache)[("train", 1)] == won
    assert cache.listdir("shards/train") == [won["dir"].rsplit("/", 1)[1]]  # the loser deleted its copy
    # A writer that dies after moving its shard into place but before committing it leaves garbage only.
    crashed = ShardWriter(cache, plan, "train", 2)
    crashed.write(shard_rows(data["train"], 16, 24, names))

    def killed(self, rel, data):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(CacheFS, "create_if_absent", killed)
        with pytest.raises(KeyboardInterrupt):
            crashed.finish()
    moved = f"shards/train/00002-{crashed.tmp.rsplit('-', 1)[1]}"
    assert cache.exists(moved) and ("train", 2) not in read_commits(cache)
    assert [r for r in collect_garbage(cache)["removed"] if r.startswith("shards/")] == [moved]
    assert write_missing(url, plan, data) == 3  # train 0, 2 and eval 0
    assert write_shard(url, plan, data, "train", 1) is None  # a late writer loses too
    finalize(cache, {})
    reader = CacheReader(url)
    for split, info in plan.splits.items():
        for a, b in info["shards"]:
            got = reader.read(split, a, b, {"input_ids", "topk", "lse", "target_logprob", "hidden"})
            for name, arr in got.items():
                np.testing.assert_array_equal(arr, data[split][name][a:b], err_msg=f"{split} {name} [{a}, {b})")
    assert cli("verify", "--full", url).exit_code == 0


def test_dataloader_workers_read_an_object_store_cache(s3_cache, reference_cache):
    """DataLoader workers are forked from a process that has already used the store; fsspec's async clients
    refuse to run after a fork ("This class is not fork-safe"), so each process must make its own."""
    def batches(url: str, workers: int) -> list[dict]:
        data = CacheDataset(url, "train", 8, FieldSchedule(always={"input_ids", "lse"}), seed=3)
        data.reader.read("train", 0, 4, {"lse"})  # the parent process uses the store first
        out = []
        for batch in DataLoader(data, batch_size=None, num_workers=workers):
            out.append(batch)
            if len(out) == 3:
                break
        return out

    got, want = batches(s3_cache, workers=1), batches(reference_cache, workers=0)
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_damage_on_an_object_store_cache_is_caught_by_full_verify_and_never_read_as_data(s3_cache):
    """The corruption campaign against the S3 cache (tests/reliability/test_corruption.py does the full sweep
    on a local disk): one file of each kind truncated, flipped or deleted through the store's own API."""
    import numpy as np

    from sad_pipe.errors import CacheError
    from sad_pipe.stages.cache_teacher.maintenance import verify_cache
    from sad_pipe.storage.reader import CacheReader

    cache = CacheFS(s3_cache)
    files = sorted(cache.walk_files(""))
    picks = {"shard data": next(f for f in files if f.startswith("shards/") and "/sample_ids/c/" in f),
             "tail draws": next(f for f in files if f.startswith("shards/") and "/tail_counts/c/" in f),
             "tokens": next(f for f in files if f.startswith("tokens/") and "/loss_mask/c/" in f),
             "commit record": next(f for f in files if f.startswith("commits/")),
             "tokenizer": "tokenizer/tokenizer.json", "config": "config.json"}
    rng = np.random.default_rng(5)
    for (what, rel), kind in zip(picks.items(), ["flip", "truncate", "flip", "flip", "truncate", "delete"]):
        original = cache.read_bytes(rel)
        if kind == "flip":
            damaged = bytearray(original)
            damaged[int(rng.integers(len(damaged)))] ^= 0xFF
            cache.fs.pipe_file(cache.path(rel), bytes(damaged))
        elif kind == "truncate":
            cache.fs.pipe_file(cache.path(rel), original[:len(original) // 2])
        else:
            cache.fs.rm(cache.path(rel))
        try:
            report = verify_cache(s3_cache, full=True)
            assert not report.ok, (what, rel)
            if rel.startswith(("shards/", "tokens/", "commits/")):
                with pytest.raises(CacheError):
                    reader = CacheReader(s3_cache)
                    for split, info in reader.plan.splits.items():
                        for a, b in info["shards"]:
                            reader.read(split, a, b, reader.groups)
        finally:
            cache.fs.pipe_file(cache.path(rel), original)
    assert verify_cache(s3_cache, full=True).ok
