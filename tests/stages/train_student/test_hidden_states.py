"""Training from caches with affordable hidden states: a low-rank cache (cache.hidden_rank) trains the
feature and relation phases in R dimensions (the router projects into each teacher layer's basis), and a
position-subsampled cache (cache.hidden_positions) gives exactly the losses of the full cache restricted to
the kept positions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_cache
from safetensors.torch import load_file

from sad_pipe.pipeline.config import load_config
from sad_pipe.stages.train_student import train as train_module
from sad_pipe.stages.train_student.losses import feature_loss, relation_loss
from sad_pipe.storage.codecs import decode_hidden
from sad_pipe.storage.hidden import KEPT

from .helpers import LLAMA_STUDENT, metrics, train, train_config

RANK = 8
KD_CACHE = {"data": {"max_documents": 5, "max_length": 32, "eval_fraction": 0.2},
            "cache": {"top_k": 16, "temperatures": [1.0, 2.0], "sequences_per_shard": 32, "sequences_per_chunk": 8}}
HIDDEN = {"kd": 0.5, "ce": 0.2, "feature": 0.2, "relation": 0.1}


def cache_with(tmp_path_factory, assets, name: str, **hidden) -> str:
    return build_cache(tmp_path_factory.mktemp(name), assets, [1, 2], data=KD_CACHE["data"],
                       cache={**KD_CACHE["cache"], **hidden})


@pytest.fixture(scope="module")
def low_rank_cache(tmp_path_factory, assets) -> str:
    return cache_with(tmp_path_factory, assets, "low_rank", hidden_rank=RANK, hidden_dtype="int8", hidden_fit_tokens=2048)


@pytest.fixture(scope="module")
def every_4_cache(tmp_path_factory, assets) -> str:
    return cache_with(tmp_path_factory, assets, "every_4", hidden_positions="every:4")


def test_a_low_rank_cache_trains_the_curriculum_in_rank_dimensions(tmp_path, low_rank_cache):
    config = train_config(tmp_path, low_rank_cache, train={"max_steps": 6, "eval_steps": 3})
    train(config)
    run = tmp_path / "run"
    rows = metrics(run)
    feature = [r["loss/feature"] for r in rows if "loss/feature" in r]
    relation = [r["loss/relation"] for r in rows if "loss/relation" in r]
    assert feature and relation and all(torch.isfinite(torch.tensor(feature + relation)))
    router = load_file(run / "router.safetensors")
    projections = {k: v.shape for k, v in router.items() if k.startswith("projections.")}
    # two matched student layers x two teacher layers, each [R, d_student]: nothing is at the teacher's width
    assert len(projections) == 4 and set(projections.values()) == {torch.Size([RANK, LLAMA_STUDENT["hidden_size"]])}
    assert json.loads((run / "result.json").read_text())["eval/feature"] > 0


def _setup(tmp_path: Path, cache: str, name: str):
    return train_module.setup(load_config(train_config(tmp_path, cache, name)))


def test_subsampled_positions_give_the_full_caches_losses_over_the_kept_positions(tmp_path, kd_cache, every_4_cache):
    full, sub = _setup(tmp_path, kd_cache, "full"), _setup(tmp_path, every_4_cache, "sub")
    sub.core.load_state_dict(full.core.state_dict())
    order, last = np.arange(full.train_set.n), 3  # micro-batch 3 of 4: in the phase that reads hidden states
    batch_full, batch_sub = full.train_set.batch(order, 0, last), sub.train_set.batch(order, 0, last)
    assert torch.equal(batch_full["sequence_ids"], batch_sub["sequence_ids"])
    keep = batch_sub[KEPT].long()
    assert torch.equal(keep[0], torch.arange(0, 32, 4))
    with torch.no_grad():
        got = train_module.batch_losses(sub, batch_sub, HIDDEN)
        # the full cache's states, with the hidden-state losses masked to the kept positions
        mask = torch.zeros(keep.shape[0], 32).scatter_(1, keep, 1.0)
        states_t = [decode_hidden(batch_full[f"hidden_{l}"], None, "bf16") for l in full.reader.layers]
        ids, positions = batch_full["input_ids"].long(), batch_full["position_ids"].long()
        _, states, (projected, targets, _) = full.core(ids, positions, full.student_layers, states_t, mask)
        want_feature = sum(feature_loss(p, t, mask) for p, t in zip(projected, targets)) / len(projected)
        segments = (positions == 0).cumsum(-1)
        pairs = full.core.router.fixed_map.tolist()
        want_relation = sum(relation_loss(h, states_t[j], mask, segments) for h, j in zip(states, pairs)) / len(states)
    torch.testing.assert_close(got["feature"], want_feature, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["relation"], want_relation, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and they differ from the losses over every position
        every = train_module.batch_losses(full, batch_full, HIDDEN)
    assert abs(float(every["relation"]) - float(got["relation"])) > 1e-4


def test_the_dataset_api_refuses_a_low_rank_cache_with_one_line(low_rank_cache):
    from sad_pipe.dataset import open_cache
    from sad_pipe.errors import CacheError

    with pytest.raises(CacheError, match=r"stores hidden states as rank-8 basis coefficients at positions all"):
        open_cache(low_rank_cache).dataset("train", layers=[1])
    assert len(open_cache(low_rank_cache).dataset("train", topk=True)) > 0  # the rest of it serves as before
