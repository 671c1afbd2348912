"""Checking and repairing an existing cache: storage's verify plus what only the pipeline knows (how to
load a tokenizer; how to re-create a shard through the teacher)."""

from __future__ import annotations

import logging

from sad_pipe.pipeline.config import validate
from sad_pipe.pipeline.models import load_tokenizer, tokenizer_fingerprint
from sad_pipe.stages.cache_teacher.stage import run
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.verify import VerifyReport, drop_shards, verify

log = logging.getLogger(__name__)


def _fingerprint_of_saved_tokenizer(path: str) -> str:
    return tokenizer_fingerprint(load_tokenizer(path))


def verify_cache(url: str, full: bool = False) -> VerifyReport:
    """storage.verify, with the cache's tokenizer/ checked against the plan's fingerprint when `full`."""
    return verify(url, full=full, tokenizer_fingerprint=_fingerprint_of_saved_tokenizer)


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
