"""Stage one: run the teacher once over the data and fill the cache.

    run(config) -> summary
      1. tokenizer + teacher; the cache identity (teacher, tokenizer, data, packing, k, layers, dtypes)
      2. plan: reuse the existing one (same identity) or tokenize + pack into tokens/ and plan.json; a
         low-rank cache (cache.hidden_rank) first fits its hidden-state basis on the first train tokens
         (basis.py), which the plan then names: a resumed run loads it
      3. every uncommitted shard: teacher forward -> top-k, logsumexp, hidden states on the device ->
         host -> encode, write and commit in a background thread, behind the next forward
      4. finalize: per-sequence index, then manifest.json (last, only when every shard is committed)

Re-running the same command resumes: committed shards are skipped, leftovers are deleted first.
Without a teacher (`teacher.model: null`) the cache holds tokens only, which is how the demo trains
its teacher with the same train-student path. Under torchrun, rank 0 plans and every rank writes the
shards whose id is its rank modulo the world size.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from sad_pipe.errors import CacheError
from sad_pipe.pipeline import distributed
from sad_pipe.pipeline.config import Config
from sad_pipe.pipeline.progress import progress_bar
from sad_pipe.stages.cache_teacher.dry_run import dry_run as plan_only
from sad_pipe.stages.cache_teacher.plan import (
    TOKENIZED,
    cache_identity,
    check_free_space,
    create,
    load_teacher,
    open_cache,
    tokenize_share,
    tokenized_batches,
)
from sad_pipe.stages.cache_teacher.runner import TeacherRunner, make_runner
from sad_pipe.stages.cache_teacher.sink import ShardSink, TeacherOutputError
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.hidden import BASIS_FILE, hidden_rank, read_basis
from sad_pipe.storage.inspect import bytes_per_token, stored_positions, topk_mass
from sad_pipe.storage.manifest import Plan, cache_id, missing_shards, read_commits, read_plan
from sad_pipe.storage.verify import collect_garbage
from sad_pipe.storage.writer import ShardWriter, finalize

log = logging.getLogger(__name__)


def run(cfg: Config, *, dry_run: bool = False) -> dict:
    """Stage one. Returns the cache summary (also saved in the manifest)."""
    cfg.require("data.path", "cache.path")
    start = time.perf_counter()
    tokenizer, teacher, device, tok_name = load_teacher(cfg)
    identity = cache_identity(cfg, tokenizer, teacher, tok_name)
    if dry_run:
        return plan_only(cfg, tokenizer, teacher, device, identity)
    rank, world = distributed.rank(), distributed.world_size()
    cache, plan = open_cache(cfg, identity)
    if cache.exists("manifest.json") and plan is not None:
        log.info("cache %s is complete; nothing to do", cfg.cache.path)
        return {**cache.read_json("manifest.json")["summary"], "already_complete": True}
    if rank == 0:  # leftovers of an earlier crash; no other writer runs before the barrier
        collect_garbage(cache, unplanned=plan is None)
    batches = None
    if plan is None and world > 1:  # every rank tokenizes a share of the documents, rank 0 packs them
        distributed.barrier()
        count = tokenize_share(cfg, cache, tokenizer, rank, world)
        distributed.barrier()
        batches = tokenized_batches(cache, count)
    runner = make_runner(cfg, teacher, device, identity)
    if rank == 0:
        if plan is None:
            plan = create(cfg, cache, tokenizer, identity, batches, runner)
            if batches is not None:
                cache.remove(TOKENIZED)
    distributed.barrier()
    plan = read_plan(cache)
    if runner is not None and hidden_rank(identity):  # the plan's basis, fitted by create: never refitted
        runner.basis = read_basis(cache, plan.files.get(BASIS_FILE))
    missing = missing_shards(plan, read_commits(cache))
    todo = [(s, i) for s, i in missing if i % world == rank]
    figures = {"forward_seconds": 0.0, "fill_seconds": 0.0, "tokens": 0, "committed": 0}
    if rank == 0 and runner is not None:
        check_free_space(cache, plan, missing)
    if runner is not None and todo:
        planned = sum(len(v["shards"]) for v in plan.splits.values())
        log.info("teacher: %d shards to write (%d already committed)", len(todo), planned - len(missing))
        figures = _fill(cfg, cache, plan, runner, todo, rank)
    figures = distributed.sum_figures(figures)
    distributed.barrier()
    commits = read_commits(cache)  # again: every rank has committed its shards since
    summary = _summary(plan, commits, {
        "wall_seconds": time.perf_counter() - start, "teacher_forward_seconds": figures["forward_seconds"],
        "fill_seconds": figures["fill_seconds"],
        "teacher_tokens_per_second": figures["tokens"] / figures["forward_seconds"] if figures["forward_seconds"] else None,
        "cache_id": cache_id(plan.identity),
    })
    if rank == 0:
        if missing_shards(plan, commits):
            raise CacheError(f"{len(missing_shards(plan, commits))} shards are still missing (another rank failed?); "
                             "re-run to finish")
        finalize(cache, summary)
    distributed.barrier()
    return summary


def _fill(cfg: Config, cache: CacheFS, plan: Plan, runner: TeacherRunner, todo: list[tuple[str, int]], rank: int) -> dict:
    """Run the teacher over the planned shards in `todo`; returns timing figures."""
    import zarr

    t_len = plan.identity["packing"]["max_length"]
    total = sum(plan.splits[s]["shards"][i][1] - plan.splits[s]["shards"][i][0] for s, i in todo)
    token_groups = {s: zarr.open_group(store=cache.zarr_store(t["dir"], read_only=True), mode="r", zarr_format=3)
                    for s, t in plan.tokens.items()}
    sink = ShardSink(runner.temperatures, cfg.cache.queue_depth)
    bar = progress_bar(total=total, desc=f"teacher{f' rank {rank}' if distributed.world_size() > 1 else ''}", unit=" seq",
               dynamic_ncols=True, position=rank)
    forward_s, done_tokens, start = 0.0, 0, time.perf_counter()
    current = None
    try:
        for split, shard in todo:
            a, b = plan.splits[split]["shards"][shard]
            current = ShardWriter(cache, plan, split, shard, rank=rank)
            rows = {name: token_groups[split][name][a:b].astype(np.int64) for name in ("input_ids", "position_ids", "loss_mask")}
            for s in range(0, b - a, cfg.teacher.batch_size):
                batch = [torch.from_numpy(rows[name][s:s + cfg.teacher.batch_size]).to(runner.device, non_blocking=True)
                         for name in ("input_ids", "position_ids", "loss_mask")]
                t0 = time.perf_counter()
                arrays, stats = runner(*batch, split=split, sequences=list(range(a + s, a + s + len(batch[0]))))
                forward_s += time.perf_counter() - t0
                sink.submit(current, arrays, stats, np.arange(a + s, a + s + len(batch[0])))
                done_tokens += len(batch[0]) * t_len
                committed_tokens = sum(r["stats"]["tokens"] for r in sink.committed)
                bar.set_postfix_str(f"{done_tokens / (time.perf_counter() - start):,.0f} tok/s"
                                    + (f", {sink.bytes / committed_tokens:,.0f} B/token" if committed_tokens else ""),
                                    refresh=False)  # the bar redraws at its own pace (rate-limited in a log file)
                bar.update(len(batch[0]))
            current = None  # fully submitted: the sink commits it
        sink.close()
    except BaseException:
        if current is not None:  # Ctrl-C or an error mid-shard: that shard is discarded, earlier ones still commit
            sink.discard(current)
        try:
            sink.close()
        except TeacherOutputError as exc:  # the writer's own error explains more than the interrupt
            raise exc from None
        except BaseException as exc:  # noqa: BLE001 - the original error is the one to report
            log.debug("writer error after interrupt: %s", exc)
        raise
    finally:
        bar.close()
    return {"forward_seconds": forward_s, "fill_seconds": time.perf_counter() - start, "tokens": done_tokens,
            "committed": len(sink.committed)}


def _summary(plan: Plan, commits: dict, figures: dict) -> dict:
    """What the manifest records of the run: sizes, the teacher's own CE on each split, top-k mass, timings."""
    sizes = bytes_per_token(plan, commits)
    tokens = sum(s["tokens"] for s in plan.splits.values())
    total = (sum(f["size"] for r in commits.values() for f in r["files"].values())
             + sum(f["size"] for t in plan.tokens.values() for f in t["files"].values()))
    out = {"sequences": {s: v["sequences"] for s, v in plan.splits.items()}, "tokens": tokens, "shards": len(commits),
           "bytes": total, **sizes, **stored_positions(plan), **figures}
    for split in plan.splits:
        st: dict[str, float] = {}
        for (s, _), record in commits.items():
            if s == split:
                for k, v in record["stats"].items():
                    st[k] = st.get(k, 0.0) + v
        if st.get("target_count"):
            out[f"teacher_{split}_ce"] = st["target_nll"] / st["target_count"]
            out[f"teacher_{split}_top1"] = st["target_top1"] / st["target_count"]
    mass = topk_mass(plan.identity["temperatures"], commits)
    if mass:
        out["topk_mass"] = mass
    return out
