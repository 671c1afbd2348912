"""Stage one's basis step (a low-rank cache, cache.hidden_rank): fit each cached layer's basis before any
shard is written, from a first teacher pass over the first hidden_fit_tokens tokens of the train split in
plan order. The basis is a function of the identity only (teacher, data, packing, layers, M), so every
machine and every resumed run gets the same one; a resumed run loads the stored basis, never refits.
The math and the file are storage/hidden.py's.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from sad_pipe.pipeline.progress import progress_bar
from sad_pipe.storage.hidden import CovarianceAccumulator, HiddenBasis

log = logging.getLogger(__name__)


def fit_basis(runner, token_group, rank: int, fit_tokens: int, batch_size: int) -> HiddenBasis:
    """token_group: the train split's packed tokens (zarr group with input_ids, position_ids). Fits on the
    states of the first `fit_tokens` tokens (row-major over sequences 0, 1, ...), document starts (position 0)
    left out: BOS and first-token states are outliers that would take the top directions."""
    t_len = token_group["input_ids"].shape[1]
    sequences = min(-(-fit_tokens // t_len), token_group["input_ids"].shape[0])
    acc: dict[int, CovarianceAccumulator] = {}
    bar = progress_bar(total=sequences, desc="fit hidden basis", unit=" seq")
    for a in range(0, sequences, batch_size):
        b = min(a + batch_size, sequences)
        ids, pos = (torch.from_numpy(token_group[name][a:b].astype(np.int64)).to(runner.device)
                    for name in ("input_ids", "position_ids"))
        take = torch.arange(a * t_len, b * t_len, device=runner.device).reshape(b - a, t_len) < fit_tokens
        take &= pos != 0
        for layer, h in runner.hidden_states(ids, pos).items():
            acc.setdefault(layer, CovarianceAccumulator(h.shape[-1], runner.device)).add(h[take])
        bar.update(b - a)
    bar.close()
    basis = HiddenBasis.fit(acc, rank)
    log.info("hidden basis (rank %d, %d states): variance explained %s", rank, basis.fit_tokens,
             ", ".join(f"layer {l} {basis.variance_explained(l):.3f}" for l in sorted(basis.bases)))
    return basis
