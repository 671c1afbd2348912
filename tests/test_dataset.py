"""The public read API (sad_pipe.dataset, sad_pipe.kd) on a real cache of the tiny Llama teacher: decoded
examples against the stored arrays, the HF view, train-student's order and losses, and damage."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import build_cache

from sad_pipe import FORM_FIELDS, collate, kd_loss, kd_losses, open_cache
from sad_pipe.errors import CacheError
from sad_pipe.stages.train_student.losses import TeacherTargets, vocab_losses_reference
from sad_pipe.storage.codecs import decode_hidden, decode_samples, decode_topk, torch_view
from sad_pipe.storage.reader import CacheDataset, CacheReader, FieldSchedule

TOKEN_FIELDS = ["input_ids", "labels", "loss_mask", "position_ids", "sequence_id"]


def stored(url: str, sequence: int, groups: set[str]) -> dict[str, torch.Tensor]:
    """One sequence's arrays as the cache stores them (the reader train-student uses)."""
    return {k: torch_view(v[0]) for k, v in CacheReader(url).read("train", sequence, sequence + 1, groups).items()}


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, assets) -> str:
    """kd_cache's data with the teacher's draws from its whole distribution only (cache.targets sampled)."""
    return build_cache(tmp_path_factory.mktemp("sampled_cache"), assets, [],
                       data={"max_documents": 5, "max_length": 32, "eval_fraction": 0.2},
                       cache={"targets": ["sampled"], "top_k": 16, "samples": 8, "sequences_per_shard": 32,
                              "sequences_per_chunk": 8})


def test_an_example_is_the_decoded_cache_row_with_only_the_fields_asked_for(kd_cache):
    cache = open_cache(kd_cache)
    assert sorted(cache.dataset("train")[0]) == TOKEN_FIELDS
    train = cache.dataset("train", topk=True, temperature=2.0, layers=[2])
    assert len(train) == cache.splits["train"]
    for i in (37, 5, 200, 6):  # random access by sequence id, across chunks and shards
        ex, raw = train[i], stored(kd_cache, i, {"input_ids", "topk", "lse", "hidden"})
        assert sorted(ex) == sorted(TOKEN_FIELDS + ["hidden_2", "tail_mass", "temperature", "topk_ids", "topk_logprobs"])
        assert ex["sequence_id"] == i
        assert torch.equal(ex["input_ids"], raw["input_ids"].long())
        mask = raw["loss_mask"].bool()
        assert torch.equal(ex["labels"][1:], torch.where(mask[:-1], raw["input_ids"][1:].long(), -100))
        assert ex["labels"][0] == -100
        top = decode_topk(raw, cache.reader.scheme)
        expected = top.logits / 2.0 - raw["lse"][:, 1:2]  # lse at T = 2 (temperatures [1, 2])
        assert torch.equal(ex["topk_ids"][mask], top.ids[mask])
        torch.testing.assert_close(ex["topk_logprobs"][mask], expected[mask], rtol=0, atol=1e-6)
        # the top-k and the tail are the teacher's whole distribution at T
        total = ex["topk_logprobs"].exp().sum(-1) + ex["tail_mass"]
        torch.testing.assert_close(total[mask], torch.ones(int(mask.sum())), rtol=0, atol=1e-5)
        assert ((ex["tail_mass"] > 0) & (ex["tail_mass"] < 1))[mask].all()
        assert torch.equal(ex["hidden_2"], decode_hidden(raw["hidden_2"], None, "bf16"))
    small = cache.dataset("train", topk=True, top_k=4)[37]
    full = cache.dataset("train", topk=True)[37]
    assert small["topk_logprobs"].shape == (cache.max_length, 4)
    torch.testing.assert_close(small["topk_logprobs"], full["topk_logprobs"].topk(4, dim=-1).values)


def test_draws_are_the_cached_ones_decoded_and_the_hybrid_ones_lie_outside_the_top_k(kd_cache, sampled_cache):
    cache = open_cache(kd_cache)
    assert cache.target_forms == ["hybrid", "topk"]  # the default cache.targets
    n = cache.identity["targets"]["samples"]
    train = cache.dataset("train", **FORM_FIELDS["hybrid"])
    for i in (0, 77, 201):
        ex, raw = train[i], stored(kd_cache, i, {"input_ids", "topk", "tail_samples"})
        mask = raw["loss_mask"].bool()
        ids, counts = decode_samples(raw, "tail")
        assert torch.equal(ex["tail_ids"], ids) and torch.equal(ex["tail_counts"], counts)
        assert ex["tail_ids"].shape == (cache.max_length, n) and ex["temperature"] == 1.0
        assert (ex["tail_counts"].sum(-1)[mask] == n).all()  # n draws at every trained position
        drawn = ex["tail_counts"] > 0
        in_top = (ex["tail_ids"].unsqueeze(-1) == ex["topk_ids"].unsqueeze(-2)).any(-1)
        assert drawn[mask].any() and not (drawn & in_top).any()  # the tail draws never hit a top-k id
    sampled = open_cache(sampled_cache).dataset("train", **FORM_FIELDS["sampled"])[5]
    assert sorted(sampled) == sorted(TOKEN_FIELDS + ["sample_counts", "sample_ids", "temperature"])
    ids, counts = decode_samples(stored(sampled_cache, 5, {"samples"}), "sample")
    assert torch.equal(sampled["sample_ids"], ids) and torch.equal(sampled["sample_counts"], counts)


