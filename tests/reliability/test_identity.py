"""The cache identity covers everything the cache depends on: the teacher's files (checked on resume, reuse and
verify --full), the cache's own config.json and tokenizer/ (hashed in plan.json), and a cache's files must be
its own: a symbolic link out of it is refused, never followed (and gc removes the link, not its target)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import cli, save_llama
from stages.train_student.helpers import train, train_config

from sad_pipe.errors import CacheError
from sad_pipe.stages.cache_teacher.maintenance import verify_cache
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.manifest import read_commits
from sad_pipe.storage.reader import CacheReader

from .conftest import cache_of, writer_config


@pytest.fixture()
def own_teacher_cache(assets, rel_docs, tmp_path) -> tuple[str, Path, str]:
    teacher = tmp_path / "teacher"
    shutil.copytree(assets["llama"], teacher)
    config = writer_config(tmp_path, assets, rel_docs, teacher={"model": str(teacher)}, data={"max_documents": 3})
    cli("-q", "cache-teacher", "--config", config)
    return config, teacher, cache_of(config)


def test_a_replaced_teacher_is_refused_on_reuse_and_reported_by_full_verify(own_teacher_cache, tmp_path):
    config, teacher, url = own_teacher_cache
    assert cli("verify", "--full", url).exit_code == 0
    save_llama(str(tmp_path / "other"), 512, seed=5)
    shutil.copy(tmp_path / "other" / "model.safetensors", teacher / "model.safetensors")
    out = cli("-q", "cache-teacher", "--config", config, expect=1).output  # a complete cache: refused, not "done"
    assert "was built from another teacher" in out and "model.safetensors changed" in out
    result = cli("verify", "--full", url, expect=1)
    assert "teacher: " in result.output and "no longer the teacher this cache was built from" in result.output
    assert "repair" not in verify_cache(url).problems  # quick verify does not read the teacher
    shutil.rmtree(teacher)  # a teacher deleted after caching is fine: stage two never needs it
    assert verify_cache(url, full=True).ok


def test_a_changed_tokenizer_or_config_json_is_damage(own_teacher_cache, tmp_path):
    _, _, url = own_teacher_cache
    for name in ("tokenizer/tokenizer_config.json", "config.json"):
        path = Path(url) / name
        original = path.read_bytes()
        path.write_bytes(original.rstrip(b"\n"))  # a change that leaves the tokenizer's behaviour as it was
        report = verify_cache(url, full=True)
        assert not report.ok and any(name in p for p in report.problems["cache"]), report.problems
        result = train(train_config(tmp_path, url, name=f"run-{path.stem}"), expect=1)
        assert f"{name}: " in result.output and "verify --full" in result.output
        path.write_bytes(original)
    assert verify_cache(url, full=True).ok


def test_a_symbolic_link_out_of_the_cache_is_refused_and_never_followed(own_teacher_cache, tmp_path):
    _, _, url = own_teacher_cache
    record = read_commits(CacheFS(url))[("train", 0)]
    victim = Path(url) / record["dir"] / "lse" / "c" / "0" / "0" / "0"
    outside = tmp_path / "outside.bin"
    outside.write_bytes(victim.read_bytes())  # the same bytes: only the link itself is wrong
    victim.unlink()
    victim.symlink_to(outside)
    with pytest.raises(CacheError, match="a symbolic link to .*outside the cache"):
        CacheReader(url).read("train", 0, 4, {"lse"})
    report = verify_cache(url, full=True)
    assert not report.ok and "a symbolic link to" in " ".join(report.problems["train/0"])
    # gc: an uncommitted directory that is a link out of the cache is removed as a link; its target stays.
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep.txt").write_text("not the cache's")
    (Path(url) / "shards" / "train" / "00099-deadbeef").symlink_to(target, target_is_directory=True)
    out = cli("gc", url).output
    assert "removed" in out and (target / "keep.txt").exists()
    assert not (Path(url) / "shards" / "train" / "00099-deadbeef").exists()
    victim.unlink()
    shutil.copy(outside, victim)
    assert verify_cache(url, full=True).ok
