"""Writer -> reader round trips, and how a reader opens a cache (manifest only, version, paths, damage)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from sad_pipe.errors import CacheError
from sad_pipe.storage.codecs import decode_topk, torch_view
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.manifest import read_commits, topk_scheme
from sad_pipe.storage.reader import CacheDataset, CacheReader, FieldSchedule

from .builders import build_cache, make_identity, plan_cache, stored_names, write_missing

GROUPS = {"input_ids", "topk", "lse", "target_logprob", "hidden"}

# (sequences_per_shard, sequences_per_chunk, train, eval, identity options)
LAYOUTS = {
    "partial-last-shard": (8, 4, 20, 5, {}),
    "u32-ids-fp16-int8": (6, 3, 13, 6, {"vocab": 70000, "values": "fp16", "hidden_dtype": "int8"}),
    "one-shard-bf16-fp16": (16, 16, 16, 3, {"values": "bf16", "hidden_dtype": "fp16", "temperatures": (1.0,),
                                             "store_target_logprob": False, "layers": (0, 2)}),
    "one-row-chunks": (4, 1, 9, 2, {"k": 3, "layers": ()}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_what_the_writer_wrote_is_what_the_reader_reads(tmp_path, layout):
    per_shard, per_chunk, n_train, n_eval, options = LAYOUTS[layout]
    identity = make_identity(sequences_per_shard=per_shard, sequences_per_chunk=per_chunk, **options)
    url = str(tmp_path / "cache")
    data = build_cache(url, identity, {"train": n_train, "eval": n_eval})
    reader = CacheReader(url)
    names = stored_names(identity)
    groups = GROUPS if identity["layers"] else GROUPS - {"hidden"}
    groups = groups if identity["store_target_logprob"] else groups - {"target_logprob"}
    for split, n in (("train", n_train), ("eval", n_eval)):
        assert reader.sequences(split) == n
        expected = data[split]
        for start in range(0, n, per_shard):  # every shard, whole
            stop = min(start + per_shard, n)
            got = reader.read(split, start, stop, groups)
            assert sorted(got) == sorted(names + ["input_ids", "position_ids", "loss_mask"])
            for name, arr in got.items():
                assert arr.dtype == expected[name].dtype, name
                np.testing.assert_array_equal(arr, expected[name][start:stop], err_msg=f"{split} {name} [{start}, {stop})")
        assert reader.num_chunks(split) == -(-n // per_chunk)
        for chunk in range(reader.num_chunks(split)):  # every chunk, the unit the training loader reads
            start = chunk * per_chunk
            got = reader.read_chunk(split, chunk, {"topk", "input_ids"})
            np.testing.assert_array_equal(got["topk_ids"], expected["topk_ids"][start:start + per_chunk])
            np.testing.assert_array_equal(got["input_ids"], expected["input_ids"][start:start + per_chunk])
    last = n_train - 1  # a single row at the very end
    np.testing.assert_array_equal(reader.read("train", last, last + 1, {"lse"})["lse"], data["train"]["lse"][last:])
    if options.get("vocab", 0) > 65535:  # ids above 65535 need, and get, 32 bits
        got = reader.read("train", 0, per_shard, {"topk", "input_ids"})
        assert got["topk_ids"].dtype == np.uint32 and got["topk_ids"].astype(np.int64).cumsum(-1).max() > 65535
        assert got["input_ids"].dtype == np.uint32


def test_reads_return_only_the_arrays_asked_for_and_decode_to_the_first_k(tmp_path):
    identity = make_identity(k=8, layers=(1, 2), hidden_dtype="int8")
    url = str(tmp_path / "cache")
    data = build_cache(url, identity, {"train": 8})
    reader = CacheReader(url)
    assert sorted(reader.read("train", 0, 8, {"topk"})) == ["topk_ids", "topk_max", "topk_step", "topk_values"]
    assert sorted(reader.read("train", 0, 8, {"hidden"})) == ["hidden_1", "hidden_1_scale", "hidden_2", "hidden_2_scale"]
    assert sorted(reader.read("train", 0, 8, {"input_ids"})) == ["input_ids", "loss_mask", "position_ids"]
    got = reader.read("train", 2, 5, {"topk"})
    scheme = topk_scheme(reader.identity)
    arrays = {k: torch_view(v) for k, v in got.items()}
    small = decode_topk(arrays, scheme, k=3)
    full = decode_topk(arrays, scheme)
    assert small.ids.shape == (3, identity["packing"]["max_length"], 3)
    np.testing.assert_array_equal(np.sort(small.logits.numpy(), -1), np.sort(full.logits.numpy(), -1)[..., -3:])
    np.testing.assert_array_equal(got["topk_ids"], data["train"]["topk_ids"][2:5])


def test_reads_that_cross_a_shard_or_ask_for_missing_arrays_are_refused(tmp_path):
    url = str(tmp_path / "cache")
    build_cache(url, make_identity(sequences_per_shard=4, sequences_per_chunk=2, layers=()), {"train": 10})
    reader = CacheReader(url)
    with pytest.raises(CacheError, match="cross a shard boundary"):
        reader.read("train", 3, 5, {"topk"})
    with pytest.raises(CacheError, match="split end"):
        reader.read("train", 8, 11, {"topk"})
    with pytest.raises(CacheError, match="no hidden arrays"):
        reader.read("train", 0, 2, {"hidden"})
    with pytest.raises(CacheError, match="unknown field group 'logits'"):
        reader.read("train", 0, 2, {"logits"})


def test_index_parquet_lists_every_sequence_with_its_shard_and_documents(tmp_path):
    url = str(tmp_path / "cache")
    data = build_cache(url, make_identity(sequences_per_shard=8, sequences_per_chunk=4), {"train": 20, "eval": 5})
    commits = read_commits(CacheFS(url))
    for split, n in (("train", 20), ("eval", 5)):
        table = pq.read_table(tmp_path / "cache" / "index" / f"{split}.parquet")
        df = table.to_pandas()
        assert df["sequence"].tolist() == list(range(n))
        assert df["shard"].tolist() == [s // 8 for s in range(n)]
        assert df["offset"].tolist() == [s % 8 for s in range(n)]
        assert df["shard_dir"].tolist() == [commits[(split, s // 8)]["dir"] for s in range(n)]
        assert (df["tokens"] == 8).all()
        np.testing.assert_array_equal(df[["doc_first", "doc_last"]].to_numpy(), data[split]["doc_span"])


# -- opening -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("reader") / "cache")
    build_cache(url, make_identity(sequences_per_shard=8, sequences_per_chunk=4), {"train": 16})
    return url


def copy_of(url: str, tmp_path) -> str:
    import shutil

    return shutil.copytree(url, str(tmp_path / "copy"))


def edit_manifest(url: str, edit) -> None:
    path = os.path.join(url, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


def test_a_cache_without_a_manifest_is_incomplete_not_readable(tmp_path):
    url = str(tmp_path / "cache")
    plan, data = plan_cache(url, make_identity(), {"train": 16})
    write_missing(url, plan, data)  # every shard committed, but finalize never ran
    with pytest.raises(CacheError, match="incomplete \\(no manifest.json\\)"):
        CacheReader(url)
    with pytest.raises(CacheError, match="not a sad-pipe cache"):
        CacheReader(str(tmp_path / "nothing-here"))


@pytest.mark.parametrize("version", [0, 1, 3, None])
def test_another_format_version_is_refused(small_cache, tmp_path, version):
    url = copy_of(small_cache, tmp_path)
    edit_manifest(url, lambda m: m.update(format_version=version))
    with pytest.raises(CacheError, match=f"format version {version}, this sad-pipe reads version 2"):
        CacheReader(url)


@pytest.mark.parametrize("where", ["shard", "tokens"])
def test_a_manifest_pointing_outside_the_cache_is_refused(small_cache, tmp_path, where):
    url = copy_of(small_cache, tmp_path)
    if where == "shard":
        edit_manifest(url, lambda m: m["shards"]["train"].__setitem__(1, "shards/train/../../../elsewhere"))
    else:
        edit_manifest(url, lambda m: m["tokens"]["train"].__setitem__("dir", "/etc"))
    with pytest.raises(CacheError, match="refusing path .* must stay inside"):
        CacheReader(url)


def test_a_corrupted_chunk_raises_naming_the_shard_and_other_chunks_still_read(small_cache, tmp_path):
    url = copy_of(small_cache, tmp_path)
    reader = CacheReader(url)
    expected = reader.read("train", 8, 16, {"topk"})
    shard_dir = reader.manifest["shards"]["train"][1]
    path = os.path.join(url, shard_dir, "topk_values", "c", "0", "0", "0")
    raw = bytearray(open(path, "rb").read())
    offset = int(np.frombuffer(bytes(raw[-36:-4]), "<u8")[2])  # inner chunk 1 (rows 12..15) starts here
    raw[offset + 20] ^= 0x01  # one bit, inside chunk 1's Blosc frame; the file keeps its size
    open(path, "wb").write(bytes(raw))
    reader = CacheReader(url)
    with pytest.raises(CacheError, match=f"shard train/1 \\({shard_dir}/topk_values\\).*checksum"):
        reader.read("train", 12, 16, {"topk"})
    np.testing.assert_array_equal(reader.read("train", 8, 12, {"topk"})["topk_values"], expected["topk_values"][:4])


def test_a_truncated_file_is_refused_before_zarr_reads_it(small_cache, tmp_path):
    url = copy_of(small_cache, tmp_path)
    reader = CacheReader(url)
    shard_dir = reader.manifest["shards"]["train"][0]
    path = os.path.join(url, shard_dir, "lse", "c", "0", "0", "0")
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(CacheError, match=f"{shard_dir}/lse/c/0/0/0: \\d+ bytes, the commit says \\d+ bytes"):
        CacheReader(url).read("train", 0, 4, {"lse"})


def test_an_eval_limit_spreads_over_the_split_instead_of_taking_its_first_sequences(tmp_path):
    # Neighbouring sequences come from the same document: the first N would score one document.
    url = str(tmp_path / "cache")
    build_cache(url, make_identity(), {"train": 40, "eval": 40})
    ds = CacheDataset(url, "eval", 4, FieldSchedule(always={"input_ids"}), shuffle=False, drop_last=False, limit=8)
    seen = np.concatenate([b["sequence_ids"].numpy() for b in ds])
    assert seen.tolist() == [0, 6, 11, 17, 22, 28, 33, 39]
    full = CacheDataset(url, "eval", 4, FieldSchedule(always={"input_ids"}), shuffle=False, drop_last=False)
    assert np.concatenate([b["sequence_ids"].numpy() for b in full]).tolist() == list(range(40))
