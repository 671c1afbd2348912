"""Loss components as pure functions. Shapes: N positions (B*T flattened), V vocab, k cached entries,
D width, B batch, T positions per sequence. Every loss is a mean over unmasked positions; an
all-masked batch gives 0, not NaN (`_mean` clamps the count at 1 to avoid 0/0).

The vocabulary-sized part (CE and KD) runs in chunks of positions, each under activation
checkpointing, so no [N, V] fp32 tensor ever exists for the whole batch: peak extra memory is
O(chunk * V) instead of O(N * V) (`sad-pipe bench` measures it at V = 128k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# log(1e-30): a floor for the student's tail log-mass, so a student whose tail mass underflows to 0
# gives a large but finite loss (and gradient) instead of inf.
LOG_FLOOR = math.log(1e-30)


def _mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return total / count.clamp_min(1)


@dataclass
class TeacherTargets:
    """What the teacher says about N positions: the cached top-k (ids, logits, lse at the training T), the
    cached draws (ids and counts), or, for online KD, the full logits."""

    ids: torch.Tensor | None = None  # [N, k] int64; entries with valid=False are ignored
    logits: torch.Tensor | None = None  # [N, k] raw teacher logits (not divided by T)
    lse: torch.Tensor | None = None  # [N] logsumexp(full teacher logits / T); needed by the tail and hybrid forms
    valid: torch.Tensor | None = None  # [N, k] bool; False for ids the student has no logit for
    full_logits: torch.Tensor | None = None  # [N, V] online teacher logits
    draw_ids: torch.Tensor | None = None  # [N, S] int64: distinct ids drawn (sampled: from p_T; hybrid: outside the top-k)
    draw_counts: torch.Tensor | None = None  # [N, S] float: how often (0: an unused slot, or an id the student lacks)

    def rows(self, sl: slice) -> TeacherTargets:
        return TeacherTargets(**{k: None if v is None else v[sl] for k, v in vars(self).items()})

    def top1(self) -> torch.Tensor:
        """The teacher's most likely id per position (for sampled targets: the most drawn one)."""
        if self.full_logits is not None:
            return self.full_logits.argmax(-1)
        if self.ids is not None:
            scores = self.logits.float() if self.valid is None else torch.where(self.valid, self.logits.float(), -torch.inf)
            return self.ids.gather(-1, scores.argmax(-1, keepdim=True)).squeeze(-1)
        return self.draw_ids.gather(-1, self.draw_counts.argmax(-1, keepdim=True)).squeeze(-1)


