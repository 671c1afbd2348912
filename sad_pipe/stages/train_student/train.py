"""Stage two: train a student from the cache; the teacher never occupies memory (except kd_form=full).

    run(config) -> result
      setup:  cache reader, the cache's tokenizer, student, layer router, AdamW, schedule, data
      plan:   printed and saved before the first step (the numbers the original trainer had to debug by hand)
      loop:   micro-batches -> accumulate -> clip -> optimizer step, or skip the step on NaN/Inf
              eval every eval_steps (same loss function and same weights as training at that step)
              checkpoint every save_steps (atomic; resumes exactly: weights, optimizer, schedule,
              scaler, RNG, data position)
      end:    final eval, student.save_pretrained + tokenizer, metrics plot, result.json

Why a hand-written loop and not transformers.Trainer: the requirements here are a NaN policy that
skips *and names* the batch and aborts after N in a row, a data position that resumes at the exact
sample for any number of ranks and workers, loaders that change which arrays they read with the
curriculum phase, and checkpoints loaded without pickle. Trainer covers each only partly (its resume
replays the sampler, its NaN handling zeroes the loss); bending it would hide the loop this file shows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from torch.utils.data import DataLoader

from sad_pipe.errors import CacheError, ConfigError, ModelError, TrainingError
from sad_pipe.pipeline import distributed
from sad_pipe.pipeline.config import COMPONENTS, Config
from sad_pipe.pipeline.fingerprint import describe_change
from sad_pipe.pipeline.models import (
    build_student,
    check_same_vocabulary,
    config_hash,
    content_fingerprint,
    generation_config_for,
    hidden_size_of,
    load_causal_lm,
    load_tokenizer,
    max_positions_of,
    num_layers_of,
    resolve_device,
    resolve_dtype,
    tokenizer_fingerprint,
    vocab_size_of,
)
from sad_pipe.pipeline.progress import progress_bar
from sad_pipe.stages.train_student.curriculum import active_step_ranges, phase_table, step_weights
from sad_pipe.stages.train_student.losses import (
    TeacherTargets,
    balance_loss,
    feature_loss,
    fit_vocabulary,
    relation_loss,
    routed_feature_loss,
    vocab_losses,
)
from sad_pipe.stages.train_student.memory import CachedArrays, ModelShape, RunShape, device_memory, project_memory
from sad_pipe.stages.train_student.router import LayerRouter
from sad_pipe.stages.train_student.tracking import MetricsLog, check_trackers
from sad_pipe.storage.codecs import decode_hidden, decode_samples, decode_topk
from sad_pipe.storage.hidden import KEPT
from sad_pipe.storage.manifest import DRAW_ARRAYS, cache_id, hidden_name, target_forms
from sad_pipe.storage.reader import CacheDataset, CacheReader, FieldSchedule
from sad_pipe.storage.verify import check_plan_files

log = logging.getLogger(__name__)

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # train.export_dtype

# Field groups each loss component reads from the cache.
NEEDS = {"ce": set(), "feature": {"hidden"}, "relation": {"hidden"}}
KD_NEEDS = {"tail": {"topk", "lse"}, "subset": {"topk"}, "sampled": {"samples"}, "hybrid": {"topk", "lse", "tail_samples"},
            "full": set()}  # online (full) KD reads nothing cached
KD_TARGETS = {"tail": "topk", "subset": "topk", "sampled": "sampled", "hybrid": "hybrid"}  # the cache.targets form each reads


def needs(component: str, kd_form: str) -> set[str]:
    """Cache field groups a component reads (the KD form decides which teacher arrays)."""
    return KD_NEEDS[kd_form] if component == "kd" else NEEDS[component]


def agreement_groups(reader: CacheReader) -> set[str]:
    """What gives the teacher's top-1 for the agreement metric: the top-k where cached, else the draws."""
    if not reader.has_teacher:
        return set()
    return {"topk"} if {"topk", "hybrid"} & target_forms(reader.identity) else {"samples"}


# -- setup ------------------------------------------------------------------------------------------------

class DistillModel(nn.Module):
    """The trainable parts (student + router) behind one forward, so DDP sees a single module."""

    def __init__(self, student: nn.Module, router: LayerRouter | None):
        super().__init__()
        self.student = student
        self.router = router

    @property
    def base(self) -> nn.Module:
        return getattr(self.student, self.student.base_model_prefix)

    def forward(self, input_ids, position_ids, student_layers: list[int] | None, teacher_states=None, mask=None,
                keep=None):
        # position_ids restarting per document: transformers masks attention per document (packed sequences).
        out = self.base(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                        output_hidden_states=student_layers or False)
        states = [out.hidden_states[i] for i in student_layers] if student_layers else []
        if keep is not None:  # keep [B, K]: the positions whose teacher states the cache holds (hidden_positions)
            states = [h.gather(1, keep.unsqueeze(-1).expand(-1, -1, h.shape[-1])) for h in states]
        routed = None
        if teacher_states is not None and self.router is not None:
            routed = self.router(states, teacher_states, mask)
        return out.last_hidden_state, states, routed


class DistillLoss(nn.Module):
    """What DDP wraps: the whole loss of a batch in one forward. DDP must see every use of a parameter
    inside its forward; the LM head is applied by the chunked vocabulary loss, after DistillModel."""

    def __init__(self, core: DistillModel):
        super().__init__()
        self.core = core

    def forward(self, s: Setup, batch: dict[str, torch.Tensor], weights: dict[str, float]) -> dict[str, torch.Tensor]:
        return batch_losses(s, batch, weights, model=self.core)


