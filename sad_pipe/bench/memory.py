"""Benchmark 7, "will it fit?": train-student's projected peak memory (stages/train_student/memory.py) ÷ the
peak measured on the same run, for three shapes; and the plan for the seed's P100 config.

Each shape is the real `train_student.run(config)`, a few optimizer steps, in its own fresh process
(sad_pipe.bench.worker: peak RSS above the RSS after imports on CPU, max_memory_allocated on CUDA); its
projection is the same config's `--dry-run` plan, in another fresh process. Shapes:
    demo student     configs/demo/student-small.json's Llama (2 x 128) at the bench vocabulary
    Qwen2.5-0.5B     its widths, heads and 151,936-row vocabulary (the tokenizer's rows plus padding: the head,
                     the loss pass and the embedding are full size), depth cut from 24 to 2 layers to fit the
                     machine (memory per layer is what the projection has to get right)
    + checkpointing  the same with train.use_gradient_checkpointing
The P100 table is arithmetic only (shapes from the Qwen2.5 configs on the meta device): the seed's
configs/p100-qwen2.5-0.5b.json settings, fp16 (a P100 has no bf16), from the cache vs online KD with the
1.5B teacher resident, against the P100's 16 GB.
"""

from __future__ import annotations

import shutil

from sad_pipe.bench.assets import llama_config
from sad_pipe.bench.measure import Context, Figure, Result, Table, run_isolated, spread

# Qwen2.5's published configs (hub config.json), the keys that decide memory.
QWEN25 = {
    "0.5B": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "tie_word_embeddings": True},
    "1.5B": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "tie_word_embeddings": True},
    "3B": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
           "num_key_value_heads": 2, "tie_word_embeddings": True},
}
QWEN_VOCAB = 151936
P100_BYTES = 17_071_734_784  # torch.cuda.get_device_properties(...).total_memory of a Tesla P100-PCIE-16GB
DEMO_STUDENT = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4}
TARGET = 0.15  # projection within ±15% of the measured peak

SIZES = {
    "full": {"steps": 3, "shapes": {
        "demo student (Llama 2 x 128)": ("demo", 4, False),
        "Qwen2.5-0.5B shape, 2 of 24 layers": ("qwen", 2, False),
        "Qwen2.5-0.5B shape, 2 of 24 layers, gradient checkpointing": ("qwen", 2, True)}},
    "quick": {"steps": 2, "shapes": {
        "demo student (quick)": ("demo", 2, False),
        "Qwen2.5 widths / 16, 2 layers, checkpointing": ("qwen", 2, True)}},
}


def student_config(ctx: Context, kind: str) -> dict:
    if kind == "demo":
        width = DEMO_STUDENT if not ctx.quick else {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                    "num_attention_heads": 4}
        return llama_config(width, ctx.assets.max_length)
    qwen = {**QWEN25["0.5B"], "num_hidden_layers": 2, "vocab_size": QWEN_VOCAB}
    if ctx.quick:
        qwen.update(hidden_size=56, intermediate_size=304, vocab_size=8192)
    return {"model_type": "qwen2", "max_position_embeddings": ctx.assets.max_length, "bos_token_id": None,
            "eos_token_id": 0, "pad_token_id": None, **qwen}


def train_config(ctx: Context, cache, output, kind: str, batch: int, checkpointing: bool) -> dict:
    return {
        "cache": {"path": str(cache)},
        "student": {"config": student_config(ctx, kind)},
        "loss": {"kd_form": "tail", "temperature": 1.0},
        "curriculum": {"use_curriculum": False, "weights": {"kd": 0.7, "ce": 0.3, "feature": 0.0, "relation": 0.0}},
        "train": {"output": str(output), "batch_size": batch, "max_steps": ctx.pick(SIZES)["steps"], "warmup_steps": 1,
                  "learning_rate": 1e-3, "seed": 0, "device": ctx.device, "use_gradient_checkpointing": checkpointing},
    }


def plan_job(args: dict, meter) -> dict:
    """In a worker process: the memory plan of `train-student --dry-run` for the config."""
    from sad_pipe.bench.assets import quiet, run_config
    from sad_pipe.stages.train_student.train import setup

    with quiet():
        return setup(run_config(args["config"])).plan.memory


