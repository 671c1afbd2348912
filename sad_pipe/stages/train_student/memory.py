"""Will it fit? The peak device memory a train-student run needs, projected part by part before any work,
compared with the device's memory, and what to change when it does not fit.

N = batch_size x length tokens per micro-batch, P trainable parameters (student + layer router), c the bytes
of the compute dtype (4 in fp32, 2 under fp16/bf16 autocast):
    weights          P x 4: fp32 (autocast computes in fp16/bf16 from fp32 master weights)
    gradients        P x 4 (under torchrun, plus DDP's gradient buckets: another P x 4 per process)
    optimizer        P x 8: AdamW's two fp32 states (exp_avg, exp_avg_sq)
    autocast copies  fp16/bf16 only: the decoder layers' matmul weights cast to c = 2 bytes, kept for backward
    activations      what autograd keeps for backward (layer_activation_bytes); with gradient checkpointing
                     each layer's input, plus one layer recomputed during backward
    loss chunk       the [min(N, chunk_tokens), V] fp32 temporaries of the chunked CE + KD pass
    batch            the micro-batch on the device: ids and masks, the decoded teacher arrays
    loader buffers   on a CPU only (the device is the host there): the loader's decompressed cache chunks
    teacher          loss.kd_form full only: the teacher's weights and its [N, V] logits
The peak is taken as their sum: the loss chunk's backward runs while every activation is still alive, and
the gradients of the weights it reaches first (the LM head and a tied embedding) are made there too; only
the decoder layers' gradients come later, as their activations are freed, so the sum overstates the peak
by at most those. `sad-pipe bench --only memory` compares the projection with measured peaks.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

GIB = 2 ** 30
# Kept free of the projection on a GPU: the CUDA context, the allocator's fragmentation, the estimate's error.
HEADROOM = 0.10
# [n, V] fp32 temporaries the vocabulary pass holds at its peak (forward + backward of one chunk of n
# positions), by what it computes: CE alone, or CE + each KD form (measured on CPU at V = 151,936,
# n = 512; sampled and hybrid taken as subset and tail, which they resemble). With more than one chunk each
# is recomputed in backward (activation checkpointing), which holds ~2 more.
CHUNK_TEMPORARIES = {"ce": 5.1, "subset": 5.1, "sampled": 5.1, "tail": 8.3, "hybrid": 8.3, "full": 6.3}
RECOMPUTED_CHUNK_EXTRA = 2.0


@dataclass(frozen=True)
class ModelShape:
    """What the projection needs to know about a decoder-only model."""

    parameters: int  # every parameter once (a tied embedding counts once)
    matmul_parameters: int  # weights of the decoder layers' linear maps: what autocast casts
    layers: int
    hidden: int
    intermediate: int
    heads: int
    head_dim: int
    vocab: int  # logit rows (an embedding table may be padded past the tokenizer)

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head = model.get_output_embeddings()
        matmul = sum(m.weight.numel() for m in model.modules()
                     if m is not head and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"))  # GPT-2's Conv1D
        hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
        return cls(parameters=sum(p.numel() for p in model.parameters()), matmul_parameters=matmul,
                   layers=int(config.num_hidden_layers), hidden=hidden,
                   intermediate=int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                                    or 4 * hidden),
                   heads=heads, head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
                   vocab=int(head.weight.shape[0]))

    @classmethod
    def of_config(cls, config: dict) -> ModelShape:
        """The shape of the model an HF config dict describes, built on the meta device (no memory, exact counts)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        fields = dict(config)
        hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        with torch.device("meta"):
            return cls.of(AutoModelForCausalLM.from_config(hf_config))


@dataclass(frozen=True)
class CachedArrays:
    """The teacher arrays a micro-batch brings to the device (0: not read)."""

    top_k: int = 0
    lse_temperatures: int = 0
    draws: int = 0  # sampled draws, or hybrid tail draws, per position
    hidden_layers: int = 0
    teacher_hidden: int = 0
    entry_bytes: int = 3  # one stored top-k entry or draw: its id (uint16, or uint32 past 65,536 ids) + its value


@dataclass(frozen=True)
class RunShape:
    """The settings that decide the peak, as the config names them."""

    batch_size: int
    length: int  # data.max_length of the cache
    precision: str  # fp32, bf16 or fp16 (resolved)
    gradient_checkpointing: bool
    chunk_tokens: int
    kd_form: str | None  # None: no KD step (CE only)
    trainable_parameters: int  # student + layer router
    arrays: CachedArrays = field(default_factory=CachedArrays)
    teacher: ModelShape | None = None  # kd_form full: the online teacher
    teacher_bytes: int = 2  # per teacher weight (bf16/fp16; 4 in fp32)
    ddp: bool = False  # several processes (torchrun): DDP keeps its own gradient buckets
    loader_sequences: int = 0  # on a CPU: the sequences the loader's chunk caches hold (0 on a GPU: host memory)


