"""The vocabulary pass: what stage one computes from each chunk of [positions, V] logits on the device.

    top_k       the k largest logits per position, ids ascending (the order the codec stores)
    logsumexp   the full-vocabulary logsumexp at each cached temperature (makes the tail mass exact)
    draw        ids drawn from the full distribution (or from outside the top-k), by inverse CDF
    chunk_rows  how many positions one pass takes at a time ([rows, V] buffers, reused)
"""

from __future__ import annotations

import math

import numpy as np
import torch


def chunk_rows(device: torch.device, vocab: int) -> int:
    """Positions per chunk of the vocabulary pass: the head's matmul into a reused [rows, V] buffer,
    then top-k and logsumexp reading it. On a GPU the chunk only bounds memory (256 MB). On a CPU the
    matmul needs rows: measured on 2 cores, a 42-row chunk of a V=49152 head took 2.2 s per 2048
    positions where one matmul took 0.9 s, and 512-1024 rows were the fastest for the whole pass at
    V=8192 and 49152 (the buffer stays reused, so no page faults either)."""
    if device.type == "cpu":
        return max(512, (32 << 20) // (4 * vocab))
    return max(1, (256 << 20) // (4 * vocab))


def _largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices [N, k] of the k largest entries of each row of x [N, M] (CPU), ascending."""
    # torch.topk on a CPU is a scalar selection per row at ~10 ns per entry; numpy's introselect does
    # the same job 2.5-3x faster (measured: 6 vs 16 us for a row of 1365), and its SIMD sort puts the
    # k indices in order for ~0.2 us a row, where the codec's torch sort costs ~4 us.
    a = x.numpy()
    return torch.from_numpy(np.sort(np.argpartition(a, a.shape[1] - k, axis=1)[:, a.shape[1] - k:], axis=1))


def top_k(f: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of the k largest entries of each row of f [N, V], ids ascending (the order the
    codec stores); exact. Ties at the k-th value are broken arbitrarily, as torch.topk does.

    A selection over V per row costs as much as a small teacher's whole output layer on a CPU. Cut
    each row into V/g strided blocks of g entries: the k largest entries lie in the k blocks with the
    largest maxima (a block ranked below them has k maxima above its own), so one vectorised max pass
    and two selections over ~sqrt(kV) entries each replace the selection over V. Block j holds columns
    j, j + width, ..., so with the chosen blocks ascending the candidate columns come out ascending too.
    GPUs select fast enough as is.
    """
    n, vocab = f.shape
    g = round(math.sqrt(vocab / k))
    if f.device.type != "cpu" or g < 2:
        values, ids = f.topk(k, dim=-1, sorted=False)
        ids, order = ids.sort(dim=-1)
        return values.gather(1, order), ids
    width = vocab // g
    block_max = f[:, :g * width].unflatten(1, (g, width)).amax(1)
    blocks = _largest(block_max, k)
    candidates = (blocks.unsqueeze(1) + torch.arange(0, g * width, width).view(1, g, 1)).flatten(1)
    if vocab > g * width:  # the few columns past the last whole block are always candidates
        candidates = torch.cat([candidates, torch.arange(g * width, vocab).expand(n, -1)], dim=1)
    values = f.gather(1, candidates)
    pick = _largest(values, k)
    return values.gather(1, pick), candidates.gather(1, pick)


def logsumexp(f: torch.Tensor, fmax: torch.Tensor, temperatures: list[float], work: torch.Tensor) -> torch.Tensor:
    """logsumexp(f / T) for each T -> [N, len(temperatures)], given the row maxima fmax [N] and a
    scratch tensor `work` shaped like f. A NaN or +inf anywhere in a row makes that row's results NaN.

    work holds exp((f - max) / T) for one T at a time, highest T first, in one fused pass; halving T
    squares it, so the sum at T/2 is a squared norm (one read) where a new exp would cost two passes
    and the exp itself."""
    sums, current = {}, None
    for t in sorted(set(temperatures), reverse=True):
        if current is not None and current == 2 * t:
            if t / 2 in temperatures:  # still needed as the base of the next T
                sums[t] = work.square_().sum(-1)
            else:
                sums[t] = torch.linalg.vector_norm(work, dim=-1).square_()
        else:
            torch.add((fmax / -t).unsqueeze(-1), f, alpha=1.0 / t, out=work).exp_()
            sums[t] = work.sum(-1)
        current = t
    scale = torch.tensor(temperatures, device=f.device)
    return torch.stack([sums[t] for t in temperatures], -1).log_() + fmax.unsqueeze(-1) / scale


def draw(f: torch.Tensor, fmax: torch.Tensor, temperature: float, uniforms: torch.Tensor, work: torch.Tensor,
         exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Ids [N, S] drawn from softmax(f / T) per row of f [N, V], one per uniform in uniforms [N, S] (ascending,
    so the ids come out ascending); with `exclude` [N, k], from the distribution renormalised without those ids
    (the tail of a hybrid target). Exact: the probabilities come from the full logits, as the logsumexp does.

    Inverse CDF in one pass: work <- exp((f - max) / T), zeroed at the excluded ids, cumulated in place
    (accumulated in float64 on a CPU), then each uniform scaled to the row's total is looked up; an id of
    probability 0 (a padded row, an excluded id) is never the first whose cumulative sum exceeds it."""
    torch.add((fmax / -temperature).unsqueeze(-1), f, alpha=1.0 / temperature, out=work).exp_()
    if exclude is not None:
        work.scatter_(1, exclude, 0.0)
    cdf = work.cumsum_(1)
    # u < 1, so u * total < total: the lookup stays inside the row (the clamp only guards rounding).
    ids = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True)
    return ids.clamp_(max=f.shape[1] - 1)
