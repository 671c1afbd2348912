"""The configuration: one typed section per part of the pipeline, loaded from JSON, validated once.

A config file is JSON with any of the sections below; both stages read the same schema, so one file
can describe a whole experiment. Command-line overrides (`--set train.learning_rate=1e-4`, `--epochs`)
are applied to the raw dict *before* validation, so every problem (unknown key, wrong type, value out
of range, a key the original trainer kept at the top level) is reported at once, each with its dotted path.

Keys inherited from the original trainer keep their meaning: train.batch_size, train.gradient_accumulation_steps,
train.learning_rate, train.warmup_steps (optimizer steps), data.max_length, loss.temperature,
loss.kd_top_k, curriculum.use_curriculum, train.use_gradient_checkpointing, train.eval_steps,
train.max_grad_norm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sad_pipe.errors import ConfigError


class Section(BaseModel):
    # strict: "3" is not silently an int; extra=forbid: a typo is an error, never a default.
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


class TeacherConfig(Section):
    model: str | None = None
    """Path or hub id of the teacher (AutoModelForCausalLM). null caches tokens only (no teacher arrays)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the teacher."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype. auto: bfloat16 on GPUs that support it, float16 on older GPUs, float32 on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the teacher runs. auto: cuda when available."""
    trust_remote_code: bool = False
    """Allow the hub repo to run its own Python code. Off unless you trust the repo."""
    batch_size: int = Field(8, gt=0)
    """Sequences per teacher forward pass."""
    layers: list[int] = []
    """Teacher hidden states to cache, as indices into output_hidden_states (0 = embeddings, L = last)."""


class DataConfig(Section):
    path: str | None = None
    """Dataset: a hub name, or local files / a directory / a glob of .txt, .json, .jsonl or .parquet."""
    name: str | None = None
    """Dataset configuration name (e.g. wikitext-2-raw-v1)."""
    split: str = "train"
    """Dataset split to read; the eval split is held out of it (see eval_fraction)."""
    revision: str | None = None
    """Hub revision of the dataset."""
    format: Literal["text", "messages"] = "text"
    """text: one document per row (text_field). messages: one conversation per row (messages_field, a list of {"role", "content"} as TRL and the HF chat datasets use), rendered with the tokenizer's chat template."""  # noqa: E501
    text_field: str = "text"
    """Column holding the document text (format text)."""
    messages_field: str = "messages"
    """Column holding the conversation (format messages)."""
    packing: Literal["documents", "stream"] = "documents"
    """documents: each packed document is attended as if it stood alone (positions restart, no attention across documents; for teacher and student). stream: attention runs across the packed documents, for teachers trained that way."""  # noqa: E501
    max_documents: int | None = Field(None, gt=0)
    """Read at most this many documents (null: all)."""
    streaming: bool = False
    """Stream the dataset instead of downloading/materialising it first."""
    tokenizer: str | None = None
    """Tokenizer path or hub id. Default: the teacher's."""
    max_length: int = Field(256, ge=8)
    """Tokens per packed sequence."""
    eval_fraction: float = Field(0.02, ge=0.0, le=0.5)
    """Fraction of documents held out for evaluation, chosen by a hash of the text (stable under reordering)."""


