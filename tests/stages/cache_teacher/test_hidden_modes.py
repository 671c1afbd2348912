"""Stage one's hidden-state modes through the real CLI: a low-rank cache (cache.hidden_rank) reconstructs the
teacher's states to the bound its discarded eigenvalues set, resumes to the same bytes with the stored basis
(never refitted), position subsampling stores exactly the kept positions, and the dry run projects the bytes
it writes. A cache at full width and every position keeps the identity it always had."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli
from transformers import AutoModelForCausalLM

from sad_pipe.stages.cache_teacher import plan as plan_module
from sad_pipe.storage.codecs import decode_hidden
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.hidden import BASIS_FILE, KEPT, kept_positions, read_basis
from sad_pipe.storage.inspect import describe
from sad_pipe.storage.reader import CacheReader
from sad_pipe.storage.verify import drop_shards, verify

from .conftest import BATCH, MAX_LENGTH
from .test_stage import assert_refused, assert_same_cache, read_all, reference, run, write_config  # noqa: F401

RANK = 8  # of the tiny teacher's 32


def teacher_states(model_path: str, url: str, split: str) -> tuple[dict[int, torch.Tensor], np.ndarray]:
    """The teacher's own hidden states [S, T, D] of every sequence of the split by a direct forward in the
    cache's batches (the same float operations), and the position ids."""
    reader = CacheReader(url)
    tok = read_all(url, {"input_ids"})[split]
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    parts = []
    for s in range(0, len(tok["input_ids"]), BATCH):
        with torch.inference_mode():
            out = model(input_ids=torch.from_numpy(tok["input_ids"][s:s + BATCH].astype(np.int64)),
                        position_ids=torch.from_numpy(tok["position_ids"][s:s + BATCH].astype(np.int64)),
                        output_hidden_states=True, use_cache=False)
        parts.append({layer: out.hidden_states[layer].float() for layer in reader.layers})
    return {layer: torch.cat([p[layer] for p in parts]) for layer in reader.layers}, tok["position_ids"]


