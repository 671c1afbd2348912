"""Models and tokenizers: loading (path or hub id), fingerprints, device and dtype choice."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from sad_pipe.errors import ModelError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' requested but torch sees no CUDA device (is this a CPU build of torch?)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs with bf16, fp16 on older GPUs (P100, V100, T4), fp32 on CPU."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def require_local_path(name: str, what: str) -> None:
    """A name that is a path (./, /, ~) must exist: say so, instead of a hub error about an invalid repo id."""
    if name.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(name)):
        raise ModelError(f"{what} {name!r}: no such directory")


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    require_local_path(name, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, hub errors: all mean "cannot load this"
        raise ModelError(f"cannot load tokenizer {name!r}: {_first_line(exc)}") from None


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the token ids: vocab, merges, normalisation, added and special tokens.

    Runtime settings (padding/truncation) are left out; so is `model_max_length`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = {"vocab": sorted(tokenizer.get_vocab().items())}
    spec["special"] = sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _merges(tokenizer) -> list | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str())["model"].get("merges") if backend is not None else None


def check_same_vocabulary(reference, other, what: str) -> list[str]:
    """Refuse `other` unless it is `reference`'s vocabulary: every token both have maps to the same id, no
    id below len of the shorter one means a token only one of them has, and the BPE merges agree. Special-
    token names and chat templates may differ (an Instruct teacher and its base student share a vocabulary).
    Returns warnings: tokens only one of them has, past the shared range (the cache never holds them:
    its ids are below its own tokenizer's size, which the caller checks against the student's logits)."""
    a, b = reference.get_vocab(), other.get_vocab()
    shared = min(len(reference), len(other))
    for token in sorted(a.keys() & b.keys(), key=lambda tok: a[tok]):
        if a[token] != b[token]:
            raise ModelError(f"{what} uses another vocabulary than the cache's teacher: token {token!r} is id {b[token]} "
                             f"there, {a[token]} in the cache's tokenizer; a student must share the teacher's "
                             "vocabulary for its logits to mean the same tokens")
    only = sorted([(i, t, "the cache's tokenizer") for t, i in a.items() if t not in b]
                  + [(i, t, what) for t, i in b.items() if t not in a])
    inside = [x for x in only if x[0] < shared]
    if inside:
        i, token, owner = inside[0]
        raise ModelError(f"{what} uses another vocabulary than the cache's teacher: id {i} is {token!r} only in {owner}; "
                         "a student must share the teacher's vocabulary for its logits to mean the same tokens")
    if _merges(reference) != _merges(other):
        raise ModelError(f"{what} uses another vocabulary than the cache's teacher: the same tokens but other BPE merges, "
                         "so the same text becomes other ids")
    return [f"{what}: token {t!r} (id {i}) exists only in {owner}" for i, t, owner in only]


def config_hash(config) -> str:
    d = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "architectures"):
        d.pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def load_causal_lm(name: str, *, revision: str | None, dtype: torch.dtype, device: torch.device,
                   trust_remote_code: bool, what: str):
    from transformers import AutoModelForCausalLM

    require_local_path(name, what)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - missing files, bad config, hub errors: all mean "cannot load this"
        raise ModelError(f"cannot load {what} {name!r}: {_first_line(exc)}") from None
    return model.to(device)


def vocab_size_of(model) -> int:
    """Logit width (may exceed len(tokenizer) when the embedding table is padded)."""
    return int(model.get_output_embeddings().weight.shape[0])


def text_config(model):
    """The config of the language model inside `model` (a multimodal config nests it; older configs lack the getter)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers_of(model) -> int:
    return int(text_config(model).num_hidden_layers)


def hidden_size_of(model) -> int:
    return int(text_config(model).hidden_size)


def max_positions_of(model) -> int | None:
    config = text_config(model)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def content_fingerprint(name: str, revision: str | None) -> dict:
    """What a model *is*: a content hash of each weight, config and tokenizer file (and the commit of a hub
    id), remembered per file by its stat so an unchanged 15 GB teacher is not read again
    (pipeline/fingerprint.py). Taken after loading: a hub snapshot holds only the files downloaded so far."""
    from sad_pipe.pipeline.fingerprint import model_fingerprint

    fp = model_fingerprint(name, revision)
    return {"commit": fp.get("commit"), "files": fp["files"]}


def teacher_identity(model, name: str, revision: str | None) -> dict:
    return {
        "model": name, "revision": revision, "fingerprint": content_fingerprint(name, revision),
        "config_sha256": config_hash(model.config),
        "architecture": type(model).__name__, "vocab_size": vocab_size_of(model),
        "hidden_size": hidden_size_of(model), "num_layers": num_layers_of(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


VOCAB_MULTIPLE = 64  # embedding rows a fresh student is padded to (tensor-core friendly; Qwen pads the same way)


def padded_vocab_size(tokens: int) -> int:
    return -(-tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def build_student(config: dict | None, model: str | None, *, tokenizer, revision: str | None = None,
                  trust_remote_code: bool = False):
    """A fresh student from an HF config dict, or a pretrained one. Returns it in float32 on CPU.

    A fresh student takes its special tokens from the tokenizer (bos, eos; pad only when the tokenizer has a
    pad token of its own: a pad id makes that embedding row untrainable) and, unless the config sets
    vocab_size, an embedding table of len(tokenizer) rows padded to a multiple of 64."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model is not None:
        return load_causal_lm(model, revision=revision, dtype=torch.float32, device=torch.device("cpu"),
                              trust_remote_code=trust_remote_code, what="student")
    fields = dict(config)
    model_type = fields.pop("model_type")
    fields.setdefault("vocab_size", padded_vocab_size(len(tokenizer)))
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id not in
               (None, tokenizer.eos_token_id, tokenizer.bos_token_id) else None}
    for key, value in special.items():
        if key in fields and fields[key] != value:
            log.warning("student.config.%s %s: the tokenizer's is %s, which the student takes", key, fields[key], value)
        fields[key] = value
    try:
        hf_config = AutoConfig.for_model(model_type, **fields)
        return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - unknown model type or inconsistent sizes: both are the user's config
        raise ModelError(f"student.config: cannot build a {model_type!r} model ({_first_line(exc)})") from None


def generation_config_for(model, tokenizer):
    """What `generate` needs to stop: the tokenizer's EOS (and pad, for batches), and the rows of a padded
    embedding table suppressed (no token, never trained: they must never be sampled)."""
    from transformers import GenerationConfig

    vocab = vocab_size_of(model)
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                            suppress_tokens=list(range(len(tokenizer), vocab)) or None)
