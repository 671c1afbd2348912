"""`sad-pipe train-student` end to end on tiny students and a real cache: the schedule, the NaN policy,
exact resume, several students from one cache, what a run writes, and one-line errors for bad input.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import save_gpt2, save_llama, train_bpe
from safetensors.torch import load_file

from sad_pipe.pipeline.config import load_config
from sad_pipe.pipeline.models import tokenizer_fingerprint
from sad_pipe.stages.train_student import train as train_module

from .helpers import GPT2_STUDENT, LLAMA_STUDENT, error_line, metrics, train, train_config


def weights(run: Path, part: str = "final", name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """Saved tensors of a run: part = "final" or "checkpoints/step-0000000N"."""
    return load_file(Path(run) / part / name)


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same tensor names, bitwise-equal values."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

# -- the schedule counts optimizer steps (the original trainer's scheduler counted micro-batches) -----------------------

ACCUM, WARMUP, PEAK = 16, 2, 1e-3


@pytest.fixture(scope="module")
def scheduled_run(tmp_path_factory, kd_cache):
    """One epoch with gradient accumulation 16, recording the micro-batch count at every optimizer and
    scheduler step."""
    tmp = tmp_path_factory.mktemp("scheduled")
    counts = {"micro": 0, "optimizer": [], "scheduler": []}
    real_setup, real_losses = train_module.setup, train_module.batch_losses

    def batch_losses(s, batch, weights, model=None):
        if model is None:  # the training call; evaluation passes the bare model
            counts["micro"] += 1
        return real_losses(s, batch, weights, model)

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name].append(counts["micro"])
            return fn(*args, **kwargs)
        return wrapper

    def setup(cfg):
        s = real_setup(cfg)
        counts["optimizer"], counts["scheduler"] = [], []  # drop the scheduler constructor's own initial step
        return s

    config = train_config(tmp, kd_cache, train={"max_steps": None, "epochs": 1, "batch_size": 4,
                                                "gradient_accumulation_steps": ACCUM, "warmup_steps": WARMUP,
                                                "learning_rate": PEAK, "eval_steps": 2})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "setup", setup)
        mp.setattr(train_module, "batch_losses", batch_losses)
        mp.setattr(torch.optim.AdamW, "step", counted("optimizer", torch.optim.AdamW.step))
        scheduler = torch.optim.lr_scheduler.LambdaLR
        mp.setattr(scheduler, "step", counted("scheduler", scheduler.step))
        result = train(config)
    return tmp / "run", counts, result.output


def test_scheduler_steps_once_per_accumulated_optimizer_step(scheduled_run):
    run, counts, _ = scheduled_run
    plan = json.loads((run / "plan.json").read_text())
    micro = plan["train_sequences"] // 4
    steps = math.ceil(micro / ACCUM)
    assert steps >= 3 and micro % ACCUM  # a short last group, so ceil differs from floor
    assert (plan["micro_batches_per_epoch"], plan["gradient_accumulation_steps"]) == (micro, ACCUM)
    assert plan["total_steps"] == plan["steps_per_epoch"] == steps
    assert counts["micro"] == micro
    # Step i comes after micro-batch 16 * i (the last one after the short group), never per micro-batch.
    boundaries = [min(ACCUM * i, micro) for i in range(1, steps + 1)]
    assert counts["optimizer"] == boundaries and counts["scheduler"] == boundaries


def test_warmup_ends_at_the_configured_optimizer_step(scheduled_run):
    run, _, _ = scheduled_run
    plan = json.loads((run / "plan.json").read_text())
    total = plan["total_steps"]
    assert (plan["warmup_steps"], plan["warmup_percent"]) == (WARMUP, pytest.approx(100 * WARMUP / total))
    assert (plan["learning_rate"], plan["lr_schedule"]) == (PEAK, "cosine")
    # Linear warm-up reaching the peak on optimizer step WARMUP, then cosine over the remaining steps.
    want = [PEAK * s / WARMUP for s in range(1, WARMUP + 1)]
    want += [PEAK * 0.5 * (1 + math.cos(math.pi * (s - WARMUP) / (total - WARMUP))) for s in range(WARMUP, total)]
    lrs = [row["lr"] for row in metrics(run)]
    assert lrs == pytest.approx(want, rel=1e-9)
    assert max(lrs) == lrs[WARMUP - 1] and all(lr > 0 for lr in lrs)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_every_schedule_warms_up_from_above_zero_and_ends_above_zero(kind):
    total, warmup = 20, 5
    factors = [train_module.lr_factor(step, warmup, total, kind) for step in range(total)]
    assert factors[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])  # peak on step `warmup`
    assert all(b <= a for a, b in zip(factors[warmup - 1:], factors[warmup:]))  # then never rises
    assert factors[-1] > 0 and (kind != "constant" or factors[-1] == 1.0)


def test_progress_bar_shows_lr_with_three_significant_digits(scheduled_run):
    run, _, output = scheduled_run
    shown = re.findall(r"lr=(\S+)", output)
    assert shown, output[-2000:]
    assert all(re.fullmatch(r"[1-9]\.\d\de[-+]\d\d", s) for s in shown), shown
    logged = {f"{row['lr']:.2e}" for row in metrics(run)}
    assert set(shown) <= logged and f"{PEAK / WARMUP:.2e}" in shown  # the first warm-up step: not 0.00e+00


def test_run_directory_holds_config_plan_metrics_plots_and_final_student(scheduled_run, kd_cache):
    run, _, _ = scheduled_run
    assert load_config(run / "config.json").train.gradient_accumulation_steps == ACCUM
    plan = json.loads((run / "plan.json").read_text())
    manifest = json.loads((Path(kd_cache) / "manifest.json").read_text())
    assert plan["teacher_eval_ce"] == pytest.approx(manifest["summary"]["teacher_eval_ce"])
    assert plan["phases"][0]["steps"][0] == 0 and plan["phases"][-1]["steps"][1] == plan["total_steps"]
    assert set(plan["arrays_read"]) == {"input_ids", "topk", "lse", "hidden"}
    parts = {p["name"] for p in plan["memory"]["parts"]}  # the memory plan, printed before step 1 too; on a CPU
    assert parts == {"weights", "gradients", "optimizer", "activations", "loss chunk", "batch", "loader buffers"}
    assert plan["memory"]["total_bytes"] > 0 and plan["memory"]["fits"] is True

    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, plan["total_steps"] + 1))
    for r in rows:
        for key in ("lr", "grad_norm", "tokens_per_second", "skipped_steps", "loss/total", "loss/ce", "loss/kd",
                    "weighted/kd", "weighted/ce", "weighted/feature", "weighted/relation"):
            assert math.isfinite(r[key]), key
        assert r["skipped_steps"] == 0 and r["tokens_per_second"] > 0
        router_term = r["weight/feature"] * 0.01 * r.get("loss/router_balance", 0.0)  # router_balance_weight 0.01
        weighted = sum(r[f"weighted/{c}"] for c in ("kd", "ce", "feature", "relation"))
        assert r["loss/total"] == pytest.approx(weighted + router_term, rel=1e-5)
    assert "loss/feature" in rows[-1] and "loss/relation" in rows[-1]  # phase 2 reached
    assert metrics(run, "eval")[-1]["final"] is True

    png = run / "plots" / "losses.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == plan["total_steps"] and result["skipped_steps"] == 0
    assert math.isfinite(result["eval/ce"]) and result["teacher/eval_ce"] == plan["teacher_eval_ce"]
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (run / "final" / name).exists()
    assert (run / "router.safetensors").exists() and not (run / "final" / "router.safetensors").exists()


# -- NaN: skipped, counted, logged with the batch's ids; N in a row abort -----------------------------------

def scale_loss(monkeypatch, micro_batches: set[int], factor: float) -> list[list[int]]:
    """Multiply the training loss by `factor` on the given micro-batches of the first epoch (numbered from 0,
    so a resumed run meets them at the same place); returns the ids of the sequences it changed."""
    real = train_module.batch_losses
    poisoned = []

    def batch_losses(s, batch, weights, model=None):
        out = real(s, batch, weights, model)
        if model is None and int(batch["micro_batch"]) in micro_batches:  # training calls; eval passes the model
            out["total"] = out["total"] * factor
            poisoned.append(batch["sequence_ids"].tolist())
        return out

    monkeypatch.setattr(train_module, "batch_losses", batch_losses)
    return poisoned


def inject_nan(monkeypatch, micro_batches: set[int]) -> list[list[int]]:
    """Make the training loss NaN on the given training micro-batches; returns their ids."""
    return scale_loss(monkeypatch, micro_batches, float("nan"))


# A finite loss (~1e36) whose gradient, times the grad scaler's 2^16, is past fp32's 3.4e38: an fp16 overflow.
OVERFLOW = 1e36


def test_nan_loss_skips_the_step_without_changing_weights(tmp_path, kd_cache, monkeypatch):
    poisoned = inject_nan(monkeypatch, {5})  # the second micro-batch of optimizer step 3
    config = train_config(tmp_path, kd_cache, train={"max_steps": 5, "batch_size": 2, "gradient_accumulation_steps": 2,
                                                     "save_steps": 1, "keep_checkpoints": 10, "max_consecutive_nan": 2})
    result = train(config)
    run = tmp_path / "run"
    after = {s: weights(run, f"checkpoints/step-{s:08d}") for s in (2, 3, 4)}
    assert identical(after[2], after[3])  # the skipped step left every weight untouched
    assert not identical(after[3], after[4])  # the next step trains again

    rows = {r["step"]: r for r in metrics(run)}
    assert rows[3]["nonfinite"] is True and rows[3]["loss/total"] is None and rows[3]["grad_norm"] is None
    assert rows[3]["skipped_sequence_ids"] == poisoned[0]
    assert [rows[s]["skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert json.loads((run / "result.json").read_text())["skipped_steps"] == 1
    assert "step 3: non-finite loss" in result.output and str(poisoned[0][:2])[1:-1] in result.output


def test_consecutive_nan_steps_abort_with_one_line_error(tmp_path, kd_cache, monkeypatch):
    inject_nan(monkeypatch, set(range(2, 100)))  # every step from the third on
    config = train_config(tmp_path, kd_cache, train={"max_steps": 8, "batch_size": 2, "max_consecutive_nan": 3})
    line = error_line(train(config, expect=1))
    assert "3 optimizer steps in a row had a non-finite loss" in line and "train.max_consecutive_nan" in line
    rows = metrics(tmp_path / "run")
    assert [r["nonfinite"] for r in rows] == [False, False, True, True, True]
    assert not (tmp_path / "run" / "final").exists()


# -- fp16 (the P100 path), on a CPU: autocast + grad scaler, overflowing steps skipped and counted -------------

def fp16_config(tmp_path: Path, cache: str, name: str = "run", **train_keys) -> str:
    return train_config(tmp_path, cache, name, train={"precision": "fp16", "device": "cpu", "max_steps": 6,
                                                      "batch_size": 2, "save_steps": 1, "keep_checkpoints": 10,
                                                      **train_keys})


def test_fp16_overflow_skips_exactly_that_step_and_halves_the_loss_scale(tmp_path, kd_cache, monkeypatch):
    scale_loss(monkeypatch, {2}, OVERFLOW)  # optimizer step 3
    result = train(fp16_config(tmp_path, kd_cache))
    run = tmp_path / "run"
    assert json.loads((run / "plan.json").read_text())["precision"] == "fp16"
    after = {s: weights(run, f"checkpoints/step-{s:08d}") for s in (2, 3, 4)}
    assert identical(after[2], after[3])  # the overflowing step left every weight untouched
    assert not identical(after[3], after[4])
    assert all(v.dtype == torch.float32 for v in after[4].values())  # fp32 master weights, autocast computes in fp16

    rows = {r["step"]: r for r in metrics(run)}
    assert [rows[s]["overflow"] for s in range(1, 7)] == [False, False, True, False, False, False]
    assert [rows[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert not any(r["nonfinite"] for r in rows.values())  # finite losses: an overflow, not a NaN step
    assert rows[3]["loss/total"] > 1e30 and rows[3]["grad_norm"] is None
    assert rows[3]["loss_scale"] == rows[2]["loss_scale"] == 2.0 ** 16 and rows[4]["loss_scale"] == 2.0 ** 15
    saved = json.loads((run / "checkpoints/step-00000003/state.json").read_text())
    assert saved["scaler"]["scale"] == 2.0 ** 15  # the scaler's state travels with the checkpoint
    assert json.loads((run / "result.json").read_text())["skipped_steps"] == 1
    assert "step 3: fp16 gradients overflowed at loss scale 65536" in result.output
    assert math.isfinite(json.loads((run / "result.json").read_text())["eval/ce"])


def test_fp16_run_with_an_overflow_resumes_exactly(tmp_path, kd_cache, monkeypatch):
    """Stopped after the overflow (the halved scale must come back from the checkpoint), resumed: bitwise the
    straight run's weights and metrics."""
    scale_loss(monkeypatch, {2}, OVERFLOW)
    train(fp16_config(tmp_path, kd_cache, "straight"))
    real_save = train_module.save_checkpoint

    def save_then_stop(s, run_dir, state):
        path = real_save(s, run_dir, state)
        if state["step"] == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)
    config = fp16_config(tmp_path, kd_cache, "resumed")
    train(config, expect=130)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    train(config)
    assert identical(weights(tmp_path / "resumed"), weights(tmp_path / "straight"))
    for split in ("train", "eval"):
        assert comparable(metrics(tmp_path / "resumed", split)) == comparable(metrics(tmp_path / "straight", split))