@dataclass
class TrainPlan:
    """Everything the run will do, computed before the first step."""

    cache: str
    cache_id: str
    train_sequences: int
    eval_sequences: int
    world_size: int
    batch_size: int
    global_batch: int
    gradient_accumulation_steps: int
    micro_batches_per_epoch: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    warmup_steps: int
    warmup_percent: float
    learning_rate: float
    lr_schedule: str
    tokens_per_step: int
    precision: str
    device: str
    kd_form: str
    temperature: float
    kd_top_k: int | None
    student_parameters: int
    student_layers: list[int]
    teacher_layers: list[int]
    phases: list[dict]
    arrays_read: dict[str, list[list[int]]]
    teacher_eval_ce: float | None
    teacher_eval_perplexity: float | None
    seed: int
    student_init: dict  # what the student started from: a pretrained student's content fingerprint, or its config
    memory: dict  # the projected peak device memory by part (memory.MemoryPlan.to_json)

    def lines(self) -> list[str]:
        out = [
            f"cache {self.cache} (id {self.cache_id}): {self.train_sequences} train / {self.eval_sequences} eval sequences",
            f"micro-batches per epoch: {self.micro_batches_per_epoch} (batch {self.batch_size} x {self.world_size} ranks = "
            f"{self.global_batch} sequences)",
            f"gradient accumulation: {self.gradient_accumulation_steps} -> {self.steps_per_epoch} optimizer steps per epoch, "
            f"{self.total_steps} in total over {self.epochs} epoch(s), {self.tokens_per_step:,} tokens per step",
            f"lr: warm-up over {self.warmup_steps} optimizer steps ({self.warmup_percent:.1f}%) to {format_lr(self.learning_rate)}, "
            f"then {self.lr_schedule}",
            f"precision {self.precision} on {self.device}; student {self.student_parameters:,} parameters; "
            f"KD {self.kd_form} at T={self.temperature:g}" + (f", top-{self.kd_top_k}" if self.kd_top_k else ""),
        ]
        for p in self.phases:
            w0 = p.get("weights_start", p.get("weights"))
            w1 = p.get("weights_end", w0)
            fmt = lambda w: " ".join(f"{c}={w[c]:.3g}" for c in COMPONENTS)  # noqa: E731
            ramp = "" if w0 == w1 else f" -> {fmt(w1)}"
            out.append(f"phase {p['phase']}: steps {p['steps'][0]}..{p['steps'][1] - 1}: {fmt(w0)}{ramp}")
        for group, ranges in self.arrays_read.items():
            spans = ", ".join(f"{a}..{b - 1}" for a, b in ranges) or "never"
            out.append(f"reads {group}: steps {spans}")
        if self.teacher_eval_ce is not None:
            out.append(f"teacher on the eval split (from the cache): CE {self.teacher_eval_ce:.4f}, "
                       f"perplexity {self.teacher_eval_perplexity:.2f}; the student chases this")
        return out


@dataclass
class Setup:
    cfg: Config
    reader: CacheReader
    tokenizer: object
    model: nn.Module  # DistillModel, or DDP around DistillLoss(core) under torchrun
    core: DistillModel
    teacher: nn.Module | None
    device: torch.device
    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    plan: TrainPlan
    train_set: CacheDataset
    student_layers: list[int]
    temperature_index: int | None
    student_vocab: int  # the student's logit rows (its embedding table may be padded)
    tokens: int  # len(tokenizer): rows past it are never a token and get no probability
    memory_lines: list[str]  # the memory plan, printed before step 1


def _precision(name: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    if name == "auto":
        if device.type != "cuda":
            return "fp32", None
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # fp16 and bf16 on a CPU are slow but real (torch autocasts and scales gradients there too): they
    # exercise the P100's fp16 path, grad scaler and overflow skips included, on any machine.
    return name, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _student_layers(cfg: Config, reader: CacheReader, n_student: int) -> list[int]:
    teacher_layers = reader.layers
    if cfg.loss.student_layers is not None:
        layers = list(cfg.loss.student_layers)
    else:  # same relative depth as each cached teacher layer
        n_teacher = reader.identity["teacher"]["num_layers"]
        layers = [round(t / n_teacher * n_student) for t in teacher_layers]
    bad = [i for i in layers if not 0 <= i <= n_student]
    if bad:
        raise ConfigError(f"loss.student_layers {bad}: out of range; the student has hidden states 0..{n_student}")
    if not cfg.loss.feature_router and len(layers) != len(teacher_layers):
        raise ConfigError(f"loss.student_layers has {len(layers)} layers but the cache holds {len(teacher_layers)} "
                          "teacher layers; a fixed layer map (feature_router false) pairs them one to one")
    return layers


def _check_cache_fits(cfg: Config, reader: CacheReader, total_steps: int) -> None:
    """Refuse, before any work, a run that asks the cache for what it does not hold."""
    problems = []
    ranges = active_step_ranges(cfg.curriculum, total_steps)
    uses = {c for c, r in ranges.items() if r}
    if "kd" in uses and cfg.loss.kd_form != "full":
        if not reader.has_teacher:
            problems.append("curriculum: kd has non-zero weight but the cache holds no teacher arrays "
                            "(tokens only); set the kd weights to 0 for CE-only training")
        else:
            problems += _kd_form_problems(cfg, reader)
    cached_mask = reader.identity["packing"]["loss_mask"]
    if cfg.loss.mask is not None and cfg.loss.mask != cached_mask:
        problems.append(f"loss.mask {cfg.loss.mask}: the cache was built with loss.mask {cached_mask} "
                        + ("(it holds teacher outputs for the assistant's tokens only)" if cached_mask == "assistant"
                           else "(it has no assistant tokens to restrict to)")
                        + "; leave loss.mask unset to follow the cache, or build a cache with it")
    if cfg.loss.mask_document_edges and reader.identity["packing"]["attention"] == "documents":
        problems.append("loss.mask_document_edges: the cache packs with attention per document, where no position "
                        "is trained across two documents already; it applies to packing stream only")
    if uses & {"feature", "relation"} and not reader.layers:
        problems.append("curriculum: feature/relation have non-zero weight but the cache holds no hidden states "
                        "(build it with teacher.layers set, or set those weights to 0)")
    if reader.sequences("train") == 0:
        problems.append(f"cache {reader.url}: the train split is empty")
    if problems:
        raise ConfigError(problems)


def _kd_form_problems(cfg: Config, reader: CacheReader) -> list[str]:
    """What a cached KD form asks of the cache that it may not hold (the README's bad-input table)."""
    form, forms, problems = cfg.loss.kd_form, target_forms(reader.identity), []
    targets = reader.identity.get("targets") or {}
    if KD_TARGETS[form] not in forms:
        problems.append(f"loss.kd_form {form}: the cache holds no {KD_TARGETS[form]} targets (its cache.targets: "
                        f"{', '.join(sorted(forms))}); use a form it serves, or build a cache with cache.targets "
                        f"including {KD_TARGETS[form]}")
        return problems
    if form in ("tail", "hybrid") and cfg.loss.temperature not in reader.temperatures:
        problems.append(f"loss.temperature {cfg.loss.temperature:g}: the {form} form needs the teacher's "
                        f"logsumexp at T, and the cache holds it only for T in {reader.temperatures}")
    if form in ("sampled", "hybrid") and cfg.loss.temperature != targets["temperature"]:
        problems.append(f"loss.temperature {cfg.loss.temperature:g}: the cache's draws come from the teacher at "
                        f"T={targets['temperature']:g} (cache.sample_temperature); train at that T")
    if cfg.loss.kd_top_k is not None and cfg.loss.kd_top_k > reader.scheme.k:
        problems.append(f"loss.kd_top_k {cfg.loss.kd_top_k}: the cache holds only the top {reader.scheme.k}")
    if form == "hybrid" and cfg.loss.kd_top_k not in (None, reader.scheme.k):
        problems.append(f"loss.kd_top_k {cfg.loss.kd_top_k}: the hybrid form's draws cover everything outside the "
                        f"cached top {reader.scheme.k}, so it uses all of them; leave loss.kd_top_k unset")
    return problems


def _load_student(cfg: Config, tokenizer, max_length: int) -> nn.Module:
    if cfg.student.model is None and cfg.student.config is None:
        raise ConfigError("student: set student.model (pretrained path or hub id) or student.config (fresh model)")
    student = build_student(cfg.student.config, cfg.student.model, tokenizer=tokenizer,
                            revision=cfg.student.revision, trust_remote_code=cfg.student.trust_remote_code)
    if cfg.student.model is not None:
        try:
            own = load_tokenizer(cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code)
        except ModelError:
            own = None  # no tokenizer shipped with the student: it uses the cache's
        if own is not None:
            for warning in check_same_vocabulary(tokenizer, own, f"student {cfg.student.model!r}"):
                log.warning("warning: %s", warning)
    vocab = vocab_size_of(student)
    if vocab < len(tokenizer):
        raise ModelError(f"student has {vocab} logits but the tokenizer has {len(tokenizer)} tokens; "
                         "its embedding table must cover the tokenizer (a larger, padded table is fine)")
    positions = max_positions_of(student)
    if positions is not None and positions < max_length:
        raise ModelError(f"student takes at most {positions} positions but the cache's sequences have {max_length} tokens; "
                         "give it max_position_embeddings (n_positions for GPT-2) >= data.max_length of the cache")
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(student.config, key, None) not in (None, 1.0):
            raise ModelError(f"student config sets {key}: sad-pipe computes logits as the LM head's output and would ignore it")
    return student


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based) of `total`.

    Warm-up is linear and reaches the peak on step warmup - 1, so warm-up ends at the configured
    optimizer step and its first step already learns (peak / warmup; transformers' schedules give 0
    there). The decay then runs over the remaining steps and stays above 0 on the last one."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def format_lr(lr: float) -> str:
    """Three significant digits in any range (2.50e-05, 3.00e-04): warm-up values stay readable."""
    return f"{lr:.2e}"


