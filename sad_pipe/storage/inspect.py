"""`sad-pipe inspect`: what a cache holds, from plan.json and the commit records (complete or not)."""

from __future__ import annotations

from sad_pipe.errors import CacheError
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.hidden import KEPT, describe_positions, hidden_mode, mode_name, read_basis
from sad_pipe.storage.manifest import cache_id, hidden_name, missing_shards, read_commits, read_plan


def describe(url: str) -> dict:
    cache = CacheFS(url)
    plan = read_plan(cache)
    if plan is None:
        raise CacheError(f"{url}: not a sad-pipe cache (no plan.json)")
    ident = plan.identity
    teacher = ident["teacher"]
    commits = read_commits(cache)
    missing = missing_shards(plan, commits)
    on_disk = sum(cache.walk_files("").values())
    out = {
        "cache": url,
        "cache_id": cache_id(ident),
        "complete": cache.exists("manifest.json") and not missing,
        "teacher": None if teacher is None else f"{teacher['model']} ({teacher['architecture']}, vocab {teacher['vocab_size']}, "
                                                f"{teacher['num_layers']} layers x {teacher['hidden_size']}, {teacher['dtype']})",
        "tokenizer": f"{ident['tokenizer']['name']} ({ident['tokenizer']['size']} tokens, sha256 {ident['tokenizer']['sha256'][:12]})",
        "dataset": ident["dataset"].get("path") or ", ".join(ident["dataset"].get("files", {})),
        "max_length": ident["packing"]["max_length"],
        "top_k": ident["top_k"],
        "values": ident["values"] if teacher else None,
        "temperatures": ident["temperatures"],
        "layers": ident["layers"],
        "hidden_dtype": ident["hidden_dtype"] if ident["layers"] else None,
        "sequences": {s: v["sequences"] for s, v in plan.splits.items()},
        "tokens": {s: v["tokens"] for s, v in plan.splits.items()},
        "shards": {"planned": sum(len(v["shards"]) for v in plan.splits.values()) if plan.arrays else 0,
                   "committed": len(commits), "missing": len(missing) if plan.arrays else 0},
        "bytes_on_disk": on_disk,
    }
    out.update(bytes_per_token(plan, commits))
    out.update(stored_positions(plan))
    if ident["layers"] and teacher:
        out["hidden"] = hidden_layers(cache, plan, out["bytes_per_token_by_array"])
    mass = topk_mass(ident["temperatures"], commits)
    if mass:
        out["topk_mass"] = mass
    if cache.exists("manifest.json"):
        summary = cache.read_json("manifest.json").get("summary", {})
        for key in ("teacher_train_ce", "teacher_eval_ce", "teacher_eval_top1"):
            if key in summary:
                out[key] = summary[key]
        for key in ("wall_seconds", "teacher_tokens_per_second"):
            if summary.get(key) is not None:
                out[key] = summary[key]
    return out


def bytes_per_token(plan, commits: dict) -> dict:
    """Bytes on disk per token, in total and per array, from the sizes the plan and commit records hold.

    input_ids counts every file of tokens/ (ids, document spans, metadata) over all planned tokens; a
    teacher array counts its own files over the committed tokens; a shard group's own zarr.json counts
    only in the total."""
    all_tokens = sum(v["tokens"] for v in plan.splits.values())
    token_bytes = sum(f["size"] for t in plan.tokens.values() for f in t["files"].values())
    committed_tokens = sum(r["stats"]["tokens"] for r in commits.values())
    per_array: dict[str, int] = {}
    group_bytes = 0
    for record in commits.values():
        for name, info in record["files"].items():
            array, sep, _ = name.partition("/")
            if sep:
                per_array[array] = per_array.get(array, 0) + info["size"]
            else:
                group_bytes += info["size"]
    by_array = {"input_ids": token_bytes / all_tokens if all_tokens else 0.0}
    by_array.update({name: size / committed_tokens for name, size in sorted(per_array.items())})
    total = sum(by_array.values()) + (group_bytes / committed_tokens if committed_tokens else 0.0)
    return {"bytes_per_token": total, "bytes_per_token_by_array": by_array}


def stored_positions(plan) -> dict:
    """How many positions are trained and so hold teacher outputs (the rest, a prompt or a document's last
    token before the next document, are stored as zeros), over all and per split."""
    tokens = sum(v["tokens"] for v in plan.splits.values())
    trained = sum(v.get("trained_positions", v["tokens"]) for v in plan.splits.values())
    return {"stored_positions": trained, "stored_positions_share": trained / tokens if tokens else 0.0}


def topk_mass(temperatures: list[float], commits: dict) -> dict[str, float]:
    """Mean teacher probability inside the cached top-k at each cached T, over the committed trained positions.

    The writer sums each shard's `stats`; stage one records `topk_mass_T<t>` as a sum over positions and
    `positions` as their count."""
    out = {}
    for t in temperatures:
        key = f"topk_mass_T{t:g}"
        records = [r for r in commits.values() if key in r["stats"]]
        positions = sum(r["stats"].get("positions", r["stats"]["tokens"]) for r in records)
        if positions:
            out[f"T{t:g}"] = sum(r["stats"][key] for r in records) / positions
    return out


def hidden_layers(cache: CacheFS, plan, by_array: dict) -> dict:
    """How the hidden states are stored and, per layer, their bytes per token (states + scales, and a share
    of the kept positions) and, for a low-rank cache, the variance its rank explains on the fit sample."""
    ident = plan.identity
    mode = hidden_mode(ident)
    basis = read_basis(cache) if mode["rank"] else None
    layers = {}
    for layer in ident["layers"]:
        name = hidden_name(layer)
        entry = {"bytes_per_token": by_array.get(name, 0.0) + by_array.get(name + "_scale", 0.0)
                 + by_array.get(KEPT, 0.0) / len(ident["layers"])}
        if basis is not None:
            entry["variance_explained"] = basis.variance_explained(layer)
        layers[str(layer)] = entry
    out = {"mode": mode_name(mode["rank"], ident["hidden_dtype"], mode["positions"]),
           "width": mode["rank"] or ident["teacher"]["hidden_size"], "teacher_width": ident["teacher"]["hidden_size"],
           "positions": describe_positions(mode["positions"]), "layers": layers}
    if basis is not None:
        out["fit_states"] = basis.fit_tokens
    return out
