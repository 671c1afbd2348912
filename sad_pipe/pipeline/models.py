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


def teacher_identity(model, name: str, revision: str | None) -> dict:
    return {
        "model": name, "revision": revision, "config_sha256": config_hash(model.config),
        "architecture": type(model).__name__, "vocab_size": vocab_size_of(model),
        "hidden_size": hidden_size_of(model), "num_layers": num_layers_of(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def build_student(config: dict | None, model: str | None, *, vocab_size: int, revision: str | None = None,
                  trust_remote_code: bool = False):
    """A fresh student from an HF config dict, or a pretrained one. Returns it in float32 on CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model is not None:
        return load_causal_lm(model, revision=revision, dtype=torch.float32, device=torch.device("cpu"),
                              trust_remote_code=trust_remote_code, what="student")
    fields = dict(config)
    model_type = fields.pop("model_type")
    fields.setdefault("vocab_size", vocab_size)
    try:
        hf_config = AutoConfig.for_model(model_type, **fields)
        return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - unknown model type or inconsistent sizes: both are the user's config
        raise ModelError(f"student.config: cannot build a {model_type!r} model ({_first_line(exc)})") from None
