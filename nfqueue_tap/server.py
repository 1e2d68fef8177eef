"""The tap daemon: NFQUEUE packets feed the flow table, and a Unix socket serves it.

Every queued packet is accepted unchanged: the tap only measures. The netlink socket
of the queue is read from the asyncio loop with add_reader, so one thread serves
both the queue and the query socket.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import warnings
from collections.abc import Callable
from typing import Any

from spamflow.config import TapConfig
from spamflow.nfqueue_tap.flows import FlowTable
from spamflow.nfqueue_tap.packet import parse_packet
from spamflow.nfqueue_tap.query import QueryServer, TapSocketError

log = logging.getLogger(__name__)

# Bytes of each packet the kernel copies to the tap: enough for the IPv6 or IPv4
# header, extension headers and a TCP header with options. The payload length comes
# from the IP header, so the rest of the packet is not needed.
COPY_RANGE = 256

# Packets the kernel queues before it drops new ones.
# NOTE: NetfilterQueue 1.1 cannot set the fail-open flag, so if the tap stalls past
# this many packets, the kernel drops packets (TCP then retransmits them) instead of
# letting them bypass the tap.
QUEUE_MAX_LEN = 4096

# Seconds between two log lines about packets that were not parsed.
FAILURE_LOG_INTERVAL = 60.0


class PacketTap:
    """NFQUEUE callback: feed each packet to the flow table, then accept it.

    Exactly one verdict (accept) is given per packet, also when parsing or the flow
    table fails. The only exception is a queue that is already unbound, where accept
    raises and the failure is logged. Packets that are not parsed as TCP are counted
    and logged at most once per FAILURE_LOG_INTERVAL.
    """

    def __init__(
        self,
        table: FlowTable,
        queue: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = table
        self.queue = queue
        self.clock = clock
        self.packets = 0
        self.parse_failures = 0
        self.errors = 0
        self._unreported_failures = 0
        self._last_failure_log = float("-inf")

    def __call__(self, packet: Any) -> None:
        now = self.clock()
        try:
            self.packets += 1
            segment = parse_packet(packet.get_payload())
            if segment is None:
                self._count_failure(packet, now)
            else:
                self.table.update(segment, now)
        except Exception:
            self.errors += 1
            log.exception("queue %d: packet id %s not counted", self.queue, packet.id)
        finally:
            self._accept(packet)

    def _count_failure(self, packet: Any, now: float) -> None:
        self.parse_failures += 1
        self._unreported_failures += 1
        if now - self._last_failure_log < FAILURE_LOG_INTERVAL:
            return
        log.warning(
            "queue %d: %d packets not parsed as TCP since the last report "
            "(%d in total, latest packet id %s, %d bytes)",
            self.queue, self._unreported_failures, self.parse_failures,
            packet.id, packet.get_payload_len(),
        )
        self._unreported_failures = 0
        self._last_failure_log = now

    def _accept(self, packet: Any) -> None:
        try:
            packet.accept()
        except RuntimeError as error:
            self.errors += 1
            log.error(
                "queue %d: accept failed for packet id %s: %s", self.queue, packet.id, error
            )


def run_tap(config: TapConfig) -> int:
    """Run the tap until SIGTERM or SIGINT. Return the process exit status."""
    return asyncio.run(serve(config))


async def serve(config: TapConfig, stop: asyncio.Event | None = None) -> int:
    """Bind the queue and the query socket, and serve until stop is set or a signal."""
    from netfilterqueue import NetfilterQueue

    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    table = FlowTable(config.server_port, config.max_flows, config.linger)
    tap = PacketTap(table, config.queue)

    # Bind the queue first, because it is what needs root.
    nfq = _bind_queue(NetfilterQueue, config.queue, tap)
    if nfq is None:
        return 1

    query = QueryServer(table, config.socket)
    try:
        await query.start()
    except OSError as error:
        kind = "invalid socket path" if isinstance(error, TapSocketError) else "bind failed"
        log.error("cannot serve on socket %s (%s): %s", config.socket, kind, error)
        nfq.unbind()
        return 1

    fd = nfq.get_fd()
    loop.add_reader(fd, _drain_queue, nfq, config.queue)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _request_stop, stop, signum)
    log.info(
        "tap started: queue %d, server port %d, socket %s, max flows %d, linger %.0f s",
        config.queue, config.server_port, config.socket, config.max_flows, config.linger,
    )

    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        loop.remove_reader(fd)

        # Give a verdict to packets already queued, because unbinding drops them.
        _drain_queue(nfq, config.queue)
        nfq.unbind()
        await query.close()
        log.info(
            "tap stopped: queue %d, %d packets, %d not parsed, %d errors, %d flows",
            config.queue, tap.packets, tap.parse_failures, tap.errors, len(table),
        )
    return 0


def _bind_queue(factory: Callable[[], Any], queue: int, tap: PacketTap) -> Any | None:
    try:
        nfq = factory()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            nfq.bind(queue, tap, max_len=QUEUE_MAX_LEN, range=COPY_RANGE)
    except OSError as error:
        log.error(
            "cannot bind NFQUEUE %d: %s (the tap needs root or CAP_NET_ADMIN, and no "
            "other process may be bound to the queue)", queue, error,
        )
        return None
    for warning in caught:
        log.warning("queue %d: %s", queue, warning.message)
    return nfq


def _drain_queue(nfq: Any, queue: int) -> None:
    # NOTE: run(block=False) returns only when the socket is empty, so a sustained
    # packet flood can delay query responses until it pauses.
    try:
        nfq.run(block=False)
    except OSError as error:
        log.error("queue %d: reading the netlink socket failed: %s", queue, error)


def _request_stop(stop: asyncio.Event, signum: int) -> None:
    log.info("received %s, stopping", signal.Signals(signum).name)
    stop.set()
