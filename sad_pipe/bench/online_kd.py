"""Benchmark 3, training from the cache vs online KD (the teacher resident in memory).

Both variants are the real `train_student.run(config)`, each repetition in its own fresh process
(sad_pipe.bench.worker) so that peak memory of one never hides in the other's. Same student, same
seed, same data order, same steps, same batch; KD weight 0.7, CE 0.3, T = 1:
    from cache  loss.kd_form tail: top-256 + lse read from the bench cache, no teacher loaded
    online KD   loss.kd_form full: the bench teacher loaded and run on every batch, full-vocabulary KL
Figures: tokens/s of the training loop, the median over optimizer steps 2.. of train-student's own
per-step `tokens_per_second` in metrics.jsonl (a step's wall time, loader included; the first step,
which pays one-off set-up, is left out), and peak memory of the whole run (see worker.py for how).
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import torch

from sad_pipe.bench.assets import llama_config
from sad_pipe.bench.measure import Context, Figure, Result, Table, interleaved, paired, run_isolated, spread

SIZES = {
    "full": {"student": {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4},
             "steps": 8, "batch": 4},
    "quick": {"student": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
              "steps": 3, "batch": 2},
}
TARGET_SPEED, TARGET_MEMORY = 1.5, 0.6
WEIGHTS = {"kd": 0.7, "ce": 0.3, "feature": 0.0, "relation": 0.0}


def train_config(ctx: Context, cache, output, kd_form: str) -> dict:
    sizes = ctx.pick(SIZES)
    cfg = {
        "cache": {"path": str(cache)},
        "student": {"config": llama_config(sizes["student"], ctx.assets.max_length)},
        "loss": {"kd_form": kd_form, "temperature": 1.0},
        "curriculum": {"use_curriculum": False, "weights": WEIGHTS},
        "train": {"output": str(output), "batch_size": sizes["batch"], "max_steps": sizes["steps"], "warmup_steps": 1,
                  "learning_rate": 1e-3, "seed": 0, "device": ctx.device},
    }
    if kd_form == "full":
        cfg["teacher"] = {"model": str(ctx.assets.teacher(ctx.assets.bench_vocab).path), "device": ctx.device}
    return cfg


def cache_sequences(ctx: Context) -> int:
    """Training sequences the bench cache needs: one epoch of the run, plus a few."""
    sizes = ctx.pick(SIZES)
    return sizes["steps"] * sizes["batch"] + 8


def train_job(args: dict, meter) -> dict:
    """In the worker process: one train-student run. Everything the run imports is imported before
    the meter's baseline: matplotlib (the plots at the end), the tokenizer classes and the model's
    modelling code (transformers imports both lazily, ~150 MB of resident code and data that are no
    part of training's memory)."""
    import importlib

    import matplotlib.pyplot  # noqa: F401

    from sad_pipe.bench.assets import quiet, run_config
    from sad_pipe.pipeline.models import load_tokenizer
    from sad_pipe.stages import train_student

    cfg = run_config(args["config"])
    for kind in {(cfg.student.config or {}).get("model_type"), "llama"} - {None}:  # the student's, the bench teacher's
        importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    load_tokenizer(str(Path(cfg.cache.path) / "tokenizer"))
    meter.start()
    with quiet():
        result = train_student.run(cfg)
    meter.stop()
    lines = [json.loads(line) for line in (Path(cfg.train.output) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per_step = [r["tokens_per_second"] for r in lines if r["split"] == "train" and r["step"] > 1]
    return {"steady_tokens_per_second": statistics.median(per_step) if per_step else result["tokens_per_second"],
            **{k: result[k] for k in ("tokens_per_second", "train_seconds", "wall_seconds", "steps", "skipped_steps",
                                                     "student_parameters")}}


def run(ctx: Context) -> Result:
    cache = ctx.assets.kd_cache(cache_sequences(ctx))
    teacher = ctx.assets.teacher(ctx.assets.bench_vocab)
    counter = iter(range(10 ** 6))

    def variant(kd_form: str):
        def go() -> dict:
            out = ctx.work / f"train-{kd_form}-{next(counter)}"
            shutil.rmtree(out, ignore_errors=True)  # a finished run there would be refused
            try:
                return run_isolated("sad_pipe.bench.online_kd:train_job",
                                    {"config": train_config(ctx, cache, out, kd_form)}, ctx.device, ctx.work)
            finally:
                shutil.rmtree(out, ignore_errors=True)
        return go

    runs = interleaved(ctx.repeats, {"cache": variant("tail"), "online": variant("full")})
    speed = {k: [r["result"]["steady_tokens_per_second"] for r in v] for k, v in runs.items()}
    total = {k: [r["memory"]["total_peak"] for r in v] for k, v in runs.items()}
    above = {k: [r["memory"]["above_baseline"] for r in v] for k, v in runs.items()}
    student = runs["cache"][0]["result"]["student_parameters"]
    cuda = ctx.device == "cuda"
    res = Result()
    res.figures.append(Figure("train from cache ÷ online KD: tokens/s", paired(speed["cache"], speed["online"]), "x",
                              "tokens/s training from the cache", "tokens/s with online full KD", target=(">=", TARGET_SPEED)))
    if cuda:
        res.figures.append(Figure("train from cache ÷ online KD: peak GPU memory", paired(total["cache"], total["online"]), "x",
                                  "max_memory_allocated from cache", "max_memory_allocated online", target=("<=", TARGET_MEMORY)))
    else:
        res.figures.append(Figure("train from cache ÷ online KD: peak RSS above baseline", paired(above["cache"], above["online"]),
                                  "x", "peak RSS - RSS after imports, from cache", "the same, online KD",
                                  target=("<=", TARGET_MEMORY)))
        res.figures.append(Figure("train from cache ÷ online KD: total peak RSS", paired(total["cache"], total["online"]), "x",
                                  "process peak RSS (imports included), from cache", "the same, online KD"))
    mem = "max allocated" if cuda else "RSS"
    table = Table("Training: from the cache vs online KD", ["variant", "tokens/s", f"total peak {mem} (MB)",
                                                          f"peak {mem} above baseline (MB)", "train seconds"])
    for key, label in (("cache", "from cache (tail KD, top-256 + lse)"), ("online", f"online KD (teacher {teacher.parameters:,} params)")):
        table.rows.append([label, spread(speed[key], "{:,.0f}"), spread([b / 2**20 for b in total[key]], "{:,.0f}"),
                           spread([b / 2**20 for b in above[key]], "{:,.0f}"),
                           spread([r["result"]["train_seconds"] for r in runs[key]])])
    res.tables.append(table)
    sizes = ctx.pick(SIZES)
    res.notes.append(f"student {student:,} parameters, teacher {teacher.parameters:,} ({teacher.parameters / student:.1f}x); "
                     f"{sizes['steps']} steps of {sizes['batch']} x {ctx.assets.max_length} tokens; each run in its own process. "
                     + ("Memory is torch.cuda.max_memory_allocated." if cuda else
                        "Total peak RSS includes the ~hundreds of MB every process holds after importing torch and "
                        "transformers, which dilutes the ratio; the figure with the target is the peak above that "
                        "baseline (RSS after imports, the modelling code and tokenizer classes included), i.e. what "
                        "training itself adds."))
    from sad_pipe.pipeline.models import resolve_dtype

    width = torch.finfo(resolve_dtype("auto", torch.device(ctx.device))).bits // 8
    weights_mb = teacher.parameters * width / 2**20
    logits_mb = sizes["batch"] * ctx.assets.max_length * teacher.vocab * 4 / 2**20
    added = statistics.median(above["online"]) - statistics.median(above["cache"])
    res.notes.append(f"What online KD holds on top of training from the cache is the teacher: {weights_mb:,.0f} MB of weights "
                     f"and its fp32 logits of a micro-batch, [{sizes['batch'] * ctx.assets.max_length:,}, {teacher.vocab:,}] = "
                     f"{logits_mb:,.0f} MB (plus temporaries). Measured: {added / 2**20:,.0f} MB more at the peak. Both "
                     "variants share the student's own peak (weights, AdamW state, activations, and the vocabulary-sized "
                     "loss tensors of one chunk of loss.chunk_tokens positions), so the ratio approaches the target only "
                     "when the teacher is large next to that (a real teacher's weights alone take GBs).")
    res.data = {"runs": runs, "student_parameters": student, "teacher_parameters": teacher.parameters}
    return res
