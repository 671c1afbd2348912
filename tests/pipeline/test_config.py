"""Config: every shipped file loads, every problem is reported at once with its dotted key, and the
README's reference is generated from the same field docs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli

from sad_pipe.errors import ConfigError
from sad_pipe.pipeline.config import load_config, reference_markdown, validate

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.json"))


def test_configs_exist():
    assert len(CONFIGS) >= 8


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.about, f"{path.name}: configs are headed by the command that runs them (the `about` field)"


@pytest.mark.parametrize("method", sorted((ROOT / "configs/demo/methods").glob("*.json")), ids=lambda p: p.stem)
def test_demo_method_overlays_apply_to_both_students(method):
    for student in ("student-small", "student-medium"):
        cfg = load_config([ROOT / f"configs/demo/{student}.json", method])
        base = json.loads((ROOT / f"configs/demo/{student}.json").read_text())
        assert cfg.student.config == base["student"]["config"]  # the overlay changes the method, not the student


def test_all_problems_reported_at_once_with_their_keys():
    with pytest.raises(ConfigError) as err:
        validate({"batch_size": 2, "train": {"learning_rate": "fast", "epochs": 0, "bogus": 1},
                  "loss": {"kd_form": "mse"}, "cache": {"sequences_per_shard": 30}})
    text = str(err.value)
    for fragment in ("train.learning_rate", "train.epochs", "train.bogus: unknown key", "loss.kd_form",
                     "sequences_per_shard (30) must be a multiple", "the original trainer's `batch_size` lives in section train"):
        assert fragment in text, text
    assert len(err.value.problems) == 6


def test_strict_types_nothing_silently_coerced():
    with pytest.raises(ConfigError, match=r"train.batch_size.*found \"8\""):
        validate({"train": {"batch_size": "8"}})


def test_set_overrides_win_and_parse_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train": {"learning_rate": 1e-3, "batch_size": 4}}))
    cfg = load_config(path, ["train.learning_rate=1e-4", "curriculum.use_curriculum=false", "train.output=runs/x"])
    assert cfg.train.learning_rate == 1e-4 and cfg.train.batch_size == 4
    assert cfg.curriculum.use_curriculum is False and cfg.train.output == "runs/x"


def test_later_config_files_deep_merge(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"train": {"learning_rate": 1e-3, "batch_size": 4}}))
    b.write_text(json.dumps({"train": {"batch_size": 2}}))
    cfg = load_config([a, b])
    assert (cfg.train.learning_rate, cfg.train.batch_size) == (1e-3, 2)


def test_curriculum_phases_must_end_at_one():
    with pytest.raises(ConfigError, match="finishing at 1.0"):
        validate({"curriculum": {"phases": [{"until": 0.5}]}})


def test_cli_config_errors_exit_2_one_line_per_key(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"train": {"learning_rate": -1, "nope": 3}}))
    result = cli("train-student", "--config", str(path), expect=2)
    assert "Traceback" not in result.output
    assert "train.learning_rate: Input should be greater than 0 (found -1)" in result.output
    assert "train.nope: unknown key" in result.output


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON (line 1"),
    ("[1, 2]", "expected a JSON object"),
])
def test_cli_unreadable_config(tmp_path, content, message):
    path = tmp_path / "c.json"
    path.write_text(content)
    result = cli("cache-teacher", "--config", str(path), expect=2)
    assert message in result.output and "Traceback" not in result.output


def test_cli_missing_config_file(tmp_path):
    result = cli("cache-teacher", "--config", str(tmp_path / "missing.json"), expect=2)
    assert "config file not found" in result.output


def test_cli_bad_set_syntax():
    result = cli("cache-teacher", "--set", "train.batch_size", expect=2)
    assert "expected section.key=value" in result.output


def test_required_keys_named():
    result = cli("cache-teacher", expect=2)
    assert "data.path: required" in result.output and "cache.path: required" in result.output


def test_readme_config_reference_is_current():
    readme = (ROOT / "README.md").read_text()
    assert reference_markdown().strip() in readme, "README config reference is stale: regenerate with `sad-pipe config-reference`"
