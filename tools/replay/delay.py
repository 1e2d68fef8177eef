"""Userspace delay stage: hold each packet of an NFQUEUE queue, then accept it.

    python -m spamflow.replay.delay --queue N --delay-ms D --jitter-ms J --seed S

Each packet is held for D ms plus a uniform random offset in [-J, +J] ms, but never
released before the packet queued ahead of it, so the stage keeps packet order. It
replaces the netem qdisc, which this testbed's kernels lack. The stage prints
``ready`` on stdout once the queue is bound, and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import random
import signal
import sys
from typing import Any

# Named explicitly because `python -m` runs this module as __main__.
log = logging.getLogger("spamflow.replay.delay")

# Packets the kernel keeps waiting for a verdict on this queue before it drops new ones.
QUEUE_MAX_LEN = 8192


class DelayLine:
    """Release times for a FIFO of packets: delay plus jitter, never out of order."""

    def __init__(self, delay_ms: float, jitter_ms: float, seed: int | None = None) -> None:
        if delay_ms < 0 or jitter_ms < 0:
            raise ValueError(f"delay and jitter must be >= 0, got {delay_ms} and {jitter_ms}")
        self.delay_s = delay_ms / 1000.0
        self.jitter_s = jitter_ms / 1000.0
        self._random = random.Random(seed)
        self._last_release = float("-inf")

    def release_time(self, now: float) -> float:
        """Return when a packet that arrives at ``now`` (seconds) may leave."""
        offset = self._random.uniform(-self.jitter_s, self.jitter_s)
        release = max(now + max(0.0, self.delay_s + offset), self._last_release)
        self._last_release = release
        return release


class DelayStage:
    """Bind an NFQUEUE queue to an asyncio loop and accept each packet when it is due."""

    def __init__(self, queue_num: int, line: DelayLine) -> None:
        self.queue_num = queue_num
        self.line = line
        self.packets = 0
        self._pending: collections.deque[tuple[float, Any]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: Any = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        from netfilterqueue import COPY_META, NetfilterQueue

        self._loop = loop
        self._queue = NetfilterQueue()
        # Only the verdict matters, so the kernel needs to copy no payload to us.
        self._queue.bind(self.queue_num, self._on_packet, max_len=QUEUE_MAX_LEN, mode=COPY_META)
        loop.add_reader(self._queue.get_fd(), self._read)
        log.info("delay stage bound to queue %d (delay %.1f ms, jitter %.1f ms)",
                 self.queue_num, self.line.delay_s * 1000, self.line.jitter_s * 1000)

    def stop(self) -> None:
        """Accept every packet still held, then unbind the queue."""
        if self._loop is not None and self._queue is not None:
            self._loop.remove_reader(self._queue.get_fd())
        if self._timer is not None:
            self._timer.cancel()
        while self._pending:
            self._pending.popleft()[1].accept()
        if self._queue is not None:
            self._queue.unbind()
            self._queue = None
        log.info("delay stage on queue %d stopped after %d packets",
                 self.queue_num, self.packets)

    def _read(self) -> None:
        try:
            self._queue.run(block=False)
        except OSError as error:
            log.error("reading queue %d failed: %s", self.queue_num, error)

    def _on_packet(self, packet: Any) -> None:
        assert self._loop is not None
        self.packets += 1
        release = self.line.release_time(self._loop.time())
        self._pending.append((release, packet))
        if len(self._pending) == 1:
            self._schedule()

    def _schedule(self) -> None:
        assert self._loop is not None
        if self._pending:
            self._timer = self._loop.call_at(self._pending[0][0], self._release_due)
        else:
            self._timer = None

    def _release_due(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        while self._pending and self._pending[0][0] <= now:
            self._pending.popleft()[1].accept()
        self._schedule()


async def serve(queue_num: int, line: DelayLine) -> None:
    """Run a delay stage until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stage = DelayStage(queue_num, line)
    stopped = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    stage.start(loop)
    print("ready", flush=True)
    try:
        await stopped.wait()
    finally:
        stage.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Delay the packets of an NFQUEUE queue.")
    parser.add_argument("--queue", type=int, required=True, help="NFQUEUE queue number")
    parser.add_argument("--delay-ms", type=float, required=True,
                        help="mean time each packet is held, in ms")
    parser.add_argument("--jitter-ms", type=float, default=0.0,
                        help="maximum deviation from the mean, in ms (uniform; default 0)")
    parser.add_argument("--seed", type=int, default=None, help="random seed of the jitter")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.queue, DelayLine(args.delay_ms, args.jitter_ms, args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
