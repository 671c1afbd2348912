"""Planning: tokenizing a share of the documents per rank and merging them gives the single-process stream."""

from __future__ import annotations

import functools

import numpy as np
from transformers import AutoTokenizer

from sad_pipe.pipeline.config import DataConfig, validate
from sad_pipe.pipeline.data import PackedDocuments, document_batches
from sad_pipe.stages.cache_teacher import plan as plan_module
from sad_pipe.storage.fs import CacheFS


def test_per_rank_tokenizing_merges_to_the_single_process_packing(assets, tmp_path, monkeypatch):
    cfg = validate({"data": {"path": assets["data"], "max_length": 64, "eval_fraction": 0.1}})
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    single = list(PackedDocuments(cfg.data, tokenizer))
    # Batches of 7 documents: three ranks each get several, so the merge order really is tested.
    monkeypatch.setattr(plan_module, "document_batches", functools.partial(document_batches, size=7))
    cache = CacheFS(str(tmp_path / "cache"))
    counts = {plan_module.tokenize_share(cfg, cache, tokenizer, rank, 3) for rank in range(3)}
    assert len(counts) == 1 and counts.pop() == -(-60 // 7)  # every rank counted every batch
    written = sorted(cache.listdir(plan_module.TOKENIZED))
    assert len(written) == 9
    merged = list(PackedDocuments(DataConfig(**cfg.data.model_dump()), tokenizer,
                                  batches=plan_module.tokenized_batches(cache, 9)))
    assert len(merged) == len(single) > 10
    for a, b in zip(single, merged):
        assert a.split == b.split and a.doc_span == b.doc_span
        for name in ("input_ids", "position_ids", "loss_mask"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