def _optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.learning_rate, betas=(0.9, 0.95), eps=1e-8)


def _field_schedule(cfg: Config, total_steps: int, mb_per_epoch: int, steps_per_epoch: int) -> tuple[FieldSchedule, dict]:
    """Which arrays micro-batch m reads: a group is read only on steps where a loss needing it has weight > 0."""
    accum = cfg.train.gradient_accumulation_steps
    ranges = active_step_ranges(cfg.curriculum, total_steps)
    by_group: dict[str, list[tuple[int, int]]] = {}
    for component, spans in ranges.items():
        for group in needs(component, cfg.loss.kd_form):
            by_group.setdefault(group, []).extend(spans)

    def first_micro_batch(step: int) -> int:
        epoch, within = divmod(step, steps_per_epoch)
        return epoch * mb_per_epoch + min(within * accum, mb_per_epoch)

    extra = {}
    for group, spans in by_group.items():
        merged = sorted(set(spans))
        extra[group] = [(first_micro_batch(a), first_micro_batch(b)) for a, b in merged]
    arrays_read = {"input_ids": [[0, total_steps]], **{g: [list(s) for s in sorted(set(v))] for g, v in by_group.items()}}
    return FieldSchedule(always={"input_ids"}, extra=extra), arrays_read


def _router(cfg: Config, reader: CacheReader, student: nn.Module, student_layers: list[int]) -> LayerRouter:
    """Projections of the matched student layers to the teacher's width, and the learned (or fixed) mixture of
    cached teacher layers each one is matched to."""
    t_width = reader.hidden_width  # a low-rank cache: the rank (the student is projected into each layer's basis)
    s_width, n_student = hidden_size_of(student), num_layers_of(student)
    if not cfg.loss.feature_projection and reader.hidden_rank:
        raise ConfigError(f"loss.feature_projection false: the cache holds rank-{reader.hidden_rank} coefficients of "
                          "the teacher's states (cache.hidden_rank), which the student is always projected onto")
    if not cfg.loss.feature_projection and s_width != t_width:
        raise ConfigError(f"loss.feature_projection false needs equal widths: student {s_width}, teacher {t_width}; "
                          "turn the projection on or pick a student of the teacher's width")
    n_t = len(reader.layers)
    n_teacher = reader.identity["teacher"]["num_layers"]
    fixed = [min(range(n_t), key=lambda j: abs(reader.layers[j] / n_teacher - s / n_student)) for s in student_layers]
    return LayerRouter(s_width, t_width, len(student_layers), n_t, learned=cfg.loss.feature_router,
                       project=cfg.loss.feature_projection, fixed_map=fixed, per_layer=reader.hidden_rank is not None)


def _online_teacher(cfg: Config, reader: CacheReader, tokenizer, device: torch.device) -> nn.Module:
    """kd_form full: the teacher itself, resident in memory (the baseline the cache replaces)."""
    name = cfg.teacher.model or reader.identity["teacher"] and reader.identity["teacher"]["model"]
    if not name:
        raise ConfigError("loss.kd_form full needs a teacher: set teacher.model (the cache has none)")
    teacher = load_causal_lm(name, revision=cfg.teacher.revision, dtype=resolve_dtype(cfg.teacher.dtype, device),
                             device=device, trust_remote_code=cfg.teacher.trust_remote_code, what="teacher")
    teacher.eval().requires_grad_(False)
    own = load_tokenizer(name, cfg.teacher.revision, cfg.teacher.trust_remote_code)
    for warning in check_same_vocabulary(tokenizer, own, f"online teacher {name!r}"):
        log.warning("warning: %s", warning)
    return teacher


def cache_tokenizer(reader: CacheReader):
    """The cache's tokenizer, after checking it and config.json against the sizes and hashes plan.json records."""
    damaged = check_plan_files(reader.cache, reader.plan)  # the tokenizer and config.json: small, checked whole
    if damaged:
        raise CacheError(f"{reader.url}: {damaged[0]}; run sad-pipe verify --full {reader.url}")
    with reader.cache.local_dir("tokenizer") as tokenizer_dir:  # a temp copy if the cache is on an object store
        tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer_fingerprint(tokenizer) != reader.identity["tokenizer"]["sha256"]:
        raise ModelError(f"{reader.url}/tokenizer does not match the fingerprint in the manifest; the cache is damaged")
    return tokenizer


