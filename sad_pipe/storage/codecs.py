"""How teacher outputs become compact integer arrays, and back.

The tricks (sorting, quantising) run in torch on the teacher's device in stage one and on the
student's device in stage two; zarr only ever sees plain integer/float arrays, compressed by Blosc
with a shuffle chosen per array (numcodecs filters inside zarr 3 are outside the v3 spec, and a
Delta filter there measured 1.6x slower to read than doing the same in torch before writing).

Top-k of one token (k entries), `values="uint8"` (the default):
    topk_ids    k x uint16 (uint32 when vocab > 65536): the ids sorted ascending, stored as their gaps
                (the first id, then each id minus the one before). A sorted set of k ids out of V carries
                about log2(V/k) + 1.44 bits per id; its gaps are small numbers the compressor can bring
                close to that, where absolute ids cost their full width (measured in `make bench`).
    topk_values k x uint8, q = round((max - logit) / step), same order as the ids.
    topk_max    float32, the largest logit (exact).
    topk_step   float16, step = max(min_step, span / 255), span = max - min of the k logits;
                adapting per token keeps a peaked teacher's long tail from clipping at 255.
  decoded logit = max - q * step; error <= step / 2 (1/32 nat at the default min_step 1/16,
  KL at T=2 ~ step^2 / (24 T^2) ~ 4e-5).
`values="fp16"` / `"bf16"`: topk_values holds (max - logit) as fp16 / bf16 bits (uint16); no step.

Sampled targets of one token (N draws, `<name>` = `sample` for draws from the whole distribution,
`tail` for draws from outside the top-k):
    <name>_ids     N x uint16/uint32: the distinct ids drawn, ascending, as gaps like topk_ids; the
                   slots past the distinct ones repeat the last id (gap 0)
    <name>_counts  N x uint8: how often each was drawn (0 in the unused slots; they sum to N)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MIN_STEP = 1.0 / 16.0
U8_LEVELS = 255


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer holding every id of a vocabulary: the one rule for token and top-k ids."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def position_dtype(max_length: int) -> np.dtype:
    """Positions within a sequence of max_length tokens."""
    return id_dtype(max_length)


@dataclass(frozen=True)
class TopKScheme:
    """Everything a reader needs to decode the top-k arrays; derived from the cache identity."""

    k: int
    vocab_size: int
    values: str = "uint8"  # uint8 | fp16 | bf16
    min_step: float = MIN_STEP

    @property
    def id_dtype(self) -> np.dtype:
        return id_dtype(self.vocab_size)

    @property
    def value_dtype(self) -> np.dtype:
        return np.dtype(np.uint8) if self.values == "uint8" else np.dtype(np.uint16)


_TORCH_OF = {np.dtype(np.uint8): torch.uint8, np.dtype(np.uint16): torch.uint16,
             np.dtype(np.uint32): torch.uint32, np.dtype(np.int8): torch.int8}


@dataclass
class TopKLogits:
    """A teacher's top-k for a batch of positions: ids [..., k] (int64) and raw logits [..., k] (float32)."""

    ids: torch.Tensor
    logits: torch.Tensor


def encode_topk(logits: torch.Tensor, ids: torch.Tensor, scheme: TopKScheme, *, ids_ascending: bool = False
                ) -> dict[str, torch.Tensor]:
    """logits, ids: [N, k] from torch.topk (any order, or ids ascending when the caller says so: stage
    one's selection already yields them so). Returns the stored arrays, still on the device."""
    if ids_ascending:
        ids_sorted, vals = ids, logits.float()
    else:
        ids_sorted, order = ids.sort(dim=-1)
        vals = logits.float().gather(-1, order)
    vmax = vals.max(dim=-1).values
    gap = vmax.unsqueeze(-1) - vals  # >= 0
    out = {"topk_ids": id_gaps(ids_sorted).to(_TORCH_OF[scheme.id_dtype]), "topk_max": vmax}
    if scheme.values == "uint8":
        span = gap.max(dim=-1).values
        # Round the step to its stored fp16 value *before* quantising, so decode uses the same step.
        step = torch.clamp(span / U8_LEVELS, min=scheme.min_step).half()
        q = torch.round(gap / step.float().unsqueeze(-1)).clamp_(0, U8_LEVELS)
        out["topk_values"] = q.to(torch.uint8)
        out["topk_step"] = step
    elif scheme.values == "fp16":
        out["topk_values"] = gap.half().view(torch.uint16)
    elif scheme.values == "bf16":
        out["topk_values"] = gap.bfloat16().view(torch.uint16)
    else:
        raise ValueError(f"unknown top-k value encoding {scheme.values!r}")
    return out


