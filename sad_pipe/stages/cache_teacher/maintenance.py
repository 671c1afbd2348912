"""Checking and repairing an existing cache: storage's verify plus what only the pipeline knows (how to
load a tokenizer; how to re-create a shard through the teacher)."""

from __future__ import annotations

import logging
import os

from sad_pipe.pipeline.config import validate
from sad_pipe.pipeline.fingerprint import describe_change
from sad_pipe.pipeline.models import content_fingerprint
from sad_pipe.stages.cache_teacher.stage import run
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.verify import VerifyReport, drop_shards, verify

log = logging.getLogger(__name__)


def verify_cache(url: str, full: bool = False) -> VerifyReport:
    """storage.verify; with `full`, also whether the teacher at the path the cache names is still the one it
    was built from (a teacher deleted since is fine: stage two never needs it; one replaced is not, since a
    repair or a resume would then mix two teachers)."""
    report = verify(url, full=full)
    teacher = CacheFS(url).read_json("plan.json")["identity"].get("teacher") if full else None
    if teacher and teacher.get("fingerprint") and os.path.isdir(os.path.expanduser(teacher["model"])):
        change = describe_change(teacher["fingerprint"], content_fingerprint(teacher["model"], teacher.get("revision")))
        if change:
            report.add("teacher", f"{teacher['model']}: no longer the teacher this cache was built from ({change}); "
                                  "repairing or extending the cache with it would mix two teachers")
    return report


def repair_cache(url: str) -> tuple[VerifyReport, list[tuple[str, int]]]:
    """Full verify; if damaged, un-commit the damaged shards and re-create exactly them through the teacher,
    with the resolved config that built the cache (its config.json). Returns (the report after, shards re-created)."""
    report = verify_cache(url, full=True)
    if report.ok:
        return report, []
    damaged = report.damaged_shards()
    raw = CacheFS(url).read_json("config.json")
    raw.setdefault("cache", {})["path"] = url
    cfg = validate(raw, f"{url}/config.json")
    drop_shards(url, damaged)
    log.info("repair: re-creating %d shards: %s", len(damaged), ", ".join(f"{s}/{i}" for s, i in damaged))
    run(cfg)
    return verify_cache(url, full=True), damaged
