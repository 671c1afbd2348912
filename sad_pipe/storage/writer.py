"""Writing a cache: packed tokens, then teacher shards, then the manifest.

Commit protocol for one shard (the only way data becomes visible to readers):
    1. write every array under `_tmp/<split>-<shard>-<uuid>/` (one zarr group, one file per array)
    2. fsync the files, then sha256 each one
    3. rename the directory to `shards/<split>/<shard>-<uuid>` (unique: two writers never share a file)
    4. create `commits/<split>-<shard>.json` if absent; the first writer wins, a loser deletes its copy
A crash before step 4 leaves only garbage that no commit names (`sad-pipe gc` removes it); a crash
after it leaves a complete shard. `finalize` writes the manifest last, only once every shard of the
plan is committed, so a cache without a manifest is visibly incomplete.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sad_pipe.errors import CacheError
from sad_pipe.storage.codecs import position_dtype
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.manifest import (
    SPLITS,
    ArraySpec,
    Plan,
    check_identity,
    commit_name,
    missing_shards,
    now,
    read_commits,
    read_plan,
)

HASH_BLOCK = 1 << 20
log = logging.getLogger(__name__)


def sha256_file(cache: CacheFS, rel: str) -> str:
    digest = hashlib.sha256()
    with cache.open(rel) as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(cache: CacheFS, rel: str) -> dict[str, dict]:
    """{file: {"size", "sha256"}} for every file below `rel` (relative to it)."""
    return {name: {"size": size, "sha256": sha256_file(cache, f"{rel}/{name}")}
            for name, size in sorted(cache.walk_files(rel).items())}


def _compressors(comp: dict, dtype: np.dtype) -> list:
    """Blosc as measured, then a crc32c per chunk so that readers detect damage chunk by chunk."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    blosc = BloscCodec(cname=comp["cname"], clevel=comp["clevel"], shuffle=comp["shuffle"], typesize=np.dtype(dtype).itemsize)
    return [blosc, Crc32cCodec()]


