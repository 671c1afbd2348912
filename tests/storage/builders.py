"""Hand-built caches for the storage tests: an identity, a plan and deterministic teacher-like arrays,
written through the real TokenWriter / ShardWriter / finalize, with no teacher model.

Plain functions (not fixtures) so that a child process can import this file to write the same data.
"""

from __future__ import annotations

import numpy as np
import torch

from sad_pipe.storage.codecs import TopKScheme, encode_hidden, encode_topk
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.manifest import Plan, hidden_name, read_commits, shard_arrays
from sad_pipe.storage.writer import ShardWriter, TokenWriter, create_plan, finalize


def make_identity(*, vocab=512, k=8, max_length=8, layers=(1,), hidden_size=16, values="uint8", hidden_dtype="bf16",
                  temperatures=(1.0, 2.0), store_target_logprob=True, sequences_per_shard=8, sequences_per_chunk=4) -> dict:
    """The same fields cache_teacher.plan.cache_identity records, with made-up teacher/tokenizer/dataset facts."""
    return {
        "teacher": {"model": "fake/teacher", "revision": None, "config_sha256": "0" * 64, "architecture": "FakeForCausalLM",
                    "vocab_size": vocab, "hidden_size": hidden_size, "num_layers": max(layers, default=0), "dtype": "float32"},
        "tokenizer": {"name": "fake/teacher", "sha256": "1" * 64, "size": vocab, "bos_token_id": None, "eos_token_id": 0},
        "dataset": {"path": "fake/data", "name": None, "split": "train", "revision": None, "format": "text",
                    "field": "text", "max_documents": None, "eval_fraction": 0.1},
        "packing": {"max_length": max_length, "attention": "documents", "format": "text", "loss_mask": "all",
                    "adds_bos": False, "separator": "eos"},
        "top_k": k, "temperatures": list(temperatures), "layers": list(layers),
        "values": values, "hidden_dtype": hidden_dtype, "store_target_logprob": store_target_logprob,
        "sequences_per_shard": sequences_per_shard, "sequences_per_chunk": sequences_per_chunk,
    }


def token_dtype(identity: dict) -> np.dtype:
    return np.dtype(np.uint16) if identity["tokenizer"]["size"] <= 65536 else np.dtype(np.uint32)


def teacher_like_logits(rng: np.random.Generator, rows: int, k: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (logits, ids) per row, in no particular order: Zipf-like decay with noise, like a trained LM's head."""
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(rows)])
    rank = np.arange(1, k + 1)
    logits = 12.0 - 3.0 * np.log(rank) + rng.normal(0, 0.3, (rows, k))
    return logits.astype(np.float32), ids.astype(np.int64)


def split_data(identity: dict, n: int, seed: int) -> dict[str, np.ndarray]:
    """Every array of `n` sequences as the writer stores it ([n, max_length, ...] in the plan's dtypes),
    plus the token arrays (input_ids, position_ids, loss_mask, doc_span). Deterministic in (identity, n, seed)."""
    rng = np.random.default_rng(seed)
    t, k = identity["packing"]["max_length"], identity["top_k"]
    vocab = identity["teacher"]["vocab_size"]
    rows = n * t
    logits, ids = teacher_like_logits(rng, rows, k, vocab)
    scheme = TopKScheme(k=k, vocab_size=vocab, values=identity["values"])
    out = {name: v.numpy().reshape(n, t, *v.shape[1:])
           for name, v in encode_topk(torch.from_numpy(logits), torch.from_numpy(ids), scheme).items()}
    temps = identity["temperatures"]
    tail = rng.uniform(0.1, 2.0, (rows, len(temps)))  # log of the mass outside the top-k, relative
    lse = np.stack([np.logaddexp.reduce(logits / temp, axis=-1) for temp in temps], -1) + tail
    out["lse"] = lse.astype(np.float32).reshape(n, t, len(temps))
    if identity["store_target_logprob"]:
        out["target_logprob"] = -rng.exponential(3.0, (n, t)).astype(np.float32)
    for layer in identity["layers"]:
        h = torch.from_numpy(rng.normal(0, 2.0, (rows, identity["teacher"]["hidden_size"])).astype(np.float32))
        enc = encode_hidden(h, identity["hidden_dtype"])
        out[hidden_name(layer)] = enc["values"].numpy().reshape(n, t, -1)
        if "scale" in enc:
            out[hidden_name(layer) + "_scale"] = enc["scale"].numpy().reshape(n, t)
    out["input_ids"] = rng.integers(0, identity["tokenizer"]["size"], (n, t)).astype(token_dtype(identity))
    first = np.sort(rng.integers(0, 4 * n, n))
    out["doc_span"] = np.stack([first, first + rng.integers(0, 3, n)], -1).astype(np.int64)
    out["position_ids"] = np.tile(np.arange(t), (n, 1)).astype(np.uint16)
    out["loss_mask"] = np.ones((n, t), dtype=np.uint8)
    return out


