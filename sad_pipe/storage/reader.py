"""Reading a cache: `CacheReader` (random access by sequence or chunk) and `CacheDataset` (training order).

Readers only see committed data: a cache opens through its manifest, which exists only once every
shard is committed. Reads ask for *field groups*, so a KD-only phase never touches hidden states:
    input_ids       the packed tokens, their position_ids and loss_mask (always available)
    topk            topk_ids, topk_values, topk_max (+ topk_step)
    samples         sample_ids, sample_counts: draws from the teacher's distribution (targets sampled)
    tail_samples    tail_ids, tail_counts: draws from outside the top-k (targets hybrid)
    lse             logsumexp of the full-vocabulary logits / T, one per cached T
    target_logprob  teacher log-prob of the true next token
    hidden          every cached hidden_<layer> (+ _scale), and kept_positions where only some positions
                    hold states (cache.hidden_positions); low-rank caches hold basis coefficients
Every chunk carries a crc32c, so a damaged chunk raises `CacheError` naming its shard instead of
decoding into plausible-looking garbage.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from sad_pipe.errors import CacheError
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.hidden import KEPT, hidden_rank, read_basis
from sad_pipe.storage.manifest import Plan, read_manifest, topk_scheme

FIELD_GROUPS = ("input_ids", "topk", "samples", "tail_samples", "lse", "target_logprob", "hidden")
TOKEN_ARRAYS = ("input_ids", "position_ids", "loss_mask")  # the "input_ids" group


def open_tokens(cache: CacheFS, plan: Plan, split: str):
    import zarr

    rel = plan.tokens[split]["dir"]
    return zarr.open_group(store=cache.zarr_store(rel, read_only=True), mode="r", zarr_format=3)


class CacheReader:
    """Random access to a complete cache. Cheap to construct; zarr handles are opened lazily per process."""

    def __init__(self, url: str):
        self.cache = CacheFS(url)
        self.url = url
        self.manifest = read_manifest(self.cache)
        self.plan = Plan.from_json(self.manifest, self.cache.path("manifest.json"))
        self.identity = self.plan.identity
        self.scheme = topk_scheme(self.identity)
        self.specs = {a.name: a for a in self.plan.arrays}
        self.max_length = self.identity["packing"]["max_length"]
        self.chunk_rows = self.identity["sequences_per_chunk"]
        self.shard_rows = self.identity["sequences_per_shard"]
        for dirs in self.manifest["shards"].values():
            for d in dirs:
                self.cache.path(d)  # refuses a manifest that points outside the cache
        for info in self.plan.tokens.values():
            self.cache.path(info["dir"])
        self._groups: dict = {}
        self._pid = os.getpid()

    # -- what is in it ------------------------------------------------------------------------
    def sequences(self, split: str) -> int:
        return self.plan.splits[split]["sequences"] if split in self.plan.splits else 0

    @property
    def has_teacher(self) -> bool:
        return self.identity["teacher"] is not None

    @property
    def layers(self) -> list[int]:
        return list(self.identity["layers"])

    @property
    def hidden_rank(self) -> int | None:
        """R when the cache holds hidden states as coefficients in its basis (storage/hidden.py), else None."""
        return hidden_rank(self.identity)

    @property
    def hidden_width(self) -> int:
        """Width of the cached hidden states: the rank of a low-rank cache, else the teacher's width."""
        return self.hidden_rank or self.identity["teacher"]["hidden_size"]

    def basis(self):
        """The low-rank cache's HiddenBasis (None for full-width states)."""
        return read_basis(self.cache) if self.hidden_rank else None

    @property
    def temperatures(self) -> list[float]:
        return list(self.identity["temperatures"])

    @property
    def groups(self) -> set[str]:
        """The field groups this cache holds."""
        out = set()
        for g in FIELD_GROUPS:
            try:
                self.arrays_for({g})
            except CacheError:
                continue
            out.add(g)
        return out

    def arrays_for(self, groups: set[str]) -> list[str]:
        """Array names behind field groups; asking for what the cache lacks is an error."""
        names = []
        for g in sorted(groups):
            if g == "input_ids":
                continue
            if g == "topk":
                wanted = [n for n in ("topk_ids", "topk_values", "topk_max", "topk_step") if n in self.specs]
            elif g in ("samples", "tail_samples"):
                prefix = "sample" if g == "samples" else "tail"
                wanted = [f"{prefix}_ids", f"{prefix}_counts"]
            elif g == "hidden":
                wanted = [n for n in self.specs if n.startswith("hidden_") or n == KEPT]
            elif g in ("lse", "target_logprob"):
                wanted = [g]
            else:
                raise CacheError(f"unknown field group {g!r}; known: {', '.join(FIELD_GROUPS)}")
            if not wanted or any(n not in self.specs for n in wanted):
                raise CacheError(f"{self.url} has no {g} arrays (cached: {', '.join(sorted(self.specs)) or 'tokens only'})")
            names += wanted
        return names

    # -- reading ----------------------------------------------------------------------------------
    def _group(self, rel: str, expected: dict | None):
        import zarr

        if self._pid != os.getpid():  # a forked DataLoader worker: the parent's object-store clients fail here
            self._groups, self._pid = {}, os.getpid()
        group = self._groups.get(rel)
        if group is None:
            if expected is not None:
                present = self.cache.walk_files(rel)
                for name, info in expected.items():
                    if present.get(name) != info["size"]:
                        found = "missing" if name not in present else f"{present[name]} bytes"
                        raise CacheError(f"{self.url}/{rel}/{name}: {found}, the commit says {info['size']} bytes; "
                                         f"run sad-pipe verify --full {self.url}")
            group = zarr.open_group(store=self.cache.zarr_store(rel, read_only=True), mode="r", zarr_format=3)
            self._groups[rel] = group
        return group

    def _shard_files(self, split: str, shard: int) -> dict:
        key = ("files", split, shard)
        if key not in self._groups:
            from sad_pipe.storage.manifest import commit_name

            self._groups[key] = self.cache.read_json(commit_name(split, shard))["files"]
        return self._groups[key]

    def read(self, split: str, start: int, stop: int, groups: set[str]) -> dict[str, np.ndarray]:
        """Rows [start, stop) of the split, for the given field groups (within one shard)."""
        shard, offset = divmod(start, self.shard_rows)
        if stop - 1 >= (shard + 1) * self.shard_rows or stop > self.sequences(split) or start < 0:
            raise CacheError(f"rows [{start}, {stop}) of {split} cross a shard boundary or the split end")
        out = {}
        where = f"tokens of {split}"
        try:
            if "input_ids" in groups:
                tok = self._group(self.plan.tokens[split]["dir"], self.plan.tokens[split]["files"])
                for name in TOKEN_ARRAYS:
                    out[name] = tok[name][start:stop]
            names = self.arrays_for(groups)
            if names:
                where = f"shard {split}/{shard}"
                rel = self.manifest["shards"][split][shard]
                where = f"shard {split}/{shard} ({rel})"
                group = self._group(rel, self._shard_files(split, shard))
                for name in names:
                    where = f"shard {split}/{shard} ({rel}/{name})"
                    out[name] = group[name][offset:offset + stop - start]
        except CacheError:
            raise
        except Exception as exc:  # zarr/blosc/crc errors: name the shard, never train on bad data
            raise CacheError(f"{self.url}: cannot read {split} rows [{start}, {stop}) from {where} "
                             f"({type(exc).__name__}: {exc}); run sad-pipe verify --full {self.url}") from None
        return out

    def read_chunk(self, split: str, chunk: int, groups: set[str]) -> dict[str, np.ndarray]:
        start = chunk * self.chunk_rows
        return self.read(split, start, min(start + self.chunk_rows, self.sequences(split)), groups)

    def num_chunks(self, split: str) -> int:
        return math.ceil(self.sequences(split) / self.chunk_rows)

    def __getstate__(self):  # worker processes reopen their own zarr handles
        state = dict(self.__dict__)
        state["_groups"] = {}
        return state