def setup(cfg: Config) -> Setup:
    cfg.require("cache.path", "train.output")
    if os.path.isfile(cfg.train.output):  # refused before any work, like cache.path
        raise ConfigError(f"train.output {cfg.train.output}: is a file, expected a directory")
    reader = CacheReader(cfg.cache.path)
    tokenizer = cache_tokenizer(reader)
    device = resolve_device(cfg.train.device)
    precision, autocast_dtype = _precision(cfg.train.precision, device)
    rank, world = distributed.rank(), distributed.world_size()

    torch.manual_seed(cfg.train.seed)  # same init for every method of a comparison
    student = _load_student(cfg, tokenizer, reader.max_length)
    n_student = num_layers_of(student)
    if cfg.train.use_gradient_checkpointing:  # renamed in transformers 5.x; the old name warns
        getattr(student, "activation_checkpointing_enable", student.gradient_checkpointing_enable)()
    global_batch = cfg.train.batch_size * world
    mb_per_epoch = reader.sequences("train") // global_batch
    if mb_per_epoch == 0:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} x {world} ranks = {global_batch} sequences per "
                          f"micro-batch, but the cache has only {reader.sequences('train')} training sequences")
    accum = cfg.train.gradient_accumulation_steps
    steps_per_epoch = math.ceil(mb_per_epoch / accum)
    total = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    epochs = math.ceil(total / steps_per_epoch)
    if cfg.train.warmup_steps >= total:
        raise ConfigError(f"train.warmup_steps {cfg.train.warmup_steps}: must be below the {total} optimizer steps planned")
    _check_cache_fits(cfg, reader, total)

    uses_hidden = any(active_step_ranges(cfg.curriculum, total)[c] for c in ("feature", "relation"))
    student_layers = _student_layers(cfg, reader, n_student) if uses_hidden else []
    router = _router(cfg, reader, student, student_layers) if uses_hidden else None
    core = DistillModel(student, router).to(device)
    model = core
    if distributed.active():
        model = nn.parallel.DistributedDataParallel(DistillLoss(core), find_unused_parameters=router is not None)
    uses_online_kd = cfg.loss.kd_form == "full" and any(active_step_ranges(cfg.curriculum, total)["kd"])
    teacher = _online_teacher(cfg, reader, tokenizer, device) if uses_online_kd else None

    optimizer = _optimizer(model, cfg)
    warmup, kind = cfg.train.warmup_steps, cfg.train.lr_schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, kind))
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    schedule, arrays_read = _field_schedule(cfg, total, mb_per_epoch, steps_per_epoch)
    train_set = CacheDataset(cfg.cache.path, "train", cfg.train.batch_size, schedule, seed=cfg.train.seed,
                             buffer_chunks=cfg.train.shuffle_buffer_chunks, rank=rank, world_size=world)
    summary = reader.manifest.get("summary", {})
    teacher_ce = summary.get("teacher_eval_ce")
    memory = _memory_plan(cfg, reader, core, teacher, precision, device, total, uses_hidden)
    plan = TrainPlan(
        cache=cfg.cache.path, cache_id=cache_id(reader.identity), train_sequences=reader.sequences("train"),
        eval_sequences=reader.sequences("eval"), world_size=world, batch_size=cfg.train.batch_size,
        global_batch=global_batch, gradient_accumulation_steps=accum, micro_batches_per_epoch=mb_per_epoch,
        steps_per_epoch=steps_per_epoch, epochs=epochs, total_steps=total, warmup_steps=cfg.train.warmup_steps,
        warmup_percent=100.0 * cfg.train.warmup_steps / total, learning_rate=cfg.train.learning_rate,
        lr_schedule=cfg.train.lr_schedule, tokens_per_step=global_batch * accum * reader.max_length,
        precision=precision, device=str(device), kd_form=cfg.loss.kd_form, temperature=cfg.loss.temperature,
        kd_top_k=cfg.loss.kd_top_k, student_parameters=sum(p.numel() for p in student.parameters()),
        student_layers=student_layers, teacher_layers=reader.layers, phases=phase_table(cfg.curriculum, total),
        arrays_read=arrays_read, teacher_eval_ce=teacher_ce,
        teacher_eval_perplexity=math.exp(teacher_ce) if teacher_ce is not None else None,
        seed=cfg.train.seed, student_init=_student_init(cfg, student), memory=memory.to_json(),
    )
    t_index = reader.temperatures.index(cfg.loss.temperature) if cfg.loss.temperature in reader.temperatures else None
    return Setup(cfg, reader, tokenizer, model, core, teacher, device, autocast_dtype, scaler, optimizer, scheduler,
                 plan, train_set, student_layers, t_index, student.get_output_embeddings().weight.shape[0],
                 len(tokenizer), memory.lines())


def _memory_plan(cfg: Config, reader: CacheReader, core: DistillModel, teacher: nn.Module | None, precision: str,
                 device: torch.device, total_steps: int, uses_hidden: bool):
    """Will it fit? The projected peak device memory of this run by part, against the device's memory."""
    ranges = active_step_ranges(cfg.curriculum, total_steps)
    kd_form = cfg.loss.kd_form if any(ranges["kd"]) else None
    groups = {"topk"} & agreement_groups(reader) | (needs("kd", kd_form) if kd_form else set())
    draws = (reader.identity.get("targets") or {}).get("samples", 0) if {"samples", "tail_samples"} & groups else 0
    arrays = CachedArrays(top_k=(cfg.loss.kd_top_k or reader.scheme.k) if "topk" in groups else 0,
                          lse_temperatures=len(reader.temperatures) if "lse" in groups else 0, draws=draws,
                          hidden_layers=len(reader.layers) if uses_hidden else 0,
                          teacher_hidden=reader.hidden_width if uses_hidden else 0,
                          entry_bytes=reader.scheme.id_dtype.itemsize + reader.scheme.value_dtype.itemsize
                          if reader.has_teacher else 3)
    # Each loader process (the main one, or each worker) keeps up to shuffle_buffer_chunks + 2 chunks decompressed.
    loader_sequences = ((cfg.train.shuffle_buffer_chunks + 2) * reader.chunk_rows * max(1, cfg.train.num_workers)
                        if device.type == "cpu" else 0)
    run = RunShape(batch_size=cfg.train.batch_size, length=reader.max_length, precision=precision,
                   gradient_checkpointing=cfg.train.use_gradient_checkpointing, chunk_tokens=cfg.loss.chunk_tokens,
                   kd_form=kd_form, trainable_parameters=sum(p.numel() for p in core.parameters()), arrays=arrays,
                   teacher=ModelShape.of(teacher) if teacher is not None else None,
                   teacher_bytes=next(teacher.parameters()).element_size() if teacher is not None else 2,
                   ddp=distributed.active(), loader_sequences=loader_sequences)
    return project_memory(ModelShape.of(core.student), run, *device_memory(device, cfg.train.device_memory_gb))


# -- one batch: the loss every caller (train and eval) shares -----------------------------------------------

