"""A per-prefix lock that marks a testbed as owned by a live process.

The lock is an ``flock`` on ``/run/spamflow/testbed-<prefix>.lock``. The kernel releases it
when the owning process exits, also on SIGKILL, so namespaces of a prefix whose lock is
free are leftovers of a dead run. The descriptor is not inherited by child processes
(Python opens files non-inheritable), so a daemon that outlives its run holds no lock.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

LOCK_DIR = Path("/run/spamflow")


class TestbedBusyError(RuntimeError):
    """Another live process holds the lock of the testbed prefix."""

    __test__ = False


class PrefixLock:
    """An exclusive, non-blocking lock on one testbed prefix."""

    def __init__(self, prefix: str, directory: Path = LOCK_DIR) -> None:
        self.prefix = prefix
        self.path = directory / f"testbed-{prefix}.lock"
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock and write this process's pid into it, or raise TestbedBusyError."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="ascii")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise TestbedBusyError(
                f"testbed prefix {self.prefix!r} is in use by a running demo or replay "
                f"(pid {owner}, lock {self.path}); wait for it to finish or pass another "
                "--prefix"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        log.debug("took lock %s", self.path)

    def release(self) -> None:
        """Drop the lock. The file stays, because deleting it would race with a new owner."""
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None
