"""What a cache is (identity), what it will hold (plan), what is done (commits), and the final manifest.

Files, all JSON, all relative to the cache root (storage/README.md has the byte-level details):
    plan.json                     identity + array layout + shard table; created once, never changed
    commits/<split>-<shard>.json  one per finished shard, created with create-if-absent
    manifest.json                 written last, only after every planned shard is committed
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sad_pipe.errors import CacheError, IdentityMismatch
from sad_pipe.storage.codecs import HIDDEN_DTYPES, TopKScheme, compressor_for, position_dtype
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.hidden import KEPT, hidden_mode, kept_count

FORMAT = "sad-pipe-cache"
FORMAT_VERSION = 2
SPLITS = ("train", "eval")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ArraySpec:
    """One per-token array of a shard: shape [sequences, max_length, *per_token]."""

    name: str
    dtype: str
    per_token: tuple[int, ...] = ()
    positions: int | None = None  # rows per sequence when not every position is stored (hidden_positions)

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one stored row (a token, or one kept position)."""
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.per_token, dtype=np.int64)))

    def rows(self, max_length: int) -> int:
        """Rows per sequence: max_length, or the kept positions."""
        return max_length if self.positions is None else self.positions

    def bytes_per_sequence(self, max_length: int) -> int:
        return self.bytes_per_token * self.rows(max_length)

    def to_json(self) -> dict:
        out = {"dtype": self.dtype, "per_token": list(self.per_token),
               "compressor": compressor_for(self.name, np.dtype(self.dtype))}
        if self.positions is not None:
            out["positions"] = self.positions
        return out


# The draws of each drawn target form are stored as <prefix>_ids and <prefix>_counts.
DRAW_ARRAYS = {"sampled": "sample", "hybrid": "tail"}


def hidden_name(layer: int) -> str:
    return f"hidden_{layer}"


def shard_arrays(identity: dict) -> list[ArraySpec]:
    """The arrays each shard holds, derived from the identity (so readers never guess)."""
    if identity["teacher"] is None:
        return []
    scheme = TopKScheme(k=identity["top_k"], vocab_size=identity["teacher"]["vocab_size"], values=identity["values"])
    forms = target_forms(identity)
    specs = []
    if {"topk", "hybrid"} & forms:
        specs += [ArraySpec("topk_ids", scheme.id_dtype.name, (scheme.k,)),
                  ArraySpec("topk_values", scheme.value_dtype.name, (scheme.k,)), ArraySpec("topk_max", "float32")]
        if scheme.values == "uint8":
            specs.append(ArraySpec("topk_step", "float16"))
    for form, name in DRAW_ARRAYS.items():
        if form in forms:
            n = identity["targets"]["samples"]
            specs += [ArraySpec(f"{name}_ids", scheme.id_dtype.name, (n,)), ArraySpec(f"{name}_counts", "uint8", (n,))]
    specs.append(ArraySpec("lse", "float32", (len(identity["temperatures"]),)))
    if identity["store_target_logprob"]:
        specs.append(ArraySpec("target_logprob", "float32"))
    hidden_dt = HIDDEN_DTYPES[identity["hidden_dtype"]].name
    mode = hidden_mode(identity)
    width = mode["rank"] or identity["teacher"]["hidden_size"]
    kept = None
    if mode["positions"] != "all":
        max_length = identity["packing"]["max_length"]
        kept = kept_count(mode["positions"], max_length)
    for layer in identity["layers"]:
        specs.append(ArraySpec(hidden_name(layer), hidden_dt, (width,), kept))
        if identity["hidden_dtype"] == "int8":
            specs.append(ArraySpec(hidden_name(layer) + "_scale", "float32", (), kept))
    if kept is not None and identity["layers"]:
        specs.append(ArraySpec(KEPT, position_dtype(max_length).name, (), kept))
    return specs


def target_forms(identity: dict) -> set[str]:
    """The teacher target forms a cache holds: topk, sampled, hybrid (see codecs.py)."""
    return set(identity["targets"]["forms"]) if identity.get("targets") else {"topk"}


def topk_scheme(identity: dict) -> TopKScheme | None:
    if identity["teacher"] is None:
        return None
    return TopKScheme(k=identity["top_k"], vocab_size=identity["teacher"]["vocab_size"], values=identity["values"])


