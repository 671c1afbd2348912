"""What the benchmarks measure on, built offline with the project's own code paths and shared by them.

    corpus       the standard library's source (sad_pipe.demo.assets), split by document into the
                 teachers' training text and held-out text (every 10th document)
    tokenizers   byte-level BPE, one per vocabulary size (demo.assets.train_bpe_tokenizer)
    teachers     Llama-style models trained briefly, CE only, by `train_student.run` from a tokens-only
                 cache, exactly like the demo's teacher: realistic logits, not random numbers
    kd cache     the bench teacher's cache (top-256, lse at T=1,2, hidden layers), by `cache_teacher.run`
    sharp        teachers trained until they are as peaked as real LLMs (teachers.py), for the storage
                 figures; the full profile's are kept across runs in the teacher cache ($SAD_PIPE_TEACHER_CACHE)

Each asset is built once per run (and reused across runs when SAD_PIPE_BENCH_WORK names a directory:
handy with --only; every asset is complete once its last file exists, like make's file targets).
The time spent building is reported apart from the benchmarks' own times.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from sad_pipe.bench.measure import cpu_seconds

log = logging.getLogger("sad_pipe.bench")

HELD_OUT_EVERY = 10  # document i is held out of teacher training when i % 10 == 0
PIECE_CHARS = 4000  # documents are cut into pieces of about this size so subsets can be sized finely

# A real small LLM's shape for timing stage one: SmolLM2-135M (width 576, 9 heads over 3 KV heads,
# MLP 1536, 30 layers, V=49152, 134.5 M parameters) with random weights: it only times. Its
# vocabulary work per unit of forward work (V / multiply-adds per token = 3.7e-4; Qwen2.5-0.5B 3.0e-4)
# and its cached bytes per unit of forward work are a real teacher's, where the demo-shaped teacher,
# whose output layer is 40% of its compute, has 1.5e-3. (An earlier 5-layer, V=8192 cut of it matched
# the first ratio but made each cached token 6x heavier next to its forward.) --quick: 2 layers.
SMALL_LLM = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3, "vocab_size": 49152}
SMALL_LLM_QUICK = {**SMALL_LLM, "num_hidden_layers": 2, "vocab_size": None}  # None: the bench vocabulary

# The bench teacher (first vocabulary) is the demo's shape, Llama 4 x 256; the V=32000 teacher, used
# only for storage, is narrower and trained for fewer steps (its loss over V dominates the cost).
# Training is brief by necessity (the whole suite must fit 15 minutes on 2 CPU cores): the storage
# benchmark reports how sharp the result is.
PROFILES = {
    "full": {
        "corpus_mb": 3.0, "vocabs": (8192, 32000), "max_length": 256, "cache_layers": [2, 4], "small_llm": SMALL_LLM,
        "teachers": {
            8192: {"width": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4},
                   "steps": 48, "batch": 4},
            32000: {"width": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 2},
                    "steps": 24, "batch": 4},
        },
    },
    "quick": {
        "corpus_mb": 1.0, "vocabs": (512, 1024), "max_length": 64, "cache_layers": [1, 2], "small_llm": SMALL_LLM_QUICK,
        "teachers": {
            v: {"width": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
                "steps": 4, "batch": 4} for v in (512, 1024)
        },
    },
}
TEACHER_LR = 3e-3


def llama_config(width: dict, max_length: int) -> dict:
    """An HF config dict (as student.config takes it) for a Llama-style model of the given widths."""
    return {"model_type": "llama", "num_key_value_heads": width["num_attention_heads"], "max_position_embeddings": max_length,
            "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": 0, "pad_token_id": None, **width}


def run_config(raw: dict):
    from sad_pipe.pipeline.config import validate

    return validate(raw, "sad-pipe bench")


@dataclass
class Teacher:
    path: Path
    vocab: int
    parameters: int
    train_steps: int
    train_tokens: int


class Assets:
    def __init__(self, root: Path, profile: str, device: str):
        self.profile = profile
        self.p = PROFILES[profile]
        # A kept work directory is reused only by runs with the same sizes and device.
        key = hashlib.sha256(json.dumps([self.p, device], sort_keys=True, default=str).encode()).hexdigest()[:8]
        self.root, self.device = root / key, device
        self.vocabs: tuple[int, int] = self.p["vocabs"]
        self.max_length: int = self.p["max_length"]
        self.build_seconds: dict[str, float] = {}  # wall seconds per asset built in this run
        self.build_cpu_seconds: dict[str, float] = {}
        self._memo: dict = {}

    @property
    def bench_vocab(self) -> int:
        """The vocabulary of the bench teacher used by the stage benchmarks (the demo's size)."""
        return self.vocabs[0]

    def _once(self, key: str, marker: Path, build) -> Path:
        """Build an asset unless its completion marker exists; time the build."""
        if key in self._memo:
            return self._memo[key]
        if not marker.exists():
            log.info("bench: building %s", key)
            start, cpu = time.perf_counter(), cpu_seconds()
            nested, nested_cpu = sum(self.build_seconds.values()), sum(self.build_cpu_seconds.values())
            build()
            # Exclusive times: assets built inside this one (a teacher's tokenizer) are counted once, as themselves.
            self.build_seconds[key] = time.perf_counter() - start - (sum(self.build_seconds.values()) - nested)
            self.build_cpu_seconds[key] = cpu_seconds() - cpu - (sum(self.build_cpu_seconds.values()) - nested_cpu)
        self._memo[key] = marker
        return marker

    # -- text ------------------------------------------------------------------------------------
    def corpus(self) -> Path:
        def build():
            from sad_pipe.demo.assets import build_corpus, read_corpus

            build_corpus(self.root / "corpus", int(self.p["corpus_mb"] * 1e6))
            docs = list(read_corpus(self.root / "corpus" / "corpus.jsonl"))
            _write_jsonl(self.root / "corpus" / "held-out.jsonl", docs[::HELD_OUT_EVERY])
            _write_jsonl(self.root / "corpus" / "train.jsonl",
                         [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY])

        self._once("corpus", self.root / "corpus" / "train.jsonl", build)
        return self.root / "corpus"

    def tokenizer(self, vocab: int) -> Path:
        out = self.root / f"tokenizer-{vocab}"

        def build():
            from sad_pipe.demo.assets import read_corpus, train_bpe_tokenizer

            train_bpe_tokenizer(read_corpus(self.corpus() / "train.jsonl"), vocab, out)

        self._once(f"tokenizer V={vocab}", out / "tokenizer.json", build)
        return out

    def held_out_sequences(self, vocab: int, count: int):
        """Up to `count` packed sequences [n, max_length] (int64 tensor) of text no teacher trained on."""
        import numpy as np
        import torch

        from sad_pipe.pipeline.config import DataConfig
        from sad_pipe.pipeline.data import PackedDocuments
        from sad_pipe.pipeline.models import load_tokenizer

        data = DataConfig(path=str(self.corpus() / "held-out.jsonl"), max_length=self.max_length, eval_fraction=0.0)
        seqs = []
        for seq in PackedDocuments(data, load_tokenizer(str(self.tokenizer(vocab)))):
            seqs.append(seq.input_ids)
            if len(seqs) == count:
                break
        return torch.from_numpy(np.stack(seqs))

    def documents(self, vocab: int, sequences: int) -> Path:
        """A jsonl of document pieces that packs into about `sequences` sequences (a few more at most)."""
        out = self.root / f"docs-{vocab}-{sequences}x{self.max_length}.jsonl"

        def build():
            from sad_pipe.demo.assets import read_corpus
            from sad_pipe.pipeline.models import load_tokenizer

            tok = load_tokenizer(str(self.tokenizer(vocab)))
            want, have, pieces = sequences * self.max_length, 0, []
            for doc in read_corpus(self.corpus() / "train.jsonl"):
                for piece in _pieces(doc):
                    pieces.append(piece)
                    have += len(tok(piece, add_special_tokens=False)["input_ids"]) + 1  # + EOS
                    if have >= want + self.max_length:
                        break
                if have >= want + self.max_length:
                    break
            _write_jsonl(out, pieces)

        self._once(f"documents V={vocab} x{sequences}", out, build)
        return out

    # -- models and caches ------------------------------------------------------------------------
    def teacher(self, vocab: int) -> Teacher:
        key = f"teacher V={vocab}"
        if key in self._memo:
            return self._memo[key]
        root = self.root / f"teacher-{vocab}"
        spec = self.p["teachers"][vocab]
        steps, batch = spec["steps"], spec["batch"]

        def build():
            from sad_pipe.stages import cache_teacher, train_student

            with quiet():
                cache_teacher.run(run_config({
                    "data": {"path": str(self.corpus() / "train.jsonl"), "tokenizer": str(self.tokenizer(vocab)),
                             "max_length": self.max_length, "eval_fraction": 0.0},
                    "cache": {"path": str(root / "tokens")},
                }))
                train_student.run(run_config({
                    "cache": {"path": str(root / "tokens")},
                    "student": {"config": llama_config(spec["width"], self.max_length)},
                    "curriculum": {"use_curriculum": False, "weights": {"kd": 0.0, "ce": 1.0, "feature": 0.0, "relation": 0.0}},
                    "train": {"output": str(root / "train"), "batch_size": batch, "max_steps": steps,
                              "learning_rate": TEACHER_LR, "warmup_steps": max(1, steps // 10),
                              "weight_decay": 0.1, "seed": 1234, "device": self.device},
                }))

        self._once(key, root / "train" / "result.json", build)
        result = json.loads((root / "train" / "result.json").read_text())
        teacher = Teacher(path=root / "train" / "final", vocab=vocab, parameters=result["student_parameters"],
                          train_steps=steps, train_tokens=steps * batch * self.max_length)
        self._memo[key] = teacher
        return teacher

    def sharp_teacher(self, recipe):
        """A sharp teacher (teachers.build_teacher). The full profile's live in the shared teacher cache, built
        once per machine; --quick's tiny ones under this run's work directory, so a check leaves nothing behind."""
        import torch

        from sad_pipe.bench.teachers import build_teacher, default_root

        key = f"sharp teacher V={recipe.vocab} ({recipe.key})"
        if key in self._memo:
            return self._memo[key]
        full = self.profile == "full"
        start, cpu = time.perf_counter(), cpu_seconds()
        # Full: every core (a 20-minute build done once, not a measurement); quick: the bench's own threads.
        asset = build_teacher(recipe, root=default_root() if full else self.root / "teachers", device=self.device,
                              threads=None if full else torch.get_num_threads())
        if asset.built:
            self.build_seconds[key] = time.perf_counter() - start
            self.build_cpu_seconds[key] = cpu_seconds() - cpu
        self._memo[key] = asset
        return asset

    def small_llm_teacher(self) -> Path:
        """SMALL_LLM (random weights) with the bench vocabulary's tokenizer, saved like any hub model."""
        out = self.root / "teacher-small-llm"

        def build():
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

            shape = dict(self.p["small_llm"])
            shape["vocab_size"] = shape["vocab_size"] or self.bench_vocab
            config = AutoConfig.for_model(**llama_config(shape, self.max_length))
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(config).save_pretrained(out)
            AutoTokenizer.from_pretrained(self.tokenizer(self.bench_vocab)).save_pretrained(out)

        self._once("teacher small-LLM-shaped", out / "model.safetensors", build)
        return out

    def cache_config(self, path: Path, data: Path, teacher: Path | None = None, **cache) -> dict:
        """The demo's cache-teacher config (top-256, lse at T=1,2, two hidden layers) for a bench teacher
        (by default the demo-shaped one)."""
        teacher = teacher or self.teacher(self.bench_vocab).path
        return {
            "teacher": {"model": str(teacher), "layers": list(self.p["cache_layers"]),
                        "device": self.device},
            "data": {"path": str(data), "max_length": self.max_length, "eval_fraction": 0.0},
            "cache": {"path": str(path), **cache},
        }

    def kd_cache(self, sequences: int) -> Path:
        """The bench teacher's cache over about `sequences` sequences: what students train from."""
        out = self.root / f"kd-cache-{sequences}"

        def build():
            from sad_pipe.stages import cache_teacher

            with quiet():
                cache_teacher.run(run_config(self.cache_config(out, self.documents(self.bench_vocab, sequences))))

        self._once(f"kd cache x{sequences}", out / "manifest.json", build)
        return out


class quiet:
    """Silence the stages' INFO logs, progress bars and warnings (plots with empty legends...) while the bench drives them.

    train-student passes tqdm an explicit `disable=False`, which TQDM_DISABLE cannot override, so
    stderr itself is captured; if the block fails, what it printed is passed on."""

    NAMES = ("sad_pipe.stages", "sad_pipe.storage", "sad_pipe.pipeline")

    def __enter__(self):
        self._levels = [(logging.getLogger(n), logging.getLogger(n).level) for n in self.NAMES]
        for logger, _ in self._levels:
            logger.setLevel(logging.WARNING)
        self._buffer = io.StringIO()
        self._redirect = contextlib.redirect_stderr(self._buffer)
        self._redirect.__enter__()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, exc_type, *exc):
        self._warnings.__exit__(exc_type, *exc)
        self._redirect.__exit__(exc_type, *exc)
        for logger, level in self._levels:
            logger.setLevel(level)
        if exc_type is not None:
            sys.stderr.write(self._buffer.getvalue()[-4000:])


def _pieces(text: str):
    """Cut a document at line ends into pieces of about PIECE_CHARS characters."""
    piece: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        piece.append(line)
        size += len(line)
        if size >= PIECE_CHARS:
            yield "".join(piece)
            piece, size = [], 0
    if piece:
        yield "".join(piece)


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    tmp.rename(path)