class CacheConfig(Section):
    path: str | None = None
    """Cache directory (stage one writes it, stage two reads it)."""
    targets: list[Literal["topk", "sampled", "hybrid"]] = ["topk", "hybrid"]
    """Teacher target forms cached in one pass: topk (the exact top_k logits); sampled (`samples` draws from the teacher's full distribution at sample_temperature, ids with counts: an unbiased estimate of full KD); hybrid (the exact top_k head plus `samples` draws from the rest, weighted by its exact mass: unbiased, far less variance). hybrid also stores the top-k. The default serves loss.kd_form hybrid (the default) as well as tail and subset."""  # noqa: E501
    top_k: int = Field(256, gt=0)
    """Teacher logits kept per token (the exact head for topk and hybrid)."""
    samples: int = Field(32, gt=0, le=255)
    """Draws per position for sampled and hybrid targets (counts are stored as uint8)."""
    sample_temperature: float = Field(1.0, gt=0)
    """Temperature of the teacher distribution sampled from; must be one of `temperatures` (hybrid weights the draws by the tail mass there)."""  # noqa: E501
    sample_seed: int = 0
    """Seeds the draws (and hidden_positions random:p); each sequence's draws depend only on (seed, split, sequence), so a cache is the same for any batch size or number of ranks."""  # noqa: E501
    temperatures: list[float] = [1.0, 2.0]
    """Temperatures at which the full-vocabulary logsumexp is stored (the tail mass is exact only at these)."""
    values: Literal["uint8", "fp16", "bf16"] = "uint8"
    """Top-k value encoding: uint8 gaps below the token's max logit (default), or fp16/bf16 gaps (near-lossless)."""
    hidden_dtype: Literal["bf16", "fp16", "int8"] = "bf16"
    """Hidden-state encoding (of the full state, or of its hidden_rank coefficients); int8 adds one scale per token."""
    hidden_rank: int | None = Field(None, gt=0)
    """Store each cached layer's state as R coefficients in a basis fitted at cache time (PCA of the teacher's states over the first hidden_fit_tokens train tokens, document starts left out; mean, basis and variance explained are stored once in the cache): R * (1 or 2) bytes per token and layer instead of width * 2. The student's feature and relation losses then work in those R dimensions. null: the full width."""  # noqa: E501
    hidden_fit_tokens: int = Field(65536, gt=1)
    """Tokens (the first of the train split, in plan order) the hidden_rank basis is fitted on; the same basis serves every rank."""  # noqa: E501
    hidden_positions: str = "all"
    """Positions whose hidden states are stored: all; every:N (positions 0, N, 2N, ... of each sequence); random:p (round(p * max_length) positions per sequence, drawn from sample_seed, the split and the sequence number). The feature and relation losses use only those."""  # noqa: E501
    store_target_logprob: bool = True
    """Store the teacher's log-prob of the true next token (gives the teacher's own CE for reference)."""
    sequences_per_shard: int = Field(256, gt=0)
    """Packed sequences per shard (the unit of commit and resume); must be a multiple of sequences_per_chunk."""
    sequences_per_chunk: int = Field(16, gt=0)
    """Sequences per compressed chunk (the unit of decompression)."""
    queue_depth: int = Field(2, gt=0)
    """Finished batches waiting for the background writer before the teacher pauses."""

    @field_validator("hidden_positions")
    @classmethod
    def _positions(cls, value: str) -> str:
        hidden_positions(value)  # raises ValueError with the one-line explanation
        return value

    @model_validator(mode="after")
    def _check(self) -> CacheConfig:
        if self.sequences_per_shard % self.sequences_per_chunk:
            raise ValueError(
                f"sequences_per_shard ({self.sequences_per_shard}) must be a multiple of "
                f"sequences_per_chunk ({self.sequences_per_chunk})"
            )
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be a non-empty list of positive numbers, found {self.temperatures}")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets must name each of topk, sampled, hybrid at most once, found {self.targets}")
        if {"sampled", "hybrid"} & set(self.targets) and self.sample_temperature not in self.temperatures:
            raise ValueError(f"sample_temperature {self.sample_temperature:g} must be one of temperatures "
                             f"{self.temperatures} (the logsumexp there weights the draws)")
        return self


def hidden_positions(value: str, seed: int = 0) -> str | dict:
    """cache.hidden_positions as the identity records it: "all", {"every": N} or {"random": p, "seed": seed}."""
    kind, _, arg = value.partition(":")
    try:
        if kind == "all" and not arg:
            return "all"
        if kind == "every" and int(arg) >= 1 and str(int(arg)) == arg:
            return {"every": int(arg)}
        if kind == "random" and 0 < float(arg) <= 1:
            return {"random": float(arg), "seed": seed}
    except ValueError:
        pass
    raise ValueError(f"expected all, every:N (an integer N >= 1) or random:p (0 < p <= 1), found {value!r}")


class StudentConfig(Section):
    model: str | None = None
    """Pretrained student: path or hub id. Exclusive with `config`."""
    config: dict[str, Any] | None = None
    """A fresh student from an HF config, e.g. {"model_type": "llama", "hidden_size": 256, ...}; vocab_size defaults to the tokenizer's."""
    revision: str | None = None
    """Hub revision of a pretrained student."""
    trust_remote_code: bool = False
    """Allow the student's hub repo to run its own code."""

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        if self.model is not None and self.config is not None:
            raise ValueError("set either student.model (pretrained) or student.config (fresh), not both")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("student.config needs a model_type (e.g. \"llama\")")
        return self


