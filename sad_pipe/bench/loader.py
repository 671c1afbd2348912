"""Benchmark 4, the loader: sequences/s it delivers from the cache ÷ sequences/s the student consumes.

Delivered: the real `CacheDataset` behind a `DataLoader` with the config's default `train.num_workers`
and shuffle buffer, iterated over the bench cache as training does (a new loader each epoch). Each
pass builds a fresh dataset, so every chunk is read and decompressed again, as in one epoch over a
cache far larger than the chunk buffer.
Consumed: the student of benchmark 3 training on batches already in memory: `train.batch_losses`
(the loss every train step runs) + backward + gradient clipping + AdamW step, so the loader plays no
part in it. Two phases of the default curriculum:
    KD phase       reads input_ids, top-k, lse; weights kd 0.7, ce 0.3
    feature phase  also reads the cached hidden states; weights of the curriculum's last phase
                   (KD + CE + feature matching through the router + relation transfer)
"""

from __future__ import annotations

import time

import torch

from sad_pipe.bench import online_kd
from sad_pipe.bench.measure import Context, Figure, Result, Table, Timer, interleaved, paired, spread

SIZES = {"full": {"min_seconds": 1.5, "steps": 3}, "quick": {"min_seconds": 0.2, "steps": 2}}
TARGET = 10.0
PHASES = {  # name -> (field groups read, loss weights)
    "KD phase (top-k + lse)": ({"input_ids", "topk", "lse"}, {"kd": 0.7, "ce": 0.3, "feature": 0.0, "relation": 0.0}),
    "feature phase (+ hidden states)": ({"input_ids", "topk", "lse", "hidden"}, None),  # None: the curriculum's last phase
}


def delivered(cache: str, groups: set[str], batch: int, min_seconds: float, pin_memory: bool) -> float:
    """Sequences/s out of DataLoader(CacheDataset) with the default workers, over whole epochs."""
    from torch.utils.data import DataLoader

    from sad_pipe.pipeline.config import TrainConfig
    from sad_pipe.storage.reader import CacheDataset, FieldSchedule

    defaults = TrainConfig()
    sequences, epoch, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        data = CacheDataset(cache, "train", batch, FieldSchedule(always=groups), seed=defaults.seed,
                            buffer_chunks=defaults.shuffle_buffer_chunks)
        data.set_position(epoch, 0)
        for b in DataLoader(data, batch_size=None, num_workers=defaults.num_workers, pin_memory=pin_memory):
            sequences += b["input_ids"].shape[0]
        epoch += 1
    return sequences / (time.perf_counter() - start)


def consumer(ctx: Context, cache: str):
    """The student's training step on in-memory batches: returns fn(groups, weights) -> sequences/s."""
    from torch.utils.data import DataLoader

    from sad_pipe.bench.assets import run_config
    from sad_pipe.pipeline.config import CurriculumConfig
    from sad_pipe.stages.train_student.train import batch_losses, setup
    from sad_pipe.storage.reader import CacheDataset, FieldSchedule

    raw = online_kd.train_config(ctx, cache, ctx.work / "loader-student", "tail")
    raw["curriculum"] = {"use_curriculum": True}  # the default curriculum: the router and the layer map exist
    s = setup(run_config(raw))
    s.model.train()
    steps = ctx.pick(SIZES)["steps"]
    last_phase = CurriculumConfig().phases[-1]

    def rate(groups: set[str], weights: dict | None) -> float:
        weights = weights or {c: float(getattr(last_phase, c)) for c in ("kd", "ce", "feature", "relation")}
        data = CacheDataset(cache, "train", s.cfg.train.batch_size, FieldSchedule(always=groups), shuffle=False)
        batches = [b for _, b in zip(range(2), DataLoader(data, batch_size=None))]

        def step(b) -> None:
            out = batch_losses(s, b, weights)
            out["total"].backward()
            torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.cfg.train.max_grad_norm)
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)

        step(batches[0])  # warm-up: first-call allocations and lazy initialisation
        with Timer(ctx.device) as t:
            for i in range(steps):
                step(batches[i % len(batches)])
        return steps * s.cfg.train.batch_size / t.seconds

    return rate


def run(ctx: Context) -> Result:
    from sad_pipe.pipeline.config import TrainConfig

    cache = str(ctx.assets.kd_cache(online_kd.cache_sequences(ctx)))
    sizes = ctx.pick(SIZES)
    batch = ctx.pick(online_kd.SIZES)["batch"]
    consume = consumer(ctx, cache)
    variants = {}
    for name, (groups, weights) in PHASES.items():
        variants[f"{name}/loader"] = lambda g=groups: delivered(cache, g, batch, sizes["min_seconds"], ctx.device == "cuda")
        variants[f"{name}/student"] = lambda g=groups, w=weights: consume(g, w)
    rates = interleaved(ctx.repeats, variants)
    res = Result()
    table = Table("Loader vs student", ["phase", "loader sequences/s", "student sequences/s", "loader ÷ student"])
    for name in PHASES:
        ratio = paired(rates[f"{name}/loader"], rates[f"{name}/student"])
        res.figures.append(Figure(f"loader ÷ student consumption, {name}", ratio, "x", "sequences/s the loader delivers",
                                  "sequences/s the student trains on", target=(">=", TARGET)))
        table.rows.append([name, spread(rates[f"{name}/loader"], "{:,.1f}"), spread(rates[f"{name}/student"], "{:,.2f}"),
                           spread(ratio)])
    res.tables.append(table)
    workers = TrainConfig().num_workers
    res.notes.append(f"DataLoader with the default train.num_workers = {workers} ({'in the training process' if workers == 0 else 'worker processes'}), "
                     f"batch {batch}, {ctx.device}; student steps on batches already in memory.")
    res.data = {"rates": rates, "num_workers": workers}
    return res
