"""Sampled and hybrid teacher targets through the real CLI: the draws are a function of (seed, split, sequence)
only (the same cache for any batch size), N per trained position, the hybrid's never inside the top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sad_pipe.storage.codecs import decode_samples, decode_topk, torch_view
from sad_pipe.storage.reader import CacheReader

from .test_stage import cache_path, read_all, run, write_config

GROUPS = {"input_ids", "topk", "samples", "tail_samples", "lse"}
TARGETS = {"targets": ["topk", "sampled", "hybrid"], "samples": 24, "top_k": 8}


@pytest.fixture(scope="module")
def sampled_cache(assets, docs_path, tmp_path_factory) -> str:
    config = write_config(tmp_path_factory.mktemp("sampled"), assets["llama"], docs_path, teacher={"layers": []},
                          cache=TARGETS)
    run(config)
    return cache_path(config)


def test_the_draws_do_not_depend_on_the_batch_size(sampled_cache, assets, docs_path, tmp_path):
    config = write_config(tmp_path, assets["llama"], docs_path, teacher={"layers": [], "batch_size": 3}, cache=TARGETS)
    run(config)
    a, b = read_all(sampled_cache, GROUPS), read_all(cache_path(config), GROUPS)
    for split in a:
        for name in ("sample_ids", "sample_counts", "tail_ids", "tail_counts"):
            np.testing.assert_array_equal(a[split][name], b[split][name], err_msg=f"{split}/{name}")


def test_every_trained_position_has_its_draws_and_the_hybrids_lie_outside_the_top_k(sampled_cache):
    r = CacheReader(sampled_cache)
    arrays = read_all(sampled_cache, GROUPS)["train"]
    trained = torch.from_numpy(arrays["loss_mask"]).bool()
    got = {k: torch_view(v) for k, v in arrays.items()}
    top = decode_topk(got, r.scheme)
    for name in ("sample", "tail"):
        ids, counts = decode_samples(got, name)
        assert (counts.sum(-1)[trained] == 24).all() and (counts.sum(-1)[~trained] == 0).all()
        assert ((counts > 0).sum(-1)[trained] >= 2).float().mean() > 0.9  # a flat teacher: many distinct ids
        if name == "tail":
            drawn = ids.unsqueeze(-1) == top.ids.unsqueeze(-2)
            assert not (drawn & (counts > 0).unsqueeze(-1)).any()
    ident = r.identity["targets"]
    assert ident == {"forms": ["topk", "sampled", "hybrid"], "samples": 24, "temperature": 1.0, "seed": 0}


def test_a_cache_of_draws_alone_serves_only_the_sampled_form(assets, docs_path, tmp_path):
    from stages.train_student.helpers import train, train_config

    config = write_config(tmp_path, assets["llama"], docs_path, teacher={"layers": []},
                          cache={"targets": ["sampled"], "samples": 16})
    run(config)
    url = cache_path(config)
    r = CacheReader(url)
    assert not any(name.startswith("topk") for name in r.specs) and "sample_ids" in r.specs
    train(train_config(tmp_path, url, name="sampled", loss={"kd_form": "sampled"}, curriculum={"use_curriculum": False}))
    out = train(train_config(tmp_path, url, name="tail", loss={"kd_form": "tail"}, curriculum={"use_curriculum": False}),
                expect=2).output
    assert "loss.kd_form tail: the cache holds no topk targets" in out
