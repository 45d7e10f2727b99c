"""One writer at a time: an exclusive advisory lock on `STORE/.edje-write.lock`, held from the
writer's start to its close (or for a whole multi-process encode, by its first process).

A second writer fails at once, naming the process that holds the store, instead of both
writing and the first one's images being lost. The lock is the kernel's (`flock`), so it goes
with the process that held it: a killed encode leaves only the small lock file, which the next
writer takes over; a writer that closes removes it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".edje-write.lock"


class StoreBusyError(BlockingIOError):
    """Another process is writing this store."""


class StoreLockError(FileExistsError):
    """The lock file's name is taken by something edje did not create: a link, a FIFO."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(
            f"TokenStore: {path} is {what}, not edje's write lock; edje does not write "
            "through it: remove it, or write the store elsewhere."
        )


class StoreLock:
    """The write lock of the store at `path` (the folder is created if missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._file = self.path / LOCK_NAME
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StoreBusyError(
                    f"TokenStore: another process (pid {self._holder()}) is writing "
                    f"{self.path}; wait for it to finish, or write the store elsewhere."
                ) from None
            if self._is_current(fd):
                break
            os.close(fd)  # its holder released and removed it as we opened it: again
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())

    def _open(self) -> int:
        """The lock file, never through a link or into a special file: a link planted at the
        lock's name would have its target truncated and a PID written into it."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self._file, flags, 0o644)
        except OSError as error:
            if error.errno != errno.ELOOP:
                raise
            raise StoreLockError(self._file, "a symbolic link") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StoreLockError(self._file, "not a regular file")
        return fd

    def _is_current(self, fd: int) -> bool:
        try:
            return os.stat(self._file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _holder(self) -> str:
        try:
            return self._file.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        """Remove the lock file (the store folder keeps only the store) and unlock."""
        if self._fd is not None:
            self._file.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@contextmanager
def store_lock(path: str | Path):
    """Hold the store's write lock for the `with` block."""
    lock = StoreLock(path)
    try:
        yield lock
    finally:
        lock.release()