# -- exact resume ---------------------------------------------------------------------------------------------

HALF = 7  # one epoch: 228 train sequences // 16 = 14 micro-batches = 7 steps of 2


def resume_config(tmp_path: Path, cache: str, name: str, workers: int, save_steps: int = HALF) -> str:
    # GPT-2 (dropout on) so the RNG restore matters; curriculum phase 2 (hidden states) starts before HALF.
    return train_config(tmp_path, cache, name, student={"config": GPT2_STUDENT},
                        train={"max_steps": 2 * HALF, "batch_size": 16, "gradient_accumulation_steps": 2,
                               "save_steps": save_steps, "eval_steps": 3, "num_workers": workers, "warmup_steps": 2})


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, kd_cache) -> Path:
    tmp = tmp_path_factory.mktemp("straight")
    train(resume_config(tmp, kd_cache, "run", workers=0))
    return tmp / "run"


def comparable(rows: list[dict]) -> list[dict]:
    """Metrics lines without wall-clock figures."""
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rows]


@pytest.mark.parametrize(("workers", "stop"), [(0, HALF), (0, 5), (2, 5)],
                         ids=["0-workers-epoch-end", "0-workers-mid-epoch", "2-workers-mid-epoch"])
def test_stop_and_resume_equals_the_straight_run(tmp_path, kd_cache, straight_run, monkeypatch, workers, stop):
    """2N steps straight == N steps, killed, resumed for the rest: bitwise weights, identical metrics."""
    plan = json.loads((straight_run / "plan.json").read_text())
    assert plan["steps_per_epoch"] == HALF and plan["phases"][1]["steps"][0] <= stop  # hidden states after resume
    config = resume_config(tmp_path, kd_cache, "run", workers, save_steps=stop)
    real_save = train_module.save_checkpoint

    def save_then_stop(s, run_dir, state):
        path = real_save(s, run_dir, state)
        if state["step"] == stop:
            raise KeyboardInterrupt  # as if the job were killed right after the checkpoint
        return path

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)
    train(config, expect=130)
    monkeypatch.undo()
    assert len(metrics(tmp_path / "run")) == stop and not (tmp_path / "run" / "final").exists()
    train(config)

    assert identical(weights(tmp_path / "run"), weights(straight_run))
    router = "router.safetensors"  # the learned layer router resumes too (saved beside final/)
    assert identical(weights(tmp_path / "run", ".", router), weights(straight_run, ".", router))
    for split in ("train", "eval"):
        assert comparable(metrics(tmp_path / "run", split)) == comparable(metrics(straight_run, split))


