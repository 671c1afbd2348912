"""`sad-pipe bench`: the performance figures that justify the design, each a ratio measured side by side.

    storage        top-k codecs (bytes/token, speed, KL at T=2) and hidden-state dtypes  (storage.py)
    hidden         hidden states per mode at width 1024: bytes, reconstruction error    (hidden.py)
    cache-teacher  stage one's wall time ÷ the bare teacher forward                    (cache_overhead.py)
    online-kd      training from the cache vs online KD: tokens/s and peak memory      (online_kd.py)
    loader         sequences/s the loader delivers ÷ sequences/s the student consumes  (loader.py)
    kd-loss        chunked CE + KD at V = 128k vs the full [N, V] fp32 version          (kd_loss.py)
    fingerprint    hashing the teacher's files: GB/s cold and warm, memo hit, ÷ stage one (fingerprint.py)
    memory         train-student's projected peak memory ÷ the measured one; the P100 plan   (memory.py)
    precision      train-student in fp16 (grad scaler) and bf16 vs fp32: tokens/s, memory    (precision.py)

`sad-pipe bench --gpu-check` (`make gpu-check`) runs the ones a GPU has to measure (GPU_CHECK) into
gpu-results.json / gpu-results.md, on --device cuda by default.

Everything is built offline inside the run (assets.py): corpus, tokenizers, teachers, caches.
results.json holds every repetition; results.md the tables. Environment:
    SAD_PIPE_BENCH_THREADS  torch threads of the bench and its subprocesses (default 1: on a small
                            machine shared with other work, OpenMP threads spinning against other
                            processes made timings several times slower and erratic; ratios are what count).
                            cache-teacher ignores it and uses every core: its target is the teacher
                            and the codecs sharing the machine.
    SAD_PIPE_BENCH_WORK     keep the work directory there (assets are then reused by the next run, e.g.
                            with --only); by default a temporary directory under OUTPUT/work/, removed at the end.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from sad_pipe.errors import ConfigError, SadPipeError

log = logging.getLogger("sad_pipe.bench")

BENCHMARKS = {
    "storage": "sad_pipe.bench.storage",
    "hidden": "sad_pipe.bench.hidden",
    "cache-teacher": "sad_pipe.bench.cache_overhead",
    "online-kd": "sad_pipe.bench.online_kd",
    "loader": "sad_pipe.bench.loader",
    "kd-loss": "sad_pipe.bench.kd_loss",
    "fingerprint": "sad_pipe.bench.fingerprint",
    "memory": "sad_pipe.bench.memory",
    "precision": "sad_pipe.bench.precision",
}
# What only a GPU can answer: stage one next to a GPU forward (target <= 1.05), training from the cache vs
# online KD where the teacher's weights and logits are GPU memory, the fp16 path (a P100's) and bf16.
GPU_CHECK = ["cache-teacher", "online-kd", "precision"]
QUIET_ENV = {"TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _threads() -> int:
    value = os.environ.get("SAD_PIPE_BENCH_THREADS", "1")
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"SAD_PIPE_BENCH_THREADS={value!r}: expected a positive integer")
    return int(value)


def _check(device: str, only: list[str], repeats: int, gpu_check: bool = False) -> list[str]:
    unknown = [n for n in only if n not in BENCHMARKS]
    problems = [f"--only {n}: unknown benchmark; known: {', '.join(BENCHMARKS)}" for n in unknown]
    if repeats < 1:
        problems.append(f"--repeats {repeats}: must be at least 1")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append("--device cuda: torch sees no CUDA device")
    if problems:
        raise ConfigError(problems)
    selected = GPU_CHECK if gpu_check else list(BENCHMARKS)
    return [n for n in selected if not only or n in only]


def _command(device: str, only: list[str], repeats: int, quick: bool, output: Path, gpu_check: bool = False) -> str:
    parts = ["sad-pipe bench", f"--output {output}"] + (["--gpu-check"] if gpu_check else [])
    parts += [f"--device {device}"] if device != ("cuda" if gpu_check else "cpu") else []
    parts += [f"--only {n}" for n in only] + ([f"--repeats {repeats}"] if repeats != 3 else []) + (["--quick"] if quick else [])
    return " ".join(parts)


def run_benchmarks(output: Path, device: str = "cpu", only: list[str] | None = None, repeats: int = 3,
                   quick: bool = False, gpu_check: bool = False) -> str:
    """Run the selected benchmarks, write output/results.json and output/results.md; return the Markdown.
    gpu_check: only the GPU_CHECK benchmarks, into output/gpu-results.json and .md (results.* are left alone)."""
    import torch

    from sad_pipe.bench import report
    from sad_pipe.bench.assets import Assets
    from sad_pipe.bench.machine import describe, load_average
    from sad_pipe.bench.measure import Context, cpu_seconds

    only = list(only or [])
    names = _check(device, only, repeats, gpu_check)
    stem = "gpu-results" if gpu_check else "results"
    threads = _threads()
    if quick and repeats > 1:  # quick checks that the suite runs; its figures are not worth repeating
        _progress(f"--quick: 1 repetition instead of {repeats}")
        repeats = 1
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    # Quiet progress bars, no hub lookups, and the thread count, here and in every subprocess.
    env = {**QUIET_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    saved_env, saved_threads = {k: os.environ.get(k) for k in env}, torch.get_num_threads()
    os.environ.update(env)
    torch.set_num_threads(threads)
    keep = os.environ.get("SAD_PIPE_BENCH_WORK")
    if keep:
        work = Path(keep)
        work.mkdir(parents=True, exist_ok=True)
    else:  # under OUTPUT/work/ (git-ignored for the default output), removed at the end
        (output / "work").mkdir(exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=output / "work"))
    profile = "quick" if quick else "full"
    ctx = Context(work=work / profile, device=device, repeats=repeats, quick=quick,
                  assets=Assets(work / profile / "assets", profile, device))
    results = {
        "machine": describe(device),
        "settings": {"device": device, "repeats": repeats, "quick": quick, "only": only, "threads": threads,
                     "command": _command(device, only, repeats, quick, output, gpu_check),
                     "started": datetime.datetime.now().isoformat(timespec="seconds")},
        "benchmarks": {}, "elapsed": {},
    }
    failed = []
    start, cpu_start = time.perf_counter(), cpu_seconds()
    try:
        for name in names:
            _progress(f"{name}: running")
            built_before = sum(ctx.assets.build_seconds.values())
            built_cpu_before = sum(ctx.assets.build_cpu_seconds.values())
            t0, cpu0 = time.perf_counter(), cpu_seconds()
            entry: dict = {}
            try:
                res = importlib.import_module(BENCHMARKS[name]).run(ctx)
                entry = {"figures_objects": res.figures, "tables_objects": res.tables, "notes": res.notes, "data": res.data}
            except Exception as exc:  # one failing benchmark must not hide the others' figures
                entry = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"}
                failed.append(name)
            seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
            assets = sum(ctx.assets.build_seconds.values()) - built_before
            assets_cpu = sum(ctx.assets.build_cpu_seconds.values()) - built_cpu_before
            results["benchmarks"][name] = entry
            results["elapsed"][name] = {"seconds": seconds - assets, "cpu_seconds": cpu - assets_cpu,
                                        "load_average_end": load_average()}
            _progress(f"{name}: {seconds - assets:.1f} s" + (f" (+ {assets:.1f} s building assets)" if assets else "")
                      + (" FAILED" if name in failed else ""))
        for key, seconds in ctx.assets.build_seconds.items():
            results["elapsed"][f"asset: {key}"] = {"seconds": seconds, "cpu_seconds": ctx.assets.build_cpu_seconds[key]}
        results["elapsed"]["total"] = {"seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds() - cpu_start,
                                       "load_average_end": load_average()}
        results["settings"]["load_average_end"] = load_average()
        text = report.markdown(results)
        (output / f"{stem}.json").write_text(json.dumps(report.to_json(results), indent=1, default=str) + "\n")
        (output / f"{stem}.md").write_text(text)
    finally:
        torch.set_num_threads(saved_threads)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(OSError):  # only if no other run is using it
                (output / "work").rmdir()
    _progress(f"total {time.perf_counter() - start:.1f} s; results in {output / (stem + '.md')}")
    if failed:
        raise SadPipeError(f"benchmarks failed: {', '.join(failed)} (details in {output / (stem + '.md')})")
    return text


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