def test_the_hf_view_yields_the_map_style_examples_in_sequence_order(kd_cache):
    train = open_cache(kd_cache).dataset("train", topk=True, draws="hybrid", layers=[1])
    hf = train.to_hf()
    assert hf.num_shards == train.reader.num_chunks("train")  # one shard per chunk: workers and nodes split chunks
    seen = 0
    for i, ex in enumerate(hf):
        expected = train[i]
        for k, v in expected.items():
            assert torch.equal(torch.as_tensor(ex[k]).to(torch.as_tensor(v).dtype), torch.as_tensor(v)), (i, k)
        seen += 1
    assert seen == len(train)


def test_training_order_and_collate_give_train_students_micro_batches(kd_cache):
    cache = open_cache(kd_cache)
    order = cache.training_order(seed=3, epoch=1)
    assert sorted(order) == list(range(len(cache.dataset())))
    theirs = CacheDataset(kd_cache, "train", 4, FieldSchedule(always={"input_ids", "topk", "lse"}), seed=3)
    theirs.set_position(1, 0)
    ours = DataLoader(cache.dataset(topk=True), batch_size=4, sampler=order, collate_fn=collate)
    for _, (a, b) in zip(range(6), zip(theirs, ours)):
        assert torch.equal(a["sequence_ids"], b["sequence_id"])
        assert torch.equal(a["input_ids"].long(), b["input_ids"])
        assert b["topk_logprobs"].shape == (4, cache.max_length, cache.top_k)


@pytest.mark.parametrize(("form", "temperature"), [("hybrid", 1.0), ("sampled", 1.0), ("tail", 1.0), ("tail", 2.0),
                                                  ("subset", 1.0), ("subset", 2.0)])
