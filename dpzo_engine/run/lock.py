"""One writer per run directory: an exclusive ``flock`` on ``<run>/.lock``, held for the run's life.

The kernel drops a ``flock`` when its holder exits, however it exits (even SIGKILL), so a lock can
never outlive its process: a ``.lock`` file still holding a pid after a kill is stale, and the next
writer takes it over and says so. The file holds the holder's pid and start time for the message a
second writer gets; the holder removes it when it releases the lock. Taking the lock never blocks.

Removing a lock file while others may open it is safe because a writer that got the lock checks that
the file it locked is still the one at ``.lock`` (same inode) and otherwise tries again.
``flock`` is local to one machine: on a network file system two hosts may not see each other's lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
import time
from pathlib import Path

from ..core.errors import RunDirError

LOCK_NAME = ".lock"


class RunLock:
    """``acquire`` (or RunDirError naming the holder), ``release``; both idempotent."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK_NAME
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> None:
        if self.fd is not None:
            return
        for _ in range(10):  # another writer may remove the file between our open and our flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise RunDirError(
                        f"{self.path.parent} is in use by another run ({self._holder()}); "
                        "wait for it to finish or stop it, or pick another --output-dir"
                    ) from None
                raise
            if self._same_file(fd):
                break
            os.close(fd)
        else:
            raise RunDirError(f"could not lock {self.path}: it keeps being replaced by another process")
        stale = os.pread(fd, 256, 0).decode(errors="replace").strip()
        if stale:
            print(f"note: {self.path} was left by a run that ended without releasing it ({stale}); taking it over",
                  file=sys.stderr)  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self.fd = fd

    def _same_file(self, fd: int) -> bool:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)

    def _holder(self) -> str:
        try:
            text = self.path.read_text().strip()
        except OSError:
            text = ""
        return text or "pid unknown"

    def release(self) -> None:
        """Remove the lock file, then drop the lock (the order matters: see the module docstring)."""
        if self.fd is None:
            return
        try:
            if self._same_file(self.fd):
                self.path.unlink()
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)  # cannot remove it: leave it empty, so it does not read as stale
        finally:
            os.close(self.fd)
            self.fd = None
