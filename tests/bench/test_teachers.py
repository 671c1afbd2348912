"""teachers.py: recipe keys, build once / reuse / resume, and the sharpness profile, on a recipe that builds in
seconds. Every build goes to a temporary teacher cache, never to the home directory."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sad_pipe.bench import teachers
from sad_pipe.bench.teachers import TINY, TeacherRecipe, build_teacher, load_teacher, teacher_profile
from sad_pipe.errors import ConfigError
from sad_pipe.stages.train_student import train as train_module


class Interrupted(Exception):
    pass


@pytest.fixture(autouse=True)
def teacher_cache(tmp_path, monkeypatch):
    """Point the default teacher cache at a temp dir, so a test that forgets `root` still stays out of ~."""
    root = tmp_path / "teacher-cache"
    monkeypatch.setenv("SAD_PIPE_TEACHER_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """TINY, built once for the module, uninterrupted."""
    root = tmp_path_factory.mktemp("teachers")
    return root, build_teacher(TINY, root=root, threads=1)


def _count_saves(monkeypatch, fail_after: int | None = None) -> list[int]:
    """Record every checkpoint train-student saves; optionally stop the run after `fail_after` of them."""
    saved: list[int] = []
    real = train_module.save_checkpoint

    def save(s, run_dir, state):
        out = real(s, run_dir, state)
        saved.append(state["step"])
        if fail_after is not None and len(saved) == fail_after:
            raise Interrupted(f"killed after step {state['step']}")
        return out

    monkeypatch.setattr(train_module, "save_checkpoint", save)
    return saved


def test_recipe_key_is_stable_and_changes_with_every_field():
    same = TeacherRecipe(**{**TINY.to_json(), "width": dict(reversed(list(TINY.width.items())))})
    assert same == TINY and same.key == TINY.key
    assert dataclasses.replace(TINY, lr=int(3)).key == dataclasses.replace(TINY, lr=3.0).key  # 3 and 3.0: one recipe
    changed = {"corpus_mb": 0.5, "vocab": 640, "max_length": 32, "steps": 7, "batch": 2, "lr": 1e-3, "warmup": 2,
               "weight_decay": 0.0, "seed": 1, "width": {**TINY.width, "hidden_size": 64}}
    assert set(changed) == {f.name for f in dataclasses.fields(TeacherRecipe)}
    keys = {name: dataclasses.replace(TINY, **{name: value}).key for name, value in changed.items()}
    assert TINY.key not in keys.values() and len(set(keys.values())) == len(keys)


def test_a_bad_recipe_is_a_config_error():
    with pytest.raises(ConfigError, match="warmup 6: must be in"):
        dataclasses.replace(TINY, warmup=6)
    with pytest.raises(ConfigError, match="missing num_attention_heads"):
        dataclasses.replace(TINY, width={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2})


def test_build_teacher_builds_once_and_reuses_it(built, monkeypatch):
    root, asset = built
    assert asset.built and (asset.path / "COMPLETE").exists() and asset.path == root / TINY.key
    assert (asset.model / "model.safetensors").exists() and (asset.tokenizer / "tokenizer.json").exists()
    assert asset.held_out.stat().st_size > 0 and asset.train_jsonl.stat().st_size > 0
    record = json.loads((asset.path / "profile.json").read_text())
    assert record["key"] == TINY.key and record["recipe"] == TINY.to_json() and record["build"]["train_seconds"] > 0
    mtime = (asset.model / "model.safetensors").stat().st_mtime_ns
    saves = _count_saves(monkeypatch)
    monkeypatch.setattr(teachers, "_corpus", lambda *a: pytest.fail("rebuilt the corpus"))
    again = build_teacher(TINY, root=root, threads=1)
    assert not again.built and again.profile == asset.profile and saves == []
    assert (asset.model / "model.safetensors").stat().st_mtime_ns == mtime


def test_default_root_comes_from_the_environment(teacher_cache, monkeypatch):
    assert teachers.default_root() == teacher_cache
    monkeypatch.delenv("SAD_PIPE_TEACHER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(teacher_cache / "xdg"))
    assert teachers.default_root() == teacher_cache / "xdg" / "sad-pipe" / "teachers"


def test_an_interrupted_build_resumes_where_it_stopped(built, teacher_cache, monkeypatch):
    _, whole = built
    saves = _count_saves(monkeypatch, fail_after=2)
    with pytest.raises(Interrupted):
        build_teacher(TINY, threads=1)  # into the env's temp cache
    assert saves == [1, 2] and load_teacher(TINY) is None
    assert not (teacher_cache / TINY.key / "COMPLETE").exists()
    monkeypatch.undo()
    monkeypatch.setenv("SAD_PIPE_TEACHER_CACHE", str(teacher_cache))
    saves = _count_saves(monkeypatch)
    resumed = build_teacher(TINY, threads=1)
    assert resumed.built and saves == list(range(3, TINY.steps + 1))  # steps 1-2 were not trained again
    # train-student resumes exactly, so the teacher is the one an uninterrupted build makes
    assert (resumed.model / "model.safetensors").read_bytes() == (whole.model / "model.safetensors").read_bytes()
    assert resumed.profile["profile"] == whole.profile["profile"]


def test_a_build_without_its_marker_is_not_taken_as_complete(built, tmp_path, monkeypatch):
    _, whole = built
    root = tmp_path / "copy"
    import shutil

    shutil.copytree(whole.path, root / TINY.key)
    (root / TINY.key / "COMPLETE").unlink()
    (root / TINY.key / "profile.json").unlink()
    assert load_teacher(TINY, root) is None
    saves = _count_saves(monkeypatch)
    finished = build_teacher(TINY, root=root, threads=1)
    assert finished.built and saves == []  # the finished training is kept; only the profile is redone
    assert finished.profile["profile"] == whole.profile["profile"]


def test_a_failed_step_leaves_no_half_built_directory(tmp_path, monkeypatch):
    def broken(recipe, corpus, out):
        out.mkdir(parents=True)
        (out / "tokenizer.json").write_text("{")  # half written
        raise Interrupted("killed while training the tokenizer")

    monkeypatch.setattr(teachers, "_tokenizer", broken)
    with pytest.raises(Interrupted):
        build_teacher(TINY, root=tmp_path, threads=1)
    assert (tmp_path / TINY.key / "corpus" / "train.jsonl").exists() and not (tmp_path / TINY.key / "tokenizer").exists()


def test_teacher_profile_masses_are_probabilities_monotone_in_k(built):
    _, asset = built
    p = teacher_profile(asset.model, asset.tokenizer, asset.held_out, 8, TINY.max_length, batch=3)
    masses = [p["mass_T1"][k] for k in ("16", "64", "256")]
    assert all(0.0 <= m <= 1.0 for m in masses) and masses == sorted(masses)
    assert 0.0 <= p["mass_T2_256"] <= p["mass_T1"]["256"] + 1e-6  # a higher temperature flattens
    assert 0.0 < p["entropy_T1"] and 0.0 < p["ce"] and 0.0 <= p["top1"] <= p["target_in_top256"] <= 1.0
    assert p["sequences"] == 8 and p["positions"] == 8 * TINY.max_length
    one_by_one = teacher_profile(asset.model, asset.tokenizer, asset.held_out, 8, TINY.max_length, batch=1)
    assert one_by_one.pop("mass_T1") == pytest.approx(p.pop("mass_T1"), rel=1e-5)
    assert one_by_one == pytest.approx(p, rel=1e-5)  # batching changes nothing
