"""`sad-pipe demo diagnose`: why a cached KD form falls behind online full KD, measured on the same batches.

One student follows one form's training trajectory (`follow`, e.g. the tail form); at every optimizer step
the gradient of the loss (kd_weight * KD + ce_weight * CE) is computed for each cached form and for online
full-vocabulary KD (the teacher resident in memory) on the same micro-batch, at the same weights, and
compared: cosine with the full-KD gradient per parameter group, the KD terms, and how much probability the
student puts outside the teacher's top-k (the mass the tail form describes with one bucket). Only the
followed form's gradient updates the weights, with train-student's own optimizer and schedule.

Writes <out>/diagnose.jsonl (one line per step) and <out>/diagnose.md (windows of steps, per form).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sad_pipe.pipeline.config import load_config
from sad_pipe.pipeline.models import load_causal_lm
from sad_pipe.stages.train_student.losses import TeacherTargets, fit_vocabulary, vocab_losses
from sad_pipe.stages.train_student.train import KD_NEEDS, cached_targets, loss_masks, setup
from sad_pipe.storage.reader import CacheDataset, FieldSchedule

FORMS = ("tail", "subset", "sampled", "hybrid")
GROUPS = ("embedding", "attention", "mlp", "norm")


def _group(name: str) -> str:
    if "embed" in name or "lm_head" in name:
        return "embedding"
    if "attn" in name:
        return "attention"
    if "mlp" in name:
        return "mlp"
    return "norm"


def diagnose(configs: list[str], overrides: list[str], teacher: str, out: Path, follow: str = "tail",
             steps: int = 200) -> str:
    cfg = load_config(configs, [*overrides, f"loss.kd_form={follow}", f"train.output={out / 'run'}",
                                f"train.max_steps={steps}", "curriculum.use_curriculum=false"])
    s = setup(cfg)
    forms = [f for f in FORMS if KD_NEEDS[f] <= s.reader.groups]  # the cached forms this cache can serve
    online = load_causal_lm(teacher, revision=None, dtype=torch.float32, device=s.device, trust_remote_code=False,
                            what="teacher").eval().requires_grad_(False)
    data = CacheDataset(cfg.cache.path, "train", cfg.train.batch_size, FieldSchedule(always=s.reader.groups - {"hidden"}),
                        seed=cfg.train.seed, buffer_chunks=cfg.train.shuffle_buffer_chunks)
    params = {n: p for n, p in s.core.named_parameters() if p.requires_grad}
    w = {"kd": cfg.curriculum.weights.kd, "ce": cfg.curriculum.weights.ce}
    head = s.core.student.get_output_embeddings()
    out.mkdir(parents=True, exist_ok=True)
    rows, epoch, step = [], 0, 0
    with open(out / "diagnose.jsonl", "w") as log:
        while step < steps:
            data.set_position(epoch, 0)
            for batch in data:
                if step >= steps:
                    break
                rows.append(_step(s, batch, forms, follow, online, params, head, w, step))
                log.write(json.dumps(rows[-1]) + "\n")
                step += 1
            epoch += 1
    text = _summary(rows, forms, follow, cfg, teacher)
    (out / "diagnose.md").write_text(text)
    return text


def _step(s, batch, forms, follow, online, params, head, w, step: int) -> dict:
    cfg, dev = s.cfg, s.device
    ids = batch["input_ids"].to(dev).long()
    positions = batch["position_ids"].to(dev).long()
    b, t = ids.shape
    labels = torch.cat([ids[:, 1:], torch.full((b, 1), -1, device=dev)], 1).reshape(-1)
    ce_mask, kd_mask = (m.to(dev).reshape(-1) for m in loss_masks(s, batch))
    last, _, _ = s.core(ids, positions, None)
    hidden = last.reshape(b * t, -1)
    with torch.no_grad():
        full_logits = online(input_ids=ids, position_ids=positions, use_cache=False).logits.reshape(b * t, -1).float()
    targets = {"full": TeacherTargets(full_logits=fit_vocabulary(full_logits, s.tokens, s.student_vocab))}
    targets.update({f: cached_targets(s, batch, f) for f in forms})
    grads, kd = {}, {}
    for form, target in targets.items():
        out = vocab_losses(hidden, head.weight, head.bias, labels, ce_mask, kd_mask, target, form=form,
                           temperature=cfg.loss.temperature, chunk_tokens=cfg.loss.chunk_tokens, vocab_limit=s.tokens)
        loss = w["kd"] * out["kd"] + w["ce"] * out["ce"]
        grads[form] = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
        kd[form], ce = float(out["kd"].detach()), float(out["ce"].detach())
    row = {"step": step + 1, "ce": ce, "kd": kd}
    for form in forms:
        row[f"cosine/{form}"] = {g: _cosine(grads[form], grads["full"], params, g) for g in (*GROUPS, "all")}
    with torch.no_grad():  # where the student's probability is: inside the teacher's top-k or not
        logits = torch.nn.functional.linear(hidden, head.weight, head.bias).float()[:, :s.tokens]
        top = targets[forms[0]] if targets[forms[0]].ids is not None else None
        if top is not None:
            p = torch.softmax(logits, -1).gather(-1, top.ids).sum(-1)
            teacher_p = torch.softmax(full_logits[:, :s.tokens], -1).gather(-1, top.ids).sum(-1)
            m = kd_mask > 0
            row["student_tail_mass"] = float(1 - p[m].mean())
            row["teacher_tail_mass"] = float(1 - teacher_p[m].mean())
    # Only the followed form moves the weights, exactly as train-student would.
    for p, g in zip(params.values(), grads[follow]):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.train.max_grad_norm)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    s.scheduler.step()
    return row


def _cosine(a, b, params, group: str) -> float:
    names = list(params)
    pick = [i for i, n in enumerate(names) if group == "all" or _group(n) == group]
    x = torch.cat([a[i].flatten() for i in pick if a[i] is not None])
    y = torch.cat([b[i].flatten() for i in pick if b[i] is not None])
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0)) if len(x) else math.nan


def _summary(rows: list[dict], forms, follow, cfg, teacher: str) -> str:
    windows = [(a, min(a + 50, len(rows))) for a in range(0, len(rows), 50)]
    lines = ["# KD gradients vs online full KD, on the same batches", "",
             f"Teacher `{teacher}`, cache `{cfg.cache.path}`, seed {cfg.train.seed}; the weights follow the `{follow}` "
             f"form (kd {cfg.curriculum.weights.kd:g}, ce {cfg.curriculum.weights.ce:g}, T={cfg.loss.temperature:g}). "
             "Cosine of each form's loss gradient with full KD's (1 = the same direction), mean over the steps of "
             "each window:", "",
             "| steps | " + " | ".join(f"{f} (all / emb / attn / mlp)" for f in forms) + " | student tail mass | "
             "teacher tail mass | train CE |",
             "|---|" + "---|" * (len(forms) + 3)]
    for a, b in windows:
        part = rows[a:b]

        def mean(key, sub=None, part=part):
            vals = [(r[key][sub] if sub else r[key]) for r in part if key in r]
            vals = [v for v in vals if v == v]
            return sum(vals) / len(vals) if vals else math.nan

        cells = [" / ".join(f"{mean(f'cosine/{f}', g):.3f}" for g in ("all", "embedding", "attention", "mlp")) for f in forms]
        lines.append(f"| {a + 1}-{b} | " + " | ".join(cells) + f" | {mean('student_tail_mass'):.3f} | "
                     f"{mean('teacher_tail_mass'):.3f} | {mean('ce'):.3f} |")
    return "\n".join(lines) + "\n"
