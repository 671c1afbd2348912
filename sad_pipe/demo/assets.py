"""A real text corpus present wherever Python is (the standard library's own source) and a BPE
tokenizer trained on it in seconds with `tokenizers`."""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable
from pathlib import Path

EOS = "<|endoftext|>"


def stdlib_sources() -> list[Path]:
    """Every .py file of this interpreter's standard library (no site-packages), in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__", "dist-packages"))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def build_corpus(output: Path, max_bytes: int) -> dict:
    """Write `corpus.jsonl` (one document per source file) with at most `max_bytes` of text.

    Files are taken in an order fixed by a hash of their path, so the sample is spread over the whole
    library (not just its first packages) and is the same on every machine with the same Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib_sources(), key=lambda p: hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest())
    output.mkdir(parents=True, exist_ok=True)
    tmp = output / "corpus.jsonl.partial"
    total = docs = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip() or total + len(text.encode()) > max_bytes:
                continue
            f.write(json.dumps({"text": text, "path": str(path.relative_to(root))}) + "\n")
            total += len(text.encode())
            docs += 1
    tmp.rename(output / "corpus.jsonl")
    return {"documents": docs, "bytes": total, "source": str(root)}


def read_corpus(path: Path) -> Iterable[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, output: Path | str) -> str:
    """A byte-level BPE tokenizer (GPT-2 style) with one special token, EOS, saved as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    hf.model_max_length = 1 << 20  # packing decides lengths; silence "sequence too long" warnings
    hf.save_pretrained(str(output))
    return str(output)


def link_sharp_teacher(out: Path) -> dict:
    """The sharp demo-shaped teacher (bench/teachers.py SHARP: top-256 >= 0.9 of its mass on held-out text,
    like a real LLM), built once per machine in the teacher cache, linked into `out` as a model directory, with
    the held-out documents it never trained on (held-out.jsonl) and its profile (profile.json)."""
    from sad_pipe.bench.teachers import SHARP, build_teacher

    asset = build_teacher(SHARP)
    out.mkdir(parents=True, exist_ok=True)
    links = {f.name: f for f in asset.model.iterdir()} | {"held-out.jsonl": asset.held_out}
    for name, target in links.items():
        link = out / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target.resolve())
    (out / "profile.json").write_text(json.dumps(asset.profile.get("profile", asset.profile), indent=1) + "\n")
    return {"teacher": str(asset.model), "recipe": asset.recipe.key, **asset.profile.get("profile", {})}
