"""train.report_to: every metrics.jsonl figure in TensorBoard (read back from the event file) and W&B (offline)."""

from __future__ import annotations

import glob
import importlib.util

import pytest

from .helpers import error_line, metrics, train, train_config


def figures(run) -> dict[tuple[str, int], float]:
    """Every number of metrics.jsonl as {(tag, step): value}, tagged as the trackers tag it."""
    out = {}
    for split in ("train", "eval"):
        for row in metrics(run, split):
            for key, value in row.items():
                if key in ("step", "split") or not isinstance(value, (int, float)):
                    continue
                out[(key if key.startswith(f"{split}/") else f"{split}/{key}", row["step"])] = float(value)
    return out


def tensorboard_scalars(run) -> dict[tuple[str, int], float]:
    """The event files read back as {(tag, step): value}; a (tag, step) logged twice is an error."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    pairs = [((tag, e.step), e.value) for tag in events.Tags()["scalars"] for e in events.Scalars(tag)]
    logged = dict(pairs)
    assert len(logged) == len(pairs), "a figure logged twice at one step"
    return logged


def test_tensorboard_gets_every_metric_of_metrics_jsonl(tmp_path, kd_cache):
    config = train_config(tmp_path, kd_cache, train={"max_steps": 4, "eval_steps": 2, "report_to": ["jsonl", "tensorboard"]})
    train(config)
    run = tmp_path / "run"
    logged = tensorboard_scalars(run)
    expected = figures(run)
    assert {"train/loss/kd", "train/lr", "eval/ce", "eval/weight/kd"} <= {tag for tag, _ in expected}
    assert ("eval/ce", 2) in expected and ("eval/ce", 4) in expected  # the eval at step 2 and the final one
    assert logged.keys() == expected.keys()
    for key, value in expected.items():  # TensorBoard keeps float32
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-30), key


def test_a_resumed_run_purges_the_events_past_its_checkpoint(tmp_path, kd_cache, monkeypatch):
    from sad_pipe.stages.train_student import train as train_module

    config = train_config(tmp_path, kd_cache, train={"max_steps": 4, "save_steps": 2, "eval_steps": 3,
                                                     "report_to": ["tensorboard"]})
    real_evaluate = train_module.evaluate

    def killed_at_step_3(s, step):
        if step == 3:
            raise KeyboardInterrupt  # after step 3's train line, before its checkpoint (the next one is at 4)
        return real_evaluate(s, step)

    monkeypatch.setattr(train_module, "evaluate", killed_at_step_3)
    train(config, expect=130)
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3]
    monkeypatch.undo()
    train(config)  # resumes from step 2: step 3 is trained again
    run = tmp_path / "run"
    logged, expected = tensorboard_scalars(run), figures(run)
    assert logged.keys() == expected.keys()  # step 3 once (no duplicate), with the resumed run's figures:
    for key, value in expected.items():  # its tokens_per_second is not the killed run's
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-30), key


def test_an_uninstalled_tracker_is_refused_before_any_work(tmp_path, kd_cache, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = train(train_config(tmp_path, kd_cache, train={"report_to": ["jsonl", "wandb"]}), expect=2)
    assert error_line(result) == ('error: config error: train.report_to wandb: not installed; pip install -e ".[wandb]" '
                                  "(or drop it from train.report_to)")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed (pip install -e \".[wandb]\")")
def test_wandb_offline_gets_every_metric_of_metrics_jsonl(tmp_path, kd_cache, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(train_config(tmp_path, kd_cache, train={"max_steps": 3, "report_to": ["wandb"]}))
    run = tmp_path / "run"
    assert len(metrics(run)) == 3  # metrics.jsonl is written whatever report_to says
    # wandb keeps an offline run in one binary log (no Python reader ships with it); each logged figure is in it as
    # its JSON text, next to its tag
    (log,) = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = open(log, "rb").read()
    for (tag, _), value in figures(run).items():
        assert tag.encode() in data and repr(value).encode() in data, tag