@pytest.fixture(scope="module")
def low_rank(assets, docs_path, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("low_rank")
    config = write_config(root, assets["llama"], docs_path,
                          cache={"hidden_rank": RANK, "hidden_dtype": "fp16", "hidden_fit_tokens": 640})
    run(config)
    return config


def test_default_hidden_settings_keep_the_identity_and_arrays_of_before(reference):
    ident = CacheReader(reference).identity
    assert "hidden" not in ident
    assert not CacheFS(reference).exists(BASIS_FILE)


def test_low_rank_states_reconstruct_to_the_variance_explained_bound(low_rank, assets):
    url = json.loads(Path(low_rank).read_text())["cache"]["path"]
    reader = CacheReader(url)
    basis = read_basis(reader.cache)
    assert reader.hidden_rank == RANK and reader.specs["hidden_1"].per_token == (RANK,)
    states, positions = teacher_states(assets["llama"], url, "train")
    cached = read_all(url, {"hidden"})["train"]
    fit = torch.from_numpy(positions != 0)
    fit &= torch.arange(fit.numel()).reshape(fit.shape) < 640  # the first 640 tokens, document starts left out
    assert basis.fit_tokens == int(fit.sum())
    for layer in reader.layers:
        z = decode_hidden(torch.from_numpy(cached[f"hidden_{layer}"]), None, "fp16")
        np.testing.assert_allclose(z, basis.project(layer, states[layer]), atol=2e-2, rtol=1e-2)
        err = (states[layer] - basis.reconstruct(layer, z)).pow(2).sum(-1)  # [S, T]
        discarded = float(basis.eigenvalues[layer][RANK:].sum())
        # On the fit sample the mean squared residual of a PCA projection is exactly the discarded variance.
        assert float(err[fit].mean()) == pytest.approx(discarded, rel=0.02)
        explained = basis.variance_explained(layer)
        assert explained == pytest.approx(1 - discarded / float(basis.eigenvalues[layer].sum()))
        assert 0.3 < explained < 1  # a rank-8 basis of 32 dims of a random teacher: some, not all
        ortho = basis.bases[layer].T @ basis.bases[layer]
        torch.testing.assert_close(ortho, torch.eye(RANK), atol=1e-5, rtol=0)


def test_a_resumed_low_rank_cache_loads_its_basis_and_writes_the_same_bytes(low_rank, assets, docs_path, tmp_path,
                                                                             monkeypatch):
    url = json.loads(Path(low_rank).read_text())["cache"]["path"]
    other = write_config(tmp_path, assets["llama"], docs_path,
                         cache={"hidden_rank": RANK, "hidden_dtype": "fp16", "hidden_fit_tokens": 640})
    run(other)
    other_url = json.loads(Path(other).read_text())["cache"]["path"]
    first = CacheFS(other_url).read_bytes(BASIS_FILE)
    assert first == CacheFS(url).read_bytes(BASIS_FILE)  # same identity, same basis, byte for byte
    assert_same_cache(other_url, url)
    drop_shards(other_url, [("train", 1), ("eval", 0)])

    def refit(*args, **kwargs):
        raise AssertionError("a resumed run must load the stored basis, not fit another")

    monkeypatch.setattr(plan_module, "fit_basis", refit)
    run(other)
    assert CacheFS(other_url).read_bytes(BASIS_FILE) == first
    assert_same_cache(other_url, url)
    assert verify(other_url, full=True).ok


def test_a_changed_basis_file_is_damage_that_verify_reports(low_rank, tmp_path):
    import shutil

    url = json.loads(Path(low_rank).read_text())["cache"]["path"]
    copy = tmp_path / "copy"
    shutil.copytree(url, copy)
    raw = bytearray((copy / BASIS_FILE).read_bytes())
    raw[-3] ^= 0xFF
    (copy / BASIS_FILE).write_bytes(bytes(raw))
    report = verify(str(copy), full=True)
    assert not report.ok and any(BASIS_FILE in p for p in report.problems["cache"])


def test_a_resume_refuses_a_damaged_basis_in_one_line_and_writes_nothing(low_rank, tmp_path):
    import shutil

    url = json.loads(Path(low_rank).read_text())["cache"]["path"]
    copy = tmp_path / "copy"
    shutil.copytree(url, copy)
    drop_shards(str(copy), [("train", 1)])
    raw = bytearray((copy / BASIS_FILE).read_bytes())
    raw[-3] ^= 0xFF  # one flipped byte: a basis that loads fine, only not the one shard 0 was written with
    (copy / BASIS_FILE).write_bytes(bytes(raw))
    config = json.loads(Path(low_rank).read_text())
    config["cache"]["path"] = str(copy)
    resumed = tmp_path / "resume.json"
    resumed.write_text(json.dumps(config))
    assert_refused(str(resumed), 1, re.escape(f"{BASIS_FILE} does not match its checksum in plan.json"))
    assert not any(p.name.startswith("00001-") for p in (copy / "shards" / "train").iterdir())  # nothing written


def test_inspect_shows_variance_explained_and_bytes_per_layer(low_rank):
    url = json.loads(Path(low_rank).read_text())["cache"]["path"]
    info = describe(url)["hidden"]
    assert info["mode"] == f"rank{RANK}-fp16" and info["width"] == RANK and info["teacher_width"] == 32
    for layer in ("1", "2"):
        assert 0.3 < info["layers"][layer]["variance_explained"] < 1
        # fp16 coefficients: 16 B/token, plus zarr's per-file overhead, large next to this tiny cache's 1,600 tokens
        assert RANK * 2 * 0.8 < info["layers"][layer]["bytes_per_token"] < RANK * 2 * 1.5
    text = cli("inspect", url).output
    assert "variance_explained" in text


@pytest.mark.parametrize("positions, kept", [("every:4", MAX_LENGTH // 4), ("random:0.25", MAX_LENGTH // 4)])
def test_subsampled_positions_store_exactly_the_kept_states(assets, docs_path, tmp_path, positions, kept):
    config = write_config(tmp_path, assets["llama"], docs_path, cache={"hidden_positions": positions})
    run(config)
    url = json.loads(Path(config).read_text())["cache"]["path"]
    reader = CacheReader(url)
    assert reader.specs["hidden_1"].positions == kept
    cached = read_all(url, {"hidden"})["train"]
    states, _ = teacher_states(assets["llama"], url, "train")
    ident = reader.identity["hidden"]["positions"]
    for seq in range(len(cached[KEPT])):
        want = kept_positions(ident, MAX_LENGTH, "train", seq)
        np.testing.assert_array_equal(cached[KEPT][seq], want)
        for layer in reader.layers:
            h = decode_hidden(torch.from_numpy(cached[f"hidden_{layer}"][seq]), None, "bf16")
            torch.testing.assert_close(h, states[layer][seq, want].bfloat16().float(), atol=0.05, rtol=0.02)
    if positions.startswith("random"):
        assert len({tuple(p) for p in cached[KEPT]}) > 1  # drawn per sequence
    assert verify(url, full=True).ok


@pytest.mark.parametrize("value", ["every:0", "random:1.5", "sometimes", "every:two"])
def test_a_bad_hidden_positions_value_is_one_line_naming_the_key(assets, docs_path, tmp_path, value):
    config = write_config(tmp_path, assets["llama"], docs_path, cache={"hidden_positions": value})
    assert_refused(config, 2, re.escape(f"cache.hidden_positions: expected all, every:N (an integer N >= 1) or "
                                        f"random:p (0 < p <= 1), found {value!r}"))
    assert not Path(tmp_path / "cache").exists()


def test_a_rank_above_the_teacher_width_is_refused(assets, docs_path, tmp_path):
    config = write_config(tmp_path, assets["llama"], docs_path, cache={"hidden_rank": 33})
    assert_refused(config, 2, re.escape("cache.hidden_rank 33: larger than the teacher's width (32)"))
    assert not Path(tmp_path / "cache").exists()


@pytest.mark.parametrize("cache", [{"hidden_rank": RANK, "hidden_dtype": "int8"}, {"hidden_positions": "every:4"},
                                   {}])
def test_the_dry_run_projects_the_hidden_bytes_it_writes(assets, docs_path, tmp_path, cache):
    config = write_config(tmp_path, assets["llama"], docs_path, data={"max_length": 64},
                          cache={"hidden_fit_tokens": 4096, "sequences_per_shard": 8, **cache})
    projected = json.loads(run(config, "--dry-run", "--json").stdout)
    run(config)
    url = json.loads(Path(config).read_text())["cache"]["path"]
    written = describe(url)["bytes_per_token_by_array"]
    for name in ("hidden_1", "hidden_2"):
        assert projected["projected_bytes_per_token"][name] == pytest.approx(written[name], rel=0.35), name
    modes = projected["hidden_bytes_per_token_per_layer"]
    assert modes["int8"] < modes["bf16"] and "rank8-int8" not in modes or modes["rank8-int8"] < modes["int8"]
