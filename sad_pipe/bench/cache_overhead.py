"""Benchmark 2, cache-teacher overhead: stage one's wall time ÷ the bare teacher forward on the same sequences.

Numerator: the real `cache_teacher.run(config)` making a new cache from documents with the demo's
cache config (top-256, lse at T=1,2, hidden layers 2 and 4 in bf16) on the bench teacher: load the
tokenizer and teacher, tokenize + pack, forward, top-k/lse on the device, encode, compress, write,
commit, finalize. A first, untimed run warms imports and the datasets cache.
Denominator: the same teacher (loaded outside the timer) running `model(input_ids)` under
inference_mode over the same packed sequences in the same batch size, nothing else.
The two are interleaved within each repetition; ratios are paired per repetition. Stage one's own
timers split its wall time into the teacher runner, the shard writing and the rest (set-up, finalize).
"""

from __future__ import annotations

import shutil

import numpy as np
import torch

from sad_pipe.bench.assets import quiet, run_config
from sad_pipe.bench.measure import Context, Figure, Result, Table, Timer, interleaved, paired, spread

SIZES = {"full": {"sequences": 64, "sequences_per_shard": 16, "sequences_per_chunk": 16},
         "quick": {"sequences": 16, "sequences_per_shard": 8, "sequences_per_chunk": 4}}
TARGET = 1.10


def _stage_one(config: dict) -> dict:
    from sad_pipe.stages import cache_teacher

    threads = torch.get_num_threads()
    try:
        with quiet():
            return cache_teacher.run(run_config(config))
    finally:
        torch.set_num_threads(threads)  # in case stage one sized the pool for itself


def run(ctx: Context) -> Result:
    from sad_pipe.pipeline.models import load_causal_lm, resolve_dtype
    from sad_pipe.storage.reader import CacheReader

    sizes = ctx.pick(SIZES)
    assets = ctx.assets
    docs = assets.documents(assets.bench_vocab, sizes["sequences"])
    shard_sizes = {"sequences_per_shard": sizes["sequences_per_shard"], "sequences_per_chunk": sizes["sequences_per_chunk"]}
    count = iter(range(10 ** 6))

    def new_cache() -> str:
        path = ctx.work / f"overhead-{next(count)}"
        shutil.rmtree(path, ignore_errors=True)
        return str(path)

    warm = new_cache()
    _stage_one(assets.cache_config(warm, docs, **shard_sizes))
    reader = CacheReader(warm)
    n = reader.sequences("train")
    ids = torch.from_numpy(np.concatenate([reader.read_chunk("train", c, {"input_ids"})["input_ids"]
                                           for c in range(reader.num_chunks("train"))]).astype(np.int64))
    shards = len(reader.plan.splits["train"]["shards"])
    batch = run_config(assets.cache_config(warm, docs)).teacher.batch_size
    shutil.rmtree(warm)

    device = torch.device(ctx.device)
    with quiet():
        teacher = load_causal_lm(str(assets.teacher(assets.bench_vocab).path), revision=None,
                                 dtype=resolve_dtype("auto", device), device=device, trust_remote_code=False, what="teacher").eval()

    def bare() -> dict:
        with torch.inference_mode(), Timer(ctx.device) as t:
            for s in range(0, n, batch):
                teacher(input_ids=ids[s:s + batch].to(device), use_cache=False)
        return {"seconds": t.seconds}

    def stage() -> dict:
        path = new_cache()
        with Timer(ctx.device) as t:
            summary = _stage_one(assets.cache_config(path, docs, **shard_sizes))
        shutil.rmtree(path, ignore_errors=True)
        return {"seconds": t.seconds, "runner": summary["teacher_forward_seconds"],
                "writing": summary["fill_seconds"] - summary["teacher_forward_seconds"],
                "rest": t.seconds - summary["fill_seconds"]}

    runs = interleaved(ctx.repeats, {"bare": bare, "stage": stage})
    bare_s = [r["seconds"] for r in runs["bare"]]
    part = {k: [r[k] for r in runs["stage"]] for k in ("seconds", "runner", "writing", "rest")}
    tokens = n * reader.max_length
    res = Result()
    res.figures.append(Figure("cache-teacher wall ÷ bare teacher forward", paired(part["seconds"], bare_s), "x",
                              "`cache-teacher` wall time, new cache from documents", "bare teacher forward, same sequences and batch",
                              target=("<=", TARGET)))
    table = Table("cache-teacher vs bare forward (the parts of stage one from its own timers)",
                  ["run", "seconds", "tokens/s", "÷ bare forward"])
    rows = [("bare teacher forward", bare_s),
            ("cache-teacher, whole run", part["seconds"]),
            ("- teacher runner: forward + top-k/lse + encode", part["runner"]),
            ("- compress + write + commit shards", part["writing"]),
            ("- the rest: load teacher, tokenize + pack, plan, finalize", part["rest"])]
    for label, secs in rows:
        rate = spread([tokens / s for s in secs], "{:,.0f}") if label[0] != "-" else ""
        table.rows.append([label, spread(secs), rate, spread(paired(secs, bare_s))])
    res.tables.append(table)
    res.data = {"runs": runs, "sequences": n, "tokens": tokens, "batch_size": batch, "shards": shards}
    writer = ("in line (a CPU teacher's thread pool already uses every core)" if ctx.device == "cpu" else
              "in a background thread; the runner's time is not synchronised with the GPU, so the split of the parts "
              "is indicative only")
    res.notes.append(f"{n} sequences x {reader.max_length} tokens in {shards} shards of {sizes['sequences_per_shard']} "
                     f"(chunks of {sizes['sequences_per_chunk']}), teacher batch {batch}, {ctx.device}; "
                     f"stage one compresses and writes {writer}.")
    return res