class TrainConfig(Section):
    output: str | None = None
    """Run directory: config, plan, metrics, checkpoints, plots, final student."""
    epochs: int = Field(1, gt=0)
    """Passes over the cache's train split."""
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps (the schedule is planned for this many)."""
    batch_size: int = Field(8, gt=0)
    """Sequences per micro-batch (per process)."""
    gradient_accumulation_steps: int = Field(1, gt=0)
    """Micro-batches per optimizer step."""
    learning_rate: float = Field(3e-4, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up length, in optimizer steps."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, over optimizer steps."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPUs that support it, fp16 + grad scaler on older GPUs (P100), fp32 on CPU. fp16 and bf16 also run on a CPU (slowly: to test the GPU paths); fp16 steps whose gradients overflow are skipped and counted, and halve the loss scale."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the student trains."""
    use_gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    device_memory_gb: float | None = Field(None, gt=0)
    """Device memory (GiB) the memory plan compares its projected peak with; null: the GPU's own (torch.cuda.get_device_properties), on a CPU the machine's physical memory."""
    eval_steps: int = Field(0, ge=0)
    """Evaluate every N optimizer steps (0: only at the end)."""
    eval_max_sequences: int | None = Field(None, gt=0)
    """Evaluate on at most this many eval sequences, evenly spaced over the split (null: all)."""
    save_steps: int = Field(0, ge=0)
    """Checkpoint every N optimizer steps (0: only at the end)."""
    keep_checkpoints: int = Field(2, gt=0)
    """Complete checkpoints kept; older ones are deleted after a newer one is complete."""
    max_consecutive_nan: int = Field(5, gt=0)
    """Abort after this many non-finite steps in a row (each is skipped, counted and logged). fp16 overflows the grad scaler skips are counted and logged but not here: each halves the scale, the scaler's own remedy."""
    seed: int = 0
    """Seeds the student init and the data order."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes reading the cache."""
    shuffle_buffer_chunks: int = Field(8, gt=0)
    """Chunks whose sequences are shuffled together (chunk order itself is shuffled too)."""
    resume: bool = True
    """Continue from the newest complete checkpoint in `output` if there is one."""
    log_steps: int = Field(1, gt=0)
    """Write a metrics line every N optimizer steps."""
    report_to: list[Literal["jsonl", "tensorboard", "wandb"]] = ["jsonl"]
    """Where metrics go: metrics.jsonl always; tensorboard (event files in <output>/tensorboard) and wandb (a run in <output>/wandb; WANDB_MODE=offline works) get every metric of it too."""  # noqa: E501
    export_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    """dtype of the weights in final/. null: the training precision's (fp32, or bf16 / fp16 under mixed precision). The layer router stays out of final/ (router.safetensors beside it)."""  # noqa: E501


class LossConfig(Section):
    kd_form: Literal["tail", "subset", "sampled", "hybrid", "full"] = "hybrid"
    """hybrid (default): the exact top-k plus the cached draws from the rest (cache.targets hybrid), an unbiased estimate of full KD that matched online full KD on every seed on a sharp teacher (README, method notes); tail: top-k plus one bucket for the rest (exact teacher tail mass from the cached lse); subset: top-k renormalised (the original trainer's); sampled: the cached draws from the teacher's distribution (cache.targets sampled); full: full-vocabulary KL against a teacher resident in memory (the baseline the cache replaces)."""  # noqa: E501
    temperature: float = Field(1.0, gt=0)
    """KD temperature; the loss is T^2 * KL. tail needs the lse at T in the cache."""
    kd_top_k: int | None = Field(None, gt=0)
    """Use the teacher's top k' <= cached k entries (null: all cached)."""
    student_layers: list[int] | None = None
    """Student hidden states matched to the cached teacher layers (null: same relative depth)."""
    feature_router: bool = True
    """Each matched student layer mixes all cached teacher layers with learned, input-dependent weights; false: fixed map by relative depth."""
    feature_projection: bool = True
    """Project student states to the teacher's width; false requires equal widths."""
    router_balance_weight: float = Field(0.01, ge=0)
    """Weight of the regulariser keeping the router's average choice spread over the teacher layers."""
    mask: Literal["all", "assistant"] | None = None
    """Which tokens CE and KD train on: all, or only the assistant's tokens of chat data (format messages). null: assistant for messages, all for text. Stage one stores teacher outputs only where it trains; stage two follows the cache."""  # noqa: E501
    mask_document_edges: bool = False
    """data.packing stream only: do not train on predicting the first token of a document from the end of the previous one (with packing documents that never happens)."""  # noqa: E501
    chunk_tokens: int = Field(1024, gt=0)
    """Tokens per chunk of the vocabulary-sized loss pass (bounds its memory; never a [B,T,V] fp32 tensor)."""


COMPONENTS = ("kd", "ce", "feature", "relation")


class Weights(Section):
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True)

    kd: float = Field(0.7, ge=0)
    """Weight of the KD loss."""
    ce: float = Field(0.3, ge=0)
    """Weight of next-token cross entropy on the true labels."""
    feature: float = Field(0.0, ge=0)
    """Weight of feature matching against the cached teacher layers."""
    relation: float = Field(0.0, ge=0, validation_alias=AliasChoices("relation", "attention"))
    """Weight of the hidden-state relation loss (token-to-token similarities, KL per sequence). `attention`, the original trainer's name for it, is accepted as an alias."""  # noqa: E501


