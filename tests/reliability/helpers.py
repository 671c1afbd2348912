"""What the reliability tests check on a cache after crashes, kills, full disks and repairs."""

from __future__ import annotations

import json
import os

import numpy as np

from sad_pipe.stages.cache_teacher.maintenance import verify_cache as verify
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.manifest import SPLITS, read_commits, read_plan
from sad_pipe.storage.reader import CacheReader



def content(url: str) -> dict:
    """What a cache holds, byte for byte: every token and shard file's size and sha256 (from the plan and the
    commit records), plus the plan's identity and shard table. Shard bytes are deterministic, so two caches
    of the same inputs have equal contents whatever crashed on the way."""
    cache = CacheFS(url)
    plan = read_plan(cache)
    return {
        "identity": plan.identity, "splits": plan.splits,
        "tokens": {split: info["files"] for split, info in plan.tokens.items()},
        "shards": {f"{s}/{i}": (r["sequences"], r["files"]) for (s, i), r in sorted(read_commits(cache).items())},
    }


def leftovers(url: str) -> dict[str, int]:
    """{path: bytes} of everything a crash may leave that no plan or commit names: _tmp entries, uncommitted
    shard or token directories, and *.partial files anywhere else."""
    cache = CacheFS(url)
    plan = read_plan(cache)
    named = {r["dir"] for r in read_commits(cache).values()} | {t["dir"] for t in (plan.tokens.values() if plan else [])}
    found = [f"_tmp/{n}" for n in cache.listdir("_tmp")]
    found += [f"shards/{s}/{d}" for s in SPLITS for d in cache.listdir(f"shards/{s}") if f"shards/{s}/{d}" not in named]
    found += [f"tokens/{d}" for d in cache.listdir("tokens") if f"tokens/{d}" not in named]
    out = {rel: sum(cache.walk_files(rel).values()) for rel in found}
    for dirpath, _, files in os.walk(url):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), url)
            if f.endswith(".partial") and not any(rel.startswith(d + "/") for d in found):
                out[rel] = os.path.getsize(os.path.join(dirpath, f))
    return out


def assert_consistent(url: str) -> None:
    """The state a crash may leave: every commit record is whole and names a whole shard, and a manifest
    exists only when every planned shard is committed. (Missing shards and garbage are allowed.)"""
    if not os.path.exists(os.path.join(url, "plan.json")):  # nothing committed before the plan
        assert read_commits(CacheFS(url)) == {} and not os.path.exists(os.path.join(url, "manifest.json"))
        return
    report = verify(url)
    for where, problems in report.problems.items():
        assert all(p.startswith(("no commit record", "no manifest.json")) for p in problems), (where, problems)
    assert os.path.exists(os.path.join(url, "manifest.json")) == (report.ok and report.complete), report.problems


def assert_equals_reference(url: str, reference: str) -> None:
    """Complete, verified in full, the same bytes as the uninterrupted run, and no garbage left."""
    report = verify(url, full=True)
    assert report.ok and report.complete, report.problems
    assert content(url) == content(reference)
    assert leftovers(url) == {}
    for name in os.listdir(os.path.join(reference, "tokenizer")):  # stage two needs no teacher path
        assert _read(url, f"tokenizer/{name}") == _read(reference, f"tokenizer/{name}"), name
    configs = [json.loads(_read(u, "config.json")) for u in (url, reference)]
    for cfg in configs:
        cfg["cache"].pop("path")  # verify --repair reruns this config
    assert configs[0] == configs[1]


def _read(url: str, rel: str) -> bytes:
    with open(os.path.join(url, rel), "rb") as f:
        return f.read()


def sequence_figures(url: str, reference: str) -> dict[str, int]:
    """Per sequence, against the uninterrupted run: lost (not readable), duplicated (held by more than one
    shard directory or commit), corrupt (any array differs)."""
    got, want = CacheReader(url), CacheReader(reference)
    lost = duplicated = corrupt = 0
    cache = CacheFS(url)
    for split in want.plan.splits:
        n, per_shard = want.sequences(split), want.shard_rows
        lost += max(0, n - got.sequences(split))
        for shard, (a, b) in enumerate(want.plan.splits[split]["shards"]):
            dirs = [d for d in cache.listdir(f"shards/{split}") if d.startswith(f"{shard:05d}-")]
            duplicated += (b - a) * max(0, len(dirs) - 1)
            mine, theirs = got.read(split, a, b, want.groups), want.read(split, a, b, want.groups)
            same = np.ones(b - a, dtype=bool)
            for name, arr in theirs.items():
                same &= np.array([np.array_equal(x, y) for x, y in zip(mine[name], arr)])
            corrupt += int((~same).sum())
        assert got.sequences(split) == n and len(got.plan.splits[split]["shards"]) == -(-n // per_shard)
    return {"lost": lost, "duplicated": duplicated, "corrupt": corrupt}
