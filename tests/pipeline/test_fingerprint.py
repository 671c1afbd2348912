"""Model fingerprints: content digests, the stat-keyed memo, model directories, hub ids offline, change messages."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import xxhash
from conftest import save_llama, word_tokenizer

from sad_pipe.errors import ModelError
from sad_pipe.pipeline import fingerprint as fp


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """Every test's memo lives in its own temp dir: never in the home directory."""
    home = tmp_path / "cache-home"
    monkeypatch.setenv("SAD_PIPE_CACHE_HOME", str(home))
    return home


@pytest.fixture
def hashes(monkeypatch):
    """Count the files actually read and hashed (the memo's only way to the bytes)."""
    calls: list[str] = []
    real = fp.hash_file

    def counting(path, *args, **kwargs):
        calls.append(os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fp, "hash_file", counting)
    return calls


@pytest.fixture
def trust_new_files(monkeypatch):
    """Files written by the test are seconds old at most: let the memo trust them at once."""
    monkeypatch.setattr(fp, "FRESH_SECONDS", 0.0)


def expected(data: bytes) -> str:
    return "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_digest_is_xxh3_128_of_the_bytes(tmp_path):
    data = os.urandom(100_003)
    path = write(tmp_path / "blob", data)
    assert fp.hash_file(path) == expected(data)
    assert fp.hash_file(path, block_size=4096) == expected(data)  # many blocks, a short last one
    assert fp.file_digest(path) == expected(data)
    assert fp.hash_file(write(tmp_path / "empty", b"")) == expected(b"")


def test_memo_location(tmp_path, monkeypatch):
    monkeypatch.setenv("SAD_PIPE_CACHE_HOME", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    monkeypatch.setenv("HOME", str(tmp_path / "c"))
    assert fp.memo_path() == tmp_path / "a" / "file-hashes.json"
    monkeypatch.delenv("SAD_PIPE_CACHE_HOME")
    assert fp.memo_path() == tmp_path / "b" / "sad-pipe" / "file-hashes.json"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert fp.memo_path() == tmp_path / "c" / ".cache" / "sad-pipe" / "file-hashes.json"


def test_memo_avoids_rereading_an_unchanged_file(tmp_path, hashes, trust_new_files, cache_home):
    path = write(tmp_path / "model.safetensors", os.urandom(50_000))
    first = fp.file_digest(path)
    assert fp.file_digest(path) == first and fp.file_digest(str(path)) == first
    assert len(hashes) == 1
    memo = json.loads((cache_home / "file-hashes.json").read_text())
    assert memo["files"][os.path.realpath(path)]["digest"] == first


def test_memo_rehashes_a_same_size_rewrite(tmp_path, hashes, trust_new_files):
    path = write(tmp_path / "w.bin", b"a" * 4096)
    old = fp.file_digest(path)
    st = os.stat(path)

    with open(path, "r+b") as f:  # in place: same inode, same size; then put the mtime back (cp -p would)
        f.write(b"b" * 4096)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_ino == st.st_ino and os.stat(path).st_mtime_ns == st.st_mtime_ns
    assert fp.file_digest(path) == expected(b"b" * 4096) != old  # ctime moved

    replacement = write(tmp_path / "w.new", b"c" * 4096)  # a new inode renamed over it, mtime put back too
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, path)
    assert fp.file_digest(path) == expected(b"c" * 4096)
    assert len(hashes) == 3


def test_a_file_modified_just_now_is_never_trusted(tmp_path, hashes, cache_home):
    path = write(tmp_path / "being-written.bin", b"x" * 1000)
    assert fp.file_digest(path) == fp.file_digest(path) == expected(b"x" * 1000)
    assert len(hashes) == 2  # FRESH_SECONDS (2 s) has not passed since the write
    assert not (cache_home / "file-hashes.json").exists()


@pytest.mark.parametrize("content", [b"", b"{not json", b"\x00\xff" * 10, b"[1, 2]", b'{"files": 3}',
                                     b'{"files": {"/x": 1, "/y": {"digest": 5}}}'])
