"""CacheFS: the three operations the commit protocol rests on, and path confinement."""

from __future__ import annotations

import os
import threading

import pytest

from sad_pipe.errors import CacheError
from sad_pipe.storage.fs import CacheFS


def test_create_if_absent_has_exactly_one_winner_among_concurrent_writers(tmp_path):
    cache = CacheFS(str(tmp_path))
    results, start = {}, threading.Barrier(8)

    def commit(i: int) -> None:
        start.wait()
        results[i] = cache.create_if_absent("commits/train-00000.json", f"writer {i}\n".encode())

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1
    assert (tmp_path / "commits" / "train-00000.json").read_bytes() == f"writer {winners[0]}\n".encode()
    assert os.listdir(tmp_path / "commits") == ["train-00000.json"]  # no .partial left by the losers


def test_write_atomic_replaces_whole_files_and_leaves_no_partial(tmp_path):
    cache = CacheFS(str(tmp_path))
    cache.write_json_atomic("manifest.json", {"a": 1})
    cache.write_json_atomic("manifest.json", {"b": [2, 3]})
    assert cache.read_json("manifest.json") == {"b": [2, 3]}
    assert (tmp_path / "manifest.json").read_text() == '{\n "b": [\n  2,\n  3\n ]\n}\n'  # indent 1, sorted, newline
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_move_publishes_a_directory_under_its_new_name(tmp_path):
    cache = CacheFS(str(tmp_path))
    cache.write_atomic("_tmp/train-00000-abcd1234/a/b", b"data")
    cache.move("_tmp/train-00000-abcd1234", "shards/train/00000-abcd1234")
    assert cache.walk_files("shards/train/00000-abcd1234") == {"a/b": 4}
    assert cache.listdir("_tmp") == []


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "shards/../../x", "a\\..\\..\\x", ".."])
def test_paths_that_leave_the_cache_are_refused(tmp_path, rel):
    with pytest.raises(CacheError, match="refusing path .* must stay inside"):
        CacheFS(str(tmp_path / "cache")).path(rel)


def test_paths_inside_the_cache_resolve_below_the_root(tmp_path):
    cache = CacheFS(str(tmp_path / "cache"))
    assert cache.path("shards/train/../eval/00000-x") == os.path.join(cache.root, "shards/eval/00000-x")
    assert cache.path("") == cache.root == str(tmp_path / "cache")


def test_a_damaged_json_record_is_a_cache_error_naming_the_file(tmp_path):
    (tmp_path / "plan.json").write_text('{"format": "sad-pipe-cache", ')
    with pytest.raises(CacheError, match="plan.json: not valid JSON .*the file is damaged"):
        CacheFS(str(tmp_path)).read_json("plan.json")
