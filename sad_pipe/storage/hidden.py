"""Hidden states a cache can afford: a low-rank basis per cached layer, and position subsampling.

The identity's optional `hidden` entry (absent for full-width states at every position, so those caches
keep their bytes and their id) says what is stored:
    {"rank": R | null, "fit_tokens": M (with a rank), "positions": "all" | {"every": N} | {"random": p, "seed": s}}

Low rank (`rank` R). Per cached layer L, stage one fits the mean mu_L [D] and the eigendecomposition of
the covariance of the teacher's states (float64, `torch.linalg.eigh`) over the first M tokens of the train
split in plan order, leaving out document starts (position 0: BOS and first-token states are outliers of
LLMs, huge in a few dimensions, and would take the top directions). It keeps the top R eigenvectors U_L
[D, R] (signs fixed: each vector's largest entry is positive) and every eigenvalue, so the variance a
rank explains is known; a shard holds per token only z = U_L^T (h - mu_L), as `hidden_dtype` (int8 with
a per-token scale, bf16 or fp16). h ~ mu_L + U_L z, with an expected squared error equal to the
eigenvalues left out. `hidden_basis.safetensors` in the cache root holds, per layer:
    mean_<L>         [D]    float32
    basis_<L>        [D, R] float32
    eigenvalues_<L>  [D]    float64, descending (of the fit sample's covariance)
and fit_tokens [1] int64, the number of states fitted on. The plan names it with its sha256 like config.json, so
verify checks it, and a resumed run loads it instead of fitting again.

Position subsampling (`positions`): states only at K of each sequence's T positions, ascending:
    every:N   positions 0, N, 2N, ... (K = ceil(T / N))
    random:p  K = max(1, round(p * T)) positions drawn without replacement from a generator seeded by
              (seed, split, sequence) only, so a shard's content never depends on batch size or ranks.
Those shards hold hidden_<L> as [sequences, K, width] and `kept_positions` [sequences, K] (uint16/uint32):
the loader hands the positions to the losses, which use only those.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from sad_pipe.errors import CacheError

BASIS_FILE = "hidden_basis.safetensors"
KEPT = "kept_positions"


def hidden_mode(identity: dict) -> dict:
    """The identity's hidden entry, with its defaults: {"rank": None, "positions": "all"} for a plain cache."""
    return identity.get("hidden") or {"rank": None, "positions": "all"}


def hidden_rank(identity: dict) -> int | None:
    return hidden_mode(identity)["rank"]


def positions_subsampled(identity: dict) -> bool:
    return hidden_mode(identity)["positions"] != "all"


