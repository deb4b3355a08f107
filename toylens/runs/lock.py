"""One writer per run directory: an exclusive ``flock`` on ``<run>/.toylens.lock``, held for the life of
a training process (or a resume). The kernel drops the lock when its holder dies, however it dies,
so a killed run never blocks its own resume; the file keeps the last holder's pid for the message.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from toylens.runs.config import ConfigError

LOCK_FILE = ".toylens.lock"


class RunLockedError(ConfigError):
    """Another live process holds the run directory; the message names its pid."""


class RunLock:
    """``RunLock(run_dir).acquire()`` ... ``release()`` (or ``with hold(run_dir):``)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunLockedError(f"run directory {self.run_dir} is in use by process {holder} (another "
                                 f"toylens-train or resume); wait for it to finish or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


@contextmanager
def hold(run_dir: Path):
    lock = RunLock(run_dir).acquire()
    try:
        yield lock
    finally:
        lock.release()
