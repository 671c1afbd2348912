"""train-student stopped and resumed, and SIGKILLed at random moments and inside checkpoint saves: the
finished run trained on the same samples in the same order, logged the same loss trace and ended with
the same weights, bit for bit, as the uninterrupted run (CPU).

Grid: gradient accumulation {1, 4} x DataLoader workers {0, 2}, each stopped mid-epoch, resumed, stopped
again at the epoch end (resume of a resume, at an epoch boundary), resumed to the end. Kill counts:
--runslow or SAD_PIPE_TRAIN_KILLS.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from stages.train_student.helpers import GPT2_STUDENT, metrics, train, train_config

from sad_pipe.stages.train_student import train as train_module

from .conftest import fuzz_count
from .forkserver import effective_trace, install_recorder

BATCH = 8  # the shared cache's ~45 train sequences: 5 micro-batches per epoch


def steps_per_epoch(cache: str, accum: int) -> int:
    train_sequences = json.loads((Path(cache) / "manifest.json").read_text())["splits"]["train"]["sequences"]
    return -(-(train_sequences // BATCH) // accum)


def grid_config(tmp_path: Path, cache: str, name: str, accum: int, workers: int) -> str:
    # GPT-2 has dropout, so a wrong RNG restore shows; the curriculum's second phase (hidden states) starts
    # in the first epoch, so the arrays read change across the resume points.
    return train_config(tmp_path, cache, name, student={"config": GPT2_STUDENT},
                        train={"max_steps": None, "epochs": 2, "batch_size": BATCH, "gradient_accumulation_steps": accum,
                               "save_steps": 1, "keep_checkpoints": 2, "num_workers": workers, "warmup_steps": 1,
                               "eval_steps": 2})


def outcome(run: Path, trace: list) -> dict:
    """What must not depend on interruptions: the sample order, the loss trace, the weights."""
    rows = {split: [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in metrics(run, split)]
            for split in ("train", "eval")}
    final = {name: load_file(run / path) for name, path in (("model", "final/model.safetensors"),
                                                            ("router", "router.safetensors"))}
    return {"trace": trace, "metrics": rows, "weights": final}


def assert_same(got: dict, want: dict) -> None:
    """Same (epoch, micro-batch, sequence ids) in the same order, none twice; same metrics; same weights."""
    assert got["trace"] == want["trace"]
    differ = [(split, a.get("step"), k, a.get(k), b.get(k)) for split in want["metrics"]
              for a, b in zip(got["metrics"][split], want["metrics"][split]) for k in a.keys() | b.keys()
              if a.get(k) != b.get(k)]
    assert not differ, differ[:10]
    assert got["metrics"] == want["metrics"]  # the same number of lines too
    for name, tensors in want["weights"].items():
        assert got["weights"][name].keys() == tensors.keys()
        assert all(torch.equal(got["weights"][name][k], tensors[k]) for k in tensors), name


def no_checkpoint_leftovers(run: Path) -> None:
    names = sorted(os.listdir(run / "checkpoints"))
    assert all(n.startswith("step-") for n in names), names  # no half-written .tmp-* save left behind
    assert len(names) <= 2 and all((run / "checkpoints" / n / "COMPLETE").exists() for n in names)


def stop_after_checkpoint(monkeypatch, step: int) -> None:
    real_save = train_module.save_checkpoint

    def save_then_stop(s, run_dir, state):
        path = real_save(s, run_dir, state)
        if state["step"] == step:
            raise KeyboardInterrupt  # as if the job were stopped right after this checkpoint
        return path

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)


@pytest.fixture(scope="module")
def straight(reference, tmp_path_factory):
    """The uninterrupted run for each accumulation (workers do not change what is trained: the grid checks it),
    and how long it took."""
    out = {}
    for accum in (1, 4):
        tmp = tmp_path_factory.mktemp(f"straight-{accum}")
        log = str(tmp / "ids.jsonl")
        start = time.perf_counter()
        with pytest.MonkeyPatch.context() as mp:
            install_recorder(log, patch=mp.setattr)
            train(grid_config(tmp, reference, "run", accum, 0))
        out[accum] = {**outcome(tmp / "run", effective_trace(log)), "seconds": time.perf_counter() - start}
    return out


# The two cells `make test` runs; the other two with --runslow.
GRID = [pytest.param(1, 0), pytest.param(4, 2), pytest.param(1, 2, marks=pytest.mark.slow),
        pytest.param(4, 0, marks=pytest.mark.slow)]


@pytest.mark.parametrize("accum, workers", GRID)
def test_stop_resume_stop_at_epoch_end_resume_equals_the_straight_run(reference, straight, tmp_path, monkeypatch,
                                                                      accum, workers):
    config = grid_config(tmp_path, reference, "run", accum, workers)
    run, log = tmp_path / "run", str(tmp_path / "ids.jsonl")
    plan_steps = steps_per_epoch(reference, accum)
    assert plan_steps >= 2
    stops = [1 if accum == 4 else 2, plan_steps]  # mid-epoch, then at the end of the first epoch
    for stop in stops:
        with monkeypatch.context() as mp:
            install_recorder(log, patch=mp.setattr)
            stop_after_checkpoint(mp, stop)
            train(config, expect=130)
        assert len(metrics(run)) == stop and not (run / "final").exists()
    with monkeypatch.context() as mp:
        install_recorder(log, patch=mp.setattr)
        train(config)
    plan = json.loads((run / "plan.json").read_text())
    assert (plan["steps_per_epoch"], plan["total_steps"]) == (plan_steps, 2 * plan_steps)
    resumes = [json.loads(line) for line in open(log) if '"resume"' in line]
    assert [(r["resume"], r["epoch"], r["micro_batch"]) for r in resumes] == [(stops[0], 0, stops[0] * accum),
                                                                              (stops[1], 1, 0)]
    assert_same(outcome(run, effective_trace(log)), straight[accum])
    no_checkpoint_leftovers(run)


# -- SIGKILL: at random moments and at each step of a checkpoint save --------------------------------------

TRAIN = "sad_pipe.stages.train_student.train"


def half_saved(*present: str, absent: str | None = None):
    """Check that a kill came inside the save of checkpoint 2: its temp directory holds `present`, not `absent`."""
    def check(run: Path) -> None:
        tmp = list((run / "checkpoints").glob(".tmp-step-00000002-*"))
        assert len(tmp) == 1 and all((tmp[0] / name).exists() for name in present), tmp
        assert absent is None or not (tmp[0] / absent).exists()
    return check


def renamed(run: Path) -> None:
    assert (run / "checkpoints" / "step-00000002" / "COMPLETE").exists()
    assert not list((run / "checkpoints").glob(".tmp-*"))


# Inside save_checkpoint, in order (the n-th call counted from the start of each run; each run resumes the
# one before): (function, n, before/after, what the kill leaves).
SAVE_CRASHES = [
    (f"{TRAIN}:save_model", 2, "after", half_saved("model.safetensors", absent="optimizer.pt")),
    ("torch:save", 1, "after", half_saved("optimizer.pt", absent="rng.pt")),
    ("os:rename", 1, "before", half_saved("COMPLETE")),
    ("os:rename", 1, "after", renamed),
]


def test_sigkilled_training_resumes_to_the_straight_run(forkserver, straight, reference, tmp_path, request):
    kills_wanted = fuzz_count(request, "SAD_PIPE_TRAIN_KILLS", fast=2, slow=60)
    config = grid_config(tmp_path, reference, "run", 4, 0)
    args, log, run = ["-q", "train-student", "--config", config], str(tmp_path / "ids.jsonl"), tmp_path / "run"
    want = straight[4]
    for target, call, when, check in SAVE_CRASHES:
        answer = forkserver.run(args, hooks={"record_ids": log, "crash": {"target": target, "call": call, "when": when}})
        assert answer["killed"], f"{target} never reached\n{forkserver.output(answer)[-3000:]}"
        check(run)
    rng = np.random.default_rng(5)
    kills = 0
    while True:
        answer = forkserver.run(args, hooks={"record_ids": log},
                                kill_after=float(rng.uniform(0, want["seconds"])) if kills < kills_wanted else None)
        if answer["killed"]:
            kills += 1
            continue
        assert answer["code"] == 0, forkserver.output(answer)[-3000:]
        assert_same(outcome(run, effective_trace(log)), want)
        no_checkpoint_leftovers(run)
        if kills >= kills_wanted:
            break
        shutil.rmtree(run)  # finished before the kills wanted: another round from scratch
        os.remove(log)
    print(f"\ntraining kill fuzz: {len(SAVE_CRASHES) + kills} SIGKILLs survived ({len(SAVE_CRASHES)} inside checkpoint "
          f"saves, {kills} at random moments)")