# -- training order ---------------------------------------------------------------------------------

def epoch_order(n: int, chunk_rows: int, buffer_chunks: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The sequence order of one epoch, a function of (seed, epoch) only.

    Chunk-aware: the chunk order is shuffled, then sequences are shuffled within consecutive groups
    of `buffer_chunks` chunks, so each chunk is decompressed once per buffer instead of once per row.
    """
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    n_chunks = math.ceil(n / chunk_rows)
    chunks = rng.permutation(n_chunks)
    parts = []
    for b in range(0, n_chunks, buffer_chunks):
        rows = np.concatenate([np.arange(c * chunk_rows, min((c + 1) * chunk_rows, n)) for c in chunks[b:b + buffer_chunks]])
        parts.append(rng.permutation(rows))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


class DecodedChunks:
    """The last `capacity` decoded chunks, least recently used out first: readers that go through a chunk's
    rows one by one (training order, a map-style dataset) decompress each chunk once. Pickled empty, so each
    DataLoader worker decodes its own."""

    def __init__(self, capacity: int):
        self.capacity, self._chunks = capacity, OrderedDict()

    def get(self, key, decode):
        hit = self._chunks.get(key)
        if hit is None:
            hit = self._chunks[key] = decode()
            while len(self._chunks) > self.capacity:
                self._chunks.popitem(last=False)
        else:
            self._chunks.move_to_end(key)
        return hit

    def __getstate__(self):
        return {"capacity": self.capacity, "_chunks": OrderedDict()}


@dataclass
class FieldSchedule:
    """Which field groups micro-batch m (counted over the whole run) needs: `always`, plus `extra[g]` on
    the [start, stop) ranges where that group's loss has a non-zero weight."""

    always: set[str]
    extra: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def groups(self, micro_batch: int) -> set[str]:
        out = set(self.always)
        for g, ranges in self.extra.items():
            if any(a <= micro_batch < b for a, b in ranges):
                out.add(g)
        return out


class CacheDataset(IterableDataset):
    """Yields whole micro-batches (dicts of tensors) of one rank, in a deterministic order.

    Global micro-batch b of an epoch is `order[b * G : (b + 1) * G]` with G = batch_size * world_size;
    rank r takes its r-th slice. The order depends on (seed, epoch) and G only, so a run resumes at
    the same sample on any number of ranks or workers. With worker processes, worker w produces
    micro-batches b = w, w + W, ...; the DataLoader's round-robin returns them in order.
    """

    def __init__(self, url: str, split: str, batch_size: int, schedule: FieldSchedule, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, buffer_chunks: int = 8, rank: int = 0,
                 world_size: int = 1, limit: int | None = None):
        super().__init__()
        self.reader = CacheReader(url)
        self.split, self.batch_size, self.schedule = split, batch_size, schedule
        self.seed, self.shuffle, self.drop_last, self.buffer_chunks = seed, shuffle, drop_last, buffer_chunks
        self.rank, self.world_size = rank, world_size
        self.available = self.reader.sequences(split)
        self.n = min(self.available, limit) if limit else self.available
        self.epoch, self.start_batch = 0, 0
        self._chunks = DecodedChunks(buffer_chunks + 2)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.n // self.global_batch
        return math.ceil(self.n / self.global_batch)

    def set_position(self, epoch: int, start_batch: int) -> None:
        """Where the next iteration starts (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _chunk(self, chunk: int, groups: set[str]) -> dict[str, np.ndarray]:
        return self._chunks.get((chunk, frozenset(groups)), lambda: self.reader.read_chunk(self.split, chunk, groups))

    def batch(self, order: np.ndarray, b: int, run_batch: int) -> dict[str, torch.Tensor] | None:
        g = self.global_batch
        rows = order[b * g:(b + 1) * g][self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        if len(rows) == 0:
            return None
        groups = self.schedule.groups(run_batch) | {"input_ids"}
        parts: dict[str, list[np.ndarray]] = {}
        for row in rows:
            chunk, offset = divmod(int(row), self.reader.chunk_rows)
            for name, arr in self._chunk(chunk, groups).items():
                parts.setdefault(name, []).append(arr[offset])
        out = {name: torch.from_numpy(np.stack(v)) for name, v in parts.items()}
        out["sequence_ids"] = torch.from_numpy(rows.copy())
        out["micro_batch"] = torch.tensor(b)
        out["epoch"] = torch.tensor(self.epoch)
        return out

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.shuffle or self.n == self.available:
            order = epoch_order(self.n, self.reader.chunk_rows, self.buffer_chunks, self.seed, self.epoch, self.shuffle)
        else:  # an eval limit: spread over the whole split, since neighbouring sequences share a document
            order = np.linspace(0, self.available - 1, self.n).round().astype(np.int64)
        per_epoch = self.batches_per_epoch()
        for b in range(self.start_batch, per_epoch):
            if (b - self.start_batch) % workers == worker:
                out = self.batch(order, b, self.epoch * per_epoch + b)
                if out is not None:  # a rank's slice of the last eval batch may be empty
                    yield out