def layer_activation_bytes(model: ModelShape, mixed: bool) -> int:
    """Bytes autograd keeps per token in one Llama-style decoder layer (counted with saved-tensor hooks on
    Qwen2, 0.4% off the count): each RMSNorm its fp32 input and normalised output (2 x 2d x 4); the inputs of
    the linear maps (2d, but under autocast each map saves its own cast copy: 5d); q, k, v (k and v repeated to
    every head) and the attention output (4d); the MLP's gate, up, SiLU(gate) and product (4f); the
    attention's logsumexp (one fp32 per head)."""
    d, f, c = model.hidden, model.intermediate, 2 if mixed else 4
    return 16 * d + (5 if mixed else 2) * d * c + 4 * d * c + 4 * f * c + 4 * model.heads


def model_activation_bytes(model: ModelShape, length: int, mixed: bool) -> int:
    """Bytes per token kept once per model: the final norm's, a row of the attention mask, the rotary tables, ids."""
    return 8 * model.hidden + length * (2 if mixed else 4) + 8 * model.head_dim + 8


def activation_bytes(model: ModelShape, tokens: int, length: int, mixed: bool, checkpointing: bool) -> int:
    """What autograd keeps for backward over `tokens` positions. With gradient checkpointing each layer keeps
    only its input (fp32, the residual stream), and backward recomputes one layer at a time."""
    per_layer = layer_activation_bytes(model, mixed) * tokens
    once = model_activation_bytes(model, length, mixed) * tokens
    if checkpointing:
        return model.layers * 4 * model.hidden * tokens + per_layer + once
    return model.layers * per_layer + once


def batch_bytes(arrays: CachedArrays, tokens: int) -> int:
    """The micro-batch on the device: ids, positions, labels (int64), masks; the decoded top-k (int64 ids, their
    clamped copy, fp32 logits, a validity flag) and lse; draws (ids and fp32 counts); decoded hidden states
    (fp32) next to their bf16 bytes."""
    per_token = 3 * 8 + 3 * 4
    per_token += arrays.top_k * (8 + 8 + 4 + 1 + 2) + arrays.lse_temperatures * 4
    per_token += arrays.draws * (8 + 8 + 4 + 1)
    per_token += arrays.hidden_layers * arrays.teacher_hidden * (4 + 2)
    return per_token * tokens


def loader_buffer_bytes(arrays: CachedArrays, length: int, sequences: int) -> int:
    """Host memory of the loader's decompressed chunks as stored: ids, positions, loss mask, the teacher's
    log-prob of the target, the top-k entries and draws, lse, bf16 hidden states."""
    per_token = 4 + 4 + 1 + 4 + (arrays.top_k + arrays.draws) * arrays.entry_bytes + arrays.lse_temperatures * 4
    return (per_token + arrays.hidden_layers * arrays.teacher_hidden * 2) * length * sequences


def loss_chunk_bytes(model: ModelShape, tokens: int, chunk_tokens: int, kd_form: str | None) -> int:
    rows = min(tokens, chunk_tokens)
    count = CHUNK_TEMPORARIES[kd_form or "ce"] + (RECOMPUTED_CHUNK_EXTRA if tokens > chunk_tokens else 0.0)
    return int(count * rows * model.vocab * 4)


@dataclass
class MemoryPart:
    name: str
    bytes: int
    detail: str


@dataclass
class MemoryPlan:
    parts: list[MemoryPart]
    device: str  # what the budget is: "cuda:0 (Tesla P100-PCIE-16GB)", "train.device_memory_gb", ...
    device_bytes: int | None
    advice: list[str] = field(default_factory=list)  # what to change when it does not fit

    @property
    def total(self) -> int:
        return sum(p.bytes for p in self.parts)

    @property
    def budget(self) -> int | None:
        return None if self.device_bytes is None else int(self.device_bytes * (1 - HEADROOM))

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget

    def lines(self) -> list[str]:
        verdict = "" if self.fits is None else (" -- fits" if self.fits else " -- does NOT fit")
        device = "" if self.device_bytes is None else (
            f" of {self.device_bytes / GIB:.1f} GiB on {self.device} ({self.total / self.device_bytes:.0%}; "
            f"{HEADROOM:.0%} kept free for the CUDA context, fragmentation and the estimate's error)")
        out = [f"memory: projected peak {self.total / GIB:.2f} GiB{device}{verdict}"]
        width = max(len(p.name) for p in self.parts)
        out += [f"memory:   {p.name:<{width}} {p.bytes / GIB:8.3f} GiB  {p.detail}" for p in self.parts]
        out += [f"memory: to fit: {a}" for a in self.advice]
        return out

    def to_json(self) -> dict:
        return {"total_bytes": self.total, "device": self.device, "device_bytes": self.device_bytes,
                "fits": self.fits, "parts": [asdict(p) for p in self.parts], "advice": self.advice}


