"""Content fingerprints of a model's files: what a teacher *is*, not only where it lives.

A cache's identity must change when a teacher's weights are replaced in place (same path, same
config), or a resumed cache would mix two teachers. The fingerprint is a full-content hash of every
file that decides the model's outputs (weights, config, tokenizer), plus the commit for a hub id.
A memo keyed by each file's stat makes a re-run over an unchanged 15 GB teacher cost a stat per
file instead of a re-read.

    hash_file(path)              xxh3_128 of the bytes, no memo
    file_digest(path)            the same through the memo
    model_fingerprint(name)      {"files": {name: digest}} (+ "commit" for a hub id)
    describe_change(old, new)    the first difference, for a one-line error
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import xxhash

from sad_pipe.errors import ModelError

log = logging.getLogger(__name__)

# xxh3_128 rather than sha256: on the 2-core development machine (AMD EPYC) it hashes 14 GB/s in
# memory against sha256's 1.4 (blake2b 0.7, md5 0.6), so it never limits even a warm page-cache read
# (~9 GB/s), where sha256 would be slower than a cold disk read (~2.3 GB/s). The fingerprint guards
# against accidental replacement, not an adversary: a fast non-cryptographic hash is enough, and
# 128 bits make an accidental collision negligible.
ALGORITHM = "xxh3_128"
# Reads of 4 MiB into one reused buffer. Warm page cache, 1 GB file: 8.5-9.5 GB/s for blocks of
# 256 KiB to 8 MiB, 6.5 GB/s at 16 MiB, 1.3 GB/s at 64 MiB (a buffer that no longer stays in the 32 MiB
# L3 between the kernel's copy and the hash); cold reads ~2.3 GB/s whatever the size. 4 MiB sits in
# the flat part with room below a smaller L3. (`sad-pipe bench --only fingerprint` re-measures it.)
# Not mmap, although it hashed the warm file at 13.5 GB/s: a file truncated while mapped (a
# save_pretrained over the same path) kills the process with SIGBUS instead of raising.
BLOCK_SIZE = 4 << 20
# A file modified within this many seconds may still be being written, and on a filesystem with coarse
# timestamps a write right after we hashed it could leave its stat unchanged: such a file is always
# re-hashed and never remembered (the "racily clean" rule of git's index).
FRESH_SECONDS = 2.0
MEMO_FILE = "file-hashes.json"
MEMO_VERSION = 1

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")  # which shard holds which tensor
MODEL_FILES = frozenset({
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "chat_template.jinja", "added_tokens.json",
})
# What a Trainer checkpoint directory holds next to the model: not weights, and optimizer.pt alone
# is twice the model's size. from_pretrained never reads them.
TRAINER_STATE = frozenset({"optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin"})


# -- one file -------------------------------------------------------------------------------------

def hash_file(path: str | os.PathLike, block_size: int = BLOCK_SIZE) -> str:
    """"xxh3_128:<32 hex digits>" of the file's bytes (a symlink: its target's), read in full, no memo."""
    digest = xxhash.xxh3_128()
    buffer = memoryview(bytearray(block_size))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(buffer[:n])
    return f"{ALGORITHM}:{digest.hexdigest()}"


def file_digest(path: str | os.PathLike) -> str:
    """hash_file(path), from the memo when the file is unchanged since it was last hashed."""
    memo = Memo()
    digest = memo.digest(path)
    memo.save()
    return digest


def memo_path() -> Path:
    """$SAD_PIPE_CACHE_HOME/file-hashes.json, else $XDG_CACHE_HOME/sad-pipe/..., else ~/.cache/sad-pipe/..."""
    root = os.environ.get("SAD_PIPE_CACHE_HOME")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")  # an empty value counts as unset, as the XDG spec says
        root = os.path.join(xdg, "sad-pipe") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "sad-pipe")
    return Path(root) / MEMO_FILE


def _stat_key(st: os.stat_result) -> dict:
    # ctime as well as mtime: a process can set mtime back (cp -p, rsync -t, touch -d) but not ctime,
    # so a same-size rewrite in place that restores the mtime still shows.
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino, "device": st.st_dev}


def _fresh(st: os.stat_result, now: float) -> bool:
    return now - max(st.st_mtime_ns, st.st_ctime_ns) / 1e9 < FRESH_SECONDS


class Memo:
    """Digests remembered per file by (realpath, size, mtime, ctime, inode, device) in one JSON file.

    Shared by every process of the user: a write replaces the file atomically (temp file + rename), so
    two processes writing at once leave one of their versions, never a torn file; entries the other
    one added in between can be lost, which only costs a re-hash. An unreadable memo counts as empty."""

    def __init__(self, path: Path | None = None):
        self.path = path or memo_path()
        self.entries = self._read()
        self.added: dict[str, dict] = {}
        self.hits = self.hashed = self.hashed_bytes = 0

    def _read(self) -> dict[str, dict]:
        try:
            files = json.loads(self.path.read_text()).get("files")
        except (OSError, ValueError, AttributeError) as exc:  # missing, torn, not JSON, not an object
            if not isinstance(exc, FileNotFoundError):
                log.debug("ignoring the file-hash memo %s: %s", self.path, exc)
            return {}
        if not isinstance(files, dict):
            return {}
        return {p: e for p, e in files.items() if isinstance(e, dict) and isinstance(e.get("digest"), str)}

    def digest(self, path: str | os.PathLike) -> str:
        real = os.path.realpath(path)
        now = time.time()
        before = os.stat(real)
        key = _stat_key(before)
        entry = self.entries.get(real)
        if entry is not None and {k: entry.get(k) for k in key} == key and not _fresh(before, now):
            self.hits += 1
            return entry["digest"]
        digest = hash_file(real)
        self.hashed, self.hashed_bytes = self.hashed + 1, self.hashed_bytes + before.st_size
        # Remember it only if it did not change while being read and is old enough to trust next time.
        if _stat_key(os.stat(real)) == key and not _fresh(before, now):
            self.added[real] = {**key, "digest": digest}
            self.entries[real] = self.added[real]
        return digest

    def save(self) -> None:
        """Write what this run added, merged into the memo as it is on disk now; never raises."""
        if not self.added:
            return
        merged = {**self._read(), **self.added}  # another process may have written since we read
        kept = {p: e for p, e in merged.items() if _unchanged(p, e)}  # files deleted or changed since: drop
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{MEMO_FILE}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": MEMO_VERSION, "files": kept}, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)  # no fsync: a memo torn by a crash is ignored and rebuilt
            tmp = None
        except OSError as exc:
            log.warning("cannot write the file-hash memo %s (%s): the next run hashes the files again", self.path, exc)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass


def _unchanged(path: str, entry: dict) -> bool:
    try:
        key = _stat_key(os.stat(path))
    except OSError:
        return False
    return {k: entry.get(k) for k in key} == key


# -- a model --------------------------------------------------------------------------------------

def model_files(directory: str | os.PathLike) -> list[str]:
    """The files of a model directory that decide its outputs, sorted: weights, their index, config, tokenizer.

    Only the top level: that is all from_pretrained(directory) reads (a Trainer output directory's
    checkpoint-*/ folders, a hub repo's original/ folder are other models). Symlinks count as the
    files they point to; dangling ones (an interrupted download) are left out."""
    names = []
    with os.scandir(directory) as entries:
        for entry in entries:
            name = entry.name
            if name in TRAINER_STATE or (name.startswith("rng_state") and name.endswith(".pth")):
                continue
            if (name in MODEL_FILES or name.endswith(WEIGHT_SUFFIXES + INDEX_SUFFIXES)) and entry.is_file():
                names.append(name)
    return sorted(names)


def _fingerprint_directory(directory: str) -> dict[str, str]:
    start = time.perf_counter()
    memo = Memo()
    files = {name: memo.digest(os.path.join(directory, name)) for name in model_files(directory)}
    memo.save()
    if memo.hashed:
        log.info("fingerprinted %s: hashed %d file(s), %.2f GB in %.1f s; %d from the memo", directory,
                 memo.hashed, memo.hashed_bytes / 1e9, time.perf_counter() - start, memo.hits)
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
        log.warning("fingerprint of %s: no weight file found", directory)
    return files


def model_fingerprint(name_or_path: str, revision: str | None = None) -> dict:
    """What identifies a model's content.

    A local directory: {"files": {name: digest}} over model_files(). A hub id: {"commit": sha,
    "files": ...} over the snapshot in the local hub cache, the commit from the hub when online,
    else from the cache's refs/. A hub id that cannot be resolved (offline and not cached, unknown)
    gives {"commit": None or sha, "files": {}, "reason": why}, without raising: the caller decides.
    A hub snapshot holds only the files downloaded so far, so fingerprint a hub model after loading it.
    `revision` applies to hub ids only, as in from_pretrained."""
    local = os.path.expanduser(name_or_path)
    if os.path.isdir(local):
        return {"files": _fingerprint_directory(local)}
    if os.path.exists(local):
        raise ModelError(f"model {name_or_path!r}: not a directory")
    if name_or_path.startswith((".", "/", "~")):  # a path, not a hub id: say so, as models.require_local_path does
        raise ModelError(f"model {name_or_path!r}: no such directory")
    commit, snapshot, reason = _resolve_hub(name_or_path, revision)
    if snapshot is None:
        log.info("fingerprint of %s: %s", name_or_path, reason)
        return {"commit": commit, "files": {}, "reason": reason}
    return {"commit": commit, "files": _fingerprint_directory(snapshot)}


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _resolve_hub(name: str, revision: str | None) -> tuple[str | None, str | None, str]:
    """(commit sha, snapshot folder, reason when there is no folder) for a hub id."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    commit, reason = None, ""
    if not constants.HF_HUB_OFFLINE:
        try:
            commit = HfApi().model_info(name, revision=revision).sha
        except Exception as exc:  # noqa: BLE001 - no network, unknown or gated repo: the local cache may still know it
            reason = f"hub lookup failed ({_first_line(exc)}); "
    try:
        # The snapshot folder is named by its commit; try_to_load_from_cache resolves a branch or tag
        # through the cache's refs/ and never touches the network.
        found = try_to_load_from_cache(name, "config.json", revision=commit or revision)
    except Exception as exc:  # noqa: BLE001 - an id that is not a valid repo id is "not cached" too
        return commit, None, reason + f"not a hub id the local cache can hold ({_first_line(exc)})"
    if not isinstance(found, str):
        where = f"commit {commit}" if commit else f"revision {revision or 'main'}"
        return commit, None, reason + f"{where} is not in the local hub cache"
    snapshot = os.path.dirname(found)
    return os.path.basename(snapshot), snapshot, ""


# -- comparing two fingerprints -------------------------------------------------------------------

def _short(digest: str | None) -> str:
    if digest is None:
        return "none"
    algorithm, _, hexdigest = digest.rpartition(":")
    return f"{algorithm}:{hexdigest[:12]}..." if algorithm else f"{hexdigest[:12]}..."


def describe_change(old: dict, new: dict) -> str | None:
    """The first difference between two fingerprints, for a one-line error; None when they are equal.

    e.g. "model.safetensors changed (xxh3_128:ab12... -> xxh3_128:cd34...)", "tokenizer.json added",
    "commit 1a2b3c4d5e6f -> 9f8e7d6c5b4a". Files are taken in sorted order; the count of the others follows."""
    if old.get("commit") != new.get("commit"):
        def sha(c):
            return c[:12] if c else "unknown"
        return f"commit {sha(old.get('commit'))} -> {sha(new.get('commit'))}"
    before, after = old.get("files") or {}, new.get("files") or {}
    changed = [name for name in sorted(before.keys() | after.keys()) if before.get(name) != after.get(name)]
    if not changed:
        return None
    name = changed[0]
    if name not in after:
        text = f"{name} removed"
    elif name not in before:
        text = f"{name} added"
    else:
        text = f"{name} changed ({_short(before[name])} -> {_short(after[name])})"
    others = len(changed) - 1
    return text + (f" (and {others} more file{'s' if others > 1 else ''})" if others else "")
