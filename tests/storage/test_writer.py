"""The commit protocol (exceptions, kills, races, identity) and the on-disk layout a shard gets."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys

import google_crc32c
import numpy as np
import pytest
import zarr
from conftest import cli
from numcodecs import Blosc

from sad_pipe.errors import CacheError, IdentityMismatch
from sad_pipe.storage import fs as fs_module
from sad_pipe.storage import writer as writer_module
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.manifest import FORMAT_VERSION, Plan, commit_name, read_commits
from sad_pipe.storage.reader import CacheReader
from sad_pipe.storage.verify import collect_garbage
from sad_pipe.storage.writer import ShardWriter, TokenWriter, create_plan, finalize

from .builders import make_identity, plan_cache, shard_rows, stored_names, write_missing, write_shard

HERE = os.path.dirname(os.path.abspath(__file__))
IDENTITY = make_identity(sequences_per_shard=8, sequences_per_chunk=4)
SIZES = {"train": 24}  # three shards of 8


def listing(url: str, top: str) -> list[str]:
    path = os.path.join(url, top)
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def assert_resumes_to_a_complete_cache(url: str, plan: Plan, data: dict) -> None:
    """What a re-run does: gc, write the uncommitted shards, finalize; then every row reads back exactly."""
    collect_garbage(CacheFS(url))
    assert listing(url, "_tmp") == []
    write_missing(url, plan, data)
    finalize(CacheFS(url), {})
    reader = CacheReader(url)
    for split, info in plan.splits.items():
        for a, b in info["shards"]:
            got = reader.read(split, a, b, {"topk", "lse", "target_logprob", "hidden"})
            for name, arr in got.items():
                np.testing.assert_array_equal(arr, data[split][name][a:b], err_msg=f"{split} {name} [{a}, {b})")
    committed_dirs = {r["dir"].rsplit("/", 1)[1] for r in read_commits(CacheFS(url)).values()}
    assert set(listing(url, "shards/train")) == committed_dirs  # nothing uncommitted left beside them
    cli("verify", "--full", url)


# -- exceptions inside the block ----------------------------------------------------------------------

@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_leaving_the_block_before_finish_leaves_no_shard(tmp_path, error):
    url = str(tmp_path / "cache")
    plan, data = plan_cache(url, IDENTITY, SIZES)
    names = stored_names(IDENTITY)
    with pytest.raises(error):
        with ShardWriter(CacheFS(url), plan, "train", 1) as writer:
            writer.write(shard_rows(data["train"], 8, 12, names))
            raise error()
    assert read_commits(CacheFS(url)) == {}
    assert listing(url, "_tmp") == [] and listing(url, "shards/train") == []
    assert_resumes_to_a_complete_cache(url, plan, data)


def test_finish_refuses_a_shard_with_missing_rows_and_write_refuses_wrong_arrays(tmp_path):
    url = str(tmp_path / "cache")
    plan, data = plan_cache(url, IDENTITY, SIZES)
    names = stored_names(IDENTITY)
    with ShardWriter(CacheFS(url), plan, "train", 0) as writer:
        with pytest.raises(CacheError, match="array topk_max is float64\\[4, 8\\], expected float32\\[4, 8\\]"):
            writer.write({**shard_rows(data["train"], 0, 4, names), "topk_max": data["train"]["topk_max"][:4].astype(float)})
        with pytest.raises(CacheError, match="got arrays .*, the plan has"):
            writer.write(shard_rows(data["train"], 0, 4, names[:-1]))
        with pytest.raises(CacheError, match="12 rows written, the plan has 8"):
            writer.write(shard_rows(data["train"], 0, 12, names))
        writer.write(shard_rows(data["train"], 0, 4, names))
        with pytest.raises(CacheError, match="shard train/0: 4 of 8 sequences written"):
            writer.finish()
    assert read_commits(CacheFS(url)) == {} and listing(url, "_tmp") == []


# -- a failure at each step of the protocol -------------------------------------------------------------

def failing_on_shard_1(original):
    """Wrap a function so that it raises when called with a path of train shard 1."""
    def wrapper(*args, **kwargs):
        if any(isinstance(a, str) and ("train-00001" in a or "train/00001" in a) for a in args):
            raise OSError(f"injected failure in {original.__name__}")
        return original(*args, **kwargs)
    return wrapper


# Each step of ShardWriter.finish before the commit record exists, in protocol order.
STEPS = {
    "write+fsync": (CacheFS, "fsync_tree"),
    "hash": (writer_module, "hash_tree"),
    "rename": (CacheFS, "move"),
    "commit": (CacheFS, "create_if_absent"),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_a_failure_before_the_commit_leaves_no_visible_shard_and_resumes(tmp_path, monkeypatch, step):
    url = str(tmp_path / "cache")
    plan, data = plan_cache(url, IDENTITY, SIZES)
    owner, attr = STEPS[step]
    monkeypatch.setattr(owner, attr, failing_on_shard_1(getattr(owner, attr)))
    write_shard(url, plan, data, "train", 0)
    with pytest.raises(OSError, match="injected failure"):
        write_shard(url, plan, data, "train", 1)
    monkeypatch.undo()
    assert sorted(read_commits(CacheFS(url))) == [("train", 0)]
    assert listing(url, "_tmp") == []  # the with-block's abort removed the temporary copy
    leftovers = [d for d in listing(url, "shards/train") if d.startswith("00001-")]
    # Once renamed, the copy is not removed by abort (a commit might name it); unnamed, it is garbage.
    assert len(leftovers) == (1 if step == "commit" else 0)
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(url)
    assert_resumes_to_a_complete_cache(url, plan, data)


def test_a_failure_just_after_the_commit_record_leaves_a_complete_shard(tmp_path, monkeypatch):
    url = str(tmp_path / "cache")
    plan, data = plan_cache(url, IDENTITY, SIZES)
    original = fs_module._fsync_dir

    def fsync_dir(path):
        if path.endswith("commits"):  # the record is linked in; flushing its directory fails
            raise OSError("injected failure after the commit")
        original(path)

    monkeypatch.setattr(fs_module, "_fsync_dir", fsync_dir)
    with pytest.raises(OSError, match="after the commit"):
        write_shard(url, plan, data, "train", 1)
    monkeypatch.undo()
    record = read_commits(CacheFS(url))[("train", 1)]
    assert os.path.isdir(os.path.join(url, record["dir"]))  # abort did not delete committed data
    assert_resumes_to_a_complete_cache(url, plan, data)


# The child writes train shards 0, 1, 2 and SIGKILLs itself mid-way through shard 1's zarr arrays, so
# no cleanup runs (unlike an exception). A kill after the rename leaves the same state as the "commit"
# failure above, whose abort cannot remove a renamed copy either.
CHILD = """
import os, signal, sys
sys.path.insert(0, {here!r})
import builders
from sad_pipe.storage import writer
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.manifest import read_plan

