"""Loading teachers and tokenizers, their fingerprints, and the facts the stages check against."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import word_tokenizer

from sad_pipe.errors import ModelError
from sad_pipe.pipeline.models import (
    build_student,
    load_causal_lm,
    load_tokenizer,
    max_positions_of,
    num_layers_of,
    resolve_device,
    resolve_dtype,
    teacher_identity,
    tokenizer_fingerprint,
    vocab_size_of,
)

CPU = torch.device("cpu")


def load(path, dtype=torch.float32):
    return load_causal_lm(str(path), revision=None, dtype=dtype, device=CPU, trust_remote_code=False, what="teacher")


@pytest.mark.parametrize("name, layers, context", [("llama", 2, 256), ("gpt2", 2, 128)])
def test_teacher_facts(assets, name, layers, context):
    model = load(assets[name])
    assert (vocab_size_of(model), num_layers_of(model), max_positions_of(model)) == (512, layers, context)
    ident = teacher_identity(model, assets[name], None)
    assert ident["vocab_size"] == 512 and ident["hidden_size"] == 32 and ident["dtype"] == "float32"


def test_the_config_hash_ignores_where_and_in_which_dtype_a_model_is_stored(assets, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(assets["llama"], copy)
    a = teacher_identity(load(assets["llama"]), "a", None)["config_sha256"]
    assert teacher_identity(load(copy, torch.bfloat16), "b", None)["config_sha256"] == a
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3  # a different model
    (copy / "config.json").write_text(json.dumps(config))
    assert teacher_identity(load(copy), "a", None)["config_sha256"] != a


def test_tokenizer_fingerprint_follows_the_vocabulary_not_the_location(assets, tmp_path):
    tok = load_tokenizer(assets["tokenizer"])
    tok.save_pretrained(tmp_path / "copy")
    assert tokenizer_fingerprint(load_tokenizer(str(tmp_path / "copy"))) == tokenizer_fingerprint(tok)
    small = load_tokenizer(word_tokenizer(str(tmp_path / "w100"), 100))
    other = load_tokenizer(word_tokenizer(str(tmp_path / "w101"), 101))
    assert len({tokenizer_fingerprint(tok), tokenizer_fingerprint(small), tokenizer_fingerprint(other)}) == 3


def test_a_word_tokenizer_above_65535_ids_round_trips(tmp_path):
    tok = load_tokenizer(word_tokenizer(str(tmp_path / "w70k"), 70000))
    assert len(tok) == 70000
    assert tok("w0 w65534 w69997", add_special_tokens=False)["input_ids"] == [2, 65536, 69999]


@pytest.mark.parametrize("loader", ["model", "tokenizer"])
def test_a_missing_local_path_is_a_one_line_model_error(tmp_path, loader):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelError, match="no such directory") as err:
        load(missing) if loader == "model" else load_tokenizer(missing)
    assert missing in str(err.value) and "\n" not in str(err.value)


def test_a_directory_without_a_model_is_a_model_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=f"cannot load teacher '{tmp_path / 'empty'}'"):
        load(tmp_path / "empty")


def test_device_and_dtype_choice_on_cpu():
    assert resolve_device("cpu") == CPU
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    if not torch.cuda.is_available():
        assert resolve_device("auto") == CPU
        with pytest.raises(ModelError, match="no CUDA device"):
            resolve_device("cuda")


def test_build_student_from_a_config_takes_the_tokenizer_vocab():
    student = build_student({"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "num_key_value_heads": 1}, None, vocab_size=300)
    assert vocab_size_of(student) == 300 and next(student.parameters()).dtype == torch.float32
    with pytest.raises(ModelError, match="student.config: cannot build a 'no-such-type' model"):
        build_student({"model_type": "no-such-type"}, None, vocab_size=300)
