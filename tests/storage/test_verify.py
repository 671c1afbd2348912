"""`sad-pipe verify` and `sad-pipe gc`, through the real CLI, on real damage to a real cache."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import zarr
from conftest import cli

from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.manifest import read_commits
from sad_pipe.storage.writer import finalize

from .builders import build_cache, make_identity, plan_cache, write_missing, write_shard

IDENTITY = make_identity(sequences_per_shard=8, sequences_per_chunk=4)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Train shards 0, 1 (8 rows, two inner chunks each) and eval shard 0; never modified."""
    url = str(tmp_path_factory.mktemp("verify") / "cache")
    build_cache(url, IDENTITY, {"train": 16, "eval": 4})
    return url


@pytest.fixture
def cache(pristine, tmp_path):
    return shutil.copytree(pristine, str(tmp_path / "cache"))


def shard_dir(url: str, split: str, shard: int) -> str:
    return os.path.join(url, read_commits(CacheFS(url))[(split, shard)]["dir"])


def shard_file(url: str, split: str, shard: int, name: str) -> str:
    return os.path.join(shard_dir(url, split, shard), name)


def inner_chunk_ends(path: str, n_chunks: int = 2) -> list[int]:
    """End offsets of the inner chunks, from the shard index at the end of the file (storage/README.md)."""
    raw = open(path, "rb").read()
    offsets = np.frombuffer(raw[-(16 * n_chunks + 4):-4], "<u8").reshape(n_chunks, 2)
    return [int(start + size) for start, size in offsets]


def test_an_intact_cache_verifies(cache):
    assert "intact" in cli("verify", cache).output
    result = cli("verify", "--full", "--json", cache)
    report = json.loads(result.output[result.output.index("{"):result.output.rindex("}") + 1])
    assert report["ok"] and report["complete"] and report["problems"] == {}
    assert report["shards_checked"] == 3
    assert report["bytes_checked"] == sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache)
                                          for f in fs if "/shards/" in d or "/tokens/" in d)


@pytest.mark.parametrize("full", [False, True])
def test_a_deleted_chunk_file_is_caught(cache, full):
    os.remove(shard_file(cache, "train", 1, "topk_values/c/0/0/0"))
    out = cli("verify", *(["--full"] if full else []), cache, expect=1).output
    assert "DAMAGED" in out and "train/1:" in out and "topk_values/c/0/0/0: missing" in out
    assert "train/0:" not in out and "eval/0:" not in out  # only the damaged shard is listed


def truncation_points(path: str) -> dict[str, int]:
    size = os.path.getsize(path)
    return {"0": 0, "1": 1, "half": size // 2, "len-1": size - 1, "inner-chunk-boundary": inner_chunk_ends(path)[0]}


@pytest.mark.parametrize("cut", ["0", "1", "half", "len-1", "inner-chunk-boundary"])
@pytest.mark.parametrize("full", [False, True])
def test_a_truncated_file_is_caught(cache, cut, full):
    path = shard_file(cache, "train", 0, "topk_ids/c/0/0/0")
    size, cut_at = os.path.getsize(path), truncation_points(path)[cut]
    os.truncate(path, cut_at)
    out = cli("verify", *(["--full"] if full else []), cache, expect=1).output
    assert f"topk_ids/c/0/0/0: {cut_at} bytes, committed with {size}" in out
    assert "train/0:" in out and "train/1:" not in out


def test_a_cut_at_an_inner_chunk_boundary_is_also_refused_by_zarr_itself(cache):
    """The second line of defence: a shard file's index sits at its end, behind a crc32c, so a prefix
    of whole chunks does not read as a shorter array."""
    path = shard_file(cache, "train", 0, "topk_ids/c/0/0/0")
    os.truncate(path, inner_chunk_ends(path)[0])
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_group(shard_dir(cache, "train", 0), mode="r")["topk_ids"][...]


@pytest.mark.parametrize("where", ["chunk-data", "shard-index", "array-metadata", "tokens"])
@pytest.mark.parametrize("nbytes", [1, 8])
def test_flipped_bytes_are_caught_by_full_verify(cache, where, nbytes):
    if where == "tokens":
        tokens_dir = json.load(open(os.path.join(cache, "plan.json")))["tokens"]["train"]["dir"]
        path, offset = os.path.join(cache, tokens_dir, "input_ids/c/0/0"), 10
    elif where == "array-metadata":
        path, offset = shard_file(cache, "eval", 0, "lse/zarr.json"), 40
    else:
        path = shard_file(cache, "train", 1, "hidden_1/c/0/0/0")
        offset = inner_chunk_ends(path)[0] + 30 if where == "chunk-data" else os.path.getsize(path) - 20
    raw = bytearray(open(path, "rb").read())
    for i in range(nbytes):
        raw[offset + i] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    out = cli("verify", "--full", cache, expect=1).output
    assert "sha256 mismatch" in out
    assert {"chunk-data": "train/1:", "shard-index": "train/1:", "array-metadata": "eval/0:", "tokens": "tokens/train:"}[where] in out


def test_a_missing_commit_record_is_caught(cache):
    os.remove(os.path.join(cache, "commits", "train-00001.json"))
    for args in ([], ["--full"]):
        out = cli("verify", *args, cache, expect=1).output
        assert "train/1: no commit record (commits/train-00001.json)" in out


def test_a_deleted_shard_directory_is_caught(cache):
    shutil.rmtree(shard_dir(cache, "eval", 0))
    assert "eval/0: shards/eval/" in cli("verify", cache, expect=1).output


def test_a_damaged_index_is_caught(cache):
    path = os.path.join(cache, "index", "train.parquet")
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 3] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    assert "index/train.parquet: unreadable" in cli("verify", "--full", cache, expect=1).output


