"""Sharp teachers: trained until their distributions look like a real LLM's, built once per machine.

The stage benchmarks' teachers (assets.py) are trained for a CPU-minute: flat (top-256 holds 0.5-0.67
of the mass at T=1) and their top-k sets repeat between positions, so the logits they cache compress
several times better than a real teacher's and KD forms rank differently on them. Real LLMs keep
>= 0.9 of the mass in their top-256 on ordinary text. A `TeacherRecipe` trained far enough reaches that
regime; `build_teacher` builds it with the project's own code paths (exactly like assets.py builds its
teachers) and keeps it in a cache directory shared by every later `make bench` / `make compare`:

    <root>/<recipe key>/
        recipe.json      what is built (written first)
        corpus/          the stdlib corpus: corpus.jsonl, train.jsonl, held-out.jsonl (every 10th document)
        tokenizer/       byte-level BPE trained on train.jsonl
        tokens/          a tokens-only cache of train.jsonl (`cache_teacher.run`, no teacher)
        train/           CE-only `train_student.run` (kd weight 0); train/final/ is the teacher
        profile.json     teacher_profile() on held-out text, build times, versions
        COMPLETE         written last: without it nothing here is taken as a finished teacher

root: the argument, else $SAD_PIPE_TEACHER_CACHE, else $XDG_CACHE_HOME/sad-pipe/teachers, else
~/.cache/sad-pipe/teachers. Every step resumes: the corpus and tokenizer appear by rename, both stages
resume on their own (committed shards, checkpoints every steps/10), and a lock keeps two processes
from building the same teacher at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType

from sad_pipe.errors import ConfigError, DataError

# Bump when the build itself changes (split rule, configs passed to the stages): old teachers then
# no longer answer to the same key, instead of being reused as if built the new way.
BUILD_VERSION = 1
HELD_OUT_EVERY = 10  # document i is held out of training when i % 10 == 0 (as in assets.py)
PROFILE_SEQUENCES = 64  # held-out sequences profile.json is computed on
PROFILE_K = (16, 64, 256)
WIDTH_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class TeacherRecipe:
    """Everything that decides the teacher built: same recipe, same key, same directory."""

    corpus_mb: float  # stdlib source text taken (before the held-out split)
    vocab: int  # BPE vocabulary size
    width: dict = field(hash=False)  # Llama widths, as bench/assets.py PROFILES give them
    max_length: int = 256
    steps: int = 300
    batch: int = 8
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.1
    seed: int = 1234

    def __post_init__(self):
        missing = [k for k in WIDTH_KEYS if k not in self.width]
        problems = [f"TeacherRecipe.width: missing {', '.join(missing)}"] if missing else []
        problems += [f"TeacherRecipe.{k}: must be positive, got {getattr(self, k)}"
                     for k in ("corpus_mb", "vocab", "max_length", "steps", "batch", "lr") if getattr(self, k) <= 0]
        if not 0 <= self.warmup < self.steps:
            problems.append(f"TeacherRecipe.warmup {self.warmup}: must be in [0, steps={self.steps})")
        if problems:
            raise ConfigError(problems)
        object.__setattr__(self, "width", MappingProxyType(dict(self.width)))  # frozen all the way down
        for name in ("corpus_mb", "lr", "weight_decay"):  # 16 and 16.0 are one recipe: one key
            object.__setattr__(self, name, float(getattr(self, name)))

    def to_json(self) -> dict:
        return {f.name: dict(self.width) if f.name == "width" else getattr(self, f.name) for f in fields(self)}

    @property
    def key(self) -> str:
        """A short hash of the recipe, the build procedure's version and the corpus source (this
        Python's stdlib: another Python version means other documents)."""
        stamp = {"recipe": self.to_json(), "build": BUILD_VERSION, "stdlib": platform.python_version()}
        return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def train_tokens(self) -> int:
        return self.steps * self.batch * self.max_length


