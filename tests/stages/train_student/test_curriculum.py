"""Curriculum weights (curriculum.py) and what the training run does with them (train.py).

The original trainer's bugs pinned here: feature/relation losses computed in phase 1 although their weight was 0,
and eval losses computed with other weights than training (a 6x train/eval gap).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sad_pipe.pipeline.config import COMPONENTS, CurriculumConfig, Phase, Weights
from sad_pipe.stages.train_student import train as train_module
from sad_pipe.stages.train_student.curriculum import active_step_ranges, curriculum_weights, phase_table, step_weights
from sad_pipe.stages.train_student.router import LayerRouter
from sad_pipe.storage.reader import CacheDataset, CacheReader

from .helpers import metrics, train, train_config

DEFAULT = CurriculumConfig()  # the original trainer's: phase 1 kd .7 ce .3 until 30%, then feature/relation ramp in over 20%


def test_phase_one_feature_and_attention_weights_are_exactly_zero():
    for progress in (0.0, 0.1, 0.2999, 0.3):  # 0.3: phase 2 starts, its ramp at 0
        w = curriculum_weights(progress, DEFAULT)
        assert w["feature"] == 0.0 and w["relation"] == 0.0, (progress, w)
        assert (w["kd"], w["ce"]) == (0.7, 0.3)
    assert curriculum_weights(0.31, DEFAULT)["feature"] > 0


def test_ramps_are_linear_between_phase_weights():
    first, second = DEFAULT.phases
    ramp_start, ramp_end = first.until, first.until + second.ramp
    for progress in (0.3, 0.35, 0.4, 0.45, 0.5, 0.75, 1.0):
        frac = min(1.0, (progress - ramp_start) / (ramp_end - ramp_start))
        w = curriculum_weights(progress, DEFAULT)
        for c in COMPONENTS:
            want = getattr(first, c) + (getattr(second, c) - getattr(first, c)) * frac
            assert w[c] == pytest.approx(want, abs=1e-12), (progress, c)


def test_without_curriculum_the_weights_are_constant():
    cfg = CurriculumConfig(use_curriculum=False, weights=Weights(kd=0.6, ce=0.4, feature=0.1, relation=0.05))
    for progress in (0.0, 0.2, 0.3, 0.5, 0.99, 1.0):
        assert curriculum_weights(progress, cfg) == {"kd": 0.6, "ce": 0.4, "feature": 0.1, "relation": 0.05}
    assert phase_table(cfg, 10) == [{"phase": 1, "steps": [0, 10], "weights": step_weights(0, 10, cfg)}]


@pytest.mark.parametrize("total", range(1, 41))
def test_phase_table_step_ranges_match_the_weights_used(total):
    """The plan's phase ranges are the steps that really get each phase's weights (no ramp, so they differ)."""
    cfg = CurriculumConfig(phases=[Phase(until=0.3, kd=1.0, ce=0.0), Phase(until=0.7, kd=0.5, ce=0.5),
                                   Phase(until=1.0, kd=0.0, ce=1.0)])
    by_phase = {}
    for step in range(total):
        by_phase.setdefault(step_weights(step, total, cfg)["kd"], []).append(step)
    rows = phase_table(cfg, total)
    got = {row["weights_start"]["kd"]: list(range(*row["steps"])) for row in rows}
    assert got == by_phase
    assert all(row["weights_start"] == row["weights_end"] for row in rows)


def test_active_ranges_are_the_steps_with_nonzero_weight():
    total = 17
    ranges = active_step_ranges(DEFAULT, total)
    for c in COMPONENTS:
        on = [s for s in range(total) if step_weights(s, total, DEFAULT)[c] > 0]
        assert [s for a, b in ranges[c] for s in range(a, b)] == on


# -- in a real run ----------------------------------------------------------------------------------------

TOTAL, ACCUM = 10, 2


@pytest.fixture(scope="module")
def instrumented_run(tmp_path_factory, kd_cache):
    """10 optimizer steps (2 micro-batches each), default curriculum, eval after every step, with a record of
    every cache read, every yielded batch, and every feature/relation/router computation."""
    tmp = tmp_path_factory.mktemp("curriculum")
    log = {"reads": [], "batches": {}, "computed": [], "forward_layers": []}
    context = {"where": None, "weights": None, "eval_step": None}

    real_read, real_batch = CacheReader.read, CacheDataset.batch

    def read(self, split, start, stop, groups):
        out = real_read(self, split, start, stop, groups)
        log["reads"].append({"where": context["where"], "eval_step": context["eval_step"], "groups": set(groups),
                             "arrays": set(out)})
        return out

    def batch(self, order, b, run_batch):
        context["where"] = (self.split, run_batch)
        out = real_batch(self, order, b, run_batch)
        context["where"] = None
        if self.split == "train":
            log["batches"][run_batch] = {k for k in out if k.startswith("hidden_")}
        return out

    def batch_losses(s, batch_, weights, model=None):
        context["weights"] = dict(weights)
        return real_losses(s, batch_, weights, model)

    def recording(name, fn):
        def wrapper(*args, **kwargs):
            log["computed"].append((name, dict(context["weights"])))
            return fn(*args, **kwargs)
        return wrapper

    real_losses, real_evaluate = train_module.batch_losses, train_module.evaluate
    real_forward = train_module.DistillModel.forward

    def evaluate(s, step):
        context["eval_step"] = step
        try:
            return real_evaluate(s, step)
        finally:
            context["eval_step"] = None

    def forward(self, input_ids, position_ids, student_layers, teacher_states=None, mask=None, keep=None):
        log["forward_layers"].append((student_layers, dict(context["weights"])))
        return real_forward(self, input_ids, position_ids, student_layers, teacher_states, mask, keep)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CacheReader, "read", read)
        mp.setattr(CacheDataset, "batch", batch)
        mp.setattr(train_module, "batch_losses", batch_losses)
        mp.setattr(train_module, "feature_loss", recording("feature", train_module.feature_loss))
        mp.setattr(train_module, "relation_loss", recording("relation", train_module.relation_loss))
        mp.setattr(LayerRouter, "forward", recording("router", LayerRouter.forward))
        mp.setattr(train_module.DistillModel, "forward", forward)
        mp.setattr(train_module, "evaluate", evaluate)
        config = train_config(tmp, kd_cache, train={"max_steps": TOTAL, "gradient_accumulation_steps": ACCUM,
                                                    "batch_size": 2, "eval_steps": 1, "num_workers": 0})
        train(config)
    return tmp / "run", log


def test_phase_one_neither_computes_nor_reads_hidden_states(instrumented_run):
    run, log = instrumented_run
    weights = {s: step_weights(s, TOTAL, DEFAULT) for s in range(TOTAL)}
    needs_hidden = {s for s, w in weights.items() if w["feature"] > 0 or w["relation"] > 0}
    assert needs_hidden == set(range(4, TOTAL))  # steps 0-2: phase 1; step 3: phase 2 with its ramp at 0

    # Every train micro-batch of a step without feature/relation lacks hidden arrays; the others hold them.
    assert len(log["batches"]) == TOTAL * ACCUM
    for micro, hidden in log["batches"].items():
        assert bool(hidden) == (micro // ACCUM in needs_hidden), (micro, hidden)
    # ... and no read from disk for those micro-batches asked for hidden states; later ones did.
    train_reads = [r for r in log["reads"] if r["where"] and r["where"][0] == "train"]
    early = [r for r in train_reads if r["where"][1] // ACCUM not in needs_hidden]
    late = [r for r in train_reads if r["where"][1] // ACCUM in needs_hidden]
    assert early and late
    assert all("hidden" not in r["groups"] and not any(a.startswith("hidden_") for a in r["arrays"]) for r in early)
    assert any({"hidden_1", "hidden_2"} <= r["arrays"] for r in late)

    # Nothing hidden-state related is computed at a zero weight: not the student's layers, not the losses.
    assert {"feature", "relation", "router"} <= {name for name, _ in log["computed"]}
    for name, w in log["computed"]:
        assert w["feature" if name == "router" else name] > 0, (name, w)
    for layers, w in log["forward_layers"]:
        assert (layers is not None) == (w["feature"] > 0 or w["relation"] > 0)

    plan = json.loads((Path(run) / "plan.json").read_text())
    assert plan["arrays_read"]["hidden"] == [[4, TOTAL]]
    for row in metrics(run):
        if row["step"] - 1 not in needs_hidden:
            assert row["weight/feature"] == 0.0 and row["weight/relation"] == 0.0
            assert "loss/feature" not in row and "loss/relation" not in row
            assert row["weighted/feature"] == 0.0 and row["weighted/relation"] == 0.0
        else:
            assert row["loss/feature"] > 0
            assert row["weighted/feature"] == pytest.approx(row["weight/feature"] * row["loss/feature"])


def test_eval_reads_hidden_states_only_when_its_weights_need_them(instrumented_run):
    _, log = instrumented_run
    eval_reads = [r for r in log["reads"] if r["eval_step"] is not None]
    assert {r["eval_step"] for r in eval_reads} == set(range(1, TOTAL + 1))
    for r in eval_reads:  # eval logged at step s uses the weights of 0-based step s - 1
        w = step_weights(r["eval_step"] - 1, TOTAL, DEFAULT)
        assert ("hidden" in r["groups"]) == (w["feature"] > 0 or w["relation"] > 0), r
        assert any(a.startswith("hidden_") for a in r["arrays"]) == ("hidden" in r["groups"])


def test_train_and_eval_at_the_same_step_use_the_same_weights(instrumented_run):
    run, _ = instrumented_run
    train_rows = {r["step"]: r for r in metrics(run)}
    eval_rows = metrics(run, "eval")
    assert [r["step"] for r in eval_rows] == list(range(1, TOTAL + 1))  # every step, then the final eval
    weights_of = lambda row: {c: row[f"weight/{c}"] for c in COMPONENTS}  # noqa: E731
    # The ramp makes consecutive steps' weights differ, so an off-by-one step would fail here.
    assert any(weights_of(train_rows[s]) != weights_of(train_rows[s + 1]) for s in range(1, TOTAL))
    balance = 0.01  # loss.router_balance_weight default
    for row in eval_rows:
        w = weights_of(row)
        assert w == weights_of(train_rows[row["step"]])
        total = sum(w[c] * row.get(f"eval/{c}", 0.0) for c in COMPONENTS)
        total += w["feature"] * balance * row.get("eval/router_balance", 0.0)
        assert row["eval/total"] == pytest.approx(total, rel=1e-6)
        for c in ("feature", "relation"):
            assert (f"eval/{c}" in row) == (w[c] > 0)
