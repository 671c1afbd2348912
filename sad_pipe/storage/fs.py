"""The cache's file operations, on a local directory or any fsspec URL (s3://, gs://, file://).

Only three operations need care to keep a cache correct after a crash:
- `write_atomic`: replace a small file whole (readers see the old or the new, never half);
- `create_if_absent`: create a small file whole, or fail if it exists. Commits use it: the first
  writer wins, a loser learns it lost. Local: write a temp file, fsync, then `os.link` (fails with
  EEXIST, never half-written). Object stores: a conditional PUT (`If-None-Match: *`).
- `move`: publish a finished directory under its final name (a rename locally, copy+delete on
  object stores; either way it is only *visible* once its commit record exists).
Everything else is a thin pass-through to fsspec.

On an object store several processes (torchrun ranks, other hosts) write the same cache, so fsspec's
directory-listing cache is turned off: a listing must show what the others committed since.
Credentials and endpoints come from the store's usual settings (for S3: the AWS_* environment
variables or ~/.aws, e.g. AWS_ENDPOINT_URL for MinIO or another S3-compatible store).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec

from sad_pipe.errors import CacheError


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CacheFS:
    """A cache root plus safe file operations. Paths given to methods are relative to the root."""

    def __init__(self, url: str | Path):
        self.url = str(url)
        fs, self.root = fsspec.core.url_to_fs(self.url)
        self.is_local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
        self._options: dict = {}
        if self.is_local:
            self.root = os.path.abspath(self.root)
        else:  # other processes write here too: never answer a listing from memory
            self._options = {"use_listings_cache": False}
            fs, self.root = fsspec.core.url_to_fs(self.url, **self._options)
        self._fs, self._pid = fs, os.getpid()

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem, made anew in a forked process (a DataLoader worker): the async clients of
        object stores (s3fs, gcsfs) refuse to run after a fork."""
        if self._pid != os.getpid():
            self._fs, self._pid = fsspec.core.url_to_fs(self.url, **self._options)[0], os.getpid()
        return self._fs

    # -- paths -----------------------------------------------------------------------------
    def _joined(self, rel: str) -> str:
        if rel in ("", "."):
            return self.root
        norm = posixpath.normpath(rel)
        if rel.startswith(("/", "\\")) or norm == ".." or norm.startswith("../") or "\\" in rel:
            raise CacheError(f"refusing path {rel!r}: paths in a cache must stay inside {self.url}")
        return posixpath.join(self.root, norm) if not self.is_local else os.path.join(self.root, norm)

    def path(self, rel: str = "") -> str:
        """Absolute path (or bucket key) of `rel`, refusing anything that escapes the cache root, by name or,
        locally, through a symbolic link inside the cache that points out of it (never followed)."""
        full = self._joined(rel)
        if self.is_local:
            self._refuse_links_out(full)
        return full

    def _refuse_links_out(self, full: str) -> None:
        real, root = os.path.realpath(full), os.path.realpath(self.root)
        if real != root and not real.startswith(root + os.sep):
            raise CacheError(f"refusing {full}: a symbolic link to {real}, outside the cache {self.url}; "
                             "a cache's files must be inside it (links out of it are never followed)")

    # -- reading -------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> Any:
        try:
            return json.loads(self.read_bytes(rel))
        except json.JSONDecodeError as exc:
            raise CacheError(f"{self.path(rel)}: not valid JSON ({exc.msg}); the file is damaged") from None
        except UnicodeDecodeError:  # json.loads decodes bytes first: a flipped byte may not be UTF-8 at all
            raise CacheError(f"{self.path(rel)}: not valid JSON (not UTF-8); the file is damaged") from None

    def listdir(self, rel: str) -> list[str]:
        """Names (not paths) directly inside `rel`; [] if it does not exist."""
        path = self.path(rel)
        if not self.fs.exists(path):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))

    def walk_files(self, rel: str) -> dict[str, int]:
        """{path relative to `rel`: size} for every file below `rel` (a link out of the cache is refused)."""
        base = self.path(rel)
        if self.is_local:
            for dirpath, dirnames, filenames in os.walk(base):
                for name in dirnames + filenames:
                    if os.path.islink(os.path.join(dirpath, name)):
                        self._refuse_links_out(os.path.join(dirpath, name))
        out = {}
        for full, info in self.fs.find(base, detail=True).items():
            if info.get("type") == "file":
                out[posixpath.relpath(full.replace(os.sep, "/"), base.replace(os.sep, "/"))] = int(info["size"])
        return out

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def open(self, rel: str, mode: str = "rb"):
        return self.fs.open(self.path(rel), mode)

    @contextlib.contextmanager
    def local_dir(self, rel: str):
        """A local directory with the files below `rel`, for libraries that open only local paths (a
        tokenizer): the directory itself in a local cache, else a temporary copy deleted on exit."""
        if self.is_local:
            yield self.path(rel)
            return
        with tempfile.TemporaryDirectory(prefix="sad-pipe-") as tmp:
            for name in self.walk_files(rel):
                dest = os.path.join(tmp, *name.split("/"))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with open(dest, "wb") as f:
                    f.write(self.read_bytes(f"{rel}/{name}"))
            yield tmp

    # -- writing -------------------------------------------------------------------------------
    def makedirs(self, rel: str) -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    def _local_temp_write(self, rel: str, data: bytes) -> str:
        final = self.path(rel)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = f"{final}.{uuid.uuid4().hex[:8]}.partial"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Replace `rel` whole: readers see the old content or the new, never a mix."""
        if not self.is_local:
            self.fs.pipe_file(self.path(rel), data)  # an object PUT is atomic
            return
        tmp = self._local_temp_write(rel, data)
        os.replace(tmp, self.path(rel))
        _fsync_dir(os.path.dirname(self.path(rel)))

    def write_json_atomic(self, rel: str, obj: Any) -> None:
        self.write_atomic(rel, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())

    def create_if_absent(self, rel: str, data: bytes) -> bool:
        """Create `rel` with `data` unless it exists. True if this call created it."""
        if not self.is_local:
            return self._create_remote(rel, data)
        tmp = self._local_temp_write(rel, data)
        try:
            os.link(tmp, self.path(rel))  # atomic and exclusive: never a half-written record
            created = True
        except FileExistsError:
            created = False
        finally:
            os.unlink(tmp)
        _fsync_dir(os.path.dirname(self.path(rel)))
        return created

    def _create_remote(self, rel: str, data: bytes, attempts: int = 4) -> bool:
        """A conditional PUT (`If-None-Match: *`): the store creates the object only if it is absent.

        A store answers a lost race with FileExistsError (HTTP 412). Any other failure (a timeout, a
        409 while a concurrent conditional write is in flight) leaves the outcome unknown: the object
        is read back, and it is ours only if it holds our bytes (records are unique: directory uuid,
        host, pid, time); absent, the PUT is tried again."""
        path = self.path(rel)
        for attempt in range(attempts):
            try:
                self.fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                return False
            except OSError:
                try:
                    return self.fs.cat_file(path) == data
                except FileNotFoundError:
                    if attempt == attempts - 1:
                        raise
                    time.sleep(0.2 * 2 ** attempt)
        raise AssertionError("unreachable")

    def create_json_if_absent(self, rel: str, obj: Any) -> bool:
        return self.create_if_absent(rel, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())

    def fsync_tree(self, rel: str) -> None:
        """Flush every file and directory below `rel` to disk (local only; object PUTs are durable)."""
        if not self.is_local:
            return
        top = self.path(rel)
        for dirpath, _, files in os.walk(top):
            for name in files:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_dir(dirpath)

    def move(self, src: str, dst: str) -> None:
        if self.is_local:
            os.makedirs(os.path.dirname(self.path(dst)), exist_ok=True)
            os.rename(self.path(src), self.path(dst))
            _fsync_dir(os.path.dirname(self.path(dst)))
        else:  # no rename: copy object by object (server side), then delete the originals
            base = self.path(src)
            files = sorted(self.fs.find(base))
            if not files:
                raise FileNotFoundError(base)
            # fs.mv(recursive=True) also tries to copy the "directories" of the listing, which an
            # object store does not have (FileNotFoundError): copy the objects themselves.
            self.fs.copy(files, [self.path(dst) + f[len(base):] for f in files])
            self.fs.rm(base, recursive=True)

    def remove(self, rel: str) -> None:
        if self.is_local and os.path.islink(self._joined(rel)):  # the link itself, never what it points to
            os.unlink(self._joined(rel))
            return
        path = self.path(rel)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # -- zarr ------------------------------------------------------------------------------------
    def zarr_store(self, rel: str, read_only: bool):
        import zarr.storage

        if self.is_local:
            return zarr.storage.LocalStore(self.path(rel), read_only=read_only)
        return zarr.storage.FsspecStore.from_url(
            self.url.rstrip("/") + "/" + rel, read_only=read_only,
            storage_options=getattr(self.fs, "storage_options", None),
        )
