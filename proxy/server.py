"""asyncio spamd proxy that adds the flow model's verdict header to scanned messages.

Per connection the proxy reads one spamc request. For a message that spamd will score
(CHECK, SYMBOLS, REPORT, REPORT_IFSPAM, PROCESS, HEADERS) it removes forged
``X-Spamflow`` headers and, when the client is a trusted MTA and the message's topmost
``X-Spamflow-Flow`` header verifies, prepends ``X-Spamflow: p=...; model=...; flow=...``.
spamd's response is relayed unchanged. Every other request, and every request the proxy
cannot read exactly as spamd would, is forwarded byte for byte so that spamd replies to it.

After the response has been sent, a background worker computes the message's score
without the verdict header and records it for learning.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from spamflow.config import ConfigError, ProxyConfig, parse_host_port
from spamflow.nfqueue_tap.protocol import format_flow
from spamflow.proxy import message as message_headers
from spamflow.proxy import spamd_protocol as protocol
from spamflow.proxy.flowid import FLOW_HEADER, FlowIdError, verify_flow_header_value
from spamflow.proxy.logtext import log_text
from spamflow.proxy.metrics import MetricsServer
from spamflow.proxy.ratelimit import RateLimitedLog
from spamflow.proxy.server_metrics import ProxyMetrics, method_label
from spamflow.proxy.tapclient import query_tap

logger = logging.getLogger(__name__)

VERDICT_HEADER = "X-Spamflow"
# Protocol versions whose framing the proxy rewrites. spamd reads no request headers
# for 1.0 and sends no Content-length before 1.2, so older requests pass unchanged.
MIN_REWRITE_VERSION = (1, 2)
MAX_REWRITE_VERSION = (1, 5)
# Header names as spamd 4.0.1 matches them (case-sensitive).
SPAMD_HEADER_SPELLING = {
    b"content-length": b"Content-length",
    b"compress": b"Compress",
    b"user": b"User",
}
# spamd 4.0.1's default --timeout-child, in seconds. A spamd_timeout at or below it
# ends slow scans before spamd can return its own "79 Timeout" error.
SPAMD_CHILD_TIMEOUT = 300.0
# Seconds to wait for a TCP connection to spamd.
SPAMD_CONNECT_TIMEOUT = 10.0
# Seconds between checks for a retrained model file.
MODEL_RELOAD_INTERVAL = 30.0
# Background scoring: concurrent workers and queued requests before new ones are dropped.
SCORING_WORKERS = 2
SCORING_QUEUE_SIZE = 256
# Maximum bytes of queued messages. Only jobs with a verdict keep their message, for
# the second CHECK, so this bounds memory when spamd falls behind.
SCORING_QUEUE_MAX_BYTES = 64 * 1024 * 1024
# Seconds a closing client connection may take to accept the buffered response.
CLIENT_CLOSE_TIMEOUT = 10.0
# Seconds that shutdown waits for in-flight requests, then for queued scoring.
SHUTDOWN_TIMEOUT = 30.0
# Seconds that shutdown waits for cancelled connection handlers to finish.
CANCEL_TIMEOUT = 5.0
# Minimum seconds between two log lines about an unreachable spamd.
SPAMD_ERROR_LOG_INTERVAL = 10.0
PIPE_CHUNK_BYTES = 64 * 1024


class FlowModelLike(Protocol):
    name: str

    def predict_spam_probability(self, features: Mapping[str, float]) -> float: ...


class LearnerLike(Protocol):
    """The part of spamflow.models.autolearn.AutoLearner that the proxy calls."""

    @property
    def model(self) -> FlowModelLike | None: ...

    def label_for(self, base_score: float) -> int | None: ...

    def observe(self, observation: Any) -> None: ...

    def reload_if_changed(self) -> Any: ...


class _PassThroughError(Exception):
    """A request that the proxy forwards unchanged, with the reason as message.

    reason is the request's label in server_metrics.PASSTHROUGH_REASONS.
    """

    def __init__(self, message: str, reason: str = "invalid_request") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class ScanRequest:
    head: protocol.RequestHead
    message: bytes
    compressed: bool
    raw: bytes


@dataclass
class Verdict:
    flow: str | None = None
    features: dict[str, float] | None = None
    p: float | None = None
    model: str | None = None
    header_value: str | None = None


@dataclass
class ScoringJob:
    """Data of one scanned request, queued for the background worker that records it."""

    peer: str
    method: str
    user: bytes | None
    # Empty unless a verdict was added, because only then does the worker rescan it.
    message_without_verdict: bytes
    verdict: Verdict
    response: bytes
    duration: float
    message_id: str | None = None
    # False when the client's bytes went to spamd unchanged, because then spamd's score
    # may include SPAMFLOW rules fired by a forged verdict header.
    verdict_removed: bool = True


def parse_trusted(addresses: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Parse trusted MTA addresses or networks. Raises ConfigError."""
    networks = []
    for address in addresses:
        try:
            networks.append(ipaddress.ip_network(address, strict=False))
        except ValueError as error:
            raise ConfigError(f"invalid trusted_mta address {address!r}: {error}") from error
    return networks


