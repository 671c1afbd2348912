"""`cache-teacher --dry-run`: count sequences and tokens, project the cache size per array from a small
teacher sample (encoded and compressed exactly as a shard would be), and the hidden-state bytes of each
storage mode (full bf16 / int8, low ranks, the configured positions); write nothing."""

from __future__ import annotations

import numpy as np
import torch

from sad_pipe.pipeline.config import Config
from sad_pipe.pipeline.data import PackedDocuments
from sad_pipe.pipeline.progress import progress_bar
from sad_pipe.stages.cache_teacher.plan import token_dtype
from sad_pipe.stages.cache_teacher.runner import make_runner
from sad_pipe.storage.hidden import CovarianceAccumulator, HiddenBasis, hidden_rank, mode_name
from sad_pipe.storage.manifest import Plan, shard_arrays
from sad_pipe.storage.verify import compressed_bytes_per_token

SAMPLE_SEQUENCES = 8


def dry_run(cfg: Config, tokenizer, teacher, device, identity: dict) -> dict:
    """Count sequences and tokens, then project the cache size per array from a small teacher sample."""
    packed = PackedDocuments(cfg.data, tokenizer, loss_mask=identity["packing"]["loss_mask"])
    sample = []
    counts = {"train": 0, "eval": 0}
    for seq in progress_bar(packed, desc="tokenize+pack (dry run)", unit=" seq"):
        counts[seq.split] += 1
        if len(sample) < SAMPLE_SEQUENCES:
            sample.append(seq)
    tokens = {s: n * cfg.data.max_length for s, n in counts.items()}
    total_tokens = sum(tokens.values())
    per_token = {"input_ids": float(token_dtype(identity).itemsize)}  # uncompressed: an upper bound
    hidden_modes = None
    if teacher is not None and sample:
        runner = make_runner(cfg, teacher, device, identity)
        batch = [torch.from_numpy(np.stack([getattr(q, name) for q in sample]).astype(np.int64)).to(device)
                 for name in ("input_ids", "position_ids", "loss_mask")]
        states = runner.hidden_states(batch[0], batch[1]) if cfg.teacher.layers else {}
        if hidden_rank(identity):  # the real basis needs hidden_fit_tokens; one fitted on the sample sizes it
            runner.basis = _sample_basis(states, batch[1], min(hidden_rank(identity), _width(states)))
        arrays, _ = runner(*batch, split="train", sequences=list(range(len(sample))))
        host = {k: v.cpu().numpy() for k, v in arrays.items()}
        specs = Plan(identity=identity, splits={}).arrays
        per_token.update(compressed_bytes_per_token(host, specs, identity["sequences_per_chunk"], cfg.data.max_length))
        if states:
            hidden_modes = _hidden_modes(cfg, runner, states, batch[1], identity)
    projected = {name: per * total_tokens for name, per in per_token.items()}
    out = {
        "dry_run": True, "sequences": counts, "tokens": tokens,
        "documents": {s: p.documents for s, p in packed.packers.items()},
        "projected_bytes_per_token": {**per_token, "total": sum(per_token.values())},
        "projected_bytes": {**projected, "total": sum(projected.values())},
    }
    if hidden_modes:
        out["hidden_bytes_per_token_per_layer"] = hidden_modes
    return out


def _width(states: dict) -> int:
    return next(iter(states.values())).shape[-1]


def _sample_basis(states: dict, positions: torch.Tensor, rank: int) -> HiddenBasis:
    acc = {}
    for layer, h in states.items():
        acc[layer] = CovarianceAccumulator(h.shape[-1], h.device)
        acc[layer].add(h[positions != 0])
    return HiddenBasis.fit(acc, rank)


def _hidden_modes(cfg: Config, runner, states: dict, positions: torch.Tensor, identity: dict) -> dict[str, float]:
    """Projected hidden-state bytes per token and layer of each way to store them (the sample encoded and
    compressed as a shard would hold it), so a user sees what cache.hidden_rank / hidden_dtype / hidden_positions
    would save before any teacher time is spent. Low ranks use a basis fitted on the sample."""
    width, t = _width(states), cfg.data.max_length
    mode = identity.get("hidden") or {}
    ranks = sorted({r for r in (32, 64, 128, mode.get("rank")) if r and r < width})
    positions_modes = ["all"] + ([mode["positions"]] if mode.get("positions", "all") != "all" else [])
    out = {}
    for where in positions_modes:
        for rank in [None, *ranks]:
            for dtype in ("bf16", "int8"):
                trial = {"rank": rank, "positions": where}
                saved = (runner.hidden, runner.basis, runner.hidden_dtype)
                runner.hidden, runner.hidden_dtype = trial, dtype
                runner.basis = _sample_basis(states, positions, rank) if rank else None
                try:
                    arrays = runner._hidden_arrays(states, "train", list(range(positions.shape[0])))
                finally:
                    runner.hidden, runner.basis, runner.hidden_dtype = saved
                host = {k: v.cpu().numpy() for k, v in arrays.items()}
                specs = [s for s in shard_arrays({**identity, "hidden": trial, "hidden_dtype": dtype})
                         if s.name in host]
                sizes = compressed_bytes_per_token(host, specs, identity["sequences_per_chunk"], t)
                out[mode_name(rank, dtype, where)] = sum(sizes.values()) / len(runner.layers)
    return out
