"""Stage one under SIGKILL at random moments, a crash at every step of the commit protocol, leftovers and
gc, repair through the teacher, and a full disk: each ends in the cache an uninterrupted run writes.

The kills and crashes hit real `sad-pipe cache-teacher` processes (forked from a server that has the
imports done, see forkserver.py), so nothing cleans up after them. Counts: `--runslow` or
SAD_PIPE_KILLS (random kills), SAD_PIPE_CRASH_SWEEP=1 (every call of every protocol step),
SAD_PIPE_ENOSPC_SWEEP=1 (every write).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from conftest import cli

from sad_pipe.stages.cache_teacher import plan as plan_module
from sad_pipe.stages.cache_teacher import runner, stage
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.manifest import read_commits, read_plan

from .conftest import cache_of, fuzz_count, writer_config
from .helpers import assert_consistent, assert_equals_reference, content, leftovers, sequence_figures

WRITER = "sad_pipe.storage.writer"
FS = "sad_pipe.storage.fs:CacheFS"


def teacher_args(config: str) -> list[str]:
    return ["-q", "cache-teacher", "--config", config]


# -- 1. random SIGKILLs --------------------------------------------------------------------------------------

def test_random_sigkills_of_the_writer_lose_duplicate_and_corrupt_nothing(forkserver, reference, assets, rel_docs,
                                                                            tmp_path, request):
    """Kill cache-teacher at seeded random moments, re-run after each kill (every run is a resume of the
    last); when a run finishes, compare sequence by sequence with the uninterrupted run, then start over."""
    wanted = fuzz_count(request, "SAD_PIPE_KILLS", fast=4, slow=200)
    config = writer_config(tmp_path, assets, rel_docs)
    url, args = cache_of(config), teacher_args(config)
    straight = forkserver.run(args)
    assert straight["code"] == 0, forkserver.output(straight)
    assert_equals_reference(url, reference)
    span = straight["seconds"]  # kill moments are drawn over a whole run, start-up included
    rng = np.random.default_rng(20261126)
    kills, rounds, totals = 0, 0, {"lost": 0, "duplicated": 0, "corrupt": 0}
    while kills < wanted:
        shutil.rmtree(url)
        while True:
            answer = forkserver.run(args, kill_after=float(rng.uniform(0, span)) if kills < wanted else None)
            if not answer["killed"]:
                assert answer["code"] == 0, forkserver.output(answer)[-3000:]
                break
            kills += 1
            assert_consistent(url)
        rounds += 1
        for key, value in sequence_figures(url, reference).items():
            totals[key] += value
        assert_equals_reference(url, reference)
    print(f"\nwriter kill fuzz: {kills} SIGKILLs survived in {rounds} rounds; {totals}")
    assert kills == wanted and totals == {"lost": 0, "duplicated": 0, "corrupt": 0}


# -- 2. a crash at every step of the commit protocol -------------------------------------------------------

def state(*present: str, absent: tuple[str, ...] = ()):
    """What a crash must have left: files matching each of `present` (globs under the cache), none of `absent`."""
    def check(url: str) -> None:
        root = Path(url)
        for pattern in present:
            assert list(root.glob(pattern)), f"{pattern} missing"
        for pattern in absent:
            assert not list(root.glob(pattern)), f"{pattern} present"
    return check


# Each step is (function, its n-th call in that run, crash before or after it, what it leaves). The chain runs in
# order, every run resuming what the crashes before it left: planning first, then one shard through each step
# of its commit, then finalize.
CHAIN = [
    (f"{WRITER}:TokenWriter._flush", 1, "after", "packing: part of the tokens in _tmp",
     state("_tmp/tokens-*/input_ids/c/0/0", absent=("plan.json", "tokens/*"))),
    (f"{FS}.move", 1, "after", "packing: one split's tokens published, no plan", state("tokens/*", absent=("plan.json",))),
    (f"{FS}.write_atomic", 1, "after", "a tokenizer file written, no plan", state("tokenizer/*", absent=("plan.json",))),
    (f"{FS}.create_if_absent", 1, "after", "plan.json created (after config.json and the tokenizer it hashes)",
     state("plan.json", "config.json", "tokenizer/tokenizer.json", absent=("commits/*",))),
    (f"{WRITER}:write_group", 1, "after", "shard write: the group in _tmp, not flushed",
     state("config.json", "_tmp/train-00000-*/topk_ids/c/0/0/0", absent=("commits/*",))),
    (f"{FS}.fsync_tree", 1, "after", "fsync: flushed, not hashed", state("_tmp/train-00000-*/lse/zarr.json")),
    (f"{WRITER}:hash_tree", 1, "after", "hash: hashed, not renamed", state("_tmp/train-00000-*", absent=("shards/*",))),
    (f"{FS}.move", 1, "after", "rename: published under shards/, no commit record",
     state("shards/train/00000-*", absent=("commits/*",))),
    (f"{FS}._local_temp_write", 1, "after", "commit record: .partial written, not linked",
     state("commits/train-00000.json.*.partial", absent=("commits/*.json",))),
    (f"{FS}.create_if_absent", 1, "after", "commit record: created, before the next shard",
     state("commits/train-00000.json", absent=("commits/train-00001.json",))),
    ("sad_pipe.stages.cache_teacher.stage:finalize", 1, "before", "finalize: every shard committed, no index",
     state("commits/eval-00000.json", "commits/train-00002.json", absent=("index/*",))),
    (f"{FS}.write_atomic", 1, "after", "index: one split's index written, no manifest",
     state("index/train.parquet", absent=("manifest.json",))),
    (f"{FS}._local_temp_write", 3, "after", "manifest: .partial written, not renamed",
     state("manifest.json.*.partial", absent=("manifest.json",))),
]


def crash(target: str, call: int, when: str) -> dict:
    return {"crash": {"target": target, "call": call, "when": when}}


def test_a_crash_at_every_protocol_step_resumes_to_the_uninterrupted_cache(forkserver, reference, assets, rel_docs,
                                                                          tmp_path):
    config = writer_config(tmp_path, assets, rel_docs)
    url, args = cache_of(config), teacher_args(config)
    freed_total = 0
    for target, call, when, what, left in CHAIN:
        answer = forkserver.run(args, hooks=crash(target, call, when))
        assert answer["killed"], f"{what}: the crash point was never reached\n{forkserver.output(answer)[-3000:]}"
        left(url)
        assert_consistent(url)
        if what.startswith(("rename", "commit record: .partial", "manifest")):
            # gc by hand (cache-teacher runs it itself too): it removes exactly the leftovers, and says so.
            garbage = leftovers(url)
            assert garbage, what
            out = cli("gc", url).output
            assert f"removed {len(garbage)} leftovers, freed {sum(garbage.values()):,} bytes" in out, (what, garbage, out)
            assert leftovers(url) == {}
            freed_total += sum(garbage.values())
    final = forkserver.run(args)
    assert final["code"] == 0, forkserver.output(final)[-3000:]
    assert_equals_reference(url, reference)
    assert freed_total > 0


PROTOCOL = [f"{WRITER}:TokenWriter._flush", f"{WRITER}:write_group", f"{FS}.fsync_tree", f"{WRITER}:hash_tree",
            f"{FS}.move", f"{FS}._local_temp_write", f"{FS}.create_if_absent", f"{FS}.write_atomic",
            "sad_pipe.stages.cache_teacher.stage:finalize"]


@pytest.mark.slow
def test_a_crash_at_every_call_of_every_protocol_step_recovers(forkserver, reference, assets, rel_docs, tmp_path):
    """The exhaustive sweep: each call of each step of a fresh run, before and after it, on a fresh cache."""
    config = writer_config(tmp_path, assets, rel_docs)
    url, args = cache_of(config), teacher_args(config)
    counts_file = str(tmp_path / "counts.json")
    answer = forkserver.run(args, hooks={"count": PROTOCOL, "count_file": counts_file})
    assert answer["code"] == 0
    counts = json.loads(open(counts_file).read())
    points = [(t, n, w) for t in PROTOCOL for n in range(1, counts[t] + 1) for w in ("before", "after")]
    for target, call, when in points:
        shutil.rmtree(url)
        answer = forkserver.run(args, hooks=crash(target, call, when))
        assert answer["killed"], (target, call, when)
        if os.path.isdir(url):
            assert_consistent(url)
        answer = forkserver.run(args)
        assert answer["code"] == 0, (target, call, when, forkserver.output(answer)[-3000:])
        assert_equals_reference(url, reference)
    print(f"\ncrash-point sweep: {len(points)} crash points recovered")
    assert len(points) > 60


# -- 3. verify --repair re-runs exactly the damaged sequences ----------------------------------------------

def test_repair_recreates_exactly_the_damaged_shards_through_the_teacher(reference, tmp_path, monkeypatch):
    url = shutil.copytree(reference, str(tmp_path / "cache"))
    cache = CacheFS(url)
    commits = read_commits(cache)
    # Three kinds of damage: a flipped byte in train/1, a truncated file in eval/0, train/2's record unreadable.
    path = os.path.join(url, commits[("train", 1)]["dir"], "hidden_2/c/0/0/0")
    raw = bytearray(open(path, "rb").read())
    raw[100] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    os.truncate(os.path.join(url, commits[("eval", 0)]["dir"], "lse/c/0/0/0"), 10)
    with open(os.path.join(url, "commits/train-00002.json"), "r+b") as f:
        f.truncate(50)
    # The teacher's inputs during the repair: exactly the damaged shards' sequences, each once.
    seen = []
    real_call = runner.TeacherRunner.__call__
    monkeypatch.setattr(runner.TeacherRunner, "__call__",
                        lambda self, ids, *rest, **kw: seen.append(ids.clone()) or real_call(self, ids, *rest, **kw))
    out = cli("verify", "--repair", url).output
    assert "repair: re-creating 3 shards: eval/0, train/1, train/2" in out and "intact" in out
    plan = read_plan(cache)
    import zarr

    expected = []
    for split, shard in (("train", 1), ("train", 2), ("eval", 0)):
        a, b = plan.splits[split]["shards"][shard]
        expected.append(zarr.open_group(os.path.join(url, plan.tokens[split]["dir"]), mode="r")["input_ids"][a:b])
    assert np.array_equal(np.concatenate([s.numpy() for s in seen]), np.concatenate(expected).astype(np.int64))
    after = read_commits(cache)
    assert after[("train", 0)] == commits[("train", 0)]  # untouched: same record, same directory
    assert after[("train", 1)]["dir"] != commits[("train", 1)]["dir"]  # re-created whole, never patched
    assert_equals_reference(url, reference)


def test_gc_frees_nothing_on_a_clean_cache_and_refuses_a_directory_that_is_no_cache(reference, tmp_path):
    url = shutil.copytree(reference, str(tmp_path / "cache"))
    assert "removed 0 leftovers, freed 0 bytes" in cli("gc", url).output
    assert content(url) == content(reference)
    other = tmp_path / "project"  # gc deletes what no plan names: a directory without a plan is left alone
    (other / "tokens" / "mine").mkdir(parents=True)
    (other / "tokens" / "mine" / "notes.txt").write_text("keep me")
    result = cli("gc", str(other), expect=1)
    assert result.output.strip().splitlines()[-1] == f"error: {other}: no plan.json, not a sad-pipe cache; gc deletes " \
        "only inside a cache (re-running cache-teacher cleans up after a run that stopped before its plan)"
    assert (other / "tokens" / "mine" / "notes.txt").read_text() == "keep me"


# -- 4. a full disk ----------------------------------------------------------------------------------------

class DiskFull:
    """Every write sad-pipe makes into a cache goes through zarr's LocalStore (`_put`) or CacheFS's temp
    file (`_local_temp_write`); the k-th of them writes half its bytes and fails with ENOSPC, as a full disk
    does. `paths` records what was being written."""

    def __init__(self, monkeypatch, k: int | None):
        import zarr.storage._local as local

        self.k, self.calls, self.failed = k, 0, None
        real_put, real_temp = local._put, CacheFS._local_temp_write

        def put(path, value, exclusive=False):
            if self._hit(str(path)):
                path.parent.mkdir(parents=True, exist_ok=True)
                view = value.as_buffer_like()
                with local._atomic_write(path, "wb", exclusive=exclusive) as f:
                    f.write(view[:len(view) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_put(path, value, exclusive=exclusive)

        def temp_write(fs, rel, data):
            if self._hit(fs.path(rel)):
                os.makedirs(os.path.dirname(fs.path(rel)), exist_ok=True)
                with open(f"{fs.path(rel)}.{uuid.uuid4().hex[:8]}.partial", "wb") as f:
                    f.write(data[:len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_temp(fs, rel, data)

        monkeypatch.setattr(local, "_put", put)
        monkeypatch.setattr(CacheFS, "_local_temp_write", temp_write)

    def _hit(self, path: str) -> bool:
        self.calls += 1
        if self.calls == self.k:
            self.failed = path
            return True
        return False


def shard_of(path: str) -> tuple[str, int] | None:
    """The shard a write belonged to (its _tmp directory or its commit record), if any."""
    m = re.search(r"_tmp/(train|eval)-(\d{5})-|commits/(train|eval)-(\d{5})\.json", path)
    if not m:
        return None
    split, shard = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return split, int(shard)


def assert_disk_full_is_clean(monkeypatch, config: str, k: int) -> DiskFull:
    """cache-teacher with ENOSPC at the k-th write: one line, exit 1, and no commit for the shard it hit."""
    url = cache_of(config)
    disk = DiskFull(monkeypatch, k)
    result = cli("-q", "cache-teacher", "--config", config, expect=None)
    monkeypatch.undo()
    if disk.failed is None:  # the run needed fewer than k writes
        assert result.exit_code == 0, result.output
        return disk
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0].startswith("error: no space left on device") and "re-run the same command to resume" in errors[0]
    if os.path.isdir(url):
        assert_consistent(url)
        hit = shard_of(disk.failed)
        assert hit is None or hit not in read_commits(CacheFS(url)), (disk.failed, hit)
    return disk


def test_a_full_disk_fails_cleanly_and_a_rerun_resumes(reference, assets, rel_docs, tmp_path, monkeypatch, request):
    """ENOSPC at the k-th write for k spread over a whole run (every k with SAD_PIPE_ENOSPC_SWEEP=1), each on a
    fresh cache; then the space comes back and the same command finishes the cache."""
    config = writer_config(tmp_path, assets, rel_docs)
    url = cache_of(config)
    total = assert_disk_full_is_clean(monkeypatch, config, None).calls  # counts every write of a whole run
    assert_equals_reference(url, reference)
    if os.environ.get("SAD_PIPE_ENOSPC_SWEEP") or request.config.getoption("--runslow"):
        ks = list(range(1, total + 1))
    else:  # the first write, the last one, and one in between (seeded)
        ks = sorted({1, total, int(np.random.default_rng(3).integers(2, total))})
    for k in ks:
        shutil.rmtree(url, ignore_errors=True)
        assert assert_disk_full_is_clean(monkeypatch, config, k).failed is not None
        cli("-q", "cache-teacher", "--config", config)
        assert_equals_reference(url, reference)
    print(f"\ndisk full: ENOSPC at {len(ks)} of {total} writes, each failed cleanly and resumed")


Usage = namedtuple("Usage", "total used free")


def test_free_space_is_checked_before_the_teacher_runs(assets, rel_docs, tmp_path, monkeypatch):
    """A warning (not an error) when the shards still to write may not fit on the cache's disk."""
    config = writer_config(tmp_path, assets, rel_docs)
    url = cache_of(config)
    free = {"bytes": 10**15}
    monkeypatch.setattr(plan_module.shutil, "disk_usage", lambda path: Usage(10**15, 0, free["bytes"]))
    # Stop after the plan, before the teacher: the shards still to write are all of them.
    real_fill = stage._fill

    def stop(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "_fill", stop)
    assert "may not fit" not in cli("cache-teacher", "--config", config, expect=130).output
    plan = read_plan(CacheFS(url))
    sequences = sum(b - a for v in plan.splits.values() for a, b in v["shards"])  # subsampled hidden rows count as stored
    raw = sum(s.bytes_per_sequence(plan.identity["packing"]["max_length"]) for s in plan.arrays) * sequences
    free["bytes"] = raw - 1
    out = cli("cache-teacher", "--config", config, expect=130).output
    warning = [line for line in out.splitlines() if "may not fit" in line]
    assert len(warning) == 1 and f"{raw - 1:,} bytes free" in warning[0] and f"{raw:,} bytes" in warning[0], out
    monkeypatch.setattr(stage, "_fill", real_fill)
    out = cli("cache-teacher", "--config", config).output  # a warning only: the run goes on and finishes
    assert "may not fit" in out and os.path.exists(os.path.join(url, "manifest.json"))
