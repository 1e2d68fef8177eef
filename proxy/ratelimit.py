"""Logging of repeated failures at a bounded rate."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    """Write at most one log line per interval and count the lines held back.

    The next line written after a quiet period reports how many were suppressed.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.suppressed = 0
        self._last = float("-inf")

    def warning(self, message: str, *args: object) -> bool:
        """Log message at WARNING unless one was logged within the interval.

        Returns True when the line was written.
        """
        return self.log(logging.WARNING, message, *args)

    def error(self, message: str, *args: object) -> bool:
        """Log message at ERROR unless one was logged within the interval.

        Returns True when the line was written.
        """
        return self.log(logging.ERROR, message, *args)

    def log(self, level: int, message: str, *args: object) -> bool:
        """Log message at level unless one was logged within the interval."""
        now = self.clock()
        if now - self._last < self.interval:
            self.suppressed += 1
            return False
        self._last = now
        if self.suppressed:
            message += " (%d similar messages suppressed)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self.logger.log(level, message, *args)
        return True
