"""Writes that either happen completely or not at all, and report why when they fail.

Every file of a run is written under a temporary name starting with ``.tmp`` in its final directory,
fsynced, then renamed into place (``os.replace`` is atomic on POSIX), and the directory is fsynced.
A kill leaves at most a ``.tmp*`` entry, which the next start removes (``RunDir.clean_up``).
A failed write removes its temporary file and raises ``OSError`` with the errno and the file name
(torch's own writer reports a full disk as an opaque ``RuntimeError``; we keep the real cause).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch

TMP_PREFIX = ".tmp"


def tmp_name(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}.{path.name}.{os.getpid()}")


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entries are durable only after it is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingFile:
    """A raw, unbuffered file that hashes what it writes and keeps the first OSError it meets."""

    def __init__(self, path: Path, mode: int):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)  # ``mode`` from the first byte
        self.sha = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            done = 0
            while done < len(view):
                n = os.write(self.fd, view[done:])
                if n == 0:
                    raise OSError(errno.ENOSPC, "No space left on device (short write)", str(self.path))
                done += n
        except OSError as exc:
            if exc.filename is None:
                exc.filename = str(self.path)
            self.error = self.error or exc
            raise
        self.sha.update(view)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)


def write_file(path: Path, write, mode: int = 0o644) -> dict:
    """Write ``path`` atomically through ``write(file)``; returns {"bytes", "sha256"} of what landed.
    ``mode`` applies from creation (a secret is never readable by others, not even for a moment)."""
    tmp = tmp_name(path)
    f = _HashingFile(tmp, mode)
    try:
        try:
            write(f)
        finally:
            f.close()
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if f.error is not None and not isinstance(exc, OSError | KeyboardInterrupt):
            raise f.error from None  # torch wraps the OSError of a full disk into a RuntimeError
        raise
    os.replace(tmp, path)
    fsync_path(path.parent)
    return {"bytes": f.size, "sha256": f.sha.hexdigest()}


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> dict:
    return write_file(path, lambda f: f.write(text.encode()), mode)


def atomic_torch_save(obj: Any, path: Path, mode: int = 0o644) -> dict:
    return write_file(path, lambda f: torch.save(obj, f), mode)


def remove(path: Path) -> None:
    """Remove a file or a directory tree; no error if it is already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