@pytest.mark.parametrize("bad", ["id-out-of-range", "nan-lse", "inf-fp16-value", "inf-bf16-hidden"])
def test_full_verify_catches_bad_values_a_buggy_writer_committed(tmp_path, bad):
    """Hashes match what was written, so only decoding every chunk finds these."""
    identity = make_identity(values="fp16" if bad == "inf-fp16-value" else "uint8")
    url = str(tmp_path / "cache")
    plan, data = plan_cache(url, identity, {"train": 16})
    train = data["train"]
    if bad == "id-out-of-range":
        train["topk_ids"][12, 3, -1] += identity["teacher"]["vocab_size"]  # a gap past the vocabulary's end
    elif bad == "nan-lse":
        train["lse"][13, 0, 1] = np.nan
    elif bad == "inf-fp16-value":
        train["topk_values"][9, 2, 5] = np.array(np.inf, np.float16).view(np.uint16)
    else:
        train["hidden_1"][15, 7, 0] = np.array(-np.inf, np.float32).view(np.uint32) >> 16
    write_missing(url, plan, data)
    finalize(CacheFS(url), {})
    cli("verify", url)  # sizes are right: quick verify cannot know
    out = cli("verify", "--full", url, expect=1).output
    # Named by the chunk's sequences, counted over the split as in the plan and the index.
    expected = {"id-out-of-range": "topk_ids sequences 12..15: index ",
                "nan-lse": "lse sequences 12..15: non-finite values",
                "inf-fp16-value": "topk_values sequences 8..11: non-finite top-k values",
                "inf-bf16-hidden": "hidden_1 sequences 12..15: non-finite hidden state"}[bad]
    assert f"train/1: {expected}" in out and "train/0:" not in out


def test_verify_of_an_unfinished_cache_reports_the_missing_shards(tmp_path):
    url = str(tmp_path / "cache")
    plan, data = plan_cache(url, IDENTITY, {"train": 24})
    write_shard(url, plan, data, "train", 1)
    out = cli("verify", url, expect=1).output
    assert "train/0: no commit record" in out and "train/2: no commit record" in out and "train/1:" not in out


# -- gc ----------------------------------------------------------------------------------------------------

def tree(url: str) -> dict[str, int]:
    return {os.path.relpath(os.path.join(d, f), url): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(url) for f in files}


def test_gc_removes_leftovers_and_keeps_committed_data(cache):
    before = tree(cache)
    # What crashes leave behind: an unfinished shard in _tmp, a renamed shard that never got its
    # commit record, tokens no plan names, and half-written small files of write_atomic.
    committed = read_commits(CacheFS(cache))[("train", 0)]["dir"]
    shutil.copytree(os.path.join(cache, committed), os.path.join(cache, "_tmp", "train-00000-deadbeef"))
    shutil.copytree(os.path.join(cache, committed), os.path.join(cache, "shards", "train", "00000-0badf00d"))
    tokens_dir = json.load(open(os.path.join(cache, "plan.json")))["tokens"]["eval"]["dir"]
    shutil.copytree(os.path.join(cache, tokens_dir), os.path.join(cache, "tokens", "eval-abad1dea"))
    for partial in ("manifest.json.1234abcd.partial", "commits/train-00001.json.1234abcd.partial",
                    "index/eval.parquet.1234abcd.partial"):
        with open(os.path.join(cache, partial), "wb") as f:
            f.write(b"x" * 100)
    leftovers = {path: size for path, size in tree(cache).items() if path not in before}

    out = cli("gc", cache).output
    assert f"removed 6 leftovers, freed {sum(leftovers.values()):,} bytes" in out
    assert tree(cache) == before
    cli("verify", "--full", cache)
    assert "removed 0 leftovers, freed 0 bytes" in cli("gc", cache).output


def test_gc_called_from_python_refuses_a_directory_that_is_no_cache(tmp_path):
    from sad_pipe.errors import CacheError
    from sad_pipe.storage.verify import collect_garbage

    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "precious.txt").write_text("not a cache's")
    with pytest.raises(CacheError, match="no plan.json, not a sad-pipe cache"):
        collect_garbage(CacheFS(str(tmp_path)))
    (tmp_path / "notes.md").write_text("x")  # a file no cache-teacher run makes: not even start-up's clean-up runs
    with pytest.raises(CacheError):
        collect_garbage(CacheFS(str(tmp_path)), unplanned=True)
    assert (tmp_path / "tokens" / "precious.txt").exists()
