"""Benchmark 5, the KD loss at a large vocabulary: chunked default path vs the straightforward version.

    chunked         `losses.vocab_losses` (the loss train-student runs): the LM head, CE and tail KD per
                    chunk of `loss.chunk_tokens` positions under activation checkpointing
    straightforward logits = hidden @ W^T as one [N, V] fp32 tensor, then `losses.vocab_losses_reference`
                    (full log-softmax, the same tail KD on [N, V])
Same inputs (seeded): N positions of final student states, an LM head of V rows, cached-style teacher
targets (top-256 ids and logits, lse at T); forward and backward of CE + KD. Each variant runs in its
own process per repetition (peak memory: see worker.py); the first repetition of each dumps loss and
gradients so the results can be compared: equal results are part of the figure.
"""

from __future__ import annotations

import math
from pathlib import Path

from sad_pipe.bench.measure import Context, Figure, Result, Table, interleaved, paired, run_isolated, spread

SIZES = {"full": {"vocab": 131072, "tokens": 4096, "width": 128, "k": 256},
         "quick": {"vocab": 8192, "tokens": 256, "width": 32, "k": 64}}
TARGET = 4.0
TEMPERATURE = 1.0
# [N, V] fp32 tensors the straightforward version holds at its peak (measured on CPU: 7.4 at N=512, 6.3 at N=2048, V=128k).
REFERENCE_COPIES = 7


def _inputs(args: dict, device):
    import torch

    from sad_pipe.stages.train_student.losses import TeacherTargets

    n, v, d, k = args["tokens"], args["vocab"], args["width"], args["k"]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / math.sqrt(d) * 3.0
    labels = torch.randint(0, v, (n,), generator=g)
    # k distinct ids per row: one random set of offsets, shifted by a random base per row.
    ids = (torch.randint(0, v, (n, 1), generator=g) + torch.randperm(v, generator=g)[:k]) % v
    logits = torch.randn(n, k, generator=g).sort(-1, descending=True).values * 2.0
    lse = torch.logsumexp(logits / TEMPERATURE, -1) + 0.1  # ~10% of the teacher's mass in the tail
    mask = torch.ones(n)
    to = lambda t: t.to(device)  # noqa: E731
    teacher = TeacherTargets(ids=to(ids), logits=to(logits), lse=to(lse))
    return to(hidden).requires_grad_(), to(weight).requires_grad_(), to(labels), to(mask), teacher


def loss_job(args: dict, meter) -> dict:
    """In the worker: one forward + backward of CE + KD, timed and metered; dumps loss and grads if asked."""
    import time

    import torch
    import torch.nn.functional as F

    from sad_pipe.bench.measure import synchronize
    from sad_pipe.pipeline.config import LossConfig
    from sad_pipe.stages.train_student.losses import vocab_losses, vocab_losses_reference

    device = torch.device(args["device"])

    def loss(hidden, weight, labels, mask, teacher):
        if args["variant"] == "chunked":
            out = vocab_losses(hidden, weight, None, labels, mask, mask, teacher, form="tail", temperature=TEMPERATURE,
                               chunk_tokens=LossConfig().chunk_tokens)
        else:
            out = vocab_losses_reference(F.linear(hidden, weight), labels, mask, mask, teacher, form="tail",
                                         temperature=TEMPERATURE)
        (out["ce"] + out["kd"]).backward()
        return out

    # A warm-up on 8 positions first: lazy imports and autograd's first-call set-up are not the loss's memory.
    loss(*_inputs({**args, "tokens": 8}, device))
    hidden, weight, labels, mask, teacher = _inputs(args, device)
    meter.start()
    synchronize(device.type)
    start = time.perf_counter()
    out = loss(hidden, weight, labels, mask, teacher)
    synchronize(device.type)
    seconds = time.perf_counter() - start
    meter.stop()
    if args.get("dump"):
        torch.save({"ce": out["ce"].detach().cpu(), "kd": out["kd"].detach().cpu(), "grad_hidden": hidden.grad.cpu(),
                    "grad_weight": weight.grad.cpu()}, args["dump"])
    return {"seconds": seconds, "chunk_tokens": LossConfig().chunk_tokens}