def test_a_run_stopped_while_finishing_completes_on_rerun(tmp_path, kd_cache, straight_run):
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    (run / "result.json").unlink()  # stopped after final/ and the final eval line, before result.json
    train(resume_config(tmp_path, kd_cache, "run", workers=0))
    for split in ("train", "eval"):  # the final eval is redone once, not appended twice
        assert comparable(metrics(run, split)) == comparable(metrics(straight_run, split))
    assert identical(weights(run), weights(straight_run))


def test_resume_with_a_changed_batch_size_is_refused(tmp_path, kd_cache, straight_run):
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    (run / "result.json").unlink()  # written last: without it, an unfinished run with checkpoints
    config = resume_config(tmp_path, kd_cache, "run", workers=0)
    line = error_line(train(config, "--set", "train.batch_size=8", expect=2))
    assert "cannot resume" in line and "global_batch was 16, now 8" in line
    shutil.copy(straight_run / "result.json", run)  # finished: refused as well, never retrained
    assert "holds a finished run" in error_line(train(config, expect=2))


# -- several students from one cache ----------------------------------------------------------------------

def test_two_students_of_different_sizes_train_from_one_cache(tmp_path, kd_cache, assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before = {p: p.stat().st_mtime_ns for p in Path(kd_cache).rglob("*")}
    # A pretrained GPT-2 (width 48, 3 layers) whose embedding is padded past the tokenizer's 512 tokens:
    # fine, its extra logits just never get teacher mass.
    gpt2 = save_gpt2(str(tmp_path / "gpt2"), 520, layers=3, hidden=48)
    AutoTokenizer.from_pretrained(assets["tokenizer"]).save_pretrained(gpt2)
    students = {"llama": ({"config": LLAMA_STUDENT}, 32, 512), "gpt2": ({"model": gpt2}, 48, 520)}
    for name, (student, _, _) in students.items():
        train(train_config(tmp_path, kd_cache, name, student=student,
                           train={"max_steps": 3, "batch_size": 4, "use_gradient_checkpointing": name == "gpt2"}))

    manifest = json.loads((Path(kd_cache) / "manifest.json").read_text())
    for name, (_, width, vocab) in students.items():
        final = tmp_path / name / "final"
        model = AutoModelForCausalLM.from_pretrained(final)
        tokenizer = AutoTokenizer.from_pretrained(final)
        assert model.config.get_text_config().hidden_size == width
        assert model.get_output_embeddings().weight.shape[0] == vocab
        assert tokenizer_fingerprint(tokenizer) == manifest["identity"]["tokenizer"]["sha256"]
        trained = weights(tmp_path / name, "checkpoints/step-00000003")
        shared = [k for k in model.state_dict() if f"student.{k}" in trained]
        assert len(shared) > 10
        assert all(torch.equal(model.state_dict()[k], trained[f"student.{k}"]) for k in shared)
        ids = tokenizer("def main():\n    return 0", return_tensors="pt")["input_ids"]
        assert model(ids).logits.shape == (1, ids.shape[1], vocab)
        plan = json.loads((tmp_path / name / "plan.json").read_text())
        assert plan["phases"][-1]["steps"] == [1, 3] and plan["arrays_read"]["hidden"] == [[1, 3]]
    params = [json.loads((tmp_path / n / "result.json").read_text())["student_parameters"] for n in students]
    assert params[0] != params[1]
    # Every weight of the pretrained student moved, through gradient checkpointing too.
    start, end = load_file(Path(gpt2) / "model.safetensors"), weights(tmp_path / "gpt2")
    assert [k for k in start if k in end and torch.equal(start[k], end[k])] == []
    assert {p: p.stat().st_mtime_ns for p in Path(kd_cache).rglob("*")} == before  # the cache is only read


def test_ce_only_run_on_a_teacher_cache_reads_no_teacher_arrays_and_still_reports_agreement(tmp_path, kd_cache):
    """The demo's CE baseline: kd weight 0 with the default tail form. Eval reads the top-k for the agreement
    metric but not the lse, so the KL must not be computed there (it used to crash on the missing lse)."""
    ce_only = {"use_curriculum": False, "weights": {"kd": 0.0, "ce": 1.0, "feature": 0.0, "relation": 0.0}}
    train(train_config(tmp_path, kd_cache, curriculum=ce_only, train={"max_steps": 2, "eval_steps": 1}))
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert {group: steps for group, steps in plan["arrays_read"].items() if steps} == {"input_ids": [[0, 2]]}
    for row in metrics(tmp_path / "run", "eval"):
        assert "eval/kd" not in row and 0.0 <= row["eval/agreement"] <= 1.0
        assert row["eval/total"] == pytest.approx(row["eval/ce"])
    assert all("loss/kd" not in row and row["weighted/kd"] == 0.0 for row in metrics(tmp_path / "run"))


# -- bad input: one line, the key, the right exit code --------------------------------------------------------

@pytest.fixture(scope="module")
def foreign_student(tmp_path_factory, assets) -> str:
    """A pretrained student shipping a tokenizer trained on other text (same size class, other merges)."""
    root = tmp_path_factory.mktemp("foreign")
    path = save_llama(str(root / "student"), 512)
    train_bpe(str(root / "tokenizer"), 400, assets["docs"][30:40])
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(root / "tokenizer")).save_pretrained(path)
    return path


