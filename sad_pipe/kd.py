"""KD losses on batches of `open_cache(...).dataset(..., **FORM_FIELDS[form])`: train-student's own loss
functions (sad_pipe/stages/train_student/losses.py), fed from a batch instead of the training loop.

    train = cache.dataset("train", **FORM_FIELDS["hybrid"], temperature=1.0)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = kd_loss(logits, batch, form="hybrid", temperature=1.0)           # T^2 * KL(teacher || student)

    losses = kd_losses(batch, hidden=last_hidden_state, head=model.lm_head)  # {"ce", "kd", "agreement"}:
        # the LM head applied chunk by chunk, never a [B, T, V] fp32 tensor (what train-student does)

Forms (the meaning of each is in losses.kd_from_logits): hybrid (the exact top-k plus the cached draws from the
rest: train-student's default), tail (top-k plus one bucket for the exact rest), subset (top-k renormalised),
sampled (the cached draws from the whole distribution). Each is a mean over the batch's loss_mask positions; an
all-masked batch gives 0.
"""

from __future__ import annotations

import torch
from torch import nn

from sad_pipe.stages.train_student.losses import TeacherTargets, feature_loss, relation_loss, vocab_losses
from sad_pipe.storage.manifest import DRAW_ARRAYS

__all__ = ["FORM_FIELDS", "kd_loss", "kd_losses", "feature_loss", "relation_loss", "teacher_targets"]

# The dataset fields each form reads: `cache.dataset(split, **FORM_FIELDS[form], temperature=...)`.
FORM_FIELDS = {"hybrid": {"topk": True, "draws": "hybrid"}, "tail": {"topk": True}, "subset": {"topk": True},
               "sampled": {"draws": "sampled"}}


def teacher_targets(batch: dict[str, torch.Tensor], student_vocab: int, temperature: float,
                    form: str = "hybrid") -> TeacherTargets:
    """The batch's teacher targets for `form` as the loss functions take them, flattened to [B*T, ...].
    topk_logprobs are log p_T (the logsumexp at T already subtracted), so they enter as logits T * log p_T
    with lse 0: the same distribution at T. Ids the student has no logit for (a wider teacher table) are
    masked out: top-k entries invalid, draws of count 0 (as train-student does)."""
    out = TeacherTargets()
    if "topk_ids" in batch:
        ids = batch["topk_ids"].flatten(0, 1)
        logprobs = batch["topk_logprobs"].flatten(0, 1).float()
        out = TeacherTargets(ids=ids.clamp_max(student_vocab - 1), valid=ids < student_vocab,
                             logits=logprobs * temperature, lse=logprobs.new_zeros(logprobs.shape[0]))
    prefix = DRAW_ARRAYS.get(form)
    if prefix is not None:
        ids, counts = batch[f"{prefix}_ids"].flatten(0, 1), batch[f"{prefix}_counts"].flatten(0, 1).float()
        out.draw_counts = torch.where(ids < student_vocab, counts, 0.0)
        out.draw_ids = ids.clamp_max(student_vocab - 1)
    return out


def kd_losses(batch: dict[str, torch.Tensor], *, logits: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
              head: nn.Linear | None = None, form: str = "hybrid", temperature: float = 1.0, vocab_limit: int | None = None,
              chunk_tokens: int = 1024) -> dict[str, torch.Tensor]:
    """CE (next token, where `labels` is not -100) and KD (over `loss_mask`) of a student on a batch.

    The student as logits [B, T, V], or as its last hidden states [B, T, D] and LM head (then the head runs per
    chunk of `chunk_tokens` positions). temperature: the batch's (topk_logprobs are at one T; a different
    value here is refused rather than silently mixing two). vocab_limit: len(tokenizer) (`Cache.vocab_size`)
    for a student whose embedding table is padded: the rows past it get no probability.
    Returns {"ce", "kd", "agreement"} (agreement: share of positions where the student's argmax is the
    teacher's top-1; a metric, no gradient)."""
    if form not in FORM_FIELDS:
        raise ValueError(f"form {form!r}: one of {', '.join(FORM_FIELDS)}")
    if (logits is None) == (hidden is None) or (hidden is not None and head is None):
        raise ValueError("pass the student as logits=..., or as hidden=... with its head=...")
    needs = FORM_FIELDS[form]
    wanted = (["topk_ids"] if needs.get("topk") else []) + ([f"{DRAW_ARRAYS[needs['draws']]}_ids"] if "draws" in needs else [])
    missing = [name for name in wanted if name not in batch]
    if missing:
        asked = ", ".join(f"{k}={v!r}" for k, v in needs.items())
        raise ValueError(f"form {form}: the batch has no {', '.join(missing)}; build the dataset with {asked}")
    batch_temperature = batch["temperature"]
    batch_temperature = float(batch_temperature.flatten()[0]) if torch.is_tensor(batch_temperature) else float(batch_temperature)
    if batch_temperature != temperature:
        raise ValueError(f"temperature {temperature:g}: the batch's teacher targets are at T={batch_temperature:g}; "
                         "build the dataset at the temperature you train at")
    student = logits if logits is not None else hidden
    b, t, width = student.shape
    device = student.device
    labels = batch["labels"].to(device)
    # labels follow the HF convention (position t holds token t; the model shifts): the target of position t is
    # labels[t + 1], and the last position has none.
    next_tokens = torch.cat([labels[:, 1:], labels.new_full((b, 1), -100)], dim=1).reshape(-1)
    ce_mask = (next_tokens != -100).float()
    kd_mask = batch["loss_mask"].to(device).float().reshape(-1)
    weight, bias = (None, None) if logits is not None else (head.weight, head.bias)
    student_vocab = width if logits is not None else head.weight.shape[0]
    teacher = {k: v.to(device) for k, v in batch.items() if k.startswith(("topk_", "tail_", "sample_")) and k != "tail_mass"}
    targets = teacher_targets(teacher, student_vocab, temperature, form)
    return vocab_losses(student.reshape(b * t, width), weight, bias, next_tokens.clamp_min(-1), ce_mask, kd_mask, targets,
                        form=form, temperature=temperature, chunk_tokens=chunk_tokens, vocab_limit=vocab_limit)


def kd_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], *, form: str = "hybrid", temperature: float = 1.0,
            vocab_limit: int | None = None) -> torch.Tensor:
    """T^2 * KL(teacher || student) at T, averaged over the batch's loss_mask positions. logits [B, T, V]."""
    return kd_losses(batch, logits=logits, form=form, temperature=temperature, vocab_limit=vocab_limit)["kd"]