DEMO_WIDTH = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4}
# Chosen by measurement on the 2-core development machine, top-256 mass at T=1 on held-out text: the demo's
# shape (4 x 256) plateaus below 0.9 as the vocabulary grows (V=2048, 16 MB, 1500 steps at lr 3e-3: 0.844 at
# step 150, 0.883 at 450, 0.900 at 1050, 0.888 at 1500; V=4096 and 8192 stayed lower at the steps reached),
# so the sharp teacher is V=2048 trained to 1050 steps; its ids are spread over 32,000 and 151,936 to stand
# for real vocabularies in the storage figures. A wider teacher would reach 0.9 at a real V, at hours of CPU.
SHARP = TeacherRecipe(corpus_mb=16.0, vocab=2048, width=DEMO_WIDTH, steps=1050, batch=8, lr=3e-3, warmup=50)
SHARP_TARGET = 0.9  # top-256 mass at T=1 on held-out text that real LLMs exceed
# Seconds to build, for tests and `bench --quick`: checks the machinery, far from sharp.
TINY = TeacherRecipe(corpus_mb=0.3, vocab=512, width={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                      "num_attention_heads": 2},
                     max_length=64, steps=6, batch=4, lr=3e-3, warmup=1)
TINY_WIDE = replace(TINY, vocab=1024)
# The hidden-state fidelity bench (bench/hidden.py) needs a real width: low-rank projections and int8 behave
# by the spectrum of trained states, which a 256-wide teacher does not show. Llama-shaped, 2 x 1024, V=2048,
# trained 200 steps of 8 x 128 tokens (about 10 CPU-minutes on one thread): its states come from training.
WIDE = TeacherRecipe(corpus_mb=4.0, vocab=2048, width={"hidden_size": 1024, "intermediate_size": 2048,
                                                       "num_hidden_layers": 2, "num_attention_heads": 16},
                     max_length=128, steps=200, batch=8, lr=1e-3, warmup=20)


@dataclass
class TeacherAsset:
    recipe: TeacherRecipe
    path: Path  # <root>/<key>
    profile: dict  # profile.json: {"profile": teacher_profile(...), "build": {...}, ...}
    built: bool  # True when this call trained (part of) it, False when it was already complete

    @property
    def model(self) -> Path:
        return self.path / "train" / "final"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

    @property
    def held_out(self) -> Path:
        return self.path / "corpus" / "held-out.jsonl"

    @property
    def train_jsonl(self) -> Path:
        return self.path / "corpus" / "train.jsonl"