def incomplete_cache(tmp_path: Path, cache: str) -> str:
    copy = tmp_path / "incomplete"
    shutil.copytree(cache, copy)
    (copy / "manifest.json").unlink()
    return str(copy)


def case(sections, code: int, message: str, id: str):
    """sections(paths) -> config sections; paths has .tmp, .cache, .no_hidden, .foreign_student."""
    return pytest.param(sections, code, message, id=id)


BAD_INPUT = [
    case(lambda p: {"cache": {"path": str(p.tmp / "nowhere")}}, 1, "no manifest.json", "cache missing"),
    case(lambda p: {"cache": {"path": incomplete_cache(p.tmp, p.cache)}}, 1, "incomplete (no manifest.json)",
         "cache incomplete"),
    case(lambda p: {"student": {"model": p.foreign_student}}, 1, "uses another vocabulary than the cache's teacher",
         "tokenizer mismatch"),
    case(lambda p: {"loss": {"student_layers": [1, 5]}}, 2, "loss.student_layers [5]: out of range",
         "layer out of range"),
    case(lambda p: {"loss": {"student_layers": [0, 1, 2], "feature_router": False}}, 2, "fixed layer map",
         "fixed map, wrong layer count"),
    case(lambda p: {"loss": {"kd_form": "tail", "temperature": 3.0}}, 2, "loss.temperature 3: the tail form",
         "tail T not cached"),
    case(lambda p: {"loss": {"kd_top_k": 32}}, 2, "loss.kd_top_k 32: the cache holds only the top 16",
         "k larger than cached"),
    case(lambda p: {"cache": {"path": p.no_hidden}}, 2, "the cache holds no hidden states",
         "feature without hidden states"),
    case(lambda p: {"loss": {"feature_projection": False}, "student": {"config": {**LLAMA_STUDENT, "hidden_size": 16}}},
         2, "feature_projection false needs equal widths: student 16, teacher 32", "width vs fixed map"),
    case(lambda p: {"student": {"config": {**LLAMA_STUDENT, "max_position_embeddings": 16}}}, 1,
         "at most 16 positions", "too few positions"),
]