def kept_count(positions, max_length: int) -> int:
    """K: the positions per sequence whose states are stored."""
    if positions == "all":
        return max_length
    if "every" in positions:
        return -(-max_length // positions["every"])
    return max(1, min(max_length, round(positions["random"] * max_length)))


def kept_positions(positions, max_length: int, split: str, sequence: int) -> np.ndarray:
    """The ascending positions [K] (int64) of one sequence whose states are stored."""
    if positions == "all":
        return np.arange(max_length, dtype=np.int64)
    if "every" in positions:
        return np.arange(0, max_length, positions["every"], dtype=np.int64)
    key = hashlib.blake2b(f"{positions['seed']}/{split}/{sequence}/hidden".encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(key, "little"))
    return np.sort(rng.choice(max_length, kept_count(positions, max_length), replace=False)).astype(np.int64)


def describe_positions(positions) -> str:
    if positions == "all":
        return "all"
    if "every" in positions:
        return f"every:{positions['every']}"
    return f"random:{positions['random']:g}"


# -- the basis ---------------------------------------------------------------------------------------------

class CovarianceAccumulator:
    """Streaming sums (float64) of h and h h^T over rows of one layer's states."""

    def __init__(self, width: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.outer = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        """rows [n, D] (any float dtype)."""
        x = rows.to(self.sum.device, torch.float64)
        self.sum += x.sum(0)
        self.outer += x.T @ x
        self.count += len(x)

    def fit(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean [D], eigenvalues [D] descending, eigenvectors [D, D] as columns), float64 on the CPU."""
        if self.count < 2:
            raise ValueError(f"a hidden-state basis needs at least 2 states to fit, got {self.count}")
        mean = (self.sum / self.count).cpu()
        cov = self.outer.cpu() / self.count - torch.outer(mean, mean)
        cov = (cov + cov.T) / 2
        values, vectors = torch.linalg.eigh(cov)
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
        # eigh's signs are arbitrary: fix them (largest-magnitude entry positive) so a basis has one form.
        pick = vectors.abs().argmax(0)
        signs = torch.sign(vectors[pick, torch.arange(vectors.shape[1])])
        return mean, values, vectors * torch.where(signs == 0, 1.0, signs).to(vectors.dtype)


@dataclass
class HiddenBasis:
    """Per cached layer: mean [D], basis [D, R] (float32), eigenvalues [D] (float64) of the fit sample."""

    means: dict[int, torch.Tensor]
    bases: dict[int, torch.Tensor]
    eigenvalues: dict[int, torch.Tensor]
    fit_tokens: int

    @classmethod
    def fit(cls, accumulators: dict[int, CovarianceAccumulator], rank: int) -> HiddenBasis:
        means, bases, values = {}, {}, {}
        for layer, acc in accumulators.items():
            mean, vals, vecs = acc.fit()
            if rank > len(vals):
                raise ValueError(f"cache.hidden_rank {rank}: larger than the teacher's width ({len(vals)})")
            means[layer], bases[layer], values[layer] = mean.float(), vecs[:, :rank].float().contiguous(), vals
        return cls(means, bases, values, min(a.count for a in accumulators.values()))

    @property
    def rank(self) -> int:
        return next(iter(self.bases.values())).shape[1]

    def variance_explained(self, layer: int, rank: int | None = None) -> float:
        """Share of the fit sample's variance (around its mean) that the top `rank` directions hold."""
        v = self.eigenvalues[layer]
        total = float(v.sum())
        return float(v[:rank or self.rank].sum()) / total if total > 0 else 1.0

    def project(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h [..., D] -> z [..., R] float32, on h's device."""
        mean, basis = self.means[layer].to(h.device), self.bases[layer].to(h.device)
        return (h.float() - mean) @ basis

    def reconstruct(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """z [..., R] -> h [..., D] float32 (for measuring and the dataset API; training never decodes)."""
        mean, basis = self.means[layer].to(z.device), self.bases[layer].to(z.device)
        return z.float() @ basis.T + mean

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        tensors = {"fit_tokens": np.asarray([self.fit_tokens], dtype=np.int64)}
        for layer in sorted(self.bases):
            tensors[f"mean_{layer}"] = self.means[layer].numpy()
            tensors[f"basis_{layer}"] = self.bases[layer].numpy()
            tensors[f"eigenvalues_{layer}"] = self.eigenvalues[layer].numpy()
        return save(tensors)

    @classmethod
    def from_bytes(cls, data: bytes) -> HiddenBasis:
        from safetensors.numpy import load

        t = load(data)
        layers = sorted(int(k.removeprefix("basis_")) for k in t if k.startswith("basis_"))
        return cls({l: torch.from_numpy(t[f"mean_{l}"].copy()) for l in layers},
                   {l: torch.from_numpy(t[f"basis_{l}"].copy()) for l in layers},
                   {l: torch.from_numpy(t[f"eigenvalues_{l}"].copy()) for l in layers}, int(t["fit_tokens"][0]))


def read_basis(cache, expected: dict | None = None) -> HiddenBasis | None:
    """The cache's basis (a CacheFS), or None for a cache without one. expected: its plan.json record
    ({"sha256": ...}); a file that does not match it is damage, refused rather than used (a resumed stage one
    would encode the rest of the cache in another basis than its first shards)."""
    if not cache.exists(BASIS_FILE):
        return None
    data = cache.read_bytes(BASIS_FILE)
    if expected is not None and hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise CacheError(f"cache {cache.url}: {BASIS_FILE} does not match its checksum in plan.json: damaged or replaced "
                         "since the cache was planned; restore it (its shards were written with it) or start the cache afresh")
    return HiddenBasis.from_bytes(data)


def encode_states(h: torch.Tensor, dtype: str, basis: HiddenBasis | None = None, layer: int | None = None,
                  keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One layer's states h [B, T, D] as a shard stores them: at the kept positions keep [B, K] (None: all),
    as basis coefficients when `basis` is given, encoded as `dtype` (codecs.encode_hidden).
    Returns {"values": [B, K, width], "scale": [B, K] (int8 only)}, on h's device."""
    from sad_pipe.storage.codecs import encode_hidden

    if keep is not None:
        h = h.gather(1, keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    if basis is not None:
        h = basis.project(layer, h)
    b, k = h.shape[:2]
    enc = encode_hidden(h.reshape(b * k, -1), dtype)
    out = {"values": enc["values"].reshape(b, k, -1)}
    if "scale" in enc:
        out["scale"] = enc["scale"].reshape(b, k)
    return out


def reconstruction_error(h: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """Relative error ||h - approx|| / ||h|| over all rows, and the mean cosine per row. h, approx [n, D]."""
    h, approx = h.double(), approx.double()
    rel = float((h - approx).norm() / h.norm().clamp_min(1e-30))
    cos = torch.nn.functional.cosine_similarity(h, approx, dim=-1)
    return {"relative_error": rel, "cosine": float(cos.mean()), "cosine_min": float(cos.min())}


def mode_name(rank: int | None, dtype: str, positions) -> str:
    """A short name of one way to store hidden states, e.g. `rank64-int8`, `bf16 every:4`."""
    name = f"rank{rank}-{dtype}" if rank else dtype
    return name if positions == "all" else f"{name} {describe_positions(positions)}"