class Phase(Weights):
    until: float = Field(gt=0, le=1)
    """Progress (fraction of optimizer steps) at which this phase ends."""
    ramp: float = Field(0.0, ge=0, le=1)
    """Progress over which weights move linearly from the previous phase's to this one's."""


def _default_phases() -> list[Phase]:
    # The original trainer's curriculum: KD + CE only for the first 30%, then feature and relation ramp in.
    return [
        Phase(until=0.3, kd=0.7, ce=0.3, feature=0.0, relation=0.0),
        Phase(until=1.0, ramp=0.2, kd=0.5, ce=0.2, feature=0.2, relation=0.1),
    ]


class CurriculumConfig(Section):
    use_curriculum: bool = True
    """false: the constant `weights` below for the whole run."""
    phases: list[Phase] = Field(default_factory=_default_phases)
    """Phases in order; the last must end at 1.0."""
    weights: Weights = Field(default_factory=Weights)
    """Constant weights used when use_curriculum is false."""

    @model_validator(mode="after")
    def _check(self) -> CurriculumConfig:
        if self.use_curriculum:
            ends = [p.until for p in self.phases]
            if not ends or ends != sorted(set(ends)) or ends[-1] != 1.0:
                raise ValueError(f"phases must end at strictly increasing `until` values finishing at 1.0, found {ends}")
        return self


class Config(Section):
    about: str | None = None
    """Free text for people: what this config is for and the command that runs it. Ignored by sad-pipe."""
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def save(self, path: Path | str) -> None:
        """Write the resolved config (what actually ran), next to the output it produced."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def require(self, *keys: str) -> None:
        """Fail unless every dotted key is set; a stage calls this for the fields it cannot default."""
        missing = [k for k in keys if _get(self, k) is None]
        if missing:
            raise ConfigError([f"{k}: required by this command, not set (add it to the file or --set {k}=...)"
                               for k in missing])


# Where the original trainer's flat keys live now: a flat config of the original trainer gets told where each key moved.
ORIGINAL_KEY_HOMES = {
    "batch_size": "train", "gradient_accumulation_steps": "train", "learning_rate": "train",
    "warmup_steps": "train", "max_length": "data", "temperature": "loss", "kd_top_k": "loss",
    "use_curriculum": "curriculum", "use_gradient_checkpointing": "train", "eval_steps": "train",
    "max_grad_norm": "train", "num_epochs": "train (as epochs)", "epochs": "train",
}


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value). The value is JSON if it parses, else a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def _describe(error: dict) -> str:
    path = ".".join(str(p) for p in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        key = str(error["loc"][-1])
        if len(error["loc"]) == 1 and key in ORIGINAL_KEY_HOMES:
            return f"{key}: unknown top-level key; the original trainer's `{key}` lives in section {ORIGINAL_KEY_HOMES[key]} now"
        return f"{path}: unknown key"
    msg = error["msg"].removeprefix("Value error, ")
    found = error.get("input")
    if isinstance(found, dict) or kind == "value_error":
        return f"{path}: {msg}"
    shown = json.dumps(found) if _jsonable(found) else repr(found)
    return f"{path}: {msg} (found {shown})"


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def validate(raw: dict, source: str | None = None) -> Config:
    """Validate a raw dict; every problem is collected into one ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a JSON object at the top level, found {type(raw).__name__}", source)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([_describe(e) for e in exc.errors()], source) from None


def _merge(base: dict, overlay: dict) -> dict:
    """Deep-merge `overlay` into `base` (sections merge key by key; other values are replaced)."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _read_json(path: str | Path) -> dict:
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a JSON object at the top level, found {type(raw).__name__}", str(path))
    return raw


def load_config(paths: str | Path | list | tuple | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read JSON config file(s) (later files deep-merge over earlier ones), apply `--set` overrides, validate once."""
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    raw: dict = {}
    for path in paths:
        _merge(raw, _read_json(path))
    source = " + ".join(str(p) for p in paths) or None
    return validate(apply_overrides(raw, overrides), source)


def reference_markdown() -> str:
    """The config reference for the README, generated from the field docstrings so the two never drift."""
    lines = []
    for section, field in Config.model_fields.items():
        model = field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        lines += [f"#### `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, f in model.model_fields.items():
            default = f.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                default = default.model_dump(mode="json")
            elif isinstance(default, list) and default and isinstance(default[0], BaseModel):
                default = [d.model_dump(mode="json", exclude_defaults=True) for d in default]
            type_name = getattr(f.annotation, "__name__", None) if isinstance(f.annotation, type) else None
            type_name = type_name or str(f.annotation).replace("typing.", "").replace("sad_pipe.pipeline.config.", "")
            doc = (f.description or "").replace("|", "\\|")
            lines.append(f"| `{name}` | `{type_name}` | `{json.dumps(default)}` | {doc} |")
        lines.append("")
    return "\n".join(lines)
