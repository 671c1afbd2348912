"""What a cache, a checkpoint or a model directory can make sad-pipe do: no code of theirs runs unless
trust_remote_code is set, nothing is unpickled, and no path they name leads outside the cache."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli, save_llama
from stages.train_student.helpers import train, train_config

from sad_pipe.errors import CacheError
from sad_pipe.storage.reader import CacheReader

from .conftest import writer_config

# -- trust_remote_code ----------------------------------------------------------------------------------------

EVIL_CONFIG = '''
import pathlib
pathlib.Path({marker!r}).write_text("the model directory's own code ran")
from transformers import PretrainedConfig


class EvilConfig(PretrainedConfig):
    model_type = "sadpipe_evil"
'''


@pytest.fixture
def evil_teacher(tmp_path, assets, monkeypatch):
    """A model directory whose config names its own Python code (auto_map), which leaves a marker file."""
    import transformers.dynamic_module_utils as dynamic

    marker = tmp_path / "marker"
    path = tmp_path / "evil"
    path.mkdir()
    (path / "configuration_evil.py").write_text(EVIL_CONFIG.format(marker=str(marker)))
    (path / "config.json").write_text(json.dumps({"model_type": "sadpipe_evil",
                                                  "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(assets["llama"]) / name, path / name)
    # transformers copies remote code into its modules cache before importing it: keep that in tmp_path
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    return str(path), marker


def test_a_model_directorys_code_runs_only_with_trust_remote_code(evil_teacher, assets, rel_docs, tmp_path):
    path, marker = evil_teacher
    config = writer_config(tmp_path, assets, rel_docs, teacher={"model": path})
    result = cli("-q", "cache-teacher", "--config", config, expect=1)
    assert result.output.strip().splitlines()[-1].startswith("error: cannot load ")
    assert not marker.exists()  # off by default: the directory's code never ran
    result = cli("-q", "cache-teacher", "--config", config, "--set", "teacher.trust_remote_code=true", expect=None)
    assert marker.exists()  # the switch is what allows it (the model itself then fails to load: it has no weights)


def test_every_load_of_a_model_or_tokenizer_passes_trust_remote_code_false_unless_set(reference, tmp_path, assets,
                                                                                    monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = save_llama(str(tmp_path / "student"), 512)
    AutoTokenizer.from_pretrained(assets["llama"]).save_pretrained(student)
    calls = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained.__func__

        def recording(owner, name, *args, real=real, **kwargs):
            calls.append((owner.__name__, str(name), kwargs.get("trust_remote_code")))
            return real(owner, name, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    config = train_config(tmp_path, reference, student={"model": student}, train={"max_steps": 2})
    train(config)
    # the student, its tokenizer (compared with the cache's) and the cache's own tokenizer
    assert {(owner, Path(name).name) for owner, name, _ in calls} >= {
        ("AutoModelForCausalLM", "student"), ("AutoTokenizer", "student"), ("AutoTokenizer", "tokenizer")}
    assert all(trusted is False for _, _, trusted in calls), calls
    calls.clear()
    train(config, "--output", str(tmp_path / "trusted"), "--set", "student.trust_remote_code=true")
    assert {(o, Path(n).name, t) for o, n, t in calls if Path(n).name == "student"} == {
        ("AutoModelForCausalLM", "student", True), ("AutoTokenizer", "student", True)}
    assert all(t is False for _, n, t in calls if Path(n).name != "student")  # the cache's tokenizer: never


# -- no pickle ------------------------------------------------------------------------------------------------

def no_unpickling(monkeypatch) -> list:
    """Make every way to unpickle fail, and torch.load refuse anything but weights_only=True."""
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    loads, real = [], torch.load

    def checked(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        assert kwargs.get("weights_only") is True, kwargs
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked)
    return loads


def test_caches_and_checkpoints_are_read_without_pickle(reference, tmp_path, monkeypatch):
    config = train_config(tmp_path, reference, train={"max_steps": 3, "save_steps": 1})
    stopping = {"after": 2}
    from sad_pipe.stages.train_student import train as train_module

    real_save = train_module.save_checkpoint

    def save_then_stop(s, run_dir, state):
        path = real_save(s, run_dir, state)
        if state["step"] == stopping["after"]:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)
    train(config, expect=130)
    monkeypatch.undo()
    loads = no_unpickling(monkeypatch)
    cli("verify", "--full", reference)
    reader = CacheReader(reference)
    for split in reader.plan.splits:
        for a, b in reader.plan.splits[split]["shards"]:
            reader.read(split, a, b, reader.groups)
    train(config)  # resumes from step 2: weights (safetensors), optimizer and RNG state (torch.load)
    assert loads == [True, True]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["steps"] == 3


# -- paths a cache names stay inside it --------------------------------------------------------------------------

@pytest.mark.parametrize("where, path", [
    ("shard", "../../etc/passwd"), ("shard", "/etc"), ("shard", "shards/../../outside"), ("shard", "..\\..\\outside"),
    ("tokens", "../outside"),
])
def test_a_manifest_naming_a_path_outside_the_cache_is_refused(reference, tmp_path, where, path):
    url = Path(shutil.copytree(reference, tmp_path / "cache"))
    manifest = json.loads((url / "manifest.json").read_text())
    if where == "shard":
        manifest["shards"]["train"][1] = path
    else:
        manifest["tokens"]["eval"]["dir"] = path
    (url / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="refusing path .*: paths in a cache must stay inside"):
        CacheReader(str(url))


def test_a_commit_record_naming_a_path_outside_the_cache_is_never_followed_and_repair_fixes_it(reference, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("not the cache's")
    url = Path(shutil.copytree(reference, tmp_path / "cache"))
    record_path = url / "commits" / "train-00000.json"
    record = json.loads(record_path.read_text())
    record["dir"] = "../outside"
    record_path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    out = cli("verify", str(url), expect=1).output
    assert "train/0: refusing path '../outside': paths in a cache must stay inside" in out
    out = cli("verify", "--repair", str(url)).output  # re-creates train/0 through the teacher
    assert "repair: re-creating 1 shards: train/0" in out and "intact" in out
    assert (outside / "precious.txt").read_text() == "not the cache's"
