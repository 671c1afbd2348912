"""Shared fixtures: tiny tokenizers, teachers and datasets built offline in a temp dir, once per session.

Nothing here downloads: the hub is forced offline so a test that would reach for it fails fast.
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import shutil
import sysconfig
import tempfile

# Tests write only into temp dirs: the caches datasets, matplotlib and sad-pipe itself keep in the
# user's home go to one directory for the session (removed at exit), also for every subprocess.
_HOME_CACHES = tempfile.mkdtemp(prefix="sad-pipe-tests-home-")
atexit.register(shutil.rmtree, _HOME_CACHES, ignore_errors=True)
os.environ.update({var: os.path.join(_HOME_CACHES, sub) for var, sub in (
    ("HF_HOME", "hf"), ("HF_DATASETS_CACHE", "hf/datasets"), ("MPLCONFIGDIR", "matplotlib"), ("XDG_CACHE_HOME", "xdg"),
    ("SAD_PIPE_CACHE_HOME", "sad-pipe"))})
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny test models are overhead-bound, and CI's 2 cores are shared by pytest, subprocesses and
# DataLoader workers: OpenMP threads spinning against each other made runs up to 8x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402 - after the environment above is set
import torch  # noqa: E402 - after the environment above is set
from click.testing import CliRunner  # noqa: E402 - after the environment above is set

from sad_pipe.cli import main  # noqa: E402 - after the environment above is set

torch.set_num_threads(1)

STDLIB = sysconfig.get_paths()["stdlib"]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow (full-count fuzzing etc.)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def stdlib_documents(n: int, max_chars: int = 4000) -> list[str]:
    files = sorted(glob.glob(os.path.join(STDLIB, "*.py")))[:n]
    docs = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            docs.append(fh.read()[:max_chars])
    return docs


def train_bpe(path: str, vocab_size: int, texts: list[str]) -> str:
    from sad_pipe.demo.assets import train_bpe_tokenizer

    return train_bpe_tokenizer(texts, vocab_size, path)


def word_tokenizer(path: str, vocab_size: int) -> str:
    """A word-level tokenizer with `vocab_size` entries w0..wN (lets tests exceed 65535 ids cheaply)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(vocab_size - 2)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(path)
    return path


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def special_tokenizer(path: str, texts: list[str], *, bos: bool, chat: bool, vocab_size: int = 506) -> str:
    """A BPE tokenizer like a real LLM's: with `bos`, tokenizer(text) starts with its BOS `<s>` (Llama,
    Gemma); with `chat`, role tokens and a chat template (an Instruct model's). Without either it adds nothing,
    like Qwen's or GPT-2's. At most 511 tokens, so the tests' 512-logit teachers take it."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(train_bpe(path, vocab_size, texts))
    tok.add_special_tokens({"bos_token": "<s>", "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>",
                                                                              "<|end|>"]})
    if bos:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)])
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


def save_llama(path: str, vocab_size: int, *, layers=2, hidden=32, heads=4, kv_heads=2, tied=True, seed=0) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=tied, bos_token_id=None, eos_token_id=0, pad_token_id=None)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a random init is nearly uniform; spread the logits like a trained model's
        model.lm_head.weight.mul_(8.0) if not tied else model.model.embed_tokens.weight.mul_(4.0)
    model.save_pretrained(path)
    return path


def save_gpt2(path: str, vocab_size: int, *, layers=2, hidden=32, seed=0) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=2, n_positions=128,
                     bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def write_jsonl(path: str, texts: list[str], field: str = "text") -> str:
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({field: t}) + "\n")
    return path


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Tokenizer + teachers + dataset shared by the suite (built once, ~seconds)."""
    root = tmp_path_factory.mktemp("assets")
    docs = stdlib_documents(60)
    a = {
        "docs": docs,
        "tokenizer": train_bpe(str(root / "tokenizer"), 512, docs),
        "data": write_jsonl(str(root / "docs.jsonl"), docs),
    }
    a["llama"] = save_llama(str(root / "llama"), 512)
    a["gpt2"] = save_gpt2(str(root / "gpt2"), 512)
    for name in ("llama", "gpt2"):  # the teachers ship their tokenizer, like hub models do
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(a["tokenizer"]).save_pretrained(a[name])
    return a


def cli(*args: str, expect: int | None = 0):
    """Run the real CLI in-process; returns the click Result and checks the exit code."""
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, f"exit {result.exit_code}, expected {expect}:\n{result.output}"
    return result


def cache_config(tmp_path, assets, teacher_name: str | None = "llama", **sections) -> str:
    """A cache-teacher config file for the shared assets (teacher_name: "llama", "gpt2" or None for a
    tokens-only cache); `sections` override keys section by section."""
    cfg = {
        "teacher": {"model": assets[teacher_name] if teacher_name else None, "batch_size": 4, "layers": [1, 2]},
        "data": {"path": assets["data"], "max_length": 64, "eval_fraction": 0.1,
                 **({} if teacher_name else {"tokenizer": assets["tokenizer"]})},
        "cache": {"path": str(tmp_path / "cache"), "top_k": 32, "sequences_per_shard": 32, "sequences_per_chunk": 8},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "cache.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def build_cache(root, assets, teacher_layers: list[int], **sections) -> str:
    """A real cache of the tiny Llama teacher through `sad-pipe cache-teacher`; returns its path."""
    config = cache_config(root, assets, teacher={"layers": teacher_layers}, **sections)
    cli("-q", "cache-teacher", "--config", config)
    with open(config) as f:
        return json.load(f)["cache"]["path"]


@pytest.fixture(scope="session")
def kd_cache(tmp_path_factory, assets) -> str:
    """Top-16 + lse at T=1,2 + hidden states of teacher layers 1 and 2 (width 32). Five documents packed at 32
    tokens give ~230 train sequences."""
    root = tmp_path_factory.mktemp("kd_cache")
    return build_cache(root, assets, [1, 2], data={"max_documents": 5, "max_length": 32, "eval_fraction": 0.2},
                       cache={"top_k": 16, "temperatures": [1.0, 2.0], "sequences_per_shard": 32, "sequences_per_chunk": 8})