def _kl_terms(p: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """sum over the last axis of p * (log p - q_log), with 0 * anything = 0."""
    return torch.where(p > 0, p * (torch.log(p.clamp_min(1e-45)) - q_log), 0.0).sum(-1)


def kd_from_logits(student: torch.Tensor, teacher: TeacherTargets, form: str, temperature: float,
                   student_lse: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position T^2 * KL(teacher || student) at temperature T. student: [n, V] logits. Returns [n].
    student_lse: logsumexp(student / T) [n] if the caller already has it (CE at T = 1 does).

    forms:
      subset  - both distributions renormalised over the teacher's top-k (the original trainer's);
      tail    - top-k plus one bucket holding the rest: teacher tail mass from the cached lse,
                student tail log-mass = logsumexp over its non-top-k logits minus its full lse
                (never log(1 - sum p), which cancels catastrophically);
      sampled - the empirical distribution of the cached draws, counts / N: an unbiased estimate of the
                teacher's distribution, so the gradient is that of full KD in expectation (RS-KD);
      hybrid  - the exact top-k, plus the draws from the rest weighted by the rest's exact mass
                (1 - sum of the top-k, from the cached lse) times counts / N: unbiased, with the
                variance of the sampled form only in the tail;
      full    - the full vocabulary (online teacher).
    The sampled and hybrid values are KL(target || student) of that empirical target: >= 0, and their
    gradient with respect to the student is unbiased for full KD.
    Every [n, V] pass costs as much as the student's output layer, so each form makes only those it needs.
    """
    t = temperature
    s = student.float()
    if t != 1.0:
        s = s / t
    if form != "subset" and student_lse is None:
        student_lse = torch.logsumexp(s, dim=-1)
    if form == "full":
        p_log = F.log_softmax(teacher.full_logits.float() / t, dim=-1)
        q_log = s - student_lse.unsqueeze(-1)
        return torch.where(p_log > -torch.inf, p_log.exp() * (p_log - q_log), 0.0).sum(-1) * t * t
    if form == "sampled":
        counts = teacher.draw_counts
        q = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        return _kl_terms(q, s.gather(-1, teacher.draw_ids) - student_lse.unsqueeze(-1)) * t * t
    ids = teacher.ids
    valid = teacher.valid if teacher.valid is not None else torch.ones_like(ids, dtype=torch.bool)
    t_scaled = torch.where(valid, teacher.logits.float() / t, torch.full_like(teacher.logits, -torch.inf, dtype=torch.float32))
    s_k = s.gather(-1, ids)
    if form == "subset":
        p_log = t_scaled - torch.logsumexp(t_scaled, dim=-1, keepdim=True)
        q_log = s_k - torch.logsumexp(torch.where(valid, s_k, -torch.inf), dim=-1, keepdim=True)
        terms = torch.where(valid, p_log.exp() * (p_log - q_log), 0.0)
        return terms.sum(-1) * t * t
    if form not in ("tail", "hybrid"):
        raise ValueError(f"unknown kd form {form!r}")
    p_log = t_scaled - teacher.lse.float().unsqueeze(-1)  # exact teacher log-probs at T (full-vocab normaliser)
    q_log = s_k - student_lse.unsqueeze(-1)
    head = torch.where(valid, p_log.exp() * (p_log - q_log), 0.0).sum(-1)
    p_tail = (-torch.expm1(torch.logsumexp(p_log, dim=-1))).clamp_min(0.0)  # 1 - sum p, accurately near 0
    if form == "hybrid":
        counts = teacher.draw_counts
        w = p_tail.unsqueeze(-1) * counts / counts.sum(-1, keepdim=True).clamp_min(1)
        return (head + _kl_terms(w, s.gather(-1, teacher.draw_ids) - student_lse.unsqueeze(-1))) * t * t
    # The student's logits with its valid top-k entries set to -inf, in one pass: amin with -inf there
    # and +inf for invalid entries, so an invalid entry sharing an id with a valid one cannot undo it.
    hide = torch.where(valid, -torch.inf, torch.inf)
    tail_lse = torch.logsumexp(s.scatter_reduce(-1, ids, hide, reduce="amin"), dim=-1)
    q_tail_log = (tail_lse - student_lse).clamp_min(LOG_FLOOR)
    # No bucket where the top-k covers the student's whole vocabulary (k = V, tail_lse = -inf): the
    # teacher's "tail" there is rounding noise, and noise * (log noise - LOG_FLOOR) would be a spurious term.
    has_tail = (p_tail > 0) & (tail_lse > -torch.inf)
    tail = torch.where(has_tail, p_tail * (torch.log(p_tail.clamp_min(1e-45)) - q_tail_log), 0.0)
    return (head + tail) * t * t


def fit_vocabulary(logits: torch.Tensor, tokens: int, width: int) -> torch.Tensor:
    """Logits [n, V] of one model made to line up with another's `width` rows: the rows past `tokens`
    (len(tokenizer); a padded embedding table) are never a token, so they get -inf, and the table is cut or
    padded with -inf to `width`. Both models' rows below `tokens` mean the same tokens (one tokenizer)."""
    n, v = logits.shape
    out = logits.new_full((n, width), -torch.inf)
    keep = min(tokens, v, width)
    out[:, :keep] = logits[:, :keep]
    return out


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(values * mask), but a masked position contributes 0 even if its value is NaN/Inf."""
    return torch.where(mask > 0, values * mask, 0.0).sum()


def _vocab_chunk(hidden, weight, bias, labels, ce_mask, kd_mask, teacher: TeacherTargets | None,
                 form: str, temperature: float, compute_kd: bool, vocab_limit: int | None):
    """Sums over one chunk of positions: (ce_sum, kd_sum, agree_sum). Recomputed in backward.
    weight None: `hidden` holds the student's logits already."""
    logits = (hidden if weight is None else F.linear(hidden, weight, bias)).float()  # [n, V]
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:  # padded rows: in no softmax, never argmax
        logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= vocab_limit, -torch.inf)
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ce_sum = _masked_sum(lse - target, ce_mask)
    zero = logits.new_zeros(())
    if teacher is None:
        return ce_sum, zero, zero
    kd_sum = zero
    if compute_kd:
        kd_sum = _masked_sum(kd_from_logits(logits, teacher, form, temperature, lse if temperature == 1.0 else None), kd_mask)
    with torch.no_grad():
        agree = _masked_sum((logits.argmax(-1) == teacher.top1()).float(), kd_mask)
    return ce_sum, kd_sum, agree


