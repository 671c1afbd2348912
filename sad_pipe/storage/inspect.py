"""`sad-pipe inspect`: what a cache holds, from its manifest (or plan + commits while incomplete)."""

from __future__ import annotations

from sad_pipe.errors import CacheError
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.manifest import cache_id, missing_shards, read_commits, read_plan


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
    if cache.exists("manifest.json"):
        summary = cache.read_json("manifest.json")["summary"]
        out["bytes_per_token"] = summary["bytes_per_token"]
        out["bytes_per_token_by_array"] = summary["bytes_per_token_by_array"]
        if "topk_mass" in summary:
            out["topk_mass"] = summary["topk_mass"]
        for key in ("teacher_train_ce", "teacher_eval_ce", "teacher_eval_top1"):
            if key in summary:
                out[key] = summary[key]
        for key in ("wall_seconds", "teacher_tokens_per_second"):
            if summary.get(key) is not None:
                out[key] = summary[key]
    return out
