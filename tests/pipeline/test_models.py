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
    generation_config_for,
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


def test_build_student_from_a_config_takes_the_tokenizers_special_tokens_and_a_padded_table(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(word_tokenizer(str(tmp_path / "tok"), 300))
    tokenizer.add_special_tokens({"bos_token": "<s>", "pad_token": "<pad>"})
    shape = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1, "eos_token_id": 7}  # a wrong eos: the tokenizer's wins
    student = build_student(shape, None, tokenizer=tokenizer)
    assert len(tokenizer) == 302 and vocab_size_of(student) == 320  # padded to a multiple of 64
    assert next(student.parameters()).dtype == torch.float32
    c = student.config
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                                tokenizer.pad_token_id)
    gen = generation_config_for(student, tokenizer)
    assert gen.eos_token_id == tokenizer.eos_token_id and gen.suppress_tokens == list(range(302, 320))
    plain = AutoTokenizer.from_pretrained(word_tokenizer(str(tmp_path / "tok2"), 64))
    student = build_student(shape, None, tokenizer=plain)
    # No pad token of its own: no pad id (it would freeze that embedding row), and none padded: 64 rows already.
    assert student.config.pad_token_id is None and vocab_size_of(student) == 64
    assert generation_config_for(student, plain).pad_token_id == plain.eos_token_id
    with pytest.raises(ModelError, match="student.config: cannot build a 'no-such-type' model"):
        build_student({"model_type": "no-such-type"}, None, tokenizer=plain)


def test_tokenizers_are_the_same_vocabulary_when_their_ids_and_merges_agree(assets, tmp_path):
    """An Instruct tokenizer (another chat template, extra special tokens past the shared range) shares its base
    model's vocabulary; another tokenizer, or one whose ids mean other tokens, does not."""
    from conftest import train_bpe
    from transformers import AutoTokenizer

    from sad_pipe.pipeline.models import check_same_vocabulary

    base = AutoTokenizer.from_pretrained(assets["tokenizer"])
    instruct = AutoTokenizer.from_pretrained(assets["tokenizer"])
    instruct.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    instruct.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    warnings = check_same_vocabulary(base, instruct, "student 'instruct'")
    assert len(warnings) == 2 and "'<|im_start|>' (id 512) exists only in student 'instruct'" in warnings[0]
    assert check_same_vocabulary(instruct, base, "student 'base'")  # the other way round: a warning too, no error
    other = AutoTokenizer.from_pretrained(train_bpe(str(tmp_path / "other"), 512, assets["docs"][10:40]))
    with pytest.raises(ModelError, match="uses another vocabulary than the cache's teacher: token .* is id"):
        check_same_vocabulary(base, other, "student 'other'")
    shifted = AutoTokenizer.from_pretrained(assets["tokenizer"])
    shifted.add_special_tokens({"additional_special_tokens": ["<pad>"]})
    with pytest.raises(ModelError, match="id 512 is '<pad>' only in"):
        check_same_vocabulary(instruct, shifted, "student 'shifted'")
