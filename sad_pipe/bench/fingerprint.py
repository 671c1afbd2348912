"""Benchmark 6, model fingerprints: what hashing a teacher's files costs, and what it costs next to stage one.

    hashing, cold      `fingerprint.hash_file` (xxh3_128, 4 MiB reads) over a ~1 GB file of random bytes just
                       dropped from the page cache (fsync + posix_fadvise DONTNEED): the disk and the hash
    hashing, warm      the same file again, from the page cache: the kernel's copy and the hash
    read size          warm throughput per read size: the measurement behind fingerprint.BLOCK_SIZE
    teacher            `model_fingerprint` of the SmolLM2-135M-shaped teacher (assets.small_llm_teacher: 134.5 M
                       parameters, ~540 MB in fp32), three ways: memo dropped and files dropped from the page
                       cache (a first run after a reboot); memo dropped, files in the page cache (a first run
                       right after the teacher was written or loaded); every file in the memo (any later run)
    ÷ stage one        each of those ÷ the wall time of `cache_teacher.run` making a new cache with that teacher,
                       run as benchmark 2 runs it (the same 48 sequences x 256 tokens, the demo's cache config,
                       every core, an untimed first run). The fingerprint is a fixed cost and 12k tokens a short
                       run: a real stage one over millions of tokens makes the fraction proportionally smaller.

Within each repetition the order is fixed, not interleaved: the cold runs must come first, and stage one
last, so that it finds the teacher in the page cache as benchmark 2's runs do. "Cold" means out of this
OS's page cache; on a VM the host may still cache the file (the notes say when cold looked warm).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from sad_pipe.bench.assets import quiet
from sad_pipe.bench.cache_overhead import SIZES as STAGE_SIZES
from sad_pipe.bench.cache_overhead import TARGET_TEACHER, _stage_one
from sad_pipe.bench.measure import Context, Figure, Result, Table, Timer, paired, spread
from sad_pipe.pipeline import fingerprint

SIZES = {"full": {"file_mb": 1024, "read_sizes_kib": (256, 1024, 4096, 8192, 16384, 65536)},
         "quick": {"file_mb": 16, "read_sizes_kib": (1024, 4096)}}
TARGET = 0.02  # the fingerprint at most 2% of a stage-one run
CHUNK = 64 << 20


def _evict(path: str) -> bool:
    """Drop a file's pages from the page cache (only clean pages go, hence the fsync); False where the OS cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def _random_file(path: Path, megabytes: int) -> int:
    """A file of random bytes (not zeros: a compressing filesystem would make reading them look fast)."""
    block = os.urandom(min(CHUNK, megabytes << 20))
    with open(path, "wb") as f:
        for _ in range((megabytes << 20) // len(block)):
            f.write(block)
    return path.stat().st_size


def _hash_seconds(path: Path, read_size: int = fingerprint.BLOCK_SIZE) -> float:
    with Timer() as t:
        fingerprint.hash_file(path, read_size)
    return t.seconds


def _wait_until_trusted(paths: list[str]) -> None:
    """The memo never trusts a file modified in the last FRESH_SECONDS: make the memo-hit run a hit."""
    newest = max(max(os.stat(p).st_mtime, os.stat(p).st_ctime) for p in paths)
    time.sleep(max(0.0, newest + fingerprint.FRESH_SECONDS + 0.1 - time.time()))


def run(ctx: Context) -> Result:
    sizes, assets = ctx.pick(SIZES), ctx.assets
    teacher = assets.small_llm_teacher()
    # Benchmark 2's stage-one run, the same documents and shard sizes (48 sequences x 256 tokens at full size).
    stage_sizes = ctx.pick(STAGE_SIZES)
    sequences = stage_sizes["sequences"]["small-llm"]
    docs = assets.documents(assets.bench_vocab, sequences)
    shards = {k: stage_sizes[k] for k in ("sequences_per_shard", "sequences_per_chunk")}
    work = ctx.work / "fingerprint"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    saved_home, threads = os.environ.get("SAD_PIPE_CACHE_HOME"), torch.get_num_threads()
    os.environ["SAD_PIPE_CACHE_HOME"] = str(work / "memo-home")  # never the user's memo
    stage_threads = (os.cpu_count() or 1) if ctx.device == "cpu" else threads  # stage one as benchmark 2 runs it
    torch.set_num_threads(stage_threads)
    try:
        big = work / "random.bin"
        size = _random_file(big, sizes["file_mb"])
        teacher_files = [os.path.realpath(teacher / n) for n in fingerprint.model_files(teacher)]
        teacher_bytes = sum(os.path.getsize(p) for p in teacher_files)
        count = iter(range(10 ** 6))

        def stage() -> float:
            path = work / f"cache-{next(count)}"
            with Timer(ctx.device) as t:
                _stage_one(assets.cache_config(path, docs, teacher=teacher, **shards))
            shutil.rmtree(path, ignore_errors=True)
            return t.seconds

        def teacher_fingerprint() -> tuple[float, dict]:
            with Timer() as t:
                result = fingerprint.model_fingerprint(str(teacher))
            return t.seconds, result

        stage()  # untimed: imports, the datasets cache, the teacher into the page cache
        runs: dict[str, list] = {k: [] for k in ("cold", "warm", "teacher cold", "teacher warm", "memo hit", "stage one")}
        reads: dict[int, list[float]] = {kib: [] for kib in sizes["read_sizes_kib"]}
        evicted = True
        with quiet():  # model_fingerprint logs every hashing at INFO
            for _ in range(ctx.repeats):
                evicted &= _evict(str(big))
                runs["cold"].append(_hash_seconds(big))
                runs["warm"].append(_hash_seconds(big))
                for kib in reads:
                    reads[kib].append(_hash_seconds(big, kib << 10))

                fingerprint.memo_path().unlink(missing_ok=True)
                for p in teacher_files:
                    evicted &= _evict(p)
                seconds, cold_result = teacher_fingerprint()
                runs["teacher cold"].append(seconds)
                fingerprint.memo_path().unlink(missing_ok=True)
                seconds, warm_result = teacher_fingerprint()
                runs["teacher warm"].append(seconds)
                _wait_until_trusted(teacher_files)
                fingerprint.model_fingerprint(str(teacher))  # now every file is in the memo
                seconds, hit_result = teacher_fingerprint()
                runs["memo hit"].append(seconds)
                if not cold_result == warm_result == hit_result:
                    raise RuntimeError(f"the teacher's fingerprint changed between runs: {fingerprint.describe_change(cold_result, hit_result)}")
                runs["stage one"].append(stage())
    finally:
        torch.set_num_threads(threads)
        if saved_home is None:
            os.environ.pop("SAD_PIPE_CACHE_HOME", None)
        else:
            os.environ["SAD_PIPE_CACHE_HOME"] = saved_home
        shutil.rmtree(work, ignore_errors=True)

    def rate(seconds: list[float], nbytes: int) -> list[float]:
        return [nbytes / s / 1e6 for s in seconds]  # MB/s

    res = Result()
    shape = f"{TARGET_TEACHER} teacher"
    res.figures += [
        Figure("xxh3_128 hashing, cold (file dropped from the page cache)", rate(runs["cold"], size), "MB/s",
               f"bytes of a {size / 1e9:.2g} GB file read and hashed per second, {fingerprint.BLOCK_SIZE >> 20} MiB reads"),
        Figure("xxh3_128 hashing, warm page cache", rate(runs["warm"], size), "MB/s",
               f"bytes of the same file read and hashed per second, {fingerprint.BLOCK_SIZE >> 20} MiB reads"),
        Figure(f"fingerprint, every file in the memo, {shape}", [s * 1e6 for s in runs["memo hit"]], "µs",
               f"model_fingerprint of {len(teacher_files)} files: read the memo, a stat per file"),
        Figure(f"fingerprint (memo dropped, cold) ÷ cache-teacher wall, {shape}", paired(runs["teacher cold"], runs["stage one"]), "x",
               "model_fingerprint, no memo, teacher files dropped from the page cache",
               f"`cache-teacher` wall time, new cache, {sequences} sequences", target=("<=", TARGET)),
        Figure(f"fingerprint (memo dropped, warm page cache) ÷ cache-teacher wall, {shape}",
               paired(runs["teacher warm"], runs["stage one"]), "x", "model_fingerprint, no memo, teacher files in the page cache",
               f"`cache-teacher` wall time, new cache, {sequences} sequences"),
    ]

    def gbps(seconds: list[float], nbytes: int) -> str:
        return spread([nbytes / s / 1e9 for s in seconds], "{:.2f}")

    hashing = Table(f"xxh3_128 over a {size / 1e9:.2g} GB file of random bytes", ["read", "read size", "seconds", "GB/s"])
    hashing.rows += [["cold (dropped from the page cache)", f"{fingerprint.BLOCK_SIZE >> 10} KiB", spread(runs["cold"]), gbps(runs["cold"], size)],
                     ["warm page cache", f"{fingerprint.BLOCK_SIZE >> 10} KiB", spread(runs["warm"]), gbps(runs["warm"], size)]]
    hashing.rows += [[f"warm page cache{' (the default)' if kib << 10 == fingerprint.BLOCK_SIZE else ''}", f"{kib} KiB",
                      spread(secs), gbps(secs, size)] for kib, secs in reads.items()]
    res.tables.append(hashing)
    versus = Table(f"{shape}: model_fingerprint ({len(teacher_files)} files, {teacher_bytes / 1e6:,.0f} MB) vs cache-teacher",
                   ["run", "seconds", "GB/s", "÷ cache-teacher wall"])
    for label, key in (("fingerprint, memo dropped, files dropped from the page cache", "teacher cold"),
                       ("fingerprint, memo dropped, files in the page cache", "teacher warm"),
                       ("fingerprint, every file in the memo", "memo hit")):
        versus.rows.append([label, spread(runs[key], "{:.3g}"), gbps(runs[key], teacher_bytes) if key != "memo hit" else "-",
                            spread(paired(runs[key], runs["stage one"]), "{:.2g}")])
    versus.rows.append([f"cache-teacher, new cache, {sequences} sequences x {assets.max_length} tokens",
                        spread(runs["stage one"]), "-", "1"])
    res.tables.append(versus)

    res.notes.append(f"{ctx.device}, {stage_threads} torch threads for stage one; "
                     "hashing is one thread. The memo (file-hashes.json) lived in the benchmark's work directory; the "
                     "memo-hit time grows with the memo's size (one JSON file for every model fingerprinted on the machine).")
    cold, warm = (statistics.median(rate(runs[k], size)) for k in ("cold", "warm"))
    if not evicted:
        res.notes.append("posix_fadvise is not available here: the 'cold' runs read from the page cache.")
    elif cold > 0.8 * warm:
        res.notes.append(f"The cold reads ({cold:,.0f} MB/s) were nearly as fast as the warm ones ({warm:,.0f} MB/s): the file was "
                         "probably still cached below this OS (a VM host's cache, or a RAM-backed filesystem).")
    res.notes.append("The fraction is of a short stage one (benchmark 2's); with the memo, every run after the first pays the "
                     "memo-hit time only. Stage one reads the teacher from disk anyway: when the fingerprint runs just before "
                     "or after loading it, the two share one read, and the fingerprint's own cost is the warm row.")
    res.data = {"runs": runs, "read_sizes_kib": {str(k): v for k, v in reads.items()}, "file_bytes": size,
                "teacher_files": len(teacher_files), "teacher_bytes": teacher_bytes, "evicted": evicted,
                "block_size": fingerprint.BLOCK_SIZE}
    return res
