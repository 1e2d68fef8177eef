"""Start and stop the spamflow daemons of a testbed, each with its own log file."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from spamflow.replay.netns import netns_exec, stop_process

log = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0



def describe_exit(returncode: int) -> str:
    """Describe how a child process ended, from its Popen return code."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    number = -returncode
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"was killed by signal {number}"
    return f"was killed by signal {number} ({name})"

class DaemonError(RuntimeError):
    """A daemon exited early or did not become ready in time."""


class Daemon:
    """One ``python -m spamflow ...`` process inside a namespace, logging to a file."""

    def __init__(self, name: str, namespace: str | None, args: list[str], log_path: Path,
                 config: Path | None = None) -> None:
        self.name = name
        self.namespace = namespace
        self.log_path = log_path
        command = [sys.executable, "-m", "spamflow"]
        if config is not None:
            command += ["-c", str(config)]
        command += args
        self.command = netns_exec(namespace, *command) if namespace else command
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        # Set by kill(): the exit was requested, so check_running() does not report it.
        self.killed = False

    def start(self) -> Daemon:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                        stdout=self._log, stderr=subprocess.STDOUT)
        log.info("%s started (pid %d): %s", self.name, self.process.pid, " ".join(self.command))
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_running(self) -> None:
        """Raise DaemonError with the log path and tail when the process has exited.

        A daemon ended by kill() counts as running, because its exit was requested.
        """
        if self.killed:
            return
        if self.process is not None and self.process.poll() is not None:
            raise DaemonError(
                f"{self.name} (pid {self.process.pid}) {describe_exit(self.process.returncode)}"
                f", log {self.log_path}\n{self.log_tail()}"
            )

    def wait_until(self, ready: object, timeout: float, what: str) -> None:
        """Poll ready() until it returns True, raising DaemonError on exit or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_running()
            if ready():  # type: ignore[operator]
                return
            time.sleep(0.1)
        raise DaemonError(f"{self.name} did not {what} within {timeout:.0f} s\n{self.log_tail()}")

    def kill(self) -> None:
        """Kill the process at once (SIGKILL), as a crash would, and expect it gone."""
        if self.running():
            assert self.process is not None
            self.killed = True
            self.process.kill()
            self.process.wait()
            log.info("%s killed", self.name)

    def stop(self) -> None:
        if self.running():
            assert self.process is not None
            stop_process(self.process, self.name, STOP_TIMEOUT)
            log.info("%s stopped (exit status %s)", self.name, self.process.returncode)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        return f"{self.log_path} tail:\n" + "\n".join(text.splitlines()[-lines:])