def test_kd_loss_on_a_batch_is_train_students_loss_on_the_cached_arrays(kd_cache, sampled_cache, form, temperature):
    url = sampled_cache if form == "sampled" else kd_cache
    cache = open_cache(url)
    batch = collate([cache.dataset(**FORM_FIELDS[form], temperature=temperature)[i] for i in (3, 90, 150)])
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 512, bias=False)
    hidden = torch.randn(3, cache.max_length, 32)
    logits = head(hidden)
    # train-student's targets: the raw decoded logits, the lse at T and the draws, straight from the stored arrays
    groups = {"sampled": {"samples"}, "hybrid": {"topk", "lse", "tail_samples"}}.get(form, {"topk", "lse"})
    raws = [stored(url, i, groups) for i in (3, 90, 150)]
    raw = {k: torch.stack([r[k] for r in raws]) for k in raws[0]}
    targets = TeacherTargets()
    if "topk" in groups:
        top = decode_topk(raw, cache.reader.scheme)
        lse = raw["lse"][..., cache.temperatures.index(temperature)]
        targets = TeacherTargets(ids=top.ids.flatten(0, 1), logits=top.logits.flatten(0, 1), lse=lse.reshape(-1))
    if form in ("sampled", "hybrid"):
        ids, counts = decode_samples(raw, "sample" if form == "sampled" else "tail")
        targets.draw_ids, targets.draw_counts = ids.flatten(0, 1), counts.flatten(0, 1)
    labels = torch.cat([batch["labels"][:, 1:], torch.full((3, 1), -100)], 1).reshape(-1)
    ce_mask = (labels != -100).float()
    reference = vocab_losses_reference(logits.reshape(-1, 512), labels.clamp_min(0), ce_mask,
                                       batch["loss_mask"].reshape(-1), targets, form=form, temperature=temperature)
    ours = kd_loss(logits, batch, form=form, temperature=temperature)
    assert ours > 0
    torch.testing.assert_close(ours, reference["kd"], rtol=1e-5, atol=1e-7)
    chunked = kd_losses(batch, hidden=hidden, head=head, form=form, temperature=temperature, chunk_tokens=40)
    torch.testing.assert_close(chunked["kd"], reference["kd"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(chunked["ce"], reference["ce"], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="the batch's teacher targets are at T="):
        kd_loss(logits, batch, form=form, temperature=temperature + 1.0)


def test_a_form_whose_fields_the_batch_lacks_is_refused_in_one_line(kd_cache):
    batch = collate([open_cache(kd_cache).dataset(topk=True)[i] for i in (0, 1)])
    logits = torch.zeros(2, batch["input_ids"].shape[1], 512)
    with pytest.raises(ValueError, match="form hybrid: the batch has no tail_ids; build the dataset with topk=True, draws='hybrid'"):
        kd_loss(logits, batch)  # hybrid is the default form, as in train-student
    with pytest.raises(ValueError, match="form 'full': one of hybrid, tail, subset, sampled"):
        kd_loss(logits, batch, form="full")


def test_asking_for_what_the_cache_lacks_is_one_line(kd_cache):
    cache = open_cache(kd_cache)
    cases = {"temperature 3: topk_logprobs need the teacher's logsumexp at T, and .* holds it only for T in \\[1.0, 2.0\\]":
             dict(topk=True, temperature=3.0),
             "layers \\[5\\]: .* holds the teacher's hidden states \\[1, 2\\] only": dict(layers=[5]),
             "top_k 17: .* holds the top 16": dict(topk=True, top_k=17),
             "draws 'sampled': .* holds no sampled targets \\(its cache.targets: hybrid, topk\\)": dict(draws="sampled"),
             "temperature 2: .*'s draws come from the teacher at T=1 \\(its cache.sample_temperature\\)":
             dict(topk=True, draws="hybrid", temperature=2.0)}
    for message, kwargs in cases.items():
        with pytest.raises(CacheError, match=message):
            cache.dataset("train", **kwargs)
    for message, kwargs in {"draws='hybrid' are the teacher's tail outside its top-k: ask for topk=True": dict(draws="hybrid"),
                            "top_k 4: the hybrid draws cover everything outside the cached top 16":
                            dict(topk=True, draws="hybrid", top_k=4),
                            "draws 'all': one of sampled, hybrid": dict(draws="all")}.items():
        with pytest.raises(ValueError, match=message):
            cache.dataset("train", **kwargs)
    with pytest.raises(CacheError, match="has no 'test' split \\(splits: eval, train\\)"):
        cache.dataset("test")
    with pytest.raises(CacheError, match="not a sad-pipe cache"):
        open_cache(os.path.dirname(kd_cache) + "/nowhere")


def test_a_damaged_chunk_raises_the_same_error_as_train_students_reader(kd_cache, tmp_path):
    url = str(tmp_path / "cache")
    shutil.copytree(kd_cache, url)
    shard_dir = CacheReader(url).manifest["shards"]["train"][0]
    path = os.path.join(url, shard_dir, "topk_values", "c", "0", "0", "0")
    raw = bytearray(open(path, "rb").read())
    chunks = 32 // 8  # sequences_per_shard // sequences_per_chunk
    index = np.frombuffer(bytes(raw[-(16 * chunks + 4):-4]), "<u8")  # the shard index: (offset, size) per inner chunk
    offset = int(index[2])  # inner chunk 1 (rows 8..15) starts here
    raw[offset + 20] ^= 0x01  # one bit inside chunk 1's compressed frame; the file keeps its size
    open(path, "wb").write(bytes(raw))
    with pytest.raises(CacheError) as theirs:
        CacheReader(url).read_chunk("train", 1, {"input_ids", "topk", "lse"})  # what train-student's loader reads
    assert "checksum" in str(theirs.value) and f"shard train/0 ({shard_dir}/topk_values)" in str(theirs.value)
    train = open_cache(url).dataset(topk=True)
    assert train[7]["topk_ids"].shape[-1] == 16  # chunk 0 is intact
    with pytest.raises(CacheError) as ours:
        train[9]
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(CacheError) as hf:
        list(train.to_hf())
    assert str(hf.value) == str(theirs.value)


def test_the_tokenizer_is_checked_like_train_student_checks_it(kd_cache, tmp_path):
    from stages.train_student.helpers import error_line, train, train_config

    assert len(open_cache(kd_cache).tokenizer()) == open_cache(kd_cache).vocab_size
    url = str(tmp_path / "cache")
    shutil.copytree(kd_cache, url)
    path = os.path.join(url, "tokenizer", "tokenizer.json")
    os.truncate(path, os.path.getsize(path) - 1)
    with pytest.raises(CacheError) as ours:
        open_cache(url).tokenizer()
    assert "tokenizer/tokenizer.json" in str(ours.value)
    theirs = error_line(train(train_config(tmp_path, url), expect=1))
    assert theirs == f"error: {ours.value}"
