"""The memory plan ("will it fit?"): its arithmetic on known shapes, its activation count against what autograd
really keeps, and `train-student --dry-run`. (Projected vs measured peaks: `sad-pipe bench --only memory`.)"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli

from sad_pipe.stages.train_student.memory import (
    CachedArrays,
    ModelShape,
    RunShape,
    activation_bytes,
    memory_parts,
    project_memory,
)

from .helpers import GPT2_STUDENT, error_line, train, train_config

D, F, H, KV_HEADS, LAYERS, V = 64, 176, 4, 2, 3, 1000
QWEN_LIKE = {"model_type": "qwen2", "hidden_size": D, "intermediate_size": F, "num_hidden_layers": LAYERS,
             "num_attention_heads": H, "num_key_value_heads": KV_HEADS, "vocab_size": V, "max_position_embeddings": 128,
             "tie_word_embeddings": True}


def test_parameter_counts_of_a_known_shape():
    shape = ModelShape.of_config(QWEN_LIKE)
    kv = KV_HEADS * D // H
    matmul = LAYERS * (D * D + 2 * D * kv + D * D + 3 * D * F)  # q, k, v, o; gate, up, down
    biases = LAYERS * (D + 2 * kv)  # Qwen2's q, k, v biases
    norms = (2 * LAYERS + 1) * D
    assert shape.matmul_parameters == matmul
    assert shape.parameters == V * D + matmul + biases + norms  # the tied head counted once
    assert (shape.layers, shape.hidden, shape.intermediate, shape.heads, shape.head_dim, shape.vocab) == (
        LAYERS, D, F, H, D // H, V)


def run_shape(**changes) -> RunShape:
    base = dict(batch_size=2, length=64, precision="fp32", gradient_checkpointing=False, chunk_tokens=1024,
                kd_form="tail", trainable_parameters=ModelShape.of_config(QWEN_LIKE).parameters,
                arrays=CachedArrays(top_k=16, lse_temperatures=2))
    return RunShape(**{**base, **changes})


def test_weights_gradients_and_adamw_state_are_4_4_and_8_bytes_per_parameter():
    shape = ModelShape.of_config(QWEN_LIKE)
    parts = {p.name: p.bytes for p in memory_parts(shape, run_shape())}
    p = shape.parameters
    assert (parts["weights"], parts["gradients"], parts["optimizer"]) == (4 * p, 4 * p, 8 * p)
    assert "autocast copies" not in parts and "teacher" not in parts
    ddp = {p.name: p.bytes for p in memory_parts(shape, run_shape(ddp=True))}
    assert ddp["gradients"] == 8 * p  # DDP's gradient buckets are a second copy
    mixed = {p.name: p.bytes for p in memory_parts(shape, run_shape(precision="fp16"))}
    assert mixed["autocast copies"] == 2 * shape.matmul_parameters
    assert mixed["activations"] < parts["activations"]
    ckpt = {p.name: p.bytes for p in memory_parts(shape, run_shape(gradient_checkpointing=True))}
    assert ckpt["activations"] < parts["activations"]
    # the loss chunk: 8.3 [n, V] fp32 temporaries for CE + tail KD, n = the 128 tokens of the micro-batch
    assert parts["loss chunk"] == int(8.3 * 128 * V * 4)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_activation_count_matches_what_autograd_saves(precision):
    """Bytes of the distinct tensors autograd keeps for backward through the decoder (saved-tensor hooks), parameters
    and their autocast copies left out, against activation_bytes: within 5%."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    fields = dict(QWEN_LIKE)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields)).train()
    b, t = 2, 64
    ids = torch.randint(0, V, (b, t))
    positions = torch.cat([torch.arange(20), torch.arange(t - 20)]).repeat(b, 1)  # two packed documents
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for p in model.parameters()}  # an autocast copy has its weight's shape
    saved: dict[int, int] = {}

    def pack(x):
        if tuple(x.shape) not in weight_shapes:
            saved.setdefault(x.untyped_storage().data_ptr(), x.untyped_storage().nbytes())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        with torch.autocast("cpu", dtype=torch.float16, enabled=precision == "fp16"):
            model.model(input_ids=ids, position_ids=positions, use_cache=False)
    counted = sum(v for k, v in saved.items() if k not in weights)
    projected = activation_bytes(ModelShape.of(model), b * t, t, precision == "fp16", checkpointing=False)
    assert abs(projected / counted - 1) < 0.05, (projected, counted)


def test_a_plan_that_does_not_fit_says_what_to_change():
    shape = ModelShape.of_config(QWEN_LIKE)
    plan = project_memory(shape, run_shape(), "train.device_memory_gb", 1 << 20)
    assert plan.fits is False
    assert [a.split(":")[0] for a in plan.advice] == [
        "set train.use_gradient_checkpointing true", "set train.batch_size 1 and double train.gradient_accumulation_steps "
        "(same tokens per step)", "all of checkpointing, chunk_tokens 256 and batch_size 1"]
    roomy = project_memory(shape, run_shape(), "train.device_memory_gb", 1 << 34)
    assert roomy.fits is True and roomy.advice == []
    assert "fits" in roomy.lines()[0] and len(roomy.lines()) == 1 + len(roomy.parts)


def test_dry_run_prints_the_memory_plan_and_trains_nothing(tmp_path, kd_cache):
    config = train_config(tmp_path, kd_cache, train={"device_memory_gb": 0.001})
    result = cli("train-student", "--config", config, "--dry-run", "--json")  # not -q: the plan is logged
    assert not (tmp_path / "run").exists()
    out = json.loads(result.stdout[result.stdout.index("{"):])
    assert out["dry_run"] is True and out["fits"] is False and out["device"] == "train.device_memory_gb"
    assert out["projected_peak_gib"] > 0.001
    lines = result.output.splitlines()
    for part in ("weights", "gradients", "optimizer", "activations", "loss chunk", "batch", "loader buffers"):
        assert any(line.startswith(f"memory:   {part}") for line in lines), part
    assert any("to fit: set train.use_gradient_checkpointing true" in line for line in lines)


def test_device_memory_gb_must_be_positive(tmp_path, kd_cache):
    line = error_line(train(train_config(tmp_path, kd_cache, train={"device_memory_gb": 0}), "--dry-run", expect=2))
    assert "train.device_memory_gb: Input should be greater than 0" in line


def test_dry_run_plans_a_gpt2_student_in_fp16_on_a_cpu(tmp_path, kd_cache):
    config = train_config(tmp_path, kd_cache, student={"config": GPT2_STUDENT},
                          train={"precision": "fp16", "device": "cpu", "use_gradient_checkpointing": True})
    result = cli("train-student", "--config", config, "--dry-run")
    assert not (tmp_path / "run").exists()
    lines = [line for line in result.output.splitlines() if line.startswith("memory:")]
    assert "fits" in lines[0] and "cpu (physical memory)" in lines[0]
    assert any(line.startswith("memory:   autocast copies") for line in lines)
    assert any("gradient checkpointing on (off:" in line for line in lines)
