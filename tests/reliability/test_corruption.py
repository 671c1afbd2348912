"""Damage every file of a real cache (truncations at 0, 1, half, len-1 and at every inner-chunk boundary;
1, 2, 4 and 8 flipped bytes; deletion): `verify --full` reports each one, naming the shard, and the
loader raises a `CacheError` naming the shard instead of returning bad rows.

The default run damages a seeded sample covering every kind of damage and every kind of file; the whole
sweep (every damage of every file, ~1000 cases) runs with --runslow or SAD_PIPE_CORRUPTION_SWEEP=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from sad_pipe.errors import CacheError
from sad_pipe.stages.cache_teacher.maintenance import verify_cache as verify
from sad_pipe.storage.reader import CacheReader


FLIPS = (1, 2, 4, 8)


def inner_chunk_ends(path: Path) -> list[int]:
    """End offsets of the inner chunks of a zarr shard file (from its index, storage/README.md)."""
    chunks = path.parent
    while chunks.name != "c":
        chunks = chunks.parent
    meta = json.loads((chunks.parent / "zarr.json").read_text())
    codec = meta["codecs"][0]
    if codec["name"] != "sharding_indexed":
        return []
    n = meta["chunk_grid"]["configuration"]["chunk_shape"][0] // codec["configuration"]["chunk_shape"][0]
    raw = path.read_bytes()
    index = np.frombuffer(raw[-(16 * n + 4):-4], "<u8").reshape(n, 2)
    missing = np.iinfo(np.uint64).max  # zarr's mark of an absent chunk
    return sorted(int(a) + int(b) for a, b in index if a != missing)


def damages(root: Path, rel: str) -> list[tuple[str, str, object]]:
    """Every damage of one file: (label, kind, argument)."""
    path = root / rel
    size = path.stat().st_size
    cuts = {0: "truncate-0", 1: "truncate-1", size // 2: "truncate-half", size - 1: "truncate-len-1"}
    if "/c/" in rel:
        cuts.update({end: "truncate-chunk-boundary" for end in inner_chunk_ends(path) if end not in cuts})
    out = [(label, "truncate", c) for c, label in sorted(cuts.items()) if 0 <= c < size]
    rng = np.random.default_rng(sum(rel.encode()))  # seeded by the file, the same on every run
    out += [(f"flip-{k}", "flip", (int(rng.integers(0, size - k + 1)), k)) for k in FLIPS if k <= size]
    return out + [("delete", "delete", None)]


def apply(path: Path, kind: str, arg) -> None:
    if kind == "truncate":
        os.truncate(path, arg)
    elif kind == "flip":
        offset, k = arg
        raw = bytearray(path.read_bytes())
        for i in range(offset, offset + k):
            raw[i] ^= 0xFF
        path.write_bytes(bytes(raw))
    else:
        path.unlink()


def owner(rel: str) -> tuple[str, list[str]]:
    """Where verify must report damage to `rel`, and strings one of which the loader's error must contain."""
    m = re.match(r"shards/(\w+)/(\d{5})-\w+/", rel) or re.match(r"commits/(\w+)-(\d{5})\.json$", rel)
    if m:
        split, shard = m.group(1), int(m.group(2))
        return f"{split}/{shard}", [f"shard {split}/{shard}", f"shards/{split}/{shard:05d}-", f"commits/{split}-{shard:05d}.json"]
    m = re.match(r"tokens/(\w+)-\w+/", rel)
    if m:
        return f"tokens/{m.group(1)}", [f"tokens of {m.group(1)}", f"tokens/{m.group(1)}-"]
    return "cache", [rel]


def read_everything(url: str) -> dict:
    reader = CacheReader(url)
    return {(split, a): reader.read(split, a, b, reader.groups)
            for split in reader.plan.splits for a, b in reader.plan.splits[split]["shards"]}


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                        for x, y in ((a[key], b[key]) for key in a))


@pytest.fixture(scope="module")
def damaged_copy(reference, tmp_path_factory):
    url = shutil.copytree(reference, str(tmp_path_factory.mktemp("corrupt") / "cache"))
    return Path(url), read_everything(url)


def cases(root: Path) -> list[tuple[str, str, str, object]]:
    """(file, label, kind, argument) for every damage of every file, config.json and the tokenizer included
    (plan.json records their hashes)."""
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return [(rel, *damage) for rel in files for damage in damages(root, rel)]


def sample(all_cases: list, request) -> list:
    """All of them under --runslow; by default each kind of damage on a few seeded-random files of each kind
    (shard data, shard metadata, tokens, commit records, the other records and the index, the tokenizer)."""
    if os.environ.get("SAD_PIPE_CORRUPTION_SWEEP") or request.config.getoption("--runslow"):
        return all_cases
    rng = np.random.default_rng(11)
    groups: dict[tuple[str, str], list] = {}
    for case in all_cases:
        rel, label = case[0], case[1]
        kind = ("shard-data" if rel.startswith("shards/") and "/c/" in rel else rel.split("/")[0] if "/" in rel
                else "record")
        groups.setdefault((label, kind), []).append(case)
    labels = sorted({label for label, _ in groups})
    kinds = sorted({kind for _, kind in groups})
    # one case per label, rotating over the kinds of file so that every kind is hit too
    picked = []
    for i, label in enumerate(labels):
        options = groups.get((label, kinds[i % len(kinds)])) or [c for (lb, _), cs in groups.items() if lb == label
                                                                  for c in cs]
        picked.append(options[int(rng.integers(len(options)))])
    assert {kind for _, kind in groups} == {kinds[i % len(kinds)] for i in range(len(labels))}
    return picked


def test_every_damage_is_caught_by_full_verify_and_never_read_as_data(damaged_copy, request):
    root, pristine = damaged_copy
    url = str(root)
    all_cases = cases(root)
    chosen = sample(all_cases, request)
    caught_verify = caught_loader = 0
    for rel, _, kind, arg in chosen:
        path = root / rel
        original = path.read_bytes()
        apply(path, kind, arg)
        try:
            where, names = owner(rel)
            # verify --full: a problem listed under the damaged shard, or (plan.json) refused as a whole
            try:
                report = verify(url, full=True)
                assert not report.ok and where in report.problems, (rel, kind, arg, report.problems)
                caught_verify += 1
            except CacheError as exc:  # plan.json unreadable: verify refuses the whole cache, one line, exit 1
                assert rel == "plan.json", (rel, kind, arg, exc)
                caught_verify += 1
            # the loader: a CacheError naming the shard, or exactly the pristine rows (damage it never reads)
            try:
                got = read_everything(url)
            except CacheError as exc:
                assert any(n in str(exc) for n in names), (rel, kind, arg, str(exc))
                caught_loader += 1
            else:
                assert equal(got, pristine), (rel, kind, arg)
                # only files the loader never reads (the records it does not use, doc_span, the tokenizer), or a
                # commit record still readable after the damage (the reader takes only file sizes from it, and the
                # files are intact: the rows are right; verify --full reported the record above)
                assert where == "cache" or "/doc_span/" in rel or rel.startswith("commits/"), (rel, kind, arg)
        finally:
            path.write_bytes(original)
    assert verify(url, full=True).ok
    print(f"\ncorruption sweep: {caught_verify} of {len(chosen)} damages caught by verify --full, {caught_loader} refused "
          f"by the loader, the rest never read by it; {len(all_cases)} damages in the full sweep")
    assert caught_verify == len(chosen) and caught_verify > 0