def cache_id(identity: dict) -> str:
    """A short name for a cache identity: two caches with the same id hold the same data."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def first_difference(old: Any, new: Any, path: str = "identity") -> tuple[str, Any, Any] | None:
    """The first dotted path where two identities differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = first_difference(old.get(key), new.get(key), f"{path}.{key}")
            if diff:
                return diff
        return None
    return None if old == new else (path, old, new)


@dataclass
class Plan:
    """Identity + shard table. `splits[split]` = {"sequences", "tokens", "documents", "shards": [[start, stop], ...]}."""

    identity: dict
    splits: dict[str, dict]
    tokens: dict[str, dict] = field(default_factory=dict)  # split -> {"dir": ..., "sha256": ...}
    files: dict[str, dict] = field(default_factory=dict)  # config.json, tokenizer/*: {path: {"size", "sha256"}}
    created: str = field(default_factory=now)

    @property
    def arrays(self) -> list[ArraySpec]:
        return shard_arrays(self.identity)

    def shard_ids(self, split: str) -> list[int]:
        return list(range(len(self.splits[split]["shards"])))

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "identity": self.identity,
            "arrays": {a.name: a.to_json() for a in self.arrays}, "splits": self.splits,
            "tokens": self.tokens, "files": self.files, "created": self.created,
        }

    @classmethod
    def from_json(cls, d: dict, where: str) -> Plan:
        check_format(d, where)
        return cls(identity=d["identity"], splits=d["splits"], tokens=d.get("tokens", {}), files=d.get("files", {}),
                   created=d["created"])


def check_format(d: dict, where: str) -> None:
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise CacheError(f"{where}: not a sad-pipe cache file (format field is {d.get('format') if isinstance(d, dict) else None!r})")
    version = d.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(
            f"{where}: cache format version {version}, this sad-pipe reads version {FORMAT_VERSION}; "
            "rebuild the cache with this version (sad-pipe cache-teacher) or use the sad-pipe that wrote it"
        )


def check_identity(existing: dict, wanted: dict, where: str) -> None:
    diff = first_difference(existing, wanted)
    if diff:
        path, old, new = diff
        raise IdentityMismatch(
            f"{where} holds a different cache: {path} is {json.dumps(old)} there but {json.dumps(new)} in this run; "
            "use another cache path, or delete that cache to rebuild it"
        )


def read_plan(cache: CacheFS) -> Plan | None:
    if not cache.exists("plan.json"):
        return None
    return Plan.from_json(cache.read_json("plan.json"), cache.path("plan.json"))


def commit_name(split: str, shard: int) -> str:
    return f"commits/{split}-{shard:05d}.json"


def parse_commit_name(name: str) -> tuple[str, int] | None:
    """`train-00012.json` -> ("train", 12); None for any other file in commits/ (e.g. a `.partial`)."""
    if not name.endswith(".json"):
        return None
    split, _, num = name.removesuffix(".json").rpartition("-")
    return (split, int(num)) if split in SPLITS and num.isdigit() else None


def read_commits(cache: CacheFS) -> dict[tuple[str, int], dict]:
    """{(split, shard): record} for every commit record present."""
    out = {}
    for name in cache.listdir("commits"):
        key = parse_commit_name(name)
        if key is not None:
            out[key] = cache.read_json(f"commits/{name}")
    return out


def missing_shards(plan: Plan, commits: dict) -> list[tuple[str, int]]:
    """Planned shards without a commit record. `commits` is read_commits(cache): on an object store
    that is a LIST request, so callers read it once and pass it on."""
    return [(s, i) for s in SPLITS if s in plan.splits for i in plan.shard_ids(s) if (s, i) not in commits]


def read_manifest(cache: CacheFS) -> dict:
    """The manifest of a complete cache, format-checked. A cache without one is incomplete."""
    if not cache.exists("manifest.json"):
        if cache.exists("plan.json"):
            raise CacheError(
                f"{cache.url} is incomplete (no manifest.json): finish it by re-running the same sad-pipe cache-teacher command"
            )
        raise CacheError(f"{cache.url} is not a sad-pipe cache (no manifest.json); build one with sad-pipe cache-teacher")
    manifest = cache.read_json("manifest.json")
    check_format(manifest, cache.path("manifest.json"))
    return manifest