def run(ctx: Context) -> Result:
    sizes = ctx.pick(SIZES)
    shapes = sizes["shapes"]
    cache = ctx.assets.kd_cache(sizes["steps"] * max(b for _, b, _ in shapes.values()) + 8)
    res, measured, projected = Result(), {}, {}
    mem = "max_memory_allocated" if ctx.device == "cuda" else "peak RSS above the RSS after imports"
    table = Table("Projected vs measured peak memory, train-student", [
        "shape", "parameters", "tokens per micro-batch", "projected (MB)", f"measured {mem} (MB)", "projected ÷ measured",
        "largest parts projected (MB)"])
    for label, (kind, batch, checkpointing) in shapes.items():
        out = ctx.work / "memory-run"
        config = train_config(ctx, cache, out, kind, batch, checkpointing)
        plan = run_isolated("sad_pipe.bench.memory:plan_job", {"config": config}, ctx.device, ctx.work)["result"]
        peaks = []
        for _ in range(ctx.repeats):
            shutil.rmtree(out, ignore_errors=True)
            try:
                run = run_isolated("sad_pipe.bench.online_kd:train_job", {"config": config}, ctx.device, ctx.work)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            peaks.append(run["memory"]["above_baseline"])
            parameters = run["result"]["student_parameters"]
        measured[label], projected[label] = peaks, plan["total_bytes"]
        ratios = [plan["total_bytes"] / p for p in peaks]
        res.figures.append(Figure(f"projected ÷ measured peak memory, {label}", ratios, "x",
                                  "train-student's projected peak (--dry-run)", f"measured {mem}",
                                  target=("within", TARGET)))
        top = sorted(plan["parts"], key=lambda p: -p["bytes"])[:3]
        table.rows.append([label, f"{parameters:,}", f"{batch} x {ctx.assets.max_length}",
                           f"{plan['total_bytes'] / 2**20:,.0f}", spread([p / 2**20 for p in peaks], "{:,.0f}"),
                           spread(ratios), ", ".join(f"{p['name']} {p['bytes'] / 2**20:,.0f}" for p in top)])
    res.tables += [table, p100_table()]
    res.notes.append("The projection counts tensors (weights, gradients, AdamW state, autocast copies, activations, the "
                     "loss pass's vocabulary-sized temporaries, the batch); a CPU's peak RSS also holds the allocator's "
                     "slack and the loader's buffers, a GPU's max_memory_allocated does not. The demo student is small "
                     "enough that the loss chunk (V x tokens) is most of it.")
    res.data = {"measured_bytes": measured, "projected_bytes": projected}
    return res


def p100_plan(teacher_size: str | None, batch_size: int = 2) -> dict:
    """The memory plan of configs/p100-qwen2.5-0.5b.json on a P100 (fp16), from its cache (teacher_size None) or
    with a Qwen2.5 teacher online: the same settings, shapes from the Qwen2.5 configs."""
    import torch

    from sad_pipe.stages.train_student.memory import CachedArrays, ModelShape, RunShape, project_memory
    from sad_pipe.stages.train_student.router import LayerRouter

    student = ModelShape.of_config({"model_type": "qwen2", **QWEN25["0.5B"], "vocab_size": QWEN_VOCAB})
    cached = ModelShape.of_config({"model_type": "qwen2", **QWEN25["1.5B"], "vocab_size": QWEN_VOCAB})
    with torch.device("meta"):  # loss.student_layers [12, 24] matched to the cache's teacher layers 14 and 28
        router = LayerRouter(student.hidden, cached.hidden, 2, 2, learned=True, project=True, fixed_map=[0, 1])
    online = teacher_size and ModelShape.of_config({"model_type": "qwen2", **QWEN25[teacher_size], "vocab_size": QWEN_VOCAB})
    run = RunShape(batch_size=batch_size, length=256, precision="fp16", gradient_checkpointing=True, chunk_tokens=1024,
                   kd_form="full" if online else "tail",
                   trainable_parameters=student.parameters + sum(p.numel() for p in router.parameters()),
                   arrays=CachedArrays(top_k=0 if online else 256, lse_temperatures=0 if online else 2, hidden_layers=2,
                                       teacher_hidden=cached.hidden),  # the curriculum's hidden states come from the cache
                   teacher=online or None, teacher_bytes=2)
    return project_memory(student, run, "Tesla P100-PCIE-16GB", P100_BYTES).to_json()


def largest_fitting_batch(teacher_size: str | None) -> int:
    batch = 0
    while batch < 64 and p100_plan(teacher_size, batch + 1)["fits"]:
        batch += 1
    return batch


def p100_table() -> Table:
    variants = {"from the cache (tail KD, top-256 + lse)": None, "online KD, Qwen2.5-1.5B resident (fp16)": "1.5B",
                "online KD, Qwen2.5-3B resident (fp16)": "3B"}
    plans = {label: p100_plan(size) for label, size in variants.items()}
    names = list(dict.fromkeys(p["name"] for plan in plans.values() for p in plan["parts"]))
    table = Table("Memory plan of configs/p100-qwen2.5-0.5b.json on a 16 GB P100 (15.9 GiB; fp16, batch 2 x 256, "
                  "gradient checkpointing), GiB", ["variant", *names, "total", "fits (90%)", "largest batch that fits"])
    for label, plan in plans.items():
        parts = {p["name"]: p["bytes"] for p in plan["parts"]}
        table.rows.append([label, *(f"{parts[n] / 2**30:.2f}" if n in parts else "-" for n in names),
                           f"{plan['total_bytes'] / 2**30:.2f}", "yes" if plan["fits"] else "**no**",
                           str(largest_fitting_batch(variants[label]))])
    return table