url = sys.argv[1]
identity = builders.make_identity(sequences_per_shard=8, sequences_per_chunk=4)
data = builders.make_data(identity, {sizes!r})
plan = read_plan(CacheFS(url))
arrays = len(plan.arrays)
calls = []
compressors = writer._compressors
def dying_compressors(*args):
    calls.append(1)
    if len(calls) == arrays + 3:  # shard 0 committed, 2 arrays of shard 1 written
        os.kill(os.getpid(), signal.SIGKILL)
    return compressors(*args)
writer._compressors = dying_compressors
builders.write_missing(url, plan, data)
"""


def test_a_writer_killed_mid_shard_leaves_a_cache_the_next_writer_resumes(tmp_path):
    url = str(tmp_path / "cache")
    plan, data = plan_cache(url, IDENTITY, SIZES)
    child = subprocess.run([sys.executable, "-c", CHILD.format(here=HERE, sizes=SIZES), url],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert sorted(read_commits(CacheFS(url))) == [("train", 0)]
    tmp = listing(url, "_tmp")
    assert len(tmp) == 1 and tmp[0].startswith("train-00001-")
    assert {"topk_ids", "topk_values"} <= set(os.listdir(os.path.join(url, "_tmp", tmp[0])))  # half on disk
    assert len(listing(url, "shards/train")) == 1
    result = cli("verify", url, expect=1)
    assert "train/1: no commit record" in result.output and "train/0" not in result.output
    assert_resumes_to_a_complete_cache(url, plan, data)


# -- two writers, one shard --------------------------------------------------------------------------

def test_the_second_writer_of_a_shard_loses_cleanly(tmp_path):
    url = str(tmp_path / "cache")
    plan, data = plan_cache(url, IDENTITY, SIZES)
    names = stored_names(IDENTITY)
    first, second = (ShardWriter(CacheFS(url), plan, "train", 2) for _ in range(2))
    for w in (first, second):
        w.write(shard_rows(data["train"], 16, 24, names))
    won = first.finish()
    lost = second.finish()
    assert won is not None and lost is None
    assert read_commits(CacheFS(url))[("train", 2)] == won
    assert listing(url, "shards/train") == [won["dir"].rsplit("/", 1)[1]]  # the loser deleted its copy
    assert listing(url, "_tmp") == []
    assert write_shard(url, plan, data, "train", 2) is None  # a late third writer loses too


# -- the plan --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("top_k", 16), ("teacher.vocab_size", 1024), ("temperatures", [1.0])])
def test_a_different_identity_is_refused_naming_the_field(tmp_path, field, value):
    url = str(tmp_path / "cache")
    plan, _ = plan_cache(url, IDENTITY, SIZES)
    before = open(os.path.join(url, "plan.json"), "rb").read()
    other = json.loads(json.dumps(IDENTITY))
    *parents, key = field.split(".")
    target = other
    for p in parents:
        target = target[p]
    old = target[key]
    target[key] = value
    with pytest.raises(IdentityMismatch) as err:
        create_plan(CacheFS(url), Plan(identity=other, splits=plan.splits, tokens=plan.tokens))
    assert f"identity.{field} is {json.dumps(old)} there but {json.dumps(value)} in this run" in str(err.value)
    assert open(os.path.join(url, "plan.json"), "rb").read() == before


def test_the_same_identity_reuses_the_plan_already_there(tmp_path):
    url = str(tmp_path / "cache")
    plan, _ = plan_cache(url, IDENTITY, SIZES)
    again = create_plan(CacheFS(url), Plan(identity=json.loads(json.dumps(IDENTITY)), splits=plan.splits, tokens={}))
    assert again.tokens == plan.tokens and again.created == plan.created


@pytest.mark.parametrize("shards, per_chunk, message", [
    ([[0, 8], [8, 20], [20, 24]], 4, "splits.train.shards is not"),
    ([[0, 8], [8, 16], [16, 24]], 3, "sequences_per_shard 8 is not a multiple of identity.sequences_per_chunk 3"),
])
def test_a_shard_table_readers_could_not_index_is_refused(tmp_path, shards, per_chunk, message):
    identity = {**IDENTITY, "sequences_per_chunk": per_chunk}
    splits = {"train": {"sequences": 24, "tokens": 192, "documents": 1, "dropped_tokens": 0, "shards": shards}}
    with pytest.raises(CacheError, match=message):
        create_plan(CacheFS(str(tmp_path / "cache")), Plan(identity=identity, splits=splits))
    assert not os.path.exists(tmp_path / "cache" / "plan.json")


def test_finalize_refuses_until_every_shard_is_committed(tmp_path):
    url = str(tmp_path / "cache")
    plan, data = plan_cache(url, IDENTITY, SIZES)
    write_shard(url, plan, data, "train", 0)
    with pytest.raises(CacheError, match="2 planned shards not committed \\(train/1, train/2"):
        finalize(CacheFS(url), {})
    assert not os.path.exists(os.path.join(url, "manifest.json"))


# -- the layout on disk (storage/README.md) ------------------------------------------------------------------

def test_plan_commit_and_manifest_records_hold_the_documented_fields(tmp_path):
    url = str(tmp_path / "cache")
    plan, data = plan_cache(url, IDENTITY, {"train": 20, "eval": 3})
    write_missing(url, plan, data)
    manifest = finalize(CacheFS(url), {"note": "x"})
    on_disk = json.load(open(os.path.join(url, "plan.json")))
    assert sorted(on_disk) == ["arrays", "created", "files", "format", "format_version", "identity", "splits", "tokens"]
    assert on_disk["format"] == "sad-pipe-cache" and on_disk["format_version"] == FORMAT_VERSION
    assert sorted(on_disk["arrays"]) == sorted(stored_names(IDENTITY))
    assert on_disk["arrays"]["topk_values"] == {"dtype": "uint8", "per_token": [8],
                                                "compressor": {"cname": "zstd", "clevel": 3, "shuffle": "bitshuffle"}}
    assert sorted(manifest) == sorted(list(on_disk) + ["completed", "shards", "summary"])
    assert manifest["summary"] == {"note": "x"}
    assert json.load(open(os.path.join(url, "manifest.json"))) == manifest
    commits = read_commits(CacheFS(url))
    assert manifest["shards"] == {s: [commits[(s, i)]["dir"] for i in range(len(plan.splits[s]["shards"]))]
                                  for s in ("eval", "train")}
    record = commits[("train", 2)]
    assert sorted(record) == ["created", "dir", "files", "sequences", "shard", "split", "stats", "writer"]
    assert re.fullmatch(r"shards/train/00002-[0-9a-f]{8}", record["dir"])
    assert record["sequences"] == [16, 20] and record["shard"] == 2 and record["split"] == "train"
    assert record["stats"] == {"tokens": 4 * 8, "rows": 4.0}  # the writer's stats, summed over its writes
    assert sorted(record["writer"]) == ["host", "pid", "rank"]
    assert json.load(open(os.path.join(url, commit_name("train", 2)))) == record
    for split, info in plan.tokens.items():
        assert re.fullmatch(f"tokens/{split}-[0-9a-f]{{8}}", info["dir"])
        assert info["sequences"] == plan.splits[split]["sequences"]


def test_each_array_is_one_zarr_shard_file_of_blosc_chunks_with_crc32c(tmp_path):
    """Reads a shard's files byte by byte, as storage/README.md describes them, without zarr."""
    url = str(tmp_path / "cache")
    plan, data = plan_cache(url, IDENTITY, {"train": 13})  # shard 1 holds 5 rows: a partial last inner chunk
    write_missing(url, plan, data)
    commits = read_commits(CacheFS(url))
    arrays = json.load(open(os.path.join(url, "plan.json")))["arrays"]
    t = IDENTITY["packing"]["max_length"]
    for shard, (a, b) in enumerate(plan.splits["train"]["shards"]):
        record = commits[("train", shard)]
        root = os.path.join(url, record["dir"])
        expected_files = {"zarr.json"}
        for name, spec in arrays.items():
            data_file = f"{name}/c/0/0" + "/0" * len(spec["per_token"])
            expected_files |= {f"{name}/zarr.json", data_file}
            meta = json.load(open(os.path.join(root, name, "zarr.json")))
            inner_shape = [4, t, *spec["per_token"]]
            assert meta["shape"] == [b - a, t, *spec["per_token"]] and meta["data_type"] == spec["dtype"]
            assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [8, t, *spec["per_token"]]
            sharding = meta["codecs"][0]
            assert sharding["name"] == "sharding_indexed" and len(meta["codecs"]) == 1
            cfg = sharding["configuration"]
            assert cfg["chunk_shape"] == inner_shape and cfg["index_location"] == "end"
            assert [c["name"] for c in cfg["codecs"]] == ["bytes", "blosc", "crc32c"]
            blosc = cfg["codecs"][1]["configuration"]
            assert {k: blosc[k] for k in ("cname", "clevel", "shuffle")} == spec["compressor"]
            assert blosc["typesize"] == np.dtype(spec["dtype"]).itemsize
            assert [c["name"] for c in cfg["index_codecs"]] == ["bytes", "crc32c"]

            raw = open(os.path.join(root, data_file), "rb").read()
            n_chunks = 2  # 8 rows per shard file / 4 per inner chunk
            index = raw[-(16 * n_chunks + 4):]
            assert int.from_bytes(index[-4:], "little") == google_crc32c.value(index[:-4])
            offsets = np.frombuffer(index[:-4], "<u8").reshape(n_chunks, 2)
            assert offsets[0, 0] == 0 and offsets[1, 0] == offsets[0].sum()  # back to back, in row order
            assert offsets[1].sum() == len(raw) - len(index)
            decoded = []
            for start, size in offsets:
                chunk = raw[start:start + size]
                frame, crc = chunk[:-4], chunk[-4:]
                assert int.from_bytes(crc, "little") == google_crc32c.value(frame)
                decoded.append(np.frombuffer(Blosc().decode(frame), dtype=np.dtype(spec["dtype"]).newbyteorder("<")))
            rows = np.concatenate(decoded).reshape(8, t, *spec["per_token"])
            np.testing.assert_array_equal(rows[:b - a], data["train"][name][a:b])
            assert (rows[b - a:] == 0).all()  # past the last row: fill value 0
        assert set(record["files"]) == expected_files
        for name, info in record["files"].items():
            content = open(os.path.join(root, name), "rb").read()
            assert info == {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}