def default_root() -> Path:
    if os.environ.get("SAD_PIPE_TEACHER_CACHE"):
        return Path(os.environ["SAD_PIPE_TEACHER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sad-pipe" / "teachers"


def load_teacher(recipe: TeacherRecipe, root: Path | str | None = None) -> TeacherAsset | None:
    """The finished teacher of this recipe, or None when it is not (completely) built."""
    path = Path(root or default_root()) / recipe.key
    if not (path / "COMPLETE").exists():
        return None
    return TeacherAsset(recipe, path, json.loads((path / "profile.json").read_text()), built=False)


def build_teacher(recipe: TeacherRecipe, root: Path | str | None = None, device: str = "cpu",
                  threads: int | None = None) -> TeacherAsset:
    """Build the recipe's teacher unless it is complete; resume whatever an interrupted build left.

    threads: torch threads while building (default: every core; a build is done once and timed only
    for the record, unlike the benchmarks that pin their own thread count)."""
    done = load_teacher(recipe, root)
    if done is not None:
        return done
    path = Path(root or default_root()) / recipe.key
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock(path.with_name(path.name + ".lock")), _threads(threads or os.cpu_count() or 1):
        done = load_teacher(recipe, root)  # another process may have finished it while we waited
        if done is not None:
            return done
        path.mkdir(exist_ok=True)
        (path / "recipe.json").write_text(json.dumps({"key": recipe.key, **recipe.to_json()}, indent=1) + "\n")
        times: dict[str, float] = {}
        _step(times, "corpus", path / "corpus", lambda tmp: _corpus(recipe, tmp))
        _step(times, "tokenizer", path / "tokenizer", lambda tmp: _tokenizer(recipe, path / "corpus", tmp))
        _stage(times, "tokens", path / "tokens" / "manifest.json", lambda: _tokens(recipe, path))
        _stage(times, "train", path / "train" / "result.json", lambda: _train(recipe, path, device))
        start = time.perf_counter()
        profile = teacher_profile(path / "train" / "final", path / "tokenizer", path / "corpus" / "held-out.jsonl",
                                  PROFILE_SEQUENCES, recipe.max_length, device=device)
        times["profile"] = time.perf_counter() - start
        result = json.loads((path / "train" / "result.json").read_text())
        record = {
            "key": recipe.key, "recipe": recipe.to_json(), "profile": profile,
            "parameters": result["student_parameters"], "train_tokens": recipe.train_tokens,
            # train_seconds counts every resumed part of the training; the step times only this call's
            "build": {"train_seconds": result["train_seconds"], "seconds_this_call": times, "device": device,
                      "threads": threads or os.cpu_count() or 1},
            "versions": {"python": platform.python_version(), **_versions()},
        }
        _write_atomic(path / "profile.json", json.dumps(record, indent=1) + "\n")
        _write_atomic(path / "COMPLETE", "ok\n")
        return TeacherAsset(recipe, path, record, built=True)


# -- the build steps: the same calls as bench/assets.py ------------------------------------------------------

def _corpus(recipe: TeacherRecipe, out: Path) -> None:
    from sad_pipe.demo.assets import build_corpus, read_corpus

    build_corpus(out, int(recipe.corpus_mb * 1e6))
    docs = list(read_corpus(out / "corpus.jsonl"))
    _write_jsonl(out / "held-out.jsonl", docs[::HELD_OUT_EVERY])
    _write_jsonl(out / "train.jsonl", [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY])


def _tokenizer(recipe: TeacherRecipe, corpus: Path, out: Path) -> None:
    from sad_pipe.demo.assets import read_corpus, train_bpe_tokenizer

    train_bpe_tokenizer(read_corpus(corpus / "train.jsonl"), recipe.vocab, out)


def _tokens(recipe: TeacherRecipe, path: Path) -> None:
    from sad_pipe.bench.assets import quiet, run_config
    from sad_pipe.stages import cache_teacher

    with quiet():
        cache_teacher.run(run_config({
            "data": {"path": str(path / "corpus" / "train.jsonl"), "tokenizer": str(path / "tokenizer"),
                     "max_length": recipe.max_length, "eval_fraction": 0.0},
            "cache": {"path": str(path / "tokens")},
        }))


def train_config(recipe: TeacherRecipe, path: Path, device: str = "cpu") -> dict:
    """The CE-only train-student config of the recipe's teacher (the curriculum with kd weight 0)."""
    from sad_pipe.bench.assets import llama_config

    return {
        "cache": {"path": str(path / "tokens")},
        "student": {"config": llama_config(dict(recipe.width), recipe.max_length)},
        "curriculum": {"use_curriculum": False, "weights": {"kd": 0.0, "ce": 1.0, "feature": 0.0, "attention": 0.0}},
        "train": {"output": str(path / "train"), "batch_size": recipe.batch, "max_steps": recipe.steps,
                  "learning_rate": recipe.lr, "warmup_steps": recipe.warmup, "weight_decay": recipe.weight_decay,
                  "seed": recipe.seed, "device": device, "save_steps": max(1, recipe.steps // 10)},
    }


def _train(recipe: TeacherRecipe, path: Path, device: str) -> None:
    from sad_pipe.bench.assets import quiet, run_config
    from sad_pipe.stages import train_student

    with quiet():
        train_student.run(run_config(train_config(recipe, path, device)))


def _step(times: dict, name: str, out: Path, build) -> None:
    """Build a directory under a temporary name and rename it: it exists only when complete."""
    if out.exists():
        return
    start = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    tmp.rename(out)
    times[name] = time.perf_counter() - start


def _stage(times: dict, name: str, marker: Path, run) -> None:
    """A stage that resumes by itself, skipped once its own last file exists."""
    if marker.exists():
        return
    start = time.perf_counter()
    run()
    times[name] = time.perf_counter() - start


# -- the profile ---------------------------------------------------------------------------------------------

def held_out_sequences(tokenizer_dir: Path | str, held_out_jsonl: Path | str, count: int, max_length: int):
    """`count` packed sequences [n, max_length] (int64) spread evenly over the held-out documents (fewer if
    they hold fewer). Evenly, not the first ones: 64 consecutive sequences cover a handful of documents,
    and one codec table of the stdlib's encodings/ would then weigh a quarter of every figure."""
    import numpy as np
    import torch

    from sad_pipe.pipeline.config import DataConfig
    from sad_pipe.pipeline.data import PackedDocuments
    from sad_pipe.pipeline.models import load_tokenizer

    data = DataConfig(path=str(held_out_jsonl), max_length=max_length, eval_fraction=0.0)
    seqs = [seq.input_ids for seq in PackedDocuments(data, load_tokenizer(str(tokenizer_dir)))]
    if not seqs:
        raise DataError(f"{held_out_jsonl}: holds less than one sequence of {max_length} tokens")
    picked = np.unique(np.linspace(0, len(seqs) - 1, min(count, len(seqs))).round().astype(int))
    return torch.from_numpy(np.stack([seqs[i] for i in picked]))


def teacher_profile(model_dir: Path | str, tokenizer_dir: Path | str, held_out_jsonl: Path | str, sequences: int,
                    max_length: int, *, batch: int = 4, device: str = "cpu") -> dict:
    """How sharp a teacher is on held-out text, per position averaged over `sequences` packed sequences:

        mass_T1[k]   probability mass in the top-k at T=1 (k = 16, 64, 256)
        mass_T2_256  the same for k=256 at T=2 (what KD at T=2 sees)
        entropy_T1   nats
        ce, top1     next-token cross entropy (nats) and top-1 accuracy on the true next token
        target_in_top256  how often the true next token is in the top-256
        top256_overlap_next  share of a position's top-256 ids also in the next position's: a flat teacher's
                     sets barely change (the same frequent tokens everywhere), which is what compresses

    Batch by batch under no_grad: one batch's [B, T, V] logits at a time, never the whole set."""
    import torch

    from sad_pipe.bench.assets import quiet
    from sad_pipe.pipeline.models import load_causal_lm

    dev = torch.device(device)
    seqs = held_out_sequences(tokenizer_dir, held_out_jsonl, sequences, max_length)
    with quiet():
        model = load_causal_lm(str(model_dir), revision=None, dtype=torch.float32, device=dev,
                               trust_remote_code=False, what="teacher").eval()
    vocab = int(model.get_output_embeddings().weight.shape[0])
    ks = [k for k in PROFILE_K if k <= vocab]
    sums = {f"mass_T1_{k}": 0.0 for k in ks} | {"mass_T2_256": 0.0, "entropy_T1": 0.0}
    nll = hits = in_top = overlap = 0.0
    positions = targets = 0
    with torch.no_grad():
        for s in range(0, len(seqs), batch):
            x = seqs[s:s + batch].to(dev)
            logits = model(input_ids=x, use_cache=False).logits.float().flatten(0, 1)  # [B*T, V]
            logp = torch.log_softmax(logits, -1)
            top = logp.topk(max(ks), dim=-1).values.exp()  # descending
            cum = top.cumsum(-1)
            for k in ks:
                sums[f"mass_T1_{k}"] += float(cum[:, k - 1].sum())
            sums["entropy_T1"] += float(-(logp.exp() * logp).sum(-1).sum())
            logp2 = torch.log_softmax(logits / 2.0, -1)
            sums["mass_T2_256"] += float(logp2.topk(min(256, vocab), dim=-1).values.exp().sum())
            positions += logits.shape[0]
            # next-token figures: position t predicts token t+1 of the same sequence
            b, t = x.shape
            pred = logp.view(b, t, -1)[:, :-1]
            nxt = x[:, 1:, None]
            nll += float(-pred.gather(-1, nxt).sum())
            hits += float((pred.argmax(-1, keepdim=True) == nxt).sum())
            in_top += float((pred.gather(-1, nxt) >= pred.topk(min(256, vocab), dim=-1).values[..., -1:]).sum())
            targets += b * (t - 1)
            kk = min(256, vocab)
            member = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, logp.topk(kk, dim=-1).indices, True).view(b, t, -1)
            overlap += float((member[:, :-1] & member[:, 1:]).sum()) / kk
            del logits, logp, logp2, top, cum, pred, member
    profile = {"vocab": vocab, "sequences": len(seqs), "positions": positions,
               **{k: v / positions for k, v in sums.items()},
               "ce": nll / targets, "top1": hits / targets, "target_in_top256": in_top / targets,
               "top256_overlap_next": overlap / targets}
    profile["mass_T1"] = {str(k): profile.pop(f"mass_T1_{k}") for k in ks}
    return profile


def describe(profile: dict) -> str:
    """'top-16/64/256 mass 0.71/0.84/0.92, H 1.30 nats' from a teacher_profile() dict."""
    mass = profile["mass_T1"]
    return (f"top-{'/'.join(mass)} mass {'/'.join(f'{m:.2f}' for m in mass.values())} at T=1, "
            f"H {profile['entropy_T1']:.2f} nats")


# -- small helpers ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive lock file (flock: released by the kernel if the holder dies)."""
    import fcntl

    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _threads(n: int):
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _versions() -> dict:
    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.rename(path)


def _write_jsonl(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


if __name__ == "__main__":  # python -m sad_pipe.bench.teachers NAME: build a named recipe, print its profile
    recipe = globals()[sys.argv[1]] if len(sys.argv) > 1 else SHARP
    asset = build_teacher(recipe)
    print(json.dumps(asset.profile, indent=1))
