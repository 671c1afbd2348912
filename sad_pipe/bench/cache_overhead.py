"""Benchmark 2, cache-teacher overhead: stage one's wall time ÷ the bare teacher forward on the same sequences.

Numerators, both the real `cache_teacher.run(config)` with the demo's cache config (top-256, lse at
T=1,2, hidden layers 2 and 4 in bf16) on the bench teacher:
    resume  the cache's shards dropped with `storage.verify.drop_shards` and the same run repeated:
            load the teacher, forward, top-k/lse on the device, encode, compress, write, commit,
            finalize. Tokenizing and packing are done once per cache and are not in it.
    fresh   a new cache from the documents: the above plus dataset load, tokenize and pack.
Denominator: the same teacher (loaded outside the timer) running `model(input_ids)` under
inference_mode over the same packed sequences in the same batch size, nothing else.
The three are interleaved within each repetition; ratios are paired per repetition.
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


class _keep_threads:
    """Stage one may size torch's thread pool for its own workers; give the next measurement the default back."""

    def __enter__(self):
        self.threads = torch.get_num_threads()

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def _stage_one(config: dict) -> dict:
    from sad_pipe.stages import cache_teacher

    with quiet(), _keep_threads():
        return cache_teacher.run(run_config(config))


def run(ctx: Context) -> Result:
    from sad_pipe.pipeline.models import load_causal_lm, resolve_dtype
    from sad_pipe.storage.reader import CacheReader
    from sad_pipe.storage.verify import drop_shards

    sizes = ctx.pick(SIZES)
    assets = ctx.assets
    docs = assets.documents(assets.bench_vocab, sizes["sequences"])
    shard_sizes = {"sequences_per_shard": sizes["sequences_per_shard"], "sequences_per_chunk": sizes["sequences_per_chunk"]}
    resume_dir = ctx.work / "overhead-resume"
    shutil.rmtree(resume_dir, ignore_errors=True)
    resume_cfg = assets.cache_config(resume_dir, docs, **shard_sizes)
    first = _stage_one(resume_cfg)  # builds tokens + plan once; also warms the file cache and the allocator
    batch = run_config(resume_cfg).teacher.batch_size

    device = torch.device(ctx.device)
    teacher = load_causal_lm(str(assets.teacher(assets.bench_vocab).path), revision=None, dtype=resolve_dtype("auto", device),
                             device=device, trust_remote_code=False, what="teacher").eval()
    reader = CacheReader(str(resume_dir))
    n = reader.sequences("train")
    ids = torch.from_numpy(np.concatenate([reader.read_chunk("train", c, {"input_ids"})["input_ids"]
                                           for c in range(reader.num_chunks("train"))]).astype(np.int64))
    shards = [("train", i) for i in range(len(reader.plan.splits["train"]["shards"]))]

    def bare() -> float:
        with torch.inference_mode(), Timer(ctx.device) as t:
            for s in range(0, n, batch):
                teacher(input_ids=ids[s:s + batch].to(device), use_cache=False)
        return t.seconds

    def resume() -> float:
        drop_shards(str(resume_dir), shards)
        with Timer(ctx.device) as t:
            _stage_one(resume_cfg)
        return t.seconds

    fresh_runs = iter(range(ctx.repeats))

    def fresh() -> float:
        path = ctx.work / f"overhead-fresh-{next(fresh_runs)}"
        shutil.rmtree(path, ignore_errors=True)
        with Timer(ctx.device) as t:
            _stage_one(assets.cache_config(path, docs, **shard_sizes))
        shutil.rmtree(path, ignore_errors=True)
        return t.seconds

    times = interleaved(ctx.repeats, {"bare": bare, "resume": resume, "fresh": fresh})
    tokens = n * reader.max_length
    res = Result()
    res.figures.append(Figure("cache-teacher wall ÷ bare teacher forward", paired(times["resume"], times["bare"]), "x",
                              "stage one (resume: load + forward + top-k/lse + encode + write + commit + finalize)",
                              "bare teacher forward, same sequences and batch", target=("<=", TARGET)))
    res.figures.append(Figure("cache-teacher incl. tokenize+pack ÷ bare forward", paired(times["fresh"], times["bare"]), "x",
                              "stage one from documents (fresh cache)", "bare teacher forward"))
    table = Table("cache-teacher vs bare forward", ["run", "seconds", "tokens/s", "÷ bare"])
    for name, label in (("bare", "bare teacher forward"), ("resume", "cache-teacher (shards re-made)"),
                        ("fresh", "cache-teacher (new cache)")):
        table.rows.append([label, spread(times[name]), spread([tokens / s for s in times[name]], "{:,.0f}"),
                           spread(paired(times[name], times["bare"]))])
    res.tables.append(table)
    res.data = {"times": times, "sequences": n, "tokens": tokens, "batch_size": batch, "shards": len(shards),
                "summary_of_first_run": {k: v for k, v in first.items() if isinstance(v, (int, float, str))}}
    res.notes.append(f"{n} sequences x {reader.max_length} tokens in {len(shards)} shards of {sizes['sequences_per_shard']} "
                     f"(chunks of {sizes['sequences_per_chunk']}), teacher batch {batch}, {ctx.device}. Small shards so that "
                     "several commit during the run, as in a real cache; the last shard's compression cannot overlap a forward.")
    return res