def decode_topk(arrays: dict[str, torch.Tensor], scheme: TopKScheme, k: int | None = None) -> TopKLogits:
    """Stored arrays ([..., k] and [...]) -> TopKLogits. With k' < k, keeps the k' largest logits."""
    vmax = arrays["topk_max"].float().unsqueeze(-1)
    values = arrays["topk_values"]
    if scheme.values == "uint8":
        gap = values.float() * arrays["topk_step"].float().unsqueeze(-1)
    elif scheme.values == "fp16":
        gap = values.view(torch.float16).float()
    else:
        gap = values.view(torch.bfloat16).float()
    logits = vmax - gap
    ids = ids_from_gaps(arrays["topk_ids"])
    if k is not None and k < scheme.k:
        logits, pick = logits.topk(k, dim=-1)
        ids = ids.gather(-1, pick)
    return TopKLogits(ids=ids, logits=logits)


def id_gaps(ids: torch.Tensor) -> torch.Tensor:
    """Ascending ids [..., k] (int64) -> the first id, then the differences (all >= 0)."""
    return torch.diff(ids, dim=-1, prepend=torch.zeros_like(ids[..., :1]))


def ids_from_gaps(gaps: torch.Tensor) -> torch.Tensor:
    """Inverse of id_gaps, as int64 (uint16/uint32 bits read as what they are)."""
    return gaps.to(torch.int64).cumsum(-1)


def encode_samples(draws: torch.Tensor, name: str, scheme: TopKScheme) -> dict[str, torch.Tensor]:
    """Draws [n, N] (int64, ascending per row) -> {<name>_ids, <name>_counts}: the distinct ids with how
    often each was drawn, in N slots (the unused ones repeat the last id with count 0)."""
    n, width = draws.shape
    new = torch.ones_like(draws, dtype=torch.bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = new.cumsum(-1) - 1  # the distinct id each draw belongs to
    ids = draws[:, -1:].expand(n, width).clone()  # unused slots repeat the last (largest) id: gap 0
    ids.scatter_(1, slot, draws)
    counts = torch.zeros(n, width, dtype=torch.int64, device=draws.device).scatter_add_(1, slot, torch.ones_like(draws))
    return {f"{name}_ids": id_gaps(ids).to(_TORCH_OF[scheme.id_dtype]), f"{name}_counts": counts.to(torch.uint8)}


def decode_samples(arrays: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """{<name>_ids, <name>_counts} -> (ids int64 [..., N], counts float32 [..., N]; 0 in unused slots)."""
    return ids_from_gaps(arrays[f"{name}_ids"]), arrays[f"{name}_counts"].float()


# -- hidden states -------------------------------------------------------------------------------

HIDDEN_DTYPES = {"bf16": np.dtype(np.uint16), "fp16": np.dtype(np.float16), "int8": np.dtype(np.int8)}


def encode_hidden(h: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """h: [N, D] -> {"values": ..., "scale": ... (int8 only)}. bf16 is stored as its uint16 bits (no bf16 in zarr/numpy)."""
    if dtype == "bf16":
        return {"values": h.to(torch.bfloat16).view(torch.uint16)}
    if dtype == "fp16":
        return {"values": h.to(torch.float16)}
    if dtype == "int8":
        h = h.float()
        scale = (h.abs().amax(dim=-1) / 127.0).clamp_min(1e-12)
        q = torch.round(h / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
        return {"values": q, "scale": scale}
    raise ValueError(f"unknown hidden dtype {dtype!r}")


def decode_hidden(values: torch.Tensor, scale: torch.Tensor | None, dtype: str) -> torch.Tensor:
    """Inverse of encode_hidden, as float32."""
    if dtype == "bf16":
        return values.view(torch.bfloat16).float()
    if dtype == "fp16":
        return values.float()
    return values.float() * scale.float().unsqueeze(-1)


def torch_view(a: np.ndarray) -> torch.Tensor:
    """numpy -> torch without a copy (uint16/uint32 included)."""
    return torch.from_numpy(np.ascontiguousarray(a))


# -- compression per array -----------------------------------------------------------------------
# Measured by `sad-pipe bench storage` (README "Performance"): zstd level 3 with byte-shuffle for
# sorted ids and floats, bit-shuffle for the uint8 gaps; lz4 for hidden states, whose mantissa bits
# barely compress and where zstd costs ~10x the encode time for a few percent.

# Id gaps (sorted random sets of 256 ids, zstd 3): byte-shuffle 177 vs bit-shuffle 189 B/token at V=4096
# (uint16), 379 vs 360 at V=151,936 (uint32); absolute ids took 281 and 515. Counts are small integers.

def compressor_for(name: str, dtype: np.dtype) -> dict:
    if name.startswith("hidden"):
        return {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}
    if (name == "topk_values" and dtype == np.uint8) or name.endswith("_counts"):
        return {"cname": "zstd", "clevel": 3, "shuffle": "bitshuffle"}
    if name.endswith("_ids") and np.dtype(dtype).itemsize == 4:
        return {"cname": "zstd", "clevel": 3, "shuffle": "bitshuffle"}
    return {"cname": "zstd", "clevel": 3, "shuffle": "shuffle"}