def cached_targets(s: Setup, batch: dict[str, torch.Tensor], form: str | None = None) -> TeacherTargets:
    """The cached teacher targets of a micro-batch, flattened to [B*T, ...] on the device: the top-k (with the
    lse at the training T) and the draws the KD form (`form`, by default the run's) uses. Ids the student has no logit for (a teacher table
    wider than the student's) are masked: top-k entries invalid, draws of count 0."""
    dev = s.device
    arrays = {k: v.to(dev, non_blocking=True) for k, v in batch.items()
              if k.startswith(("topk_", "sample_", "tail_")) or k == "lse"}
    out = TeacherTargets()
    if "topk_ids" in arrays:
        top = decode_topk(arrays, s.reader.scheme, s.cfg.loss.kd_top_k)
        ids = top.ids.flatten(0, 1)
        out.valid = ids < s.student_vocab
        out.ids, out.logits = ids.clamp_max(s.student_vocab - 1), top.logits.flatten(0, 1)
    if "lse" in arrays and s.temperature_index is not None:
        out.lse = arrays["lse"][..., s.temperature_index].reshape(-1)
    name = DRAW_ARRAYS.get(form or s.cfg.loss.kd_form)
    if name is None and out.ids is None:  # sampled targets only, read for the agreement metric
        name = "sample"
    if name is not None and f"{name}_ids" in arrays:
        ids, counts = decode_samples(arrays, name)
        ids, counts = ids.flatten(0, 1), counts.flatten(0, 1)
        out.draw_counts = torch.where(ids < s.student_vocab, counts, 0.0)
        out.draw_ids = ids.clamp_max(s.student_vocab - 1)
    return out


def loss_masks(s: Setup, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE mask, KD mask) [B, T] float, on the loader's device. KD trains where stage one did (the cache's
    loss_mask: never across two documents with packing "documents", only the assistant's tokens of chat
    data); CE also needs the next token inside the sequence."""
    kd = batch["loss_mask"].float()
    if s.cfg.loss.mask_document_edges:  # packing stream: do not learn "what follows EOS" across unrelated documents
        kd = kd * (batch["input_ids"] != s.reader.identity["tokenizer"]["eos_token_id"]).float()
    ce = kd.clone()
    ce[:, -1] = 0
    return ce, kd


def global_counts(s: Setup, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Under DDP: the CE and KD positions of this micro-batch summed over the ranks, over their number.
    Ranks' batches hold different numbers of trained positions (documents end anywhere); dividing each rank's
    sum by this common count makes DDP's average of gradients the gradient of the global mean. The masks
    are CPU tensors from the loader: the all-reduce never waits for a device."""
    ce, kd = loss_masks(s, batch)
    counts = torch.tensor([float(ce.sum()), float(kd.sum())], dtype=torch.float64)
    distributed.all_reduce_sum(counts)
    return tuple((counts / distributed.world_size()).tolist())


