"""The cache's file operations, on a local directory or any fsspec URL (s3://, gs://, file://).

Only three operations need care to keep a cache correct after a crash:
- `write_atomic`: replace a small file whole (readers see the old or the new, never half);
- `create_if_absent`: create a small file whole, or fail if it exists. Commits use it: the first
  writer wins, a loser learns it lost. Local: write a temp file, fsync, then `os.link` (fails with
  EEXIST, never half-written). Object stores: a conditional PUT (`If-None-Match: *`).
- `move`: publish a finished directory under its final name (a rename locally, copy+delete on
  object stores; either way it is only *visible* once its commit record exists).
Everything else is a thin pass-through to fsspec.
"""

from __future__ import annotations

import json
import os
import posixpath
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
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.is_local = isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)
        if self.is_local:
            self.root = os.path.abspath(self.root)

    # -- paths -----------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """Absolute path (or bucket key) of `rel`, refusing anything that escapes the cache root."""
        if rel in ("", "."):
            return self.root
        norm = posixpath.normpath(rel)
        if rel.startswith(("/", "\\")) or norm == ".." or norm.startswith("../") or "\\" in rel:
            raise CacheError(f"refusing path {rel!r}: paths in a cache must stay inside {self.url}")
        return posixpath.join(self.root, norm) if not self.is_local else os.path.join(self.root, norm)

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

    def listdir(self, rel: str) -> list[str]:
        """Names (not paths) directly inside `rel`; [] if it does not exist."""
        path = self.path(rel)
        if not self.fs.exists(path):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))

    def walk_files(self, rel: str) -> dict[str, int]:
        """{path relative to `rel`: size} for every file below `rel`."""
        base = self.path(rel)
        out = {}
        for full, info in self.fs.find(base, detail=True).items():
            if info.get("type") == "file":
                out[posixpath.relpath(full.replace(os.sep, "/"), base.replace(os.sep, "/"))] = int(info["size"])
        return out

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def open(self, rel: str, mode: str = "rb"):
        return self.fs.open(self.path(rel), mode)

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
            try:
                self.fs.pipe_file(self.path(rel), data, mode="create")
                return True
            except FileExistsError:
                return False
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
        else:
            self.fs.mv(self.path(src), self.path(dst), recursive=True)

    def remove(self, rel: str) -> None:
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