def write_group(cache: CacheFS, rel: str, arrays: dict[str, np.ndarray], specs: list[ArraySpec], chunk_rows: int) -> None:
    """One zarr group; each array sharded so that the whole array is one file with `chunk_rows`-row inner chunks."""
    import zarr

    group = zarr.open_group(store=cache.zarr_store(rel, read_only=False), mode="w-", zarr_format=3)
    for spec in specs:
        data = arrays[spec.name]
        comp = spec.to_json()["compressor"]
        rows = data.shape[0]
        whole = -(-rows // chunk_rows) * chunk_rows  # the shard must be a whole number of inner chunks
        arr = group.create_array(
            name=spec.name, shape=data.shape, dtype=data.dtype,
            chunks=(chunk_rows,) + data.shape[1:], shards=(whole,) + data.shape[1:],
            compressors=_compressors(comp, data.dtype), fill_value=0,
            config={"write_empty_chunks": True},  # an all-zero chunk must exist, or a lost one looks the same
        )
        arr[...] = data


class ShardWriter:
    """Buffers one shard's sequences in memory, then commits it (see the protocol above).

    Use as a context manager: leaving the block without `finish()` (an exception, Ctrl-C) discards
    the shard; it is never committed half-written.
    """

    def __init__(self, cache: CacheFS, plan: Plan, split: str, shard: int, rank: int = 0):
        self.cache, self.plan, self.split, self.shard, self.rank = cache, plan, split, shard, rank
        self.start, self.stop = plan.splits[split]["shards"][shard]
        self.max_length = plan.identity["packing"]["max_length"]
        self.specs = plan.arrays
        n = self.stop - self.start
        self.buffers = {s.name: np.zeros((n, s.rows(self.max_length), *s.per_token), dtype=s.dtype) for s in self.specs}
        self.filled = 0
        self.stats: dict[str, float] = {}
        self.tmp = f"_tmp/{split}-{shard:05d}-{uuid.uuid4().hex[:8]}"
        self.done = False

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def write(self, arrays: dict[str, np.ndarray], stats: dict[str, float] | None = None) -> None:
        """Append the next rows (sequences) of every array; `stats` are summed into the commit record."""
        if set(arrays) != set(self.buffers):
            raise CacheError(f"shard {self.split}/{self.shard}: got arrays {sorted(arrays)}, the plan has {sorted(self.buffers)}")
        n = next(iter(arrays.values())).shape[0]
        if self.filled + n > self.rows:
            raise CacheError(f"shard {self.split}/{self.shard}: {self.filled + n} rows written, the plan has {self.rows}")
        for name, data in arrays.items():
            buf = self.buffers[name]
            if data.shape[1:] != buf.shape[1:] or data.dtype != buf.dtype or data.shape[0] != n:
                raise CacheError(f"shard {self.split}/{self.shard}: array {name} is {data.dtype}{list(data.shape)}, "
                                 f"expected {buf.dtype}[{n}, {', '.join(map(str, buf.shape[1:]))}]")
            buf[self.filled:self.filled + n] = data
        self.filled += n
        for key, value in (stats or {}).items():
            self.stats[key] = self.stats.get(key, 0.0) + float(value)

    def finish(self) -> dict | None:
        """Commit the shard. Returns its commit record, or None if another writer committed it first."""
        if self.filled != self.rows:
            raise CacheError(f"shard {self.split}/{self.shard}: {self.filled} of {self.rows} sequences written")
        chunk = self.plan.identity["sequences_per_chunk"]
        write_group(self.cache, self.tmp, self.buffers, self.specs, chunk)
        self.cache.fsync_tree(self.tmp)
        files = hash_tree(self.cache, self.tmp)
        final = f"shards/{self.split}/{self.shard:05d}-{self.tmp.rsplit('-', 1)[1]}"
        self.cache.move(self.tmp, final)
        record = {
            "split": self.split, "shard": self.shard, "sequences": [self.start, self.stop], "dir": final,
            "files": files, "stats": {"tokens": self.rows * self.max_length, **self.stats},
            "created": now(), "writer": {"host": socket.gethostname(), "pid": os.getpid(), "rank": self.rank},
        }
        won = self.cache.create_json_if_absent(commit_name(self.split, self.shard), record)
        self.done = True
        self.buffers = {}
        if not won:
            self.cache.remove(final)
            return None
        return record

    def abort(self) -> None:
        self.buffers = {}
        self.done = True
        _discard(self.cache, self.tmp)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.done:  # never finalize from here: a failed block must not look complete
            self.abort()


class TokenWriter:
    """The packed tokens of one split, appended in order: per sequence `input_ids`, `position_ids` and
    `loss_mask` [T] and `doc_span` [2] (the documents it spans).

    Written under `_tmp/` and published under a unique `tokens/<split>-<uuid>` name; the plan names it.
    """

    def __init__(self, cache: CacheFS, split: str, max_length: int, id_dtype: np.dtype, rows_per_file: int, chunk_rows: int):
        import zarr

        self.cache, self.split = cache, split
        self.tmp = f"_tmp/tokens-{split}-{uuid.uuid4().hex[:8]}"
        self.group = zarr.open_group(store=cache.zarr_store(self.tmp, read_only=False), mode="w-", zarr_format=3)
        zstd = {"cname": "zstd", "clevel": 3, "shuffle": "shuffle"}
        every_chunk = {"write_empty_chunks": True}  # as in shards: a lost chunk file must not read as zeros
        per_token = {"input_ids": np.dtype(id_dtype), "position_ids": position_dtype(max_length), "loss_mask": np.dtype(np.uint8)}
        self.arrays = {name: self.group.create_array(name, shape=(0, max_length), dtype=dtype, chunks=(chunk_rows, max_length),
                                                     shards=(rows_per_file, max_length), compressors=_compressors(zstd, dtype),
                                                     fill_value=0, config=every_chunk)
                       for name, dtype in per_token.items()}
        self.arrays["doc_span"] = self.group.create_array("doc_span", shape=(0, 2), dtype=np.int64, chunks=(rows_per_file, 2),
                                                          compressors=_compressors(zstd, np.int64), fill_value=0,
                                                          config=every_chunk)
        self.rows_per_file = rows_per_file
        self.pending: dict[str, list[np.ndarray]] = {name: [] for name in self.arrays}
        self.pending_rows = 0
        self.sequences = 0

    def append(self, rows: dict[str, np.ndarray]) -> None:
        """rows: one [n, ...] array per name (input_ids, position_ids, loss_mask, doc_span)."""
        for name, arr in self.arrays.items():
            self.pending[name].append(rows[name].astype(arr.dtype, copy=False))
        self.pending_rows += len(rows["input_ids"])
        while self.pending_rows >= self.rows_per_file:
            self._flush(self.rows_per_file)

    def _flush(self, n: int) -> None:
        # Append whole zarr shards only: a partial-shard write would rewrite the file each time.
        for name, arr in self.arrays.items():
            data = np.concatenate(self.pending[name])
            arr.append(data[:n], axis=0)
            self.pending[name] = [data[n:]]
        self.pending_rows -= n
        self.sequences += n

    def finish(self) -> dict:
        if self.pending_rows:
            self._flush(self.pending_rows)
        self.cache.fsync_tree(self.tmp)
        files = hash_tree(self.cache, self.tmp)
        final = f"tokens/{self.split}-{self.tmp.rsplit('-', 1)[1]}"
        self.cache.move(self.tmp, final)
        return {"dir": final, "sequences": self.sequences, "files": files}

    def abort(self) -> None:
        _discard(self.cache, self.tmp)


def _discard(cache: CacheFS, tmp: str) -> None:
    """Best-effort removal of an aborted write's _tmp directory. It runs while an error propagates, and zarr's
    writer threads may still be finishing in there (one failed write, e.g. a full disk, does not stop the others):
    a failure here must not replace the error being reported. What stays is garbage that gc removes."""
    try:
        cache.remove(tmp)
    except OSError as exc:
        log.debug("could not remove %s (%s); gc will", tmp, exc)


def _check_shard_table(plan: Plan) -> None:
    """Readers find sequence s in shard s // sequences_per_shard and read whole chunks: refuse any other table."""
    per_shard, per_chunk = plan.identity["sequences_per_shard"], plan.identity["sequences_per_chunk"]
    if per_shard % per_chunk:
        raise CacheError(f"plan.json: identity.sequences_per_shard {per_shard} is not a multiple of "
                         f"identity.sequences_per_chunk {per_chunk}")
    for split, info in plan.splits.items():
        n = info["sequences"]
        regular = [[a, min(a + per_shard, n)] for a in range(0, n, per_shard)]
        if info["shards"] != regular and not (info["shards"] == [] and not plan.arrays):
            raise CacheError(f"plan.json: splits.{split}.shards is not [[0, {per_shard}], [{per_shard}, ...], ..., [.., {n}]]")


def index_bytes(cache: CacheFS, plan: Plan, split: str, commits: dict) -> bytes:
    """index/<split>.parquet as finalize writes it (verify --full rebuilds it to compare)."""
    buf = io.BytesIO()
    # Page checksums: a flipped bit in the index is an error, not a silent wrong row.
    pq.write_table(_index_table(cache, plan, split, commits), buf, write_page_checksum=True)
    return buf.getvalue()


def create_plan(cache: CacheFS, plan: Plan) -> Plan:
    """Record the plan unless one exists; if one does, it must have the same identity. Returns the plan in force."""
    _check_shard_table(plan)
    if cache.create_json_if_absent("plan.json", plan.to_json()):
        return plan
    existing = read_plan(cache)
    check_identity(existing.identity, plan.identity, cache.url)
    return existing


def _index_table(cache: CacheFS, plan: Plan, split: str, commits: dict) -> pa.Table:
    from sad_pipe.storage.reader import open_tokens

    spans = open_tokens(cache, plan, split)["doc_span"][...]
    per_shard = plan.identity["sequences_per_shard"]
    seq = list(range(plan.splits[split]["sequences"]))
    shard = [s // per_shard for s in seq]
    offset = [s % per_shard for s in seq]
    # A tokens-only cache has no teacher shards: its rows name no shard directory.
    dirs = [commits[(split, i)]["dir"] if (split, i) in commits else "" for i in shard]
    max_length = plan.identity["packing"]["max_length"]
    # Only the first and last document are known: the documents between them in the dataset's row
    # order may belong to the other split, so a range [doc_first, doc_last] would name wrong ones.
    return pa.table({
        "sequence": pa.array(seq, pa.int64()), "shard": pa.array(shard, pa.int32()),
        "offset": pa.array(offset, pa.int32()), "shard_dir": pa.array(dirs, pa.string()),
        "tokens": pa.array([max_length] * len(seq), pa.int32()),
        "doc_first": pa.array(spans[:, 0], pa.int64()), "doc_last": pa.array(spans[:, 1], pa.int64()),
    })


def finalize(cache: CacheFS, summary: dict) -> dict:
    """Write the per-sequence index and then the manifest, once every planned shard is committed."""
    plan = read_plan(cache)
    if plan is None:
        raise CacheError(f"{cache.url}: no plan.json; nothing to finalize")
    commits = read_commits(cache)
    missing = missing_shards(plan, commits)
    if missing:
        names = ", ".join(f"{s}/{i}" for s, i in missing[:5])
        raise CacheError(f"{cache.url}: {len(missing)} planned shards not committed ({names}...); re-run cache-teacher to finish")
    for split in SPLITS:
        if split not in plan.splits:
            continue
        cache.write_atomic(f"index/{split}.parquet", index_bytes(cache, plan, split, commits))
    manifest = plan.to_json()
    manifest["shards"] = {
        split: [commits[(split, i)]["dir"] for i in plan.shard_ids(split)] for split in plan.splits
    }
    manifest["summary"] = summary
    manifest["completed"] = now()
    cache.write_json_atomic("manifest.json", manifest)
    return manifest