def batch_losses(s: Setup, batch: dict[str, torch.Tensor], weights: dict[str, float], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Raw components (only those with weight > 0, plus CE and KD agreement as metrics) and the weighted total.

    `model` defaults to the (maybe DDP-wrapped) training model; eval passes the bare one."""
    if isinstance(model or s.model, nn.parallel.DistributedDataParallel):
        return (model or s.model)(s, batch, weights)  # DistillLoss.forward, which comes back here with the core
    cfg, dev = s.cfg, s.device
    ids = batch["input_ids"].to(dev, non_blocking=True).long()
    positions = batch["position_ids"].to(dev, non_blocking=True).long()
    b, t = ids.shape
    labels = torch.cat([ids[:, 1:], torch.full((b, 1), -1, device=dev, dtype=ids.dtype)], dim=1)
    ce_mask, kd_mask = (m.to(dev, non_blocking=True) for m in loss_masks(s, batch))
    want = {c for c in COMPONENTS if weights[c] > 0}
    need_hidden = bool(want & {"feature", "relation"})
    # Hidden-state losses: every position with a cached state counts; with hidden_positions, only those kept.
    keep = batch[KEPT].to(dev).long() if need_hidden and KEPT in batch else None
    token_mask = torch.ones(b, t if keep is None else keep.shape[1], device=dev)

    teacher_states = None
    if need_hidden:
        teacher_states = [decode_hidden(batch[hidden_name(l)].to(dev), batch.get(hidden_name(l) + "_scale"),
                                        s.reader.identity["hidden_dtype"]) for l in s.reader.layers]
        teacher_states = [h if h.device == dev else h.to(dev) for h in teacher_states]
    autocast = torch.autocast(dev.type, dtype=s.autocast_dtype) if s.autocast_dtype else nullcontext()
    with autocast:
        last, states, routed = (model or s.model)(ids, positions, s.student_layers if need_hidden else None,
                                                  teacher_states if "feature" in want else None, token_mask, keep)

    targets = None  # teacher targets: for KD, and (when the cache gives them anyway) for top-1 agreement
    if "kd" in want or {"topk_ids", "sample_ids"} & batch.keys():
        if cfg.loss.kd_form == "full" and s.teacher is not None and "kd" in want:
            with torch.no_grad():
                full = s.teacher(input_ids=ids, position_ids=positions, use_cache=False).logits.reshape(b * t, -1)
            targets = TeacherTargets(full_logits=fit_vocabulary(full.float(), s.tokens, s.student_vocab))
        elif {"topk_ids", "sample_ids"} & batch.keys():
            targets = cached_targets(s, batch)
    head = s.core.student.get_output_embeddings()
    out = vocab_losses(last.reshape(b * t, -1), head.weight, head.bias, labels.reshape(-1), ce_mask.reshape(-1),
                       kd_mask.reshape(-1), targets, form=cfg.loss.kd_form, temperature=cfg.loss.temperature,
                       chunk_tokens=cfg.loss.chunk_tokens, compute_kd="kd" in want, vocab_limit=s.tokens,
                       counts=batch.get("global_counts"))
    if "feature" in want:
        projected, target_states, routing = routed
        if s.reader.hidden_rank:  # per-layer bases: the router mixes the per-layer losses (router.py)
            out["feature"] = sum(routed_feature_loss(p, target_states, routing[i], token_mask)
                                 for i, p in enumerate(projected)) / len(projected)
        else:
            out["feature"] = sum(feature_loss(p, tgt, token_mask) for p, tgt in zip(projected, target_states)) / len(projected)
        out["router_balance"] = balance_loss(routing)
    if "relation" in want:
        pairs = s.core.router.fixed_map.tolist() if s.core.router is not None else range(len(states))
        segments = (positions == 0).cumsum(-1)  # relations pair tokens of one document piece only
        if keep is not None:  # the kept positions, ascending: the causal order among them is theirs
            segments = segments.gather(1, keep)
        out["relation"] = sum(relation_loss(h, teacher_states[j], token_mask, segments)
                              for h, j in zip(states, pairs)) / len(states)
    # In COMPONENTS order, never a set's: set order follows the per-process string hash seed, and a float sum
    # in another order differs in its last bits, so a resumed process would not reproduce the run it continues.
    total = sum((weights[c] * out[c] for c in COMPONENTS if c in want), out["ce"].new_zeros(()))
    if "router_balance" in out:
        total = total + weights["feature"] * cfg.loss.router_balance_weight * out["router_balance"]
    out["total"] = total
    return out


# -- checkpoints --------------------------------------------------------------------------------------------

def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, t in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = t
    return state


def save_checkpoint(s: Setup, run_dir: Path, state: dict) -> Path:
    """Write everything to a temp dir, fsync, mark COMPLETE, rename: a crash leaves the old ones valid."""
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step-{state['step']:08d}"
    tmp = ckpt_root / f".tmp-step-{state['step']:08d}-{os.getpid()}"
    for stale in ckpt_root.glob(".tmp-step-*"):  # saves a killed run left half-written (only rank 0 saves)
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(s.core, str(tmp / "model.safetensors"))
    torch.save(s.optimizer.state_dict(), tmp / "optimizer.pt")  # tensors + numbers: loaded with weights_only=True
    torch.save(_rng_state(), tmp / "rng.pt")
    extra = {"scheduler": s.scheduler.state_dict(), "scaler": s.scaler.state_dict() if s.scaler else None}
    (tmp / "state.json").write_text(json.dumps({**state, **extra}, indent=1, default=float))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    (tmp / "COMPLETE").write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    complete = sorted(p for p in ckpt_root.glob("step-*") if (p / "COMPLETE").exists())
    for old in complete[:-s.cfg.train.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    complete = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())
    return complete[-1] if complete else None


def load_checkpoint(s: Setup, path: Path) -> dict:
    load_model(s.core, str(path / "model.safetensors"), device=str(s.device))
    s.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location=s.device))
    state = json.loads((path / "state.json").read_text())
    s.scheduler.load_state_dict(state.pop("scheduler"))
    scaler_state = state.pop("scaler")
    if s.scaler is not None and scaler_state:
        s.scaler.load_state_dict(scaler_state)
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(rng) if k.startswith("cuda")])
    return state


# Changing these between a run and its resume would silently train something else (the restored
# scheduler, for one, keeps the old learning rate), or fail deep inside loading the checkpoint.
RESUME_KEYS = ("cache_id", "global_batch", "gradient_accumulation_steps", "total_steps", "learning_rate", "lr_schedule",
               "warmup_steps", "kd_form", "temperature", "kd_top_k", "student_parameters", "student_layers", "seed")


def _student_init(cfg: Config, student: nn.Module) -> dict:
    if cfg.student.model is not None:
        return {"model": cfg.student.model, **content_fingerprint(cfg.student.model, cfg.student.revision)}
    return {"config_sha256": config_hash(student.config)}


def _check_resume(run_dir: Path, plan: TrainPlan) -> None:
    saved_path = run_dir / "plan.json"
    if not saved_path.exists():
        return
    saved = json.loads(saved_path.read_text())
    before = saved.get("student_init")
    change = describe_change(before, plan.student_init) if before and "files" in before else (
        "its config changed" if before is not None and before != plan.student_init else None)
    if change:
        raise ConfigError(f"cannot resume the run in {run_dir}: the student it started from is not the one now "
                          f"({change}) (use a new train.output, or train.resume false with an empty directory)")
    changed = [f"{k} was {saved.get(k)!r}, now {getattr(plan, k)!r}" for k in RESUME_KEYS if saved.get(k) != getattr(plan, k)]
    if changed:
        raise ConfigError(f"cannot resume the run in {run_dir}: " + "; ".join(changed) +
                          " (use a new train.output, or train.resume false with an empty directory)")


# -- eval -----------------------------------------------------------------------------------------------------

def logged_weights(s: Setup, step: int) -> dict[str, float]:
    """The weights of the optimizer step logged as `step` in metrics.jsonl (1-based: steps done so far,
    so it is 0-based step `step - 1`). Eval logged at `step` uses the same, so the losses compare."""
    return step_weights(max(step, 1) - 1, s.plan.total_steps, s.cfg.curriculum)


@torch.no_grad()
def evaluate(s: Setup, step: int) -> dict[str, float]:
    """Eval split after `step` optimizer steps, with the weights the train loss logged at `step` used."""
    if s.reader.sequences("eval") == 0:
        return {}
    weights = logged_weights(s, step)
    groups = {"input_ids"}
    for c in COMPONENTS:
        if weights[c] > 0:
            groups |= needs(c, s.cfg.loss.kd_form)
    groups |= agreement_groups(s.reader)  # top-1 agreement with the teacher, reported whatever the weights
    data = CacheDataset(s.cfg.cache.path, "eval", s.cfg.train.batch_size, FieldSchedule(always=groups), shuffle=False,
                        drop_last=False, limit=s.cfg.train.eval_max_sequences, rank=distributed.rank(),
                        world_size=distributed.world_size())
    s.model.eval()
    sums: dict[str, float] = {}
    seen = 0
    for batch in DataLoader(data, batch_size=None, num_workers=0, generator=_loader_generator()):
        n = batch["input_ids"].shape[0]
        if n == 0:
            continue
        out = batch_losses(s, batch, weights, model=s.core)  # no DDP: ranks may see different batch counts
        for k, v in out.items():  # device tensors: no sync per batch
            sums[k] = sums.get(k, 0.0) + v.detach() * n
        seen += n
    s.model.train()
    keys = sorted(sums)
    totals = distributed.sum_figures({**{k: float(sums[k]) for k in keys}, "_seen": seen})
    seen = totals.pop("_seen")
    result = {f"eval/{k}": v / max(seen, 1) for k, v in totals.items()}
    if "eval/ce" in result:
        result["eval/perplexity"] = math.exp(min(result["eval/ce"], 50.0))
    return result


# -- the loop -------------------------------------------------------------------------------------------------

@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    next_micro_batch: int = 0  # data position within `epoch`
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    skipped: list = field(default_factory=list)  # [{"step", "sequence_ids"}] for the last few skips


def _is_main() -> bool:
    return distributed.rank() == 0


def run(cfg: Config, dry_run: bool = False) -> dict:
    """Stage two. Returns the final eval metrics and the run's figures (also saved as result.json).
    dry_run: set up (every check), print the plan and the memory plan, and stop: nothing trained or written."""
    wall_start = time.perf_counter()
    check_trackers(cfg.train.report_to)
    s = setup(cfg)
    if dry_run:
        _log_plan(s)
        memory = s.plan.memory
        return {"dry_run": True, "total_steps": s.plan.total_steps, "projected_peak_gib": memory["total_bytes"] / 2 ** 30,
                "device": memory["device"],
                "device_gib": memory["device_bytes"] / 2 ** 30 if memory["device_bytes"] else None, "fits": memory["fits"]}
    run_dir = Path(cfg.train.output)
    state = _resume(s, run_dir)
    if _is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
        (run_dir / "plan.json").write_text(json.dumps(asdict(s.plan), indent=1) + "\n")
        _log_plan(s)
    metrics = MetricsLog(run_dir, state.step, cfg.train.report_to, cfg.to_dict()) if _is_main() else None
    try:
        _train(s, state, run_dir, metrics)
        final_eval = evaluate(s, s.plan.total_steps)
        result = _result(s, state, final_eval, wall_start)
        if metrics:
            _finish(s, run_dir, state, final_eval, result, metrics)
    finally:
        if metrics:
            metrics.close()
    distributed.barrier()
    return result


def _result(s: Setup, state: LoopState, final_eval: dict, wall_start: float) -> dict:
    result = {
        "run": str(Path(s.cfg.train.output)), "cache_id": s.plan.cache_id, "steps": state.step, "skipped_steps": state.skipped_steps,
        "train_seconds": state.train_seconds, "wall_seconds": time.perf_counter() - wall_start,
        "tokens_per_second": state.tokens / state.train_seconds if state.train_seconds else None,
        "peak_memory_bytes": _peak_memory(s.device), "student_parameters": s.plan.student_parameters, **final_eval,
    }
    if s.plan.teacher_eval_ce is not None:
        result["teacher/eval_ce"] = s.plan.teacher_eval_ce
    return result


def _log_plan(s: Setup) -> None:
    """The plan and the memory plan, before step 1 (rank 0); a warning when the projection does not fit."""
    if not _is_main():
        return
    for line in s.plan.lines():
        log.info("plan: %s", line)
    for line in s.memory_lines:
        log.info("%s", line)
    if s.plan.memory["fits"] is False:
        log.warning("warning: the projected peak memory exceeds the device's (the memory plan above says what would fit)")


def _resume(s: Setup, run_dir: Path) -> LoopState:
    """The loop state to start from: a fresh one, or the newest complete checkpoint's (after checking the run
    is the same run). result.json is written last, and the last step always leaves a checkpoint, so a run
    stopped while writing final/ resumes from it and finishes again."""
    if (run_dir / "result.json").exists():
        raise ConfigError(f"train.output {run_dir}: holds a finished run; choose another directory or delete it")
    resume_from = latest_checkpoint(run_dir) if run_dir.exists() else None
    if resume_from is None:
        return LoopState()
    if not s.cfg.train.resume:
        raise ConfigError(f"train.output {run_dir}: holds checkpoints but train.resume is false; "
                          "choose another directory or delete it")
    _check_resume(run_dir, s.plan)
    try:
        saved = load_checkpoint(s, resume_from)
    except Exception as exc:  # noqa: BLE001 - a damaged file, or a pickle that weights_only refuses
        import pickle

        why = ("it holds Python objects, not only tensors, and loading them could run code" if
               isinstance(exc, pickle.UnpicklingError) else f"{type(exc).__name__}: {str(exc).strip()[:200]}")
        raise TrainingError(f"checkpoint {resume_from} cannot be loaded ({why}); delete it to resume from the one "
                            "before, or train into a new train.output") from None
    state = LoopState(**{k: saved[k] for k in asdict(LoopState()) if k in saved})
    log.info("resuming from %s (step %d of %d)", resume_from, state.step, s.plan.total_steps)
    return state


def _finish(s: Setup, run_dir: Path, state: LoopState, final_eval: dict, result: dict, metrics: MetricsLog) -> None:
    """The run's products (rank 0): the final eval line, final/ (student + tokenizer), plots, result.json last."""
    metrics.write({**_eval_record(s, state.step, final_eval), "final": True})
    final = run_dir / "final"
    student = s.core.student
    student.generation_config = generation_config_for(student, s.tokenizer)
    # The last thing done with the student: training is over and its checkpoint is written, so converting it
    # in place costs no second copy of the weights.
    student.to(EXPORT_DTYPES[s.cfg.train.export_dtype or s.plan.precision])
    student.save_pretrained(final)
    s.tokenizer.save_pretrained(final)
    if s.core.router is not None:  # beside final/, not in it: final/ is a plain HF model for any tool to load
        save_model(s.core.router, str(run_dir / "router.safetensors"))
    from sad_pipe.stages.train_student.plots import plot_metrics

    plot_metrics(run_dir / "metrics.jsonl", run_dir / "plots")
    (run_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


@dataclass
class StepInputs:
    """What the micro-batches of one optimizer step leave for its boundary: loss sums (device tensors, so a
    micro-batch never waits for the device), whether each loss was finite, and the sequences seen."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    finite: list[torch.Tensor] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)

    def add(self, out: dict[str, torch.Tensor], sequence_ids: torch.Tensor, group_size: int) -> None:
        for k, v in out.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach() / group_size
        self.finite.append(torch.isfinite(out["total"].detach()))
        self.ids.append(sequence_ids.tolist())

    def reduce(self) -> tuple[bool, list[int], dict[str, float]]:
        """(any rank saw a non-finite loss, this rank's sequences to blame, loss sums averaged over ranks):
        one all-reduce and one device sync per optimizer step."""
        keys = sorted(self.sums)  # the same on every rank: the components follow the shared weights
        local_bad = ~torch.stack(self.finite).all()
        vector = torch.stack([local_bad.float()] + [self.sums[k].float() for k in keys])
        distributed.all_reduce_sum(vector)
        values = vector.tolist()
        bad_ids: list[int] = []
        if values[0] > 0:  # rare: find which micro-batches of this rank were to blame
            flags = torch.stack(self.finite).tolist()
            bad_ids = [i for ok, ids in zip(flags, self.ids) if not ok for i in ids]
        world = distributed.world_size()
        return values[0] > 0, bad_ids, {k: v / world for k, v in zip(keys, values[1:])}


def _train(s: Setup, state: LoopState, run_dir: Path, metrics) -> None:
    cfg, plan = s.cfg, s.plan
    accum, mb_per_epoch = plan.gradient_accumulation_steps, plan.micro_batches_per_epoch
    s.model.train()
    bar = progress_bar(total=plan.total_steps, initial=state.step, desc="train", unit=" step", disable=not _is_main())
    while state.step < plan.total_steps:
        s.train_set.set_position(state.epoch, state.next_micro_batch)
        loader = DataLoader(s.train_set, batch_size=None, num_workers=cfg.train.num_workers,
                            pin_memory=s.device.type == "cuda", persistent_workers=False, generator=_loader_generator())
        inputs, step_start = StepInputs(), time.perf_counter()
        for batch in loader:
            b = int(batch["micro_batch"])
            group_start = b // accum * accum
            group_size = min(accum, mb_per_epoch - group_start)
            weights = step_weights(state.step, plan.total_steps, cfg.curriculum)
            last_of_step = b + 1 == group_start + group_size
            sync = nullcontext() if last_of_step or not distributed.active() else s.model.no_sync()
            if distributed.active():
                batch["global_counts"] = global_counts(s, batch)
            with sync:
                out = batch_losses(s, batch, weights)
                # A non-finite loss is backpropagated like any other (its NaN gradients are thrown away with
                # the whole step below), so no micro-batch has to wait for the device to know.
                loss = out["total"] / group_size
                (s.scaler.scale(loss) if s.scaler else loss).backward()
            inputs.add(out, batch["sequence_ids"], group_size)
            if not last_of_step:
                continue
            _end_of_step(s, state, inputs, weights, len(inputs.ids), b + 1, time.perf_counter() - step_start, metrics, bar)
            if cfg.train.eval_steps and state.step % cfg.train.eval_steps == 0 and state.step < plan.total_steps:
                ev = evaluate(s, state.step)
                if metrics and ev:
                    metrics.write(_eval_record(s, state.step, ev))
                    log.info("eval at step %d: %s", state.step, ", ".join(f"{k[5:]}={v:.4f}" for k, v in ev.items()))
            if _is_main() and ((cfg.train.save_steps and state.step % cfg.train.save_steps == 0) or state.step == plan.total_steps):
                save_checkpoint(s, run_dir, asdict(state))
            distributed.barrier()
            inputs, step_start = StepInputs(), time.perf_counter()
            if state.step >= plan.total_steps:
                break
    bar.close()


def _optimizer_step(s: Setup) -> tuple[float | None, bool]:
    """Clip and step. Returns (gradient norm, whether the weights changed): a non-finite gradient skips the
    step. With fp16 the grad scaler does that itself: unscale_ finds the inf/NaN, step() then leaves every
    weight and the optimizer state alone (nothing is clamped into them), and update() halves the scale."""
    if s.scaler:
        s.scaler.unscale_(s.optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.cfg.train.max_grad_norm))
    if s.scaler:
        scale = s.scaler.get_scale()
        s.scaler.step(s.optimizer)
        s.scaler.update()
        return grad_norm, s.scaler.get_scale() >= scale
    if not math.isfinite(grad_norm):
        return grad_norm, False
    s.optimizer.step()
    return grad_norm, True


def _end_of_step(s: Setup, state: LoopState, inputs: StepInputs, weights: dict[str, float], micro_batches: int,
                 next_batch: int, elapsed: float, metrics, bar) -> None:
    """The optimizer step boundary: skip or step, advance the schedule and the data position, log."""
    cfg, plan = s.cfg, s.plan
    bad, bad_ids, sums = inputs.reduce()
    scale = s.scaler.get_scale() if s.scaler else None  # the loss scale this step's gradients were made at
    grad_norm, stepped = (None, False) if bad else _optimizer_step(s)
    # Finite losses but gradients that are not: with fp16 an overflow at this loss scale, which the scaler
    # answers by halving it (its own remedy, so it does not count towards max_consecutive_nan); in fp32 or
    # bf16 a real non-finite gradient.
    overflow = not bad and not stepped and s.scaler is not None
    if not bad and not stepped and s.scaler is None:
        bad = True
    s.optimizer.zero_grad(set_to_none=True)
    lr = s.optimizer.param_groups[0]["lr"]
    with _quiet_scheduler_warning():
        s.scheduler.step()
    state.step += 1
    tokens = plan.global_batch * s.reader.max_length * micro_batches
    state.tokens += tokens
    # A non-finite gradient with finite losses cannot be pinned on one micro-batch: name them all.
    bad_ids = (bad_ids or [i for ids in inputs.ids for i in ids])[:64] if bad else []
    if bad:
        state.skipped_steps += 1
        state.consecutive_nonfinite += 1
        state.skipped = (state.skipped + [{"step": state.step, "sequence_ids": bad_ids}])[-10:]
        log.warning("step %d: non-finite loss or gradient; step skipped (weights unchanged), sequences %s",
                    state.step, bad_ids[:16])
    elif overflow:
        state.skipped_steps += 1
        log.warning("step %d: fp16 gradients overflowed at loss scale %g; step skipped (weights unchanged), "
                    "loss scale now %g", state.step, scale, s.scaler.get_scale())
    else:
        state.consecutive_nonfinite = 0
    state.epoch, state.next_micro_batch = ((state.epoch + 1, 0) if next_batch >= plan.micro_batches_per_epoch
                                           else (state.epoch, next_batch))
    state.train_seconds += elapsed
    record = {"step": state.step, "split": "train", "epoch": state.epoch, "progress": state.step / plan.total_steps,
              "lr": lr, "grad_norm": grad_norm, "tokens_per_second": tokens / max(elapsed, 1e-9),
              "skipped_steps": state.skipped_steps, "nonfinite": bad, **{f"weight/{c}": weights[c] for c in COMPONENTS}}
    if s.scaler:
        record.update(overflow=overflow, loss_scale=scale)
    record.update({k if k == "agreement" else f"loss/{k}": v for k, v in sums.items()})  # agreement: a metric
    # A component with weight 0 is not computed: its raw loss is absent, its weighted share exactly 0.
    record.update({f"weighted/{c}": weights[c] * sums[c] if weights[c] > 0 else 0.0 for c in COMPONENTS})
    if bad:
        record["skipped_sequence_ids"] = bad_ids
    if metrics and (state.step % cfg.train.log_steps == 0 or bad or overflow):
        metrics.write(record)
    if bad and state.consecutive_nonfinite >= cfg.train.max_consecutive_nan:
        raise TrainingError(
            f"{state.consecutive_nonfinite} optimizer steps in a row had a non-finite loss or gradient "
            f"(train.max_consecutive_nan is {cfg.train.max_consecutive_nan}; last at step {state.step}, "
            f"sequences {bad_ids[:16]}); stopping. Lower train.learning_rate or loss.temperature, "
            "or check the cache with sad-pipe verify --full"
        )
    # refresh=False: the bar redraws at its own pace (rate-limited in a log file), not at every step
    bar.set_postfix_str(f"loss={sums.get('total', float('nan')):.4f} lr={format_lr(lr)} "
                        f"tok/s={record['tokens_per_second']:,.0f}" + (f" skipped={state.skipped_steps}" if state.skipped_steps else ""),
                        refresh=False)
    bar.update(1)


def _eval_record(s: Setup, step: int, ev: dict) -> dict:
    """An eval line for metrics.jsonl; it repeats the weights so a reader sees they equal the train line's."""
    return {"step": step, "split": "eval", **{f"weight/{c}": w for c, w in logged_weights(s, step).items()}, **ev}


def _loader_generator() -> torch.Generator:
    """A private generator for a DataLoader. Each new loader iterator draws a seed; drawn from the global
    RNG it would shift dropout after a resume (the resumed run makes a loader the straight run did not)."""
    return torch.Generator().manual_seed(0)


class _quiet_scheduler_warning:
    """A skipped step calls scheduler.step() without optimizer.step(): intended (the data was consumed and
    the schedule counts optimizer steps), so torch's ordering warning is noise here."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
