"""storage/hidden.py: the basis fit (exact on a known spectrum, one form whatever the rank), its file, and
the kept positions (a function of seed, split and sequence only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sad_pipe.storage.hidden import CovarianceAccumulator, HiddenBasis, kept_count, kept_positions, reconstruction_error


def states(n: int = 4000, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, d)  # a decaying spectrum, like trained states
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ q.T + 3.0


def fitted(h: torch.Tensor, rank: int, chunks: int = 1) -> HiddenBasis:
    acc = CovarianceAccumulator(h.shape[1])
    for part in h.chunk(chunks):
        acc.add(part)
    return HiddenBasis.fit({0: acc}, rank)


def test_the_fit_is_the_sample_pca_streamed_or_not_and_every_rank_shares_one_basis():
    h = states()
    b4, b8, streamed = fitted(h, 4), fitted(h, 8), fitted(h, 8, chunks=7)
    torch.testing.assert_close(b8.bases[0][:, :4], b4.bases[0])  # the same basis for every rank
    torch.testing.assert_close(streamed.bases[0], b8.bases[0], atol=1e-5, rtol=0)
    cov = torch.cov(h.T, correction=0)
    torch.testing.assert_close(b8.eigenvalues[0], torch.linalg.eigvalsh(cov).flip(0).clamp_min(0), rtol=1e-6, atol=1e-9)
    z = b8.project(0, h.float())
    err = (h.float() - b8.reconstruct(0, z)).pow(2).sum(-1).mean()
    assert float(err) == pytest.approx(float(b8.eigenvalues[0][8:].sum()), rel=1e-3)
    rec = reconstruction_error(h, b8.reconstruct(0, z))
    assert rec["relative_error"] < 0.05 and rec["cosine"] > 0.99


def test_a_basis_file_round_trips():
    b = fitted(states(), 5)
    back = HiddenBasis.from_bytes(b.to_bytes())
    assert back.fit_tokens == 4000 and back.rank == 5
    for name in ("means", "bases", "eigenvalues"):
        torch.testing.assert_close(getattr(back, name)[0], getattr(b, name)[0], rtol=0, atol=0)
    assert b.to_bytes() == back.to_bytes()


def test_kept_positions_depend_only_on_seed_split_and_sequence():
    every = {"every": 3}
    np.testing.assert_array_equal(kept_positions(every, 10, "train", 5), [0, 3, 6, 9])
    assert kept_count(every, 10) == 4
    rnd = {"random": 0.25, "seed": 7}
    a = kept_positions(rnd, 64, "train", 3)
    assert len(a) == kept_count(rnd, 64) == 16 and (np.diff(a) > 0).all() and a.max() < 64
    np.testing.assert_array_equal(a, kept_positions(rnd, 64, "train", 3))
    assert not np.array_equal(a, kept_positions(rnd, 64, "train", 4))
    assert not np.array_equal(a, kept_positions(rnd, 64, "eval", 3))
    assert not np.array_equal(a, kept_positions({**rnd, "seed": 8}, 64, "train", 3))
