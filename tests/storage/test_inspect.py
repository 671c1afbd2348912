"""`sad-pipe inspect --json`: every figure recomputed here from the files of the cache itself."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import cache_config, cli

from sad_pipe.storage.codecs import decode_topk, torch_view
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.manifest import cache_id, read_plan
from sad_pipe.storage.reader import CacheReader

from .builders import make_identity, plan_cache, write_shard


def inspect_json(url: str) -> dict:
    out = cli("inspect", "--json", url).output
    return json.loads(out[out.index("{"):out.rindex("}") + 1])


def file_sizes(root: str) -> dict[str, int]:
    return {os.path.relpath(os.path.join(d, f), root): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(root) for f in files}


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory, assets):
    """A small real cache: the tiny llama teacher over a few stdlib documents, through the real CLI."""
    tmp = tmp_path_factory.mktemp("inspect")
    config = cache_config(tmp, assets, data={"max_documents": 6, "max_length": 32, "eval_fraction": 0.5},
                          cache={"top_k": 16, "sequences_per_shard": 16, "sequences_per_chunk": 8})
    cli("-q", "cache-teacher", "--config", config, "--set", "teacher.layers=[1]", "--set", "teacher.batch_size=8")
    return str(tmp / "cache")


def test_inspect_json_reports_identity_counts_and_sizes(teacher_cache, assets):
    report = inspect_json(teacher_cache)
    plan = read_plan(CacheFS(teacher_cache))
    assert report["complete"] is True and report["cache_id"] == cache_id(plan.identity)
    assert report["teacher"].startswith(f"{assets['llama']} (LlamaForCausalLM, vocab 512, 2 layers x 32")
    assert report["tokenizer"].endswith(f"(512 tokens, sha256 {plan.identity['tokenizer']['sha256'][:12]})")
    assert report["dataset"] == "docs.jsonl"
    assert (report["top_k"], report["values"], report["temperatures"], report["layers"], report["hidden_dtype"],
            report["max_length"]) == (16, "uint8", [1.0, 2.0], [1], "bf16", 32)

    reader = CacheReader(teacher_cache)
    splits = sorted(plan.splits)
    assert splits == ["eval", "train"]
    assert report["sequences"] == {s: reader.sequences(s) for s in splits}
    assert all(n > 0 for n in report["sequences"].values())
    assert report["tokens"] == {s: 32 * reader.sequences(s) for s in splits}
    commit_files = os.listdir(os.path.join(teacher_cache, "commits"))
    shards = sum(len(reader.manifest["shards"][s]) for s in splits)
    assert report["shards"] == {"planned": shards, "committed": len(commit_files), "missing": 0}
    assert shards == len(commit_files) == sum(-(-reader.sequences(s) // 16) for s in splits)

    sizes = file_sizes(teacher_cache)
    assert report["bytes_on_disk"] == sum(sizes.values())
    tokens = sum(report["tokens"].values())
    per_array = {"input_ids": sum(v for k, v in sizes.items() if k.startswith("tokens/"))}
    for path, size in sizes.items():
        parts = path.split(os.sep)
        if parts[0] == "shards" and len(parts) > 4:  # shards/<split>/<shard dir>/<array>/...
            per_array[parts[3]] = per_array.get(parts[3], 0) + size
    assert report["bytes_per_token_by_array"] == pytest.approx({k: v / tokens for k, v in per_array.items()})
    data_bytes = sum(v for k, v in sizes.items() if k.startswith(("tokens/", "shards/")))
    assert report["bytes_per_token"] == pytest.approx(data_bytes / tokens)


def test_inspect_top_k_mass_matches_the_mass_recomputed_from_the_cached_arrays(teacher_cache):
    """mass_T = exp(logsumexp(top-k logits / T) - lse_T) per token, averaged over every trained token. The
    teacher measured it on exact logits; the cache holds them to within step/2, which moves
    logsumexp(l / T) by at most max_step / (2 T)."""
    report = inspect_json(teacher_cache)
    reader = CacheReader(teacher_cache)
    masses, max_step = [], 0.0
    for split in ("eval", "train"):
        for chunk in range(reader.num_chunks(split)):
            got = {k: torch_view(v) for k, v in reader.read_chunk(split, chunk, {"topk", "lse", "input_ids"}).items()}
            trained = got["loss_mask"].bool()  # untrained positions hold no teacher outputs
            logits = decode_topk(got, reader.scheme).logits.double()[trained]
            lse = got["lse"].double()[trained]
            masses.append(torch.stack([torch.exp(torch.logsumexp(logits / t, -1) - lse[..., j])
                                       for j, t in enumerate(reader.temperatures)], -1).reshape(-1, 2))
            max_step = max(max_step, float(got["topk_step"].float().max()))
    mean = torch.cat(masses).mean(0).numpy()
    assert sorted(report["topk_mass"]) == ["T1", "T2"]
    for j, t in enumerate(reader.temperatures):
        reported = report["topk_mass"][f"T{t:g}"]
        assert 0 < reported <= 1
        assert abs(np.log(reported / mean[j])) <= max_step / (2 * t) + 1e-6
    assert report["topk_mass"]["T1"] >= report["topk_mass"]["T2"]  # a higher T spreads mass past the top-k


def test_a_real_cache_verifies_and_its_index_loads_in_datasets(teacher_cache):
    import datasets

    cli("verify", "--full", teacher_cache)
    index = datasets.Dataset.from_parquet(os.path.join(teacher_cache, "index", "train.parquet"))
    assert index.num_rows == CacheReader(teacher_cache).sequences("train")
    assert index[0]["sequence"] == 0 and index[0]["shard"] == 0 and index[0]["tokens"] == 32


def test_inspect_an_unfinished_cache_counts_only_what_is_committed(tmp_path):
    url = str(tmp_path / "cache")
    identity = make_identity(sequences_per_shard=8, sequences_per_chunk=4)
    plan, data = plan_cache(url, identity, {"train": 20})
    write_shard(url, plan, data, "train", 2)  # the 4-row last shard only
    report = inspect_json(url)
    assert report["complete"] is False
    assert report["shards"] == {"planned": 3, "committed": 1, "missing": 2}
    assert report["sequences"] == {"train": 20} and report["tokens"] == {"train": 160}
    sizes = file_sizes(url)
    record_dir = json.load(open(os.path.join(url, "commits", "train-00002.json")))["dir"]
    topk_ids = sum(v for k, v in sizes.items() if k.startswith(os.path.join(record_dir, "topk_ids") + os.sep))
    assert report["bytes_per_token_by_array"]["topk_ids"] == pytest.approx(topk_ids / (4 * 8))
    assert "topk_mass" not in report  # the writer here records no teacher statistics


def test_inspect_refuses_a_directory_that_is_not_a_cache(tmp_path):
    assert "not a sad-pipe cache (no plan.json)" in cli("inspect", str(tmp_path), expect=1).output