def vocab_losses(hidden: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, labels: torch.Tensor,
                 ce_mask: torch.Tensor, kd_mask: torch.Tensor, teacher: TeacherTargets | None, *, form: str,
                 temperature: float, chunk_tokens: int, compute_kd: bool = True,
                 vocab_limit: int | None = None, counts: tuple[float, float] | None = None) -> dict[str, torch.Tensor]:
    """CE and KD through the student's output layer, chunk by chunk.

    hidden [N, D] (final student states), weight [V, D] (+ bias [V]): the LM head, applied per chunk; or
    hidden [N, V] the student's logits, weight None (a model whose forward made them already).
    labels [N] (next-token ids, -1 where none), ce_mask / kd_mask [N] float.
    Returns {"ce"; with a teacher also "agreement" (fraction of kd_mask positions where the student's
    argmax is the teacher's top-1) and, unless compute_kd is false, "kd"}. compute_kd=False is for a
    KD weight of 0: the cached top-k still gives the agreement metric, the KL is not computed.
    vocab_limit: len(tokenizer); the rows of a padded head past it are left out of every softmax.
    counts: (CE positions, KD positions) to divide by instead of this batch's own: under DDP, the micro-batch's
    count over all ranks divided by their number, so that the gradients DDP averages are those of the global mean.
    """
    want_kd = teacher is not None and compute_kd
    n = hidden.shape[0]
    sums = [hidden.new_zeros((), dtype=torch.float32) for _ in range(3)]
    # Checkpointing pays only with several chunks (one chunk's temporaries are alive at the peak
    # either way); with one chunk it would just recompute the LM head.
    use_ckpt = torch.is_grad_enabled() and hidden.requires_grad and n > chunk_tokens
    for a in range(0, n, chunk_tokens):
        sl = slice(a, a + chunk_tokens)
        args = (hidden[sl], weight, bias, labels[sl], ce_mask[sl], kd_mask[sl], None if teacher is None else teacher.rows(sl))
        if use_ckpt:
            part = checkpoint(_vocab_chunk, *args, form, temperature, want_kd, vocab_limit, use_reentrant=False)
        else:
            part = _vocab_chunk(*args, form, temperature, want_kd, vocab_limit)
        sums = [s + p for s, p in zip(sums, part)]
    ce_count, kd_count = (ce_mask.sum(), kd_mask.sum()) if counts is None else (ce_mask.new_tensor(c) for c in counts)
    out = {"ce": _mean(sums[0], ce_count)}
    if want_kd:
        out["kd"] = _mean(sums[1], kd_count)
    if teacher is not None:
        out["agreement"] = _mean(sums[2].detach(), kd_count)
    return out


