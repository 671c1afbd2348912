"""Loss components (stages/train_student/losses.py) against straightforward float64 references.

The references below are written from the definitions (softmax, renormalise, bucket, KL) with no code
shared with losses.py, so a test fails if either the formula or its numerics drift.
"""

from __future__ import annotations

import pytest
import torch

from sad_pipe.stages.train_student.losses import (
    TeacherTargets,
    feature_loss,
    kd_from_logits,
    relation_loss,
    standardize,
    vocab_losses,
    vocab_losses_reference,
)
from sad_pipe.stages.train_student.router import LayerRouter

V = 24  # student vocabulary in these tests


def logits(seed: int, rows: int, vocab: int = V, spread: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * spread


def topk(teacher: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k ids and logits, in a shuffled order (the cache stores ids sorted, not by rank)."""
    values, ids = teacher.topk(k, dim=-1)
    order = torch.stack([torch.randperm(k, generator=torch.Generator().manual_seed(seed + r)) for r in range(len(ids))])
    return ids.gather(-1, order), values.gather(-1, order)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row of probabilities (float64); 0 * log 0 = 0."""
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)


def softmax64(x: torch.Tensor, temperature: float) -> torch.Tensor:
    e = torch.exp(x.double() / temperature - (x.double() / temperature).max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def subset_kl(student, ids, t_logits, temperature):
    """KL at T between the teacher and student distributions renormalised over the teacher's top-k."""
    return kl(softmax64(t_logits, temperature), softmax64(student.gather(-1, ids), temperature))


def bucket_kl(student, teacher_full, ids, temperature):
    """KL at T over the top-k ids plus one bucket holding all the other ids, from full distributions."""
    p, q = softmax64(teacher_full, temperature), softmax64(student, temperature)
    p_head, q_head = p.gather(-1, ids), q.gather(-1, ids)
    p_tail = (1 - p_head.sum(-1, keepdim=True)).clamp_min(0)
    q_tail = (1 - q_head.sum(-1, keepdim=True)).clamp_min(0)
    return kl(torch.cat([p_head, p_tail], -1), torch.cat([q_head, q_tail], -1))


def cached(teacher_full: torch.Tensor, k: int, temperature: float) -> TeacherTargets:
    """What the cache gives for these teacher logits: top-k ids and logits, and the full lse at T."""
    ids, values = topk(teacher_full, k)
    return TeacherTargets(ids=ids, logits=values, lse=torch.logsumexp(teacher_full / temperature, dim=-1))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_subset_is_renormalised_topk_kl_times_t_squared(temperature):
    student, teacher = logits(0, 8), logits(1, 8)
    targets = cached(teacher, 6, temperature)
    got = kd_from_logits(student, targets, "subset", temperature)
    want = temperature ** 2 * subset_kl(student, targets.ids, targets.logits, temperature)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_tail_is_topk_plus_one_bucket_kl_times_t_squared(temperature):
    student, teacher = logits(2, 8), logits(3, 8)
    targets = cached(teacher, 6, temperature)
    got = kd_from_logits(student, targets, "tail", temperature)
    want = temperature ** 2 * bucket_kl(student, teacher, targets.ids, temperature)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_tail_with_k_equal_to_vocab_is_the_full_vocabulary_kl(temperature):
    student, teacher = logits(4, 8), logits(5, 8)
    targets = cached(teacher, V, temperature)
    want = temperature ** 2 * kl(softmax64(teacher, temperature), softmax64(student, temperature))
    got = kd_from_logits(student, targets, "tail", temperature)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    full = kd_from_logits(student, TeacherTargets(full_logits=teacher), "full", temperature)
    torch.testing.assert_close(full.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["subset", "tail"])
def test_identical_teacher_and_student_give_zero(form):
    teacher = logits(6, 8)
    for temperature in (1.0, 2.0):
        kd = kd_from_logits(teacher.clone(), cached(teacher, 6, temperature), form, temperature)
        torch.testing.assert_close(kd, torch.zeros_like(kd), rtol=0, atol=1e-5)


def test_the_t_squared_factor_keeps_the_gradient_scale():
    """T^2 * KL at T: the same logits at T=1 and T=4 give the bare KLs times 1 and 16."""
    student, teacher = logits(7, 4), logits(8, 4)
    for form in ("subset", "tail"):
        at = {t: kd_from_logits(student, cached(teacher, 6, t), form, t).double() for t in (1.0, 4.0)}
        bare = {t: (subset_kl(student, cached(teacher, 6, t).ids, cached(teacher, 6, t).logits, t) if form == "subset"
                    else bucket_kl(student, teacher, cached(teacher, 6, t).ids, t)) for t in (1.0, 4.0)}
        torch.testing.assert_close(at[1.0] / bare[1.0], torch.ones(4, dtype=torch.float64), rtol=1e-4, atol=0)
        torch.testing.assert_close(at[4.0] / bare[4.0], torch.full((4,), 16.0, dtype=torch.float64), rtol=1e-4, atol=0)


def test_tail_is_finite_when_the_teacher_topk_holds_all_the_mass():
    """A sharp teacher (top-k mass 1 - 1e-30 in fp32): the bucket must not produce log(0) or 0/0."""
    teacher = logits(9, 6, spread=1.0)
    teacher[:, :4] += 80.0
    student = logits(10, 6).requires_grad_()
    targets = cached(teacher, 4, 1.0)
    kd = kd_from_logits(student, targets, "tail", 1.0)
    kd.sum().backward()
    assert torch.isfinite(kd).all() and torch.isfinite(student.grad).all()
    torch.testing.assert_close(kd.detach().double(), bucket_kl(student.detach(), teacher, targets.ids, 1.0),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", ["subset", "tail"])
def test_padded_vocab_entries_marked_invalid_are_ignored(form):
    """Teacher ids the student has no logit for (a padded teacher vocab): valid=False, id clamped by the caller.
    Their teacher mass is renormalised away (subset) or joins the tail bucket (tail)."""
    pad = 4
    teacher = logits(11, 6, vocab=V + pad)
    teacher[:, V:] += 6.0  # the padded ids rank high, so they land in the top-k
    student = logits(12, 6).requires_grad_()
    ids, values = topk(teacher, 8)
    valid = ids < V
    assert (~valid).any() and valid.any(dim=-1).all()
    targets = TeacherTargets(ids=ids.clamp_max(V - 1), logits=values, lse=torch.logsumexp(teacher, -1), valid=valid)
    kd = kd_from_logits(student, targets, form, 1.0)
    kd.sum().backward()
    assert torch.isfinite(kd).all() and torch.isfinite(student.grad).all()
    for r in range(len(ids)):  # the reference sees only the valid entries of the row
        keep = valid[r]
        s_row, ids_row = student.detach()[r:r + 1], ids[r:r + 1, keep]
        if form == "subset":
            want = subset_kl(s_row, ids_row, values[r:r + 1, keep], 1.0)
        else:
            p = softmax64(teacher[r:r + 1], 1.0)
            p_head = p.gather(-1, ids_row)
            q_head = softmax64(s_row, 1.0).gather(-1, ids_row)
            want = kl(torch.cat([p_head, 1 - p_head.sum(-1, keepdim=True)], -1),
                      torch.cat([q_head, 1 - q_head.sum(-1, keepdim=True)], -1))
        torch.testing.assert_close(kd[r].detach().double(), want[0], rtol=1e-4, atol=1e-6)


def batch(n: int, d: int, seed: int):
    """Inputs of vocab_losses: hidden states, an LM head with bias, labels (-1 = none), masks with holes."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    weight = (torch.randn(V, d, generator=g) * 0.5).requires_grad_()
    bias = torch.randn(V, generator=g).requires_grad_()
    labels = torch.randint(0, V, (n,), generator=g)
    labels[::5] = -1
    kd_mask = (torch.rand(n, generator=g) > 0.2).float()
    ce_mask = kd_mask * (labels >= 0).float()
    teacher = torch.randn(n, V, generator=g) * 3
    targets = cached(teacher, 6, 2.0)
    targets.valid = torch.rand(n, 6, generator=g) > 0.1
    return hidden, weight, bias, labels, ce_mask, kd_mask, targets


@pytest.mark.parametrize("form", ["subset", "tail"])
@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 1000])
def test_chunked_vocab_losses_equal_the_reference_in_values_and_gradients(form, chunk):
    hidden, weight, bias, labels, ce_mask, kd_mask, targets = batch(16, 8, seed=13)
    ref = vocab_losses_reference(hidden @ weight.T + bias, labels, ce_mask, kd_mask, targets, form=form, temperature=2.0)
    ref_grads = torch.autograd.grad(ref["ce"] + 0.5 * ref["kd"], (hidden, weight, bias))
    out = vocab_losses(hidden, weight, bias, labels, ce_mask, kd_mask, targets, form=form, temperature=2.0,
                       chunk_tokens=chunk)
    grads = torch.autograd.grad(out["ce"] + 0.5 * out["kd"], (hidden, weight, bias))
    torch.testing.assert_close(out["ce"], ref["ce"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["kd"], ref["kd"], rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_vocab_losses_without_kd_still_report_agreement_and_skip_the_kl():
    hidden, weight, bias, labels, ce_mask, kd_mask, targets = batch(16, 8, seed=14)
    targets.lse = None  # not read from the cache when the KD weight is 0: must not be needed
    out = vocab_losses(hidden, weight, bias, labels, ce_mask, kd_mask, targets, form="tail", temperature=2.0,
                       chunk_tokens=5, compute_kd=False)
    assert "kd" not in out
    logits_ = (hidden @ weight.T + bias).detach()
    t_top = targets.ids.gather(-1, targets.logits.masked_fill(~targets.valid, -torch.inf).argmax(-1, keepdim=True))[:, 0]
    want = ((logits_.argmax(-1) == t_top).float() * kd_mask).sum() / kd_mask.sum()
    torch.testing.assert_close(out["agreement"], want)


def test_all_masked_batch_gives_zero_not_nan():
    hidden, weight, bias, labels, _, _, targets = batch(8, 8, seed=15)
    zero = torch.zeros(8)
    for form in ("subset", "tail"):
        out = vocab_losses(hidden, weight, bias, labels, zero, zero, targets, form=form, temperature=1.0, chunk_tokens=3)
        assert out["ce"].item() == 0.0 and out["kd"].item() == 0.0
        grads = torch.autograd.grad(out["ce"] + out["kd"], (hidden, weight))
        assert all(torch.isfinite(g).all() for g in grads)
    states = torch.randn(2, 5, 8).requires_grad_()
    mask = torch.zeros(2, 5)
    feature = feature_loss(states, standardize(torch.randn(2, 5, 8)), mask)
    relation = relation_loss(states, torch.randn(2, 5, 12), mask)
    assert feature.item() == 0.0 and relation.item() == 0.0
    (grad,) = torch.autograd.grad(feature + relation, states)
    assert torch.isfinite(grad).all()


def test_relation_loss_is_finite_when_a_sequence_starts_masked():
    """Position 0 masked: its row of keys is empty (-inf everywhere); it must contribute 0, not NaN."""
    states = torch.randn(2, 6, 8).requires_grad_()
    mask = torch.ones(2, 6)
    mask[:, 0] = 0
    loss = relation_loss(states, torch.randn(2, 6, 8), mask)
    (grad,) = torch.autograd.grad(loss, states)
    assert torch.isfinite(loss) and loss > 0 and torch.isfinite(grad).all()


def test_feature_and_relation_losses_are_zero_for_identical_states():
    states = torch.randn(2, 7, 16) * 3 + 1
    mask = torch.ones(2, 7)
    mask[1, 5:] = 0
    assert feature_loss(states, standardize(states), mask).item() == pytest.approx(0.0, abs=1e-10)
    assert relation_loss(states, states.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    # Through the router: no projection, fixed map, student states equal to the cached teacher layers.
    router = LayerRouter(16, 16, 2, 2, learned=False, project=False, fixed_map=[0, 1])
    layers = [states, states * 2 - 1]
    projected, targets, routing = router(layers, layers, mask)
    assert all(feature_loss(p, t, mask).item() == pytest.approx(0.0, abs=1e-6) for p, t in zip(projected, targets))
    assert torch.equal(routing, torch.eye(2).unsqueeze(1).expand(2, 2, 2))
    # A different state is not zero (the test could fail).
    assert feature_loss(states.flip(1), standardize(states), mask).item() > 0.1
    assert relation_loss(states.flip(1), states, mask).item() > 1e-3


def test_sampled_and_hybrid_kd_gradients_are_unbiased_and_hybrid_varies_less():
    """E[grad of the sampled/hybrid KL] = grad of the full-vocabulary KL (the point of RS-KD), checked over
    many independent draws; the hybrid's exact head leaves less variance than sampling everything."""
    from sad_pipe.stages.cache_teacher.vocab import draw, top_k
    from sad_pipe.storage.codecs import TopKScheme, decode_samples, encode_samples

    torch.manual_seed(0)
    n, v, k, draws, repeats, t = 3, 200, 8, 16, 600, 1.0
    teacher = torch.randn(n, v) * 3
    student = torch.randn(n, v, requires_grad=True)

    def grad(form: str, targets: TeacherTargets) -> torch.Tensor:
        student.grad = None
        kd_from_logits(student, targets, form, t).sum().backward()
        return student.grad.clone()

    full = grad("full", TeacherTargets(full_logits=teacher))
    vals, ids = top_k(teacher, k)
    lse = torch.logsumexp(teacher / t, -1)
    scheme, work = TopKScheme(k=k, vocab_size=v), torch.empty_like(teacher)
    got = {"sampled": [], "hybrid": []}
    for _ in range(repeats):
        for form, name, exclude in (("sampled", "sample", None), ("hybrid", "tail", ids)):
            u = torch.rand(n, draws).sort(-1).values
            d_ids, counts = decode_samples(encode_samples(draw(teacher, teacher.amax(-1), t, u, work, exclude), name, scheme), name)
            targets = TeacherTargets(ids=ids, logits=vals, lse=lse, draw_ids=d_ids, draw_counts=counts)
            got[form].append(grad(form, targets))
    # d KL(q || s) / d logit_i = s_i - q_i at T=1, so the mean gradient's error is that of the mean of q_i, a
    # binomial share of N * repeats draws: its standard error sqrt(p (1 - p) / (N repeats)) bounds both forms'
    # (the hybrid's tail share has less); for ids of tiny probability, where one draw more or less is the whole
    # error, a few draws' worth, 1 / (N repeats) each.
    p = torch.softmax(teacher / t, -1)
    stderr = (p * (1 - p) / (draws * repeats)).sqrt()
    for form, grads in got.items():
        assert ((torch.stack(grads).mean(0) - full).abs() <= 5 * stderr + 3 / (draws * repeats)).all(), form
    assert torch.stack(got["hybrid"]).var(0).sum() < 0.5 * torch.stack(got["sampled"]).var(0).sum()


def test_routed_feature_loss_is_the_feature_loss_of_the_chosen_layer_and_mixes_per_layer_losses():
    from sad_pipe.stages.train_student.losses import routed_feature_loss

    g = torch.Generator().manual_seed(0)
    b, t, r = 3, 5, 4
    projected = {j: torch.randn(b, t, r, generator=g) for j in range(2)}
    targets = [standardize(torch.randn(b, t, r, generator=g)) for _ in range(2)]
    mask = (torch.rand(b, t, generator=g) > 0.3).float()
    one_hot = torch.tensor([[0.0, 1.0]]).expand(b, -1)
    torch.testing.assert_close(routed_feature_loss(projected, targets, one_hot, mask),
                               feature_loss(projected[1], targets[1], mask))
    alpha = torch.tensor([[0.25, 0.75]]).expand(b, -1)  # the same mixture for every sequence: the mixed losses
    torch.testing.assert_close(routed_feature_loss(projected, targets, alpha, mask),
                               0.25 * feature_loss(projected[0], targets[0], mask)
                               + 0.75 * feature_loss(projected[1], targets[1], mask))
