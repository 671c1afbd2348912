"""Benchmark 8, the mixed-precision paths of train-student: fp16 (autocast + grad scaler, a P100's only one)
and bf16 (where the device supports it) against fp32, on online_kd's student and bench cache.

Each variant is the real `train_student.run(config)` in its own fresh process (sad_pipe.bench.worker), the
same student, seed, data and steps as fp32 but train.precision; interleaved per repetition. Figures:
tokens/s (the median over steps 2.. of metrics.jsonl, as online-kd), peak memory above the baseline, and the
fp16 steps the grad scaler skipped for overflowing gradients (each is counted in metrics.jsonl).
A CPU runs both paths too (slowly: it checks they work); the speed figures mean something on a GPU.
"""

from __future__ import annotations

import shutil

from sad_pipe.bench import online_kd
from sad_pipe.bench.measure import Context, Figure, Result, Table, interleaved, paired, run_isolated, spread


def bf16_supported(device: str) -> bool:
    import torch

    return device != "cuda" or torch.cuda.is_bf16_supported()


def run(ctx: Context) -> Result:
    cache = ctx.assets.kd_cache(online_kd.cache_sequences(ctx))
    precisions = ["fp32", "fp16"] + (["bf16"] if bf16_supported(ctx.device) else [])
    counter = iter(range(10 ** 6))

    def variant(precision: str):
        def go() -> dict:
            out = ctx.work / f"train-{precision}-{next(counter)}"
            config = online_kd.train_config(ctx, cache, out, "tail")
            config["train"]["precision"] = precision
            shutil.rmtree(out, ignore_errors=True)
            try:
                return run_isolated("sad_pipe.bench.online_kd:train_job", {"config": config}, ctx.device, ctx.work)
            finally:
                shutil.rmtree(out, ignore_errors=True)
        return go

    runs = interleaved(ctx.repeats, {p: variant(p) for p in precisions})
    speed = {p: [r["result"]["steady_tokens_per_second"] for r in v] for p, v in runs.items()}
    memory = {p: [r["memory"]["above_baseline"] for r in v] for p, v in runs.items()}
    mem = "max_memory_allocated" if ctx.device == "cuda" else "peak RSS above baseline"
    res = Result()
    for p in precisions[1:]:
        res.figures.append(Figure(f"train-student {p} ÷ fp32: tokens/s", paired(speed[p], speed["fp32"]), "x",
                                  f"tokens/s with train.precision {p}", "tokens/s in fp32"))
        res.figures.append(Figure(f"train-student {p} ÷ fp32: {mem}", paired(memory[p], memory["fp32"]), "x",
                                  f"{mem}, {p}", f"{mem}, fp32"))
    res.figures.append(Figure("train-student fp16: steps skipped for overflowing gradients",
                              [float(r["result"]["skipped_steps"]) for r in runs["fp16"]], "steps",
                              "optimizer steps the grad scaler skipped (metrics.jsonl skipped_steps)"))
    table = Table("train-student by precision", ["precision", "tokens/s", f"{mem} (MB)", "skipped steps"])
    for p in precisions:
        table.rows.append([p, spread(speed[p], "{:,.0f}"), spread([b / 2**20 for b in memory[p]], "{:,.0f}"),
                           spread([r["result"]["skipped_steps"] for r in runs[p]], "{:.0f}")])
    res.tables.append(table)
    if "bf16" not in precisions:
        res.notes.append(f"bf16: not supported by this {ctx.device} device, not run.")
    res.notes.append("fp16 and bf16 autocast the student's forward; weights, gradients, the AdamW state and the "
                     "vocabulary-sized loss pass stay fp32. The grad scaler starts at 2^16 and halves at each overflow.")
    res.data = {"runs": runs}
    return res
