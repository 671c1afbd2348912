"""`cache-teacher --dry-run`: count sequences and tokens, project the cache size per array from a small
teacher sample (encoded and compressed exactly as a shard would be); write nothing."""

from __future__ import annotations

import numpy as np
import torch

from sad_pipe.pipeline.config import Config
from sad_pipe.pipeline.data import PackedDocuments
from sad_pipe.pipeline.progress import progress_bar
from sad_pipe.stages.cache_teacher.plan import token_dtype
from sad_pipe.stages.cache_teacher.runner import make_runner
from sad_pipe.storage.manifest import Plan
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
    if teacher is not None and sample:
        runner = make_runner(cfg, teacher, device, identity)
        batch = [torch.from_numpy(np.stack([getattr(q, name) for q in sample]).astype(np.int64)).to(device)
                 for name in ("input_ids", "position_ids", "loss_mask")]
        arrays, _ = runner(*batch, split="train", sequences=list(range(len(sample))))
        host = {k: v.cpu().numpy() for k, v in arrays.items()}
        specs = Plan(identity=identity, splits={}).arrays
        per_token.update(compressed_bytes_per_token(host, specs, identity["sequences_per_chunk"]))
    projected = {name: per * total_tokens for name, per in per_token.items()}
    return {
        "dry_run": True, "sequences": counts, "tokens": tokens,
        "documents": {s: p.documents for s, p in packed.packers.items()},
        "projected_bytes_per_token": {**per_token, "total": sum(per_token.values())},
        "projected_bytes": {**projected, "total": sum(projected.values())},
    }