def test_a_corrupt_memo_is_ignored_and_rewritten(tmp_path, hashes, trust_new_files, cache_home, content):
    cache_home.mkdir()
    (cache_home / "file-hashes.json").write_bytes(content)
    path = write(tmp_path / "f.bin", b"data")
    assert fp.file_digest(path) == expected(b"data")
    assert fp.file_digest(path) == expected(b"data")
    assert len(hashes) == 1  # rewritten as a valid memo by the first call
    assert list(json.loads((cache_home / "file-hashes.json").read_text())["files"]) == [os.path.realpath(path)]


def test_an_unwritable_memo_is_not_an_error(tmp_path, monkeypatch, trust_new_files):
    blocker = write(tmp_path / "not-a-dir", b"")
    monkeypatch.setenv("SAD_PIPE_CACHE_HOME", str(blocker / "sub"))  # mkdir under a file fails
    path = write(tmp_path / "f.bin", b"data")
    assert fp.file_digest(path) == expected(b"data")


def test_concurrent_writers_leave_a_valid_memo(tmp_path, trust_new_files, cache_home):
    files = [write(tmp_path / f"f{i}.bin", os.urandom(1000)) for i in range(24)]
    errors = []

    def worker(part):
        try:
            for path in part:
                assert fp.file_digest(path) == fp.hash_file(path)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(files[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    memo = json.loads((cache_home / "file-hashes.json").read_text())  # last writer wins, never torn
    assert memo["files"] and set(memo["files"]) <= {os.path.realpath(p) for p in files}
    assert not [n for n in os.listdir(cache_home) if n != "file-hashes.json"], "temp files left behind"


def test_memo_drops_entries_of_deleted_files(tmp_path, trust_new_files, cache_home):
    gone, kept = write(tmp_path / "gone.bin", b"1"), write(tmp_path / "kept.bin", b"2")
    fp.file_digest(gone)
    gone.unlink()
    fp.file_digest(kept)
    assert list(json.loads((cache_home / "file-hashes.json").read_text())["files"]) == [os.path.realpath(kept)]


# -- model directories --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Two tiny Llamas of the same config (2 layers, hidden 16) and different weights, with a tokenizer."""
    root = tmp_path_factory.mktemp("models")
    paths = []
    for seed in (0, 1):
        path = str(root / f"llama-{seed}")
        save_llama(path, 64, hidden=16, heads=2, kv_heads=1, seed=seed)
        word_tokenizer(path, 64)
        paths.append(path)
    return paths


def model_copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_model_fingerprint_lists_weights_config_and_tokenizer(tmp_path, tiny_models, trust_new_files):
    model = model_copy(tiny_models[0], tmp_path / "model")
    for junk in ("README.md", "optimizer.pt", "training_args.bin", "rng_state.pth", "notes.txt"):
        write(model / junk, b"not part of the model")
    (model / "checkpoint-10").mkdir()
    write(model / "checkpoint-10" / "model.safetensors", b"another model")
    result = fp.model_fingerprint(str(model))
    assert list(result) == ["files"]
    assert list(result["files"]) == ["config.json", "generation_config.json", "model.safetensors",
                                     "tokenizer.json", "tokenizer_config.json"]
    for name, digest in result["files"].items():
        assert digest == expected((model / name).read_bytes()), name
    assert fp.model_fingerprint(str(model)) == result


def test_model_fingerprint_changes_when_the_weights_are_replaced_in_place(tmp_path, tiny_models, hashes, trust_new_files):
    model = model_copy(tiny_models[0], tmp_path / "model")
    before = fp.model_fingerprint(str(model))
    assert fp.model_fingerprint(str(model)) == before and len(hashes) == 5  # second run: all from the memo

    other = os.path.join(tiny_models[1], "model.safetensors")
    assert os.path.getsize(other) == os.path.getsize(model / "model.safetensors")  # same config, same size
    shutil.copyfile(other, model / "model.safetensors")  # overwrites in place: same path, inode and size
    after = fp.model_fingerprint(str(model))
    assert len(hashes) == 6  # only the replaced file was read again
    assert after["files"]["model.safetensors"] == expected(open(other, "rb").read())
    assert {k: v for k, v in after["files"].items() if k != "model.safetensors"} == \
        {k: v for k, v in before["files"].items() if k != "model.safetensors"}
    message = fp.describe_change(before, after)
    assert message.startswith("model.safetensors changed (xxh3_128:") and " -> xxh3_128:" in message


def test_symlinked_files_are_hashed_by_content(tmp_path, trust_new_files):
    blobs, model = tmp_path / "blobs", tmp_path / "model"
    blobs.mkdir()
    model.mkdir()
    weights, config = write(blobs / "0a1b", b"weights"), write(blobs / "2c3d", b"{}")
    (model / "model.safetensors").symlink_to(os.path.relpath(weights, model))
    (model / "config.json").symlink_to(config)
    (model / "tokenizer.json").symlink_to(blobs / "missing")  # dangling: an interrupted download
    assert fp.model_fingerprint(str(model)) == {"files": {"config.json": expected(b"{}"), "model.safetensors": expected(b"weights")}}


def fake_hub_cache(root, repo_id: str, sha: str, files: dict[str, bytes]):
    """The hub cache layout: refs/main -> sha, snapshots/<sha>/<file> symlinked into blobs/."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for i, (name, data) in enumerate(files.items()):
        write(repo / "blobs" / f"blob{i}", data)
        (snapshot / name).symlink_to(os.path.join("..", "..", "blobs", f"blob{i}"))
    return snapshot


def test_hub_id_offline_from_the_local_hub_cache(tmp_path, monkeypatch, trust_new_files):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # tests/conftest.py: no network
    sha = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_cache(tmp_path / "hub", "org/tiny", sha, {"config.json": b"{}", "model.safetensors": b"w"})
    want = {"commit": sha, "files": {"config.json": expected(b"{}"), "model.safetensors": expected(b"w")}}
    assert fp.model_fingerprint("org/tiny") == want
    assert fp.model_fingerprint("org/tiny", revision="main") == want
    assert fp.model_fingerprint("org/tiny", revision=sha) == want


@pytest.mark.parametrize("name", ["sad-pipe-tests/not-cached", "not-cached", "not a repo id!"])
def test_hub_id_not_cached_offline_gives_no_commit(tmp_path, monkeypatch, name):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    result = fp.model_fingerprint(name, revision="main")
    assert result["commit"] is None and result["files"] == {}
    assert isinstance(result["reason"], str) and result["reason"]


def test_a_missing_local_path_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="no such directory"):
        fp.model_fingerprint(str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match="not a directory"):
        fp.model_fingerprint(str(write(tmp_path / "file", b"")))


# -- describe_change ----------------------------------------------------------------------------

def test_describe_change():
    a = {"files": {"config.json": "xxh3_128:" + "1" * 32, "model.safetensors": "xxh3_128:" + "ab12" * 8}}
    assert fp.describe_change(a, a) is None
    assert fp.describe_change(a, {"files": dict(a["files"])}) is None
    changed = {"files": {**a["files"], "model.safetensors": "xxh3_128:" + "cd34" * 8}}
    assert fp.describe_change(a, changed) == "model.safetensors changed (xxh3_128:ab12ab12ab12... -> xxh3_128:cd34cd34cd34...)"
    assert fp.describe_change(a, {"files": {**a["files"], "tokenizer.json": "x"}}) == "tokenizer.json added"
    assert fp.describe_change(a, {"files": {"config.json": a["files"]["config.json"]}}) == "model.safetensors removed"
    assert fp.describe_change(a, {"files": {}}) == "config.json removed (and 1 more file)"
    assert fp.describe_change({**a, "commit": "f" * 40}, {**a, "commit": "e" * 40}) == "commit ffffffffffff -> eeeeeeeeeeee"
    assert fp.describe_change({**a, "commit": None}, {**a, "commit": "e" * 40}) == "commit unknown -> eeeeeeeeeeee"