@pytest.mark.parametrize(("sections", "code", "message"), BAD_INPUT)
def test_bad_input_fails_with_one_line_error(sections, code, message, tmp_path, kd_cache, no_hidden_cache,
                                             foreign_student):
    paths = SimpleNamespace(tmp=tmp_path, cache=kd_cache, no_hidden=no_hidden_cache, foreign_student=foreign_student)
    result = train(train_config(tmp_path, kd_cache, **sections(paths)), expect=code)
    line = error_line(result)
    assert message in line, line
    assert result.output.rstrip().splitlines()[-1] == line  # nothing after it: one line, no traceback
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- final/: a plain HF model in the export dtype; the router beside it -----------------------------------------

@pytest.mark.parametrize(("export_dtype", "dtype"), [(None, torch.float32), ("bf16", torch.bfloat16)])
def test_final_loads_as_a_plain_hf_model_in_the_export_dtype(tmp_path, kd_cache, export_dtype, dtype):
    from transformers import AutoModelForCausalLM

    with_router = {"use_curriculum": False, "weights": {"kd": 0.5, "ce": 0.3, "feature": 0.2, "relation": 0.0}}
    train(train_config(tmp_path, kd_cache, train={"max_steps": 2, "export_dtype": export_dtype}, curriculum=with_router))
    run = tmp_path / "run"
    student = AutoModelForCausalLM.from_pretrained(run / "final", dtype="auto")
    assert {p.dtype for p in student.parameters()} == {dtype}
    checkpoint = weights(run, "checkpoints/step-00000002")  # the trained weights: "student.*" and "router.*"
    saved = weights(run)
    assert saved.keys() == {k.removeprefix("student.") for k in checkpoint if k.startswith("student.")}
    for name, value in saved.items():
        assert torch.equal(value, checkpoint[f"student.{name}"].to(dtype)), name
    router = weights(run, ".", "router.safetensors")
    assert router.keys() == {k.removeprefix("router.") for k in checkpoint if k.startswith("router.")} != set()