def test_tokens_are_one_zarr_group_per_split_and_every_chunk_has_a_file(tmp_path):
    ids = np.arange(20 * 8, dtype=np.uint16).reshape(20, 8)
    ids[:8] = 0  # an all-zero file's worth of rows: still written, so its loss cannot read as zeros
    spans = np.repeat(np.arange(20, dtype=np.int64)[:, None] // 10, 2, axis=1)  # rows 0..9 in document 0
    positions = np.tile(np.arange(8), (20, 1))
    positions[3, 5:] = np.arange(3)  # a document starting inside a sequence
    mask = np.ones((20, 8), dtype=np.uint8)
    mask[3, 4] = 0  # ... whose first token the one before it does not predict
    rows = {"input_ids": ids, "position_ids": positions, "loss_mask": mask, "doc_span": spans}
    writer = TokenWriter(CacheFS(str(tmp_path)), "train", 8, np.dtype(np.uint16), rows_per_file=8, chunk_rows=4)
    writer.append({k: v[:5] for k, v in rows.items()})
    writer.append({k: v[5:] for k, v in rows.items()})
    info = writer.finish()
    assert re.fullmatch("tokens/train-[0-9a-f]{8}", info["dir"]) and info["sequences"] == 20
    assert sorted(info["files"]) == sorted([f"{name}/c/{i}/0" for name in rows for i in range(3)]
                                           + [f"{name}/zarr.json" for name in rows] + ["zarr.json"])
    group = zarr.open_group(str(tmp_path / info["dir"]), mode="r")
    input_ids, doc_span = group["input_ids"], group["doc_span"]
    assert input_ids.shape == (20, 8) and input_ids.shards == (8, 8) and input_ids.chunks == (4, 8)
    assert doc_span.shape == (20, 2) and doc_span.dtype == np.int64 and doc_span.chunks == (8, 2)
    assert group["position_ids"].dtype == np.uint16 and group["loss_mask"].dtype == np.uint8
    for name, value in rows.items():
        np.testing.assert_array_equal(group[name][...], value)
    assert os.listdir(tmp_path / "_tmp") == []
