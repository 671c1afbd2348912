"""Stage two on packed documents: the student attends within each document as the teacher did, no loss pairs
tokens of two documents, vocabularies of any padded width line up, and the exported student stops at EOS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import cache_config, cli, save_llama, word_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sad_pipe.stages.train_student.losses import fit_vocabulary, relation_loss
from sad_pipe.stages.train_student.train import DistillModel

from .helpers import LLAMA_STUDENT, metrics, train, train_config


def test_the_student_attends_within_each_document_of_a_packed_sequence():
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1)).eval()
    model = DistillModel(student, None)
    ids = torch.randint(0, 64, (1, 20))
    positions = torch.cat([torch.arange(7), torch.arange(13)])[None]
    with torch.no_grad():
        packed, _, _ = model(ids, positions, None)
        first, _, _ = model(ids[:, :7], torch.arange(7)[None], None)
        second, _, _ = model(ids[:, 7:], torch.arange(13)[None], None)
        crossed, _, _ = model(ids, torch.arange(20)[None], None)
    torch.testing.assert_close(packed[:, :7], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, 7:], second, rtol=1e-5, atol=1e-5)
    assert (crossed[:, 7:] - second).abs().max() > 1e-2  # without the restart the second document sees the first


def test_relation_loss_never_pairs_tokens_of_two_documents():
    torch.manual_seed(1)
    s, t = torch.randn(1, 12, 8), torch.randn(1, 12, 16)
    mask = torch.ones(1, 12)
    segments = torch.tensor([[0] * 5 + [1] * 7])
    packed = relation_loss(s, t, mask, segments)
    alone = [relation_loss(s[:, a:b], t[:, a:b], mask[:, a:b]) for a, b in ((0, 5), (5, 12))]
    torch.testing.assert_close(packed, (alone[0] * 5 + alone[1] * 7) / 12)
    assert not torch.allclose(relation_loss(s, t, mask), packed)


def test_fit_vocabulary_gives_padded_and_missing_rows_no_probability():
    logits = torch.randn(3, 576)
    narrow = fit_vocabulary(logits, tokens=512, width=512)
    torch.testing.assert_close(narrow, logits[:, :512])
    wide = fit_vocabulary(logits, tokens=512, width=640)
    torch.testing.assert_close(wide[:, :512], logits[:, :512])
    assert torch.isinf(wide[:, 512:]).all() and (wide[:, 512:] < 0).all()


@pytest.fixture(scope="module")
def padded_teacher_cache(assets, tmp_path_factory) -> tuple[str, str]:
    """A teacher with 576 logits over a 512-token tokenizer (a padded embedding table, like Qwen's), its cache."""
    root = tmp_path_factory.mktemp("padded")
    teacher = save_llama(str(root / "teacher"), 576, seed=3)
    AutoTokenizer.from_pretrained(assets["tokenizer"]).save_pretrained(teacher)
    config = cache_config(root, assets, teacher={"model": teacher, "layers": []},
                          data={"max_documents": 3, "max_length": 32, "eval_fraction": 0.2},
                          cache={"top_k": 16, "sequences_per_shard": 32, "sequences_per_chunk": 8})
    cli("-q", "cache-teacher", "--config", config)
    return json.loads(Path(config).read_text())["cache"]["path"], teacher


@pytest.mark.parametrize("student_vocab", [512, 640], ids=["narrower", "wider"])
def test_online_full_kd_takes_a_student_narrower_or_wider_than_the_teacher(padded_teacher_cache, tmp_path, student_vocab):
    cache, teacher = padded_teacher_cache
    config = train_config(tmp_path, cache, student={"config": {**LLAMA_STUDENT, "vocab_size": student_vocab}},
                          teacher={"model": teacher}, loss={"kd_form": "full"}, train={"max_steps": 3},
                          curriculum={"use_curriculum": False})
    train(config)
    rows = metrics(tmp_path / "run")
    assert len(rows) == 3 and all(r["loss/kd"] is not None and r["loss/kd"] > 0 for r in rows)
    # The cache never names a padded row either: stage one left them out of the top-k and the logsumexp.
    from sad_pipe.storage.reader import CacheReader

    r = CacheReader(cache)
    assert int(r.read("train", 0, 8, {"topk"})["topk_ids"].max()) < 512


def test_the_exported_student_stops_at_eos(tmp_path):
    """A student trained on short documents generates one from final/ and stops at EOS, by its
    generation_config alone."""
    tok_dir = word_tokenizer(str(tmp_path / "tok"), 40)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "w1 w2 w3 w4 w5 w6"}) + "\n" for _ in range(400)))
    cache_cfg = {"data": {"path": str(docs), "tokenizer": tok_dir, "max_length": 32, "eval_fraction": 0.0},
                 "cache": {"path": str(tmp_path / "tokens")}}
    (tmp_path / "cache.json").write_text(json.dumps(cache_cfg))
    cli("-q", "cache-teacher", "--config", str(tmp_path / "cache.json"))
    config = train_config(tmp_path, str(tmp_path / "tokens"), train={"max_steps": 40, "learning_rate": 1e-2, "batch_size": 8},
                          curriculum={"use_curriculum": False, "weights": {"kd": 0.0, "ce": 1.0}})
    train(config)
    final = tmp_path / "run" / "final"
    gen = json.loads((final / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert gen["eos_token_id"] == tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    prompt = tokenizer("w1 w2", return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=prompt, max_new_tokens=20, do_sample=False)[0].tolist()
    assert tokenizer.decode(out[len(prompt[0]):-1]) == "w3 w4 w5 w6" and out[-1] == tokenizer.eos_token_id