def _ip_addresses(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Resolve host to IP addresses, with IPv4-mapped IPv6 addresses as IPv4."""
    try:
        infos = socket.getaddrinfo(host or None, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return set()
    addresses: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        addresses.add(address)
    return addresses


def _is_local_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Return whether a socket of this host can bind to address, which sends no packet."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def check_spamd_address(listen: str, spamd: str) -> None:
    """Raise ConfigError when spamd is the proxy's own listening address.

    A proxy that connects to itself opens a new connection per connection until it
    runs out of file descriptors. The check covers a wildcard listen address (0.0.0.0
    or ::) with a local spamd address, and spamd 0.0.0.0 or ::, which Linux connects
    to the local host. A spamd host name that does not resolve passes, because the
    proxy then cannot reach it at all.
    """
    listen_host, listen_port = parse_host_port(listen)
    spamd_host, spamd_port = parse_host_port(spamd)
    if listen_port != spamd_port or listen_port == 0:
        return
    listen_addresses = _ip_addresses(listen_host)
    listen_wildcard = any(address.is_unspecified for address in listen_addresses)
    for address in _ip_addresses(spamd_host):
        if (
            address in listen_addresses
            or address.is_unspecified
            or (listen_wildcard and _is_local_address(address))
        ):
            raise ConfigError(
                f"spamd address {spamd} is the proxy's own listen address {listen}: "
                "set spamd to the address of the real spamd"
            )


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return format_flow(str(peer[0]), peer[1])
    return str(peer)


def _format_p(p: float | None) -> str:
    return "-" if p is None else f"{p:.2f}"


class ProxyServer:
    """spamd proxy. Call start(), then shutdown() to stop it gracefully."""

    def __init__(
        self,
        config: ProxyConfig,
        learner: LearnerLike | None = None,
        flow_key: bytes | None = None,
        observation_factory: Callable[..., Any] | None = None,
        scoring_workers: int = SCORING_WORKERS,
        scoring_queue_size: int = SCORING_QUEUE_SIZE,
        scoring_queue_max_bytes: int = SCORING_QUEUE_MAX_BYTES,
        model_reload_interval: float = MODEL_RELOAD_INTERVAL,
    ) -> None:
        self.config = config
        self.learner = learner
        self.flow_key = flow_key
        self.listen_host, self.listen_port = parse_host_port(config.listen)
        self.spamd_host, self.spamd_port = parse_host_port(config.spamd)
        check_spamd_address(config.listen, config.spamd)
        self.trusted = parse_trusted(config.trusted_mta)
        self._observation_factory = observation_factory
        self._worker_count = scoring_workers
        self._queue_max_bytes = scoring_queue_max_bytes
        self._queued_bytes = 0
        self._model_reload_interval = model_reload_interval
        self._queue: asyncio.Queue[ScoringJob] = asyncio.Queue(scoring_queue_size)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._flow_failures = RateLimitedLog(logger)
        self._spamd_failures = RateLimitedLog(logger, interval=SPAMD_ERROR_LOG_INTERVAL)
        self.dropped_jobs = 0
        self.metrics = ProxyMetrics(
            active_connections=lambda: len(self._connections),
            scoring_queue_size=self._queue.qsize,
            model_examples=self._model_examples,
        )
        self._metrics_server: MetricsServer | None = None

    # Lifecycle

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle_connection,
            self.listen_host,
            self.listen_port,
            limit=protocol.MAX_REQUEST_HEAD_BYTES,
        )
        self.listen_port = self._server.sockets[0].getsockname()[1]
        if self.config.metrics_listen is not None:
            host, port = parse_host_port(self.config.metrics_listen)
            self._metrics_server = MetricsServer(self.metrics.registry, host, port)
            try:
                await self._metrics_server.start()
            except OSError:
                self._server.close()
                await self._server.wait_closed()
                raise
        for _ in range(self._worker_count):
            self._background.append(asyncio.create_task(self._scoring_worker()))
        if self.learner is not None:
            self._background.append(asyncio.create_task(self._reload_models()))
        logger.info(
            "proxy listening on %s:%s, spamd %s:%s",
            self.listen_host, self.listen_port, self.spamd_host, self.spamd_port,
        )
        if self.config.spamd_timeout <= SPAMD_CHILD_TIMEOUT:
            logger.warning(
                "spamd_timeout %s s is not above spamd's default --timeout-child of %s s: "
                "a slow scan ends with an empty response instead of spamd's timeout error, "
                "so set spamd_timeout above spamd's --timeout-child",
                self.config.spamd_timeout, SPAMD_CHILD_TIMEOUT,
            )

    async def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Stop accepting, let in-flight requests and queued scoring finish, then stop."""
        if self._server is not None:
            self._server.close()
        if self._connections:
            logger.info("waiting for %d in-flight requests", len(self._connections))
            _, pending = await asyncio.wait(set(self._connections), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                # Each handler catches its cancellation, so this wait ends quickly.
                await asyncio.wait(pending, timeout=CANCEL_TIMEOUT)
        try:
            async with asyncio.timeout(timeout):
                await self._queue.join()
        except TimeoutError:
            logger.warning("shutdown: %d scoring jobs not finished", self._queue.qsize())
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        if self._metrics_server is not None:
            await self._metrics_server.close()
        logger.info("proxy stopped")

    async def wait_idle(self, timeout: float) -> None:
        """Wait until no request is in flight and the scoring queue is empty.

        Raises TimeoutError after timeout seconds.
        """
        async with asyncio.timeout(timeout):
            while self._connections:
                await asyncio.wait(set(self._connections))
            await self._queue.join()

    @property
    def metrics_port(self) -> int | None:
        """Port of the metrics endpoint, or None when metrics_listen is not set."""
        return None if self._metrics_server is None else self._metrics_server.port

    def _model_examples(self) -> int:
        model = self.learner.model if self.learner is not None else None
        if model is None:
            return 0
        return int(getattr(model, "n_examples", 0))

    async def _reload_models(self) -> None:
        assert self.learner is not None
        while True:
            await asyncio.sleep(self._model_reload_interval)
            try:
                await asyncio.to_thread(self.learner.reload_if_changed)
            except Exception:
                logger.exception("model reload failed")

    # Connections

    async def _handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = writer.get_extra_info("peername")
        cancelled = False
        try:
            await self._serve(reader, writer, peer)
        except asyncio.CancelledError:
            # Not re-raised: asyncio 3.11 logs a handler task that ends cancelled as an
            # "Exception in callback" error with a traceback.
            cancelled = True
            logger.warning(
                "peer=%s request not finished at shutdown, closing the connection",
                _peer_text(peer),
            )
        except ConnectionError as error:
            logger.info("peer=%s connection ended: %r", _peer_text(peer), error)
        except TimeoutError:
            self.metrics.spamd_errors.inc("timeout")
            logger.warning(
                "peer=%s exchange with spamd not finished within %s s (spamd or the client "
                "stalled), closing the client connection",
                _peer_text(peer), self.config.spamd_timeout,
            )
        except Exception:
            logger.exception("peer=%s request failed", _peer_text(peer))
        finally:
            self._connections.discard(task)
            if cancelled:
                writer.transport.abort()
            else:
                await self._close_client(writer, peer)

    @staticmethod
    async def _close_client(writer: asyncio.StreamWriter, peer: Any) -> None:
        """Close the client connection, and abort it when it does not take the rest."""
        # close() first sends what is buffered, which waits for a client that reads.
        writer.close()
        try:
            async with asyncio.timeout(CLIENT_CLOSE_TIMEOUT):
                await writer.wait_closed()
        except ConnectionError:
            pass
        except TimeoutError:
            logger.warning(
                "peer=%s client did not take the rest of the response within %s s, aborting",
                _peer_text(peer), CLIENT_CLOSE_TIMEOUT,
            )
            writer.transport.abort()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Any
    ) -> None:
        started = time.monotonic()
        consumed = bytearray()
        try:
            async with asyncio.timeout(self.config.client_timeout):
                request = await self._read_request(reader, consumed)
        except _PassThroughError as error:
            self._count_pass_through(consumed, error.reason)
            await self._pass_through(bytes(consumed), reader, writer, peer, str(error), started)
            return
        except TimeoutError:
            # Ending the input here makes spamd return its own error at once, instead of
            # waiting for its own timeout.
            reason = f"request not complete after {self.config.client_timeout} s"
            consumed += await self._take_buffered(reader)
            self._count_pass_through(consumed, "client_timeout")
            await self._pass_through(bytes(consumed), None, writer, peer, reason, started)
            return
        self.metrics.requests.inc(request.head.method)
        await self._scan(request, writer, peer, started)

    def _count_pass_through(self, consumed: bytearray, reason: str) -> None:
        line_end = consumed.find(b"\n")
        request_line = bytes(consumed if line_end < 0 else consumed[: line_end + 1])
        self.metrics.requests.inc(method_label(request_line))
        self.metrics.passthrough.inc(reason if consumed else "empty")

    async def _read_request(
        self, reader: asyncio.StreamReader, consumed: bytearray
    ) -> ScanRequest:
        """Read one request that the proxy may rewrite, appending what it reads to consumed.

        Raises _PassThroughError when the request must reach spamd unchanged. Bytes not
        in consumed remain in reader.
        """
        line = await self._read_line(reader, consumed)
        try:
            method, version = protocol.parse_request_line(line)
        except protocol.SpamdProtocolError as error:
            raise _PassThroughError(str(error)) from None
        if method not in protocol.SCORED_METHODS:
            raise _PassThroughError(f"{method} carries no message to score", "unscored_method")
        if not MIN_REWRITE_VERSION <= version <= MAX_REWRITE_VERSION:
            raise _PassThroughError(
                f"unsupported protocol version {version[0]}.{version[1]}", "unsupported_version"
            )

        while not consumed.endswith(protocol.HEAD_END):
            await self._read_line(reader, consumed)
        try:
            head = protocol.parse_request_head(bytes(consumed))
            length = head.content_length()
        except protocol.SpamdProtocolError as error:
            raise _PassThroughError(str(error)) from None
        self._check_header_spelling(head)
        if length is None:
            raise _PassThroughError("no Content-length", "no_content_length")
        if length > self.config.max_message_size:
            # NOTE: a message passed through unchanged keeps any forged X-Spamflow header,
            # so max_message_size must stay above spamc's -s limit (500 KB by default).
            raise _PassThroughError(
                f"Content-length {length} above max_message_size", "too_large"
            )

        try:
            body = await reader.readexactly(length)
        except asyncio.IncompleteReadError as error:
            consumed += error.partial
            raise _PassThroughError(
                f"body has {len(error.partial)} of {length} bytes"
            ) from None
        consumed += body
        compressed = self._is_compressed(head)
        if compressed or not body.endswith(b"\n"):
            # spamd 4.0.1 reads a zlib body up to end of input, and a plain body in whole
            # lines until it has Content-length bytes. So it reads past this body and
            # returns its own error when more input follows. spamc half-closes after the
            # request, so this read returns at once.
            extra = await reader.read(PIPE_CHUNK_BYTES)
            if extra:
                consumed += extra
                raise _PassThroughError(f"input continues after the {length} bytes of body")
        message = self._decompress(body) if compressed else body
        return ScanRequest(head=head, message=message, compressed=compressed, raw=bytes(consumed))

    @staticmethod
    async def _take_buffered(reader: asyncio.StreamReader) -> bytes:
        """Return the bytes already buffered in reader, without waiting for more.

        An interrupted readuntil or readexactly leaves its partial input in reader.
        """
        data = bytearray()
        while True:
            # read() returns within its first step when reader has buffered data or is at EOF.
            read = asyncio.ensure_future(reader.read(PIPE_CHUNK_BYTES))
            await asyncio.sleep(0)
            if not read.done():
                read.cancel()
                await asyncio.gather(read, return_exceptions=True)
                return bytes(data)
            chunk = read.result()
            if not chunk:
                return bytes(data)
            data += chunk

    @staticmethod
    async def _read_line(reader: asyncio.StreamReader, consumed: bytearray) -> bytes:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as error:
            consumed += error.partial
            raise _PassThroughError("end of input inside the request head") from None
        except asyncio.LimitOverrunError:
            raise _PassThroughError("request head too long") from None
        consumed += line
        if len(consumed) > protocol.MAX_REQUEST_HEAD_BYTES:
            raise _PassThroughError("request head too long")
        return line

    @staticmethod
    def _check_header_spelling(head: protocol.RequestHead) -> None:
        for header in head.headers:
            expected = SPAMD_HEADER_SPELLING.get(header.name.lower())
            if expected is not None and header.name != expected:
                # spamd ignores the header when spelt differently and would see
                # another request than the proxy.
                raise _PassThroughError(f"header spelt {header.name!r}")
        if len(head.find("User")) > 1 or len(head.find("Compress")) > 1:
            raise _PassThroughError("repeated User or Compress header")

    @staticmethod
    def _is_compressed(head: protocol.RequestHead) -> bool:
        found = head.find("Compress")
        if not found:
            return False
        if found[0].value.strip().lower() != b"zlib":
            raise _PassThroughError(f"unsupported Compress value {found[0].value[:20]!r}")
        return True

    def _decompress(self, body: bytes) -> bytes:
        decompressor = zlib.decompressobj()
        try:
            message = decompressor.decompress(body, self.config.max_message_size + 1)
        except zlib.error as error:
            raise _PassThroughError(f"zlib data invalid: {error}") from None
        if len(message) > self.config.max_message_size:
            raise _PassThroughError("decompressed message above max_message_size", "too_large")
        if not decompressor.eof:
            raise _PassThroughError("zlib stream incomplete")
        return message

    # Forwarding

    async def _open_spamd(
        self, peer: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            async with asyncio.timeout(SPAMD_CONNECT_TIMEOUT):
                return await asyncio.open_connection(self.spamd_host, self.spamd_port)
        except (OSError, TimeoutError) as error:
            self.metrics.spamd_errors.inc("unreachable")
            self._spamd_failures.error(
                "peer=%s spamd %s:%s unreachable, closing the client connection: %r",
                _peer_text(peer), self.spamd_host, self.spamd_port, error,
            )
            return None

    async def _pass_through(
        self,
        prefix: bytes,
        reader: asyncio.StreamReader | None,
        writer: asyncio.StreamWriter,
        peer: Any,
        reason: str,
        started: float,
    ) -> None:
        """Send prefix to spamd, then copy both directions until spamd closes.

        With reader None, only prefix goes to spamd, followed by end of input.
        """
        method = log_text(prefix.split(b" ", 1)[0], limit=20) if prefix else "-"
        logger.debug("peer=%s forwarding unchanged: %s", _peer_text(peer), reason)
        connection = await self._open_spamd(peer)
        if connection is None:
            return
        spamd_reader, spamd_writer = connection
        upstream = asyncio.create_task(self._copy_to_spamd(prefix, reader, spamd_writer))
        try:
            async with asyncio.timeout(self.config.spamd_timeout):
                await self._copy(spamd_reader, writer)
        finally:
            upstream.cancel()
            await asyncio.gather(upstream, return_exceptions=True)
            spamd_writer.close()
        # A connection without a single byte is usually a port probe, such as a
        # readiness check.
        level = logging.INFO if prefix else logging.DEBUG
        logger.log(
            level,
            "request peer=%s method=%s passed through (%s) duration=%.3f",
            _peer_text(peer), method, reason, time.monotonic() - started,
        )

    @staticmethod
    async def _copy_to_spamd(
        prefix: bytes, reader: asyncio.StreamReader | None, spamd_writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(ConnectionError):
            spamd_writer.write(prefix)
            await spamd_writer.drain()
            while reader is not None and (chunk := await reader.read(PIPE_CHUNK_BYTES)):
                spamd_writer.write(chunk)
                await spamd_writer.drain()
            if spamd_writer.can_write_eof():
                spamd_writer.write_eof()

    @staticmethod
    async def _copy(
        source: asyncio.StreamReader, sink: asyncio.StreamWriter, keep: int = 0
    ) -> bytes:
        """Copy source to sink until EOF and return the first keep bytes."""
        start = bytearray()
        while chunk := await source.read(PIPE_CHUNK_BYTES):
            if len(start) < keep:
                start += chunk[: keep - len(start)]
            sink.write(chunk)
            await sink.drain()
        return bytes(start)

    # Scanning

    async def _scan(
        self, request: ScanRequest, writer: asyncio.StreamWriter, peer: Any, started: float
    ) -> None:
        method = request.head.method
        outgoing, cleaned, verdict = await self._rewrite(request, peer)
        if verdict.header_value is not None:
            self.metrics.verdicts.inc()
        verdict_removed = cleaned is not None
        if cleaned is None:
            cleaned = request.message

        connection = await self._open_spamd(peer)
        if connection is None:
            return
        spamd_reader, spamd_writer = connection
        try:
            # The timeout also covers sending, because a stalled spamd stops reading.
            async with asyncio.timeout(self.config.spamd_timeout):
                spamd_writer.write(outgoing)
                await spamd_writer.drain()
                spamd_writer.write_eof()
                response = await self._copy(
                    spamd_reader, writer, keep=protocol.MAX_RESPONSE_HEAD_BYTES
                )
        finally:
            spamd_writer.close()
        writer.close()

        user = request.head.find("User")
        job = ScoringJob(
            peer=_peer_text(peer),
            method=method,
            user=user[0].value if user else None,
            message_without_verdict=cleaned if verdict.header_value is not None else b"",
            verdict=verdict,
            response=response,
            duration=time.monotonic() - started,
            message_id=message_headers.find_header(cleaned, "Message-Id"),
            verdict_removed=verdict_removed,
        )
        self._enqueue(job)

    async def _rewrite(
        self, request: ScanRequest, peer: Any
    ) -> tuple[bytes, bytes | None, Verdict]:
        """Return the request to send, the message without verdict, and the verdict.

        Each failing step falls back to less: a failed verdict lookup leaves the message
        without a verdict, and a failed header edit sends the client's bytes unchanged
        and returns None as the message without verdict.
        """
        method = request.head.method
        try:
            cleaned = message_headers.remove_header(request.message, VERDICT_HEADER)
        except Exception:
            logger.exception(
                "peer=%s method=%s removing %s failed, forwarding the request unchanged",
                _peer_text(peer), method, VERDICT_HEADER,
            )
            return request.raw, None, Verdict()
        # remove_header only shortens a message, so a shorter one lost a forged header.
        if len(cleaned) != len(request.message):
            self.metrics.forged_headers_removed.inc()

        try:
            verdict = await self._find_verdict(cleaned, peer)
            forwarded = cleaned
            if verdict.header_value is not None:
                forwarded = message_headers.prepend_header(
                    cleaned, VERDICT_HEADER, verdict.header_value
                )
        except Exception:
            logger.exception(
                "peer=%s method=%s verdict failed, scanning without it", _peer_text(peer), method
            )
            verdict = Verdict()
            forwarded = cleaned

        try:
            body = zlib.compress(forwarded) if request.compressed else forwarded
            return request.head.with_content_length(len(body)) + body, cleaned, verdict
        except Exception:
            logger.exception(
                "peer=%s method=%s request rewrite failed, forwarding it unchanged",
                _peer_text(peer), method,
            )
            return request.raw, None, Verdict()

    async def _find_verdict(self, message: bytes, peer: Any) -> Verdict:
        """Look up the flow's features and the model's p. Missing pieces stay None."""
        verdict = Verdict()
        if not self._is_trusted(peer):
            return verdict
        value = message_headers.find_header(message, FLOW_HEADER)
        if value is None:
            return verdict
        try:
            identity = verify_flow_header_value(value, self.flow_key)
        except FlowIdError as error:
            self._flow_failures.warning(
                "peer=%s flow header rejected: %s", _peer_text(peer), error
            )
            return verdict
        verdict.flow = identity.flow
        if self.learner is None:
            # Without a learner there is neither a model nor a record to use features.
            return verdict

        result, verdict.features = await query_tap(
            self.config.tap_socket, identity.ip, identity.port, self.config.tap_timeout
        )
        self.metrics.tap_queries.inc(result)
        model = self.learner.model if self.learner is not None else None
        if verdict.features is None or model is None:
            return verdict

        p = float(model.predict_spam_probability(verdict.features))
        if not 0.0 <= p <= 1.0:
            # NaN fails this test too, and clamping it would produce p=0.00.
            logger.error(
                "peer=%s flow=%s model %s returned invalid p %r, adding no verdict",
                _peer_text(peer), identity.flow, model.name, p,
            )
            return verdict
        # Adding 0.0 turns -0.0 into 0.0, which "%.2f" would write as -0.00, a value that
        # no SPAMFLOW rule matches.
        verdict.p = p + 0.0
        verdict.model = model.name
        verdict.header_value = f"p={verdict.p:.2f}; model={model.name}; flow={identity.flow}"
        return verdict

    def _is_trusted(self, peer: Any) -> bool:
        if not isinstance(peer, tuple):
            return False
        try:
            address = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted)

    # Background scoring

    def _enqueue(self, job: ScoringJob) -> None:
        size = len(job.message_without_verdict)
        try:
            if self._queued_bytes + size > self._queue_max_bytes:
                raise asyncio.QueueFull
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.dropped_jobs += 1
            self.metrics.scoring_dropped.inc()
            logger.warning(
                "request peer=%s method=%s flow=%s p=%s not recorded: scoring queue full "
                "(%d dropped so far)",
                job.peer, job.method, job.verdict.flow or "-", _format_p(job.verdict.p),
                self.dropped_jobs,
            )
            return
        self._queued_bytes += size

    async def _scoring_worker(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                await self._record(job)
            except TimeoutError:
                self.metrics.spamd_errors.inc("timeout")
                logger.warning(
                    "peer=%s CHECK without verdict not finished within %s s, not recorded",
                    job.peer, self.config.spamd_timeout,
                )
            except Exception:
                logger.exception("peer=%s scoring for learning failed", job.peer)
            finally:
                self._queued_bytes -= len(job.message_without_verdict)
                self._queue.task_done()

    async def _record(self, job: ScoringJob) -> None:
        spam = None
        code = None
        if not job.response:
            self.metrics.spamd_errors.inc("closed")
            logger.warning(
                "peer=%s method=%s spamd closed the connection without a response",
                job.peer, job.method,
            )
        else:
            try:
                head = protocol.parse_response_head(job.response)
                code = head.code
                spam = head.spam()
            except protocol.SpamdProtocolError as error:
                logger.warning("peer=%s spamd response not parsed: %s", job.peer, error)

        base_score = None
        if spam is not None and code == protocol.SpamdExitCode.EX_OK and job.verdict_removed:
            if job.verdict.header_value is None:
                base_score = spam.score
            else:
                base_score = await self._score_without_verdict(job)

        logger.info(
            "request peer=%s method=%s flow=%s p=%s score=%s base_score=%s duration=%.3f",
            job.peer, job.method, job.verdict.flow or "-", _format_p(job.verdict.p),
            "-" if spam is None else spam.score,
            "-" if base_score is None else base_score,
            job.duration,
        )
        if self.learner is None or spam is None or base_score is None:
            return
        observation = self._make_observation(
            ts=time.time(),
            flow=job.verdict.flow,
            message_id=job.message_id,
            method=job.method,
            score=spam.score,
            base_score=base_score,
            threshold=spam.threshold,
            p=job.verdict.p,
            model=job.verdict.model,
            label=self.learner.label_for(base_score),
            features=job.verdict.features,
        )
        await asyncio.to_thread(self.learner.observe, observation)
        self.metrics.observations_recorded.inc()

    def _make_observation(self, **fields: Any) -> Any:
        if self._observation_factory is None:
            from spamflow.models.store import Observation

            self._observation_factory = Observation
        return self._observation_factory(**fields)

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> bytes:
        """Read up to EOF or MAX_RESPONSE_HEAD_BYTES, whichever comes first."""
        data = bytearray()
        while len(data) < protocol.MAX_RESPONSE_HEAD_BYTES:
            chunk = await reader.read(protocol.MAX_RESPONSE_HEAD_BYTES - len(data))
            if not chunk:
                break
            data += chunk
        return bytes(data)

    async def _score_without_verdict(self, job: ScoringJob) -> float | None:
        """Send spamd a CHECK of the message without the verdict header and return its score."""
        # NOTE: spamd's history plugins (AWL, TxRep, Bayes auto-learning) see the message
        # twice when they are enabled, and their update from the first scan can shift
        # this score away from the client's scan minus the SPAMFLOW rules.
        request = protocol.format_request("CHECK", job.message_without_verdict, job.user)
        connection = await self._open_spamd(job.peer)
        if connection is None:
            return None
        spamd_reader, spamd_writer = connection
        try:
            async with asyncio.timeout(self.config.spamd_timeout):
                spamd_writer.write(request)
                await spamd_writer.drain()
                spamd_writer.write_eof()
                response = await self._read_head(spamd_reader)
        finally:
            spamd_writer.close()
        if not response:
            self.metrics.spamd_errors.inc("closed")
            logger.warning(
                "peer=%s CHECK without verdict: spamd closed the connection without a response",
                job.peer,
            )
            return None
        head = protocol.parse_response_head(response)
        spam = head.spam()
        if head.code != protocol.SpamdExitCode.EX_OK or spam is None:
            logger.warning(
                "peer=%s CHECK without verdict returned %s %s", job.peer, head.code, head.message
            )
            return None
        return spam.score


async def serve_proxy(
    config: ProxyConfig,
    learner: LearnerLike | None,
    flow_key: bytes | None,
) -> None:
    """Run the proxy until SIGTERM or SIGINT, then shut it down gracefully."""
    server = ProxyServer(config, learner, flow_key)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        logger.info("stop signal received, shutting down")
    finally:
        await server.shutdown()