def vocab_losses_reference(logits: torch.Tensor, labels: torch.Tensor, ce_mask: torch.Tensor, kd_mask: torch.Tensor,
                           teacher: TeacherTargets | None, *, form: str, temperature: float) -> dict[str, torch.Tensor]:
    """The straightforward version over full [N, V] fp32 logits; used by tests and the benchmark."""
    logp = F.log_softmax(logits.float(), dim=-1)
    ce = -(logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * ce_mask).sum() / ce_mask.sum().clamp_min(1)
    out = {"ce": ce}
    if teacher is not None:
        out["kd"] = (kd_from_logits(logits, teacher, form, temperature) * kd_mask).sum() / kd_mask.sum().clamp_min(1)
    return out


# -- hidden-state losses ------------------------------------------------------------------------------

def standardize(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-token zero mean, unit variance over features: puts states of any model on one scale."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps)


def feature_loss(student: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised MSE. student, target: [B, T, D] (student already projected to the teacher width;
    target already standardised), mask [B, T]. Mean over unmasked tokens of the per-feature MSE."""
    err = (standardize(student) - target.float()).pow(2).mean(-1)
    return _mean((err * mask).sum(), mask.sum())


def routed_feature_loss(projected: dict[int, torch.Tensor], targets: list[torch.Tensor], routing: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """Feature loss against a low-rank cache, where every teacher layer has its own basis, so the layers'
    coefficients live in different coordinates and are never mixed: the mixture is of the per-layer losses.
    projected {layer j: [B, T, R]} (the student state projected into layer j's basis), targets L x [B, T, R]
    (standardised), routing [B, L], mask [B, T]. With a one-hot routing on layer j this is
    feature_loss(projected[j], targets[j], mask)."""
    total = mask.new_zeros((), dtype=torch.float32)
    for j, p in projected.items():
        err = (standardize(p) - targets[j].float()).pow(2).mean(-1)  # [B, T]
        total = total + (routing[:, j].float() * (err * mask).sum(-1)).sum()
    return _mean(total, mask.sum())


def relation_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                  segments: torch.Tensor | None = None) -> torch.Tensor:
    """Token-relation transfer: KL(R_t || R_s), R = softmax(H H^T / sqrt(d)) over the causal past.

    student [B, T, Ds], teacher [B, T, Dt] (any widths: relations are T x T), mask [B, T]; segments [B, T]
    (optional) numbers the documents of a packed sequence: a token relates only to its own document's past.
    States are standardised first so the temperature sqrt(d) means the same for both models."""
    b, t, _ = student.shape
    causal = torch.ones(t, t, dtype=torch.bool, device=student.device).tril()
    keys = causal.unsqueeze(0) & mask.bool().unsqueeze(1)  # [B, T, T]
    if segments is not None:
        keys = keys & (segments.unsqueeze(2) == segments.unsqueeze(1))

    def log_relations(h: torch.Tensor) -> torch.Tensor:
        h = standardize(h)
        scores = h @ h.transpose(1, 2) / math.sqrt(h.shape[-1])
        return torch.log_softmax(scores.masked_fill(~keys, -torch.inf), dim=-1)

    p_log, q_log = log_relations(teacher), log_relations(student)
    kl = torch.where(keys, p_log.exp() * (p_log - q_log), 0.0).sum(-1)  # [B, T]
    return _mean((kl * mask).sum(), mask.sum())


def balance_loss(routing: torch.Tensor) -> torch.Tensor:
    """KL(mean routing || uniform) over teacher layers; routing [S, B, L] (S student layers).

    Zero when the teacher layers are used equally on average, so single student layers may still
    specialise; it only stops the whole router collapsing onto one teacher layer."""
    usage = routing.float().mean(dim=(0, 1))
    n = usage.shape[-1]
    return (usage * (usage * n).clamp_min(1e-12).log()).sum()