def memory_parts(student: ModelShape, run: RunShape) -> list[MemoryPart]:
    """The projected peak, part by part (see the module docstring)."""
    tokens, p = run.batch_size * run.length, run.trainable_parameters
    mixed = run.precision in ("fp16", "bf16")
    act = {ckpt: activation_bytes(student, tokens, run.length, mixed, ckpt) for ckpt in (False, True)}
    on = run.gradient_checkpointing
    parts = [
        MemoryPart("weights", 4 * p, f"{p:,} fp32 parameters (student + layer router)"),
        MemoryPart("gradients", 4 * p * (2 if run.ddp else 1),
                   "fp32, one per parameter" + (", and DDP's buckets of them" if run.ddp else "")),
        MemoryPart("optimizer", 8 * p, "AdamW: exp_avg and exp_avg_sq, fp32"),
    ]
    if mixed:
        parts.append(MemoryPart("autocast copies", 2 * student.matmul_parameters,
                                f"the decoder layers' {student.matmul_parameters:,} matmul weights in {run.precision}"))
    parts += [
        MemoryPart("activations", act[on], f"{student.layers} layers x {tokens:,} tokens ({run.batch_size} x {run.length}), "
                   f"{'fp32' if not mixed else run.precision}; gradient checkpointing {'on' if on else 'off'} "
                   f"({'off' if on else 'on'}: {act[not on] / GIB:.3f} GiB)"),
        MemoryPart("loss chunk", loss_chunk_bytes(student, tokens, run.chunk_tokens, run.kd_form),
                   f"[{min(tokens, run.chunk_tokens):,}, {student.vocab:,}] fp32 temporaries of "
                   f"{'CE + ' + run.kd_form + ' KD' if run.kd_form else 'CE'} (loss.chunk_tokens {run.chunk_tokens})"),
        MemoryPart("batch", batch_bytes(run.arrays, tokens), "the micro-batch and its decoded teacher arrays"),
    ]
    if run.loader_sequences:
        parts.append(MemoryPart("loader buffers", loader_buffer_bytes(run.arrays, run.length, run.loader_sequences),
                                f"the loader's decompressed cache chunks, {run.loader_sequences} sequences (host memory: "
                                "on a CPU the device's)"))
    if run.teacher is not None:
        t = run.teacher
        parts.append(MemoryPart("teacher", t.parameters * run.teacher_bytes + tokens * t.vocab * (run.teacher_bytes + 8),
                                f"online: {t.parameters:,} weights x {run.teacher_bytes} B, and its [{tokens:,}, {t.vocab:,}] "
                                "logits (its dtype, then fp32 twice)"))
    return parts


def project_memory(student: ModelShape, run: RunShape, device: str, device_bytes: int | None) -> MemoryPlan:
    """The plan: the parts, the device's memory, and when it does not fit, single changes that help."""
    plan = MemoryPlan(memory_parts(student, run), device, device_bytes)
    if plan.fits is False:
        plan.advice = advice(student, run, plan.budget)
    return plan


def advice(student: ModelShape, run: RunShape, budget: int) -> list[str]:
    """Changes that lower the peak, the least disruptive first, each with the peak it gives."""
    options: list[tuple[str, RunShape]] = []
    if not run.gradient_checkpointing:
        options.append(("set train.use_gradient_checkpointing true", replace(run, gradient_checkpointing=True)))
    tokens = run.batch_size * run.length
    if min(tokens, run.chunk_tokens) > 256:
        options.append(("set loss.chunk_tokens 256", replace(run, chunk_tokens=256)))
    if run.batch_size > 1:
        half = run.batch_size // 2
        options.append((f"set train.batch_size {half} and double train.gradient_accumulation_steps (same tokens per step)",
                        replace(run, batch_size=half)))
    if run.length > 128:
        options.append((f"build the cache with data.max_length {run.length // 2} (a new stage one)",
                        replace(run, length=run.length // 2)))
    if run.teacher is not None:
        options.append(("train from the cache (a cached loss.kd_form) instead of an online teacher",
                        replace(run, teacher=None, kd_form="tail")))
    out = []
    for what, changed in options:
        total = sum(p.bytes for p in memory_parts(student, changed))
        out.append(f"{what}: {total / GIB:.2f} GiB ({'fits' if total <= budget else 'still too much'})")
    combined = replace(run, gradient_checkpointing=True, chunk_tokens=min(run.chunk_tokens, 256), batch_size=1)
    total = sum(p.bytes for p in memory_parts(student, combined))
    out.append(f"all of checkpointing, chunk_tokens 256 and batch_size 1: {total / GIB:.2f} GiB "
               f"({'fits' if total <= budget else 'still too much: a smaller student or a larger device'})")
    return out


def device_memory(device: torch.device, configured_gib: float | None) -> tuple[str, int | None]:
    """(what the budget is, its bytes): train.device_memory_gb if set, else the GPU's own memory, else (CPU)
    the machine's physical memory."""
    if configured_gib is not None:
        return "train.device_memory_gb", int(configured_gib * GIB)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name})", int(props.total_memory)
    try:
        return "cpu (physical memory)", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return "cpu", None