def _room_for_reference(ctx: Context, sizes: dict) -> tuple[bool, str]:
    """Whether the straightforward version fits in memory now; it is refused rather than OOM-killed."""
    need = REFERENCE_COPIES * sizes["tokens"] * sizes["vocab"] * 4
    if ctx.device == "cuda":
        import torch

        free = torch.cuda.mem_get_info()[0]
    else:
        from sad_pipe.bench.machine import available_memory_bytes

        free = available_memory_bytes()
    if free is not None and free < need * 1.1:
        return False, f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available"
    return True, ""


def run(ctx: Context) -> Result:
    import torch

    sizes = ctx.pick(SIZES)
    res = Result()
    fits, why = _room_for_reference(ctx, sizes)
    if not fits:
        res.notes.append(f"skipped: the straightforward version {why}")
        return res
    dumps = {name: ctx.work / f"kd-loss-{name}.pt" for name in ("chunked", "straightforward")}

    def variant(name: str):
        count = iter(range(10 ** 6))

        def go() -> dict:
            first = next(count) == 0
            args = {**sizes, "variant": name, "device": ctx.device, "dump": str(dumps[name]) if first else None}
            return run_isolated("sad_pipe.bench.kd_loss:loss_job", args, ctx.device, ctx.work)
        return go

    runs = interleaved(ctx.repeats, {"chunked": variant("chunked"), "straightforward": variant("straightforward")})
    a, b = (torch.load(dumps[n], weights_only=True) for n in ("chunked", "straightforward"))
    diffs = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a}
    scale = {k: float(b[k].double().abs().max()) for k in b}
    for path in dumps.values():
        Path(path).unlink(missing_ok=True)
    above = {k: [r["memory"]["above_baseline"] for r in v] for k, v in runs.items()}
    secs = {k: [r["result"]["seconds"] for r in v] for k, v in runs.items()}
    mem = "max allocated" if ctx.device == "cuda" else "RSS"
    res.figures.append(Figure(f"KD loss peak memory: straightforward ÷ chunked (V={sizes['vocab']:,}, N={sizes['tokens']:,})",
                              paired(above["straightforward"], above["chunked"]), "x",
                              f"peak {mem} above inputs, straightforward [N, V] fp32", "the same, chunked default path",
                              target=(">=", TARGET)))
    res.figures.append(Figure("KD loss time: chunked ÷ straightforward", paired(secs["chunked"], secs["straightforward"]), "x",
                              "seconds, forward + backward, chunked", "seconds, straightforward"))
    chunk = runs["chunked"][0]["result"]["chunk_tokens"]
    rows = {"straightforward": sizes["tokens"], "chunked": min(chunk, sizes["tokens"])}  # positions per vocab-sized pass
    table = Table(f"CE + tail KD at V={sizes['vocab']:,}, {sizes['tokens']:,} positions, width {sizes['width']}, "
                  f"top-{sizes['k']} (forward + backward)",
                  ["variant", f"peak {mem} above inputs (MB)", "÷ one [rows, V] fp32 tensor", "seconds"])
    for key in ("straightforward", "chunked"):
        one = rows[key] * sizes["vocab"] * 4
        table.rows.append([f"{key} (rows = {rows[key]:,})", spread([x / 2**20 for x in above[key]], "{:,.0f}"),
                           spread([x / one for x in above[key]], "{:.2f}"), spread(secs[key])])
    res.tables.append(table)
    res.tables.append(Table("Equal results: chunked vs straightforward", ["quantity", "max |difference|", "max |value|"],
                            [[k, f"{diffs[k]:.2e}", f"{scale[k]:.2e}"] for k in diffs]))
    res.notes += [
        f"chunk_tokens = {chunk} (the config default); inputs (states, LM head, teacher targets) are allocated before "
        "the baseline, so the figures are what the loss itself adds. Teacher targets are synthetic (seeded); memory "
        "and time do not depend on their values.",
        f"Both versions hold a few vocabulary-sized temporaries at their peak (the column ÷ one tensor): the chunked "
        f"one over {rows['chunked']:,} rows, the straightforward one over all {sizes['tokens']:,}, so the memory ratio "
        f"approaches {sizes['tokens']:,} ÷ {rows['chunked']:,} = {sizes['tokens'] / rows['chunked']:.3g} and passes it "
        "only if a chunk needs fewer such temporaries than the full version. The chunked time includes recomputing "
        "each chunk in backward (activation checkpointing).",
    ]
    res.data = {"runs": runs, "max_abs_difference": diffs, "max_abs_value": scale, "sizes": sizes}
    return res
