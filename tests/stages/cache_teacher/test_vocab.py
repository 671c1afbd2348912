"""The vocabulary pass: exact top-k selection and logsumexp at several temperatures."""

from __future__ import annotations

import pytest
import torch

from sad_pipe.stages.cache_teacher.vocab import logsumexp, top_k


@pytest.mark.parametrize("vocab, k", [(512, 16), (1000, 7), (4099, 256), (70_000, 256), (300, 256), (64, 64)])
def test_top_k_selects_the_k_largest_with_ids_ascending(vocab, k):
    """Exact against torch.topk whatever V and k (blocks, a ragged tail, no blocks at all), ties included:
    k distinct ids, ascending, whose values are the k largest of the row."""
    torch.manual_seed(vocab + k)
    f = torch.randn(33, vocab) * 3
    f[0] = 1.0  # every entry tied
    f[1, ::3] = f[1].max() + 1  # ties at the top, spread over every block
    f[2, -3:] = f[2].max() + 1  # the largest entries in the ragged tail past the last whole block
    values, ids = top_k(f, k)
    assert values.shape == ids.shape == (33, k)
    assert (ids.diff(dim=-1) > 0).all()
    assert torch.equal(values, f.gather(1, ids))
    assert torch.equal(values.sort(dim=-1).values, f.topk(k, dim=-1).values.sort(dim=-1).values)
    untied = slice(3, None)  # distinct random values: the very ids torch.topk picks
    assert torch.equal(ids[untied], f[untied].topk(k, dim=-1).indices.sort(dim=-1).values)


@pytest.mark.parametrize("temperatures", [[1.0], [1.0, 2.0], [2.0, 1.0, 4.0], [0.5, 1.0, 3.0], [1.0, 1.5, 2.0]])
def test_logsumexp_at_each_temperature_and_nan_for_bad_rows(temperatures):
    torch.manual_seed(len(temperatures))
    f = torch.randn(9, 777) * 4
    f[3, 10] = float("-inf")  # a masked-out logit is fine
    f[4, 0], f[5, 1] = float("nan"), float("inf")
    got = logsumexp(f, f.amax(-1), temperatures, torch.empty_like(f))
    good = [0, 1, 2, 3, 6, 7, 8]
    for j, t in enumerate(temperatures):
        torch.testing.assert_close(got[good, j], torch.logsumexp(f[good] / t, -1), rtol=1e-6, atol=1e-5)
    assert got[[4, 5]].isnan().all()


def test_draws_follow_the_teachers_distribution_and_never_an_excluded_or_impossible_id():
    from sad_pipe.stages.cache_teacher.vocab import draw

    torch.manual_seed(3)
    f = torch.randn(2, 50) * 2
    f[:, 40:] = -torch.inf  # padded rows: no probability
    n = 20_000
    u = torch.rand(2, n).sort(-1).values
    for temperature in (1.0, 2.0):
        ids = draw(f, f.amax(-1), temperature, u, torch.empty_like(f))
        assert (ids.diff(dim=-1) >= 0).all() and int(ids.max()) < 40
        p = torch.softmax(f / temperature, -1)
        freq = torch.stack([torch.bincount(row, minlength=50) for row in ids]).float() / n
        assert (freq - p).abs().max() < 4 * (p * (1 - p) / n).sqrt().max() + 1e-3
    head = f.topk(5, -1).indices
    ids = draw(f, f.amax(-1), 1.0, u, torch.empty_like(f), exclude=head)
    assert not (ids.unsqueeze(-1) == head.unsqueeze(1)).any()  # the tail of a hybrid target: never a head id
    rest = torch.softmax(f.scatter(1, head, -torch.inf), -1)
    freq = torch.stack([torch.bincount(row, minlength=50) for row in ids]).float() / n
    assert (freq - rest).abs().max() < 4 * (rest * (1 - rest) / n).sqrt().max() + 1e-3