def shard_rows(data: dict[str, np.ndarray], start: int, stop: int, names) -> dict[str, np.ndarray]:
    return {name: data[name][start:stop] for name in names}


def make_data(identity: dict, sizes: dict[str, int], seed: int = 0) -> dict[str, dict]:
    """The data of every split, the same in every process for the same arguments."""
    return {split: split_data(identity, n, seed + i) for i, (split, n) in enumerate(sorted(sizes.items()))}


def plan_cache(url: str, identity: dict, sizes: dict[str, int], seed: int = 0) -> tuple[Plan, dict[str, dict]]:
    """Write the packed tokens and plan.json (as cache-teacher does before the teacher runs).
    Returns the plan in force and the data of every split."""
    cache = CacheFS(url)
    per_shard, per_chunk = identity["sequences_per_shard"], identity["sequences_per_chunk"]
    data, splits, tokens = make_data(identity, sizes, seed), {}, {}
    for split, n in sizes.items():
        writer = TokenWriter(cache, split, identity["packing"]["max_length"], token_dtype(identity), per_shard, per_chunk)
        writer.append({name: data[split][name] for name in ("input_ids", "position_ids", "loss_mask", "doc_span")})
        tokens[split] = writer.finish()
        splits[split] = {"sequences": n, "tokens": n * identity["packing"]["max_length"], "documents": 4 * n,
                         "dropped_tokens": 0, "trained_positions": n * identity["packing"]["max_length"],
                         "max_token_id": int(data[split]["input_ids"].max()), "shards": [[a, min(a + per_shard, n)] for a in range(0, n, per_shard)]}
    plan = create_plan(cache, Plan(identity=identity, splits=splits, tokens=tokens))
    return plan, data


def write_shard(url: str, plan: Plan, data: dict, split: str, shard: int, batch: int = 3) -> dict | None:
    """One shard through ShardWriter, fed `batch` sequences at a time like the background writer."""
    cache = CacheFS(url)
    a, b = plan.splits[split]["shards"][shard]
    names = [s.name for s in plan.arrays]
    with ShardWriter(cache, plan, split, shard) as writer:
        for s in range(a, b, batch):
            writer.write(shard_rows(data[split], s, min(s + batch, b), names), {"rows": min(s + batch, b) - s})
        return writer.finish()


def write_missing(url: str, plan: Plan, data: dict) -> int:
    """Write every shard without a commit record (a resume). Returns how many were written."""
    done = read_commits(CacheFS(url))
    todo = [(s, i) for s in plan.splits for i in plan.shard_ids(s) if (s, i) not in done]
    for split, shard in todo:
        write_shard(url, plan, data, split, shard)
    return len(todo)


def build_cache(url: str, identity: dict, sizes: dict[str, int], seed: int = 0) -> dict[str, dict]:
    """A complete cache (tokens, every shard, index, manifest). Returns the data of every split."""
    plan, data = plan_cache(url, identity, sizes, seed)
    write_missing(url, plan, data)
    finalize(CacheFS(url), {"built_by": "tests/storage"})
    return data


def stored_names(identity: dict) -> list[str]:
    return [s.name for s in shard_arrays(identity)]

