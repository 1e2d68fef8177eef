"""Counters and gauges in Prometheus text exposition format 0.0.4, and a scrape server.

The server answers ``GET /metrics`` on its own TCP address. It reads one request per
connection and closes the connection after the response, as HTTP/1.0 does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Sequence

from spamflow.proxy.logtext import log_text

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATH = "/metrics"
# Maximum bytes of one request head, request line included.
MAX_REQUEST_BYTES = 8192
# Seconds a client may take to send its whole request head.
READ_TIMEOUT = 5.0
# Seconds a closing connection may take to accept the response.
WRITE_TIMEOUT = 5.0
# Seconds and bytes of unread request input that the server discards before closing.
# Closing a socket with unread input sends a TCP reset, which can destroy the response.
DISCARD_TIMEOUT = 1.0
DISCARD_MAX_BYTES = 64 * 1024


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


class Counter:
    """A counter with a fixed tuple of label names. Each label value set starts at 0."""

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        self.name = name
        self.help_text = help_text
        self.label_names = tuple(label_names)
        self.values: dict[tuple[str, ...], float] = {}
        if not self.label_names:
            self.values[()] = 0

    def declare(self, *label_values: str) -> None:
        """Show a label value set with 0 before its first increment."""
        self.values.setdefault(self._key(label_values), 0)

    def inc(self, *label_values: str, amount: float = 1) -> None:
        key = self._key(label_values)
        self.values[key] = self.values.get(key, 0) + amount

    def value(self, *label_values: str) -> float:
        return self.values.get(self._key(label_values), 0)

    def _key(self, label_values: tuple[str, ...]) -> tuple[str, ...]:
        if len(label_values) != len(self.label_names):
            raise ValueError(
                f"counter {self.name} takes {len(self.label_names)} label values, "
                f"got {len(label_values)}"
            )
        return label_values

    def samples(self) -> list[tuple[tuple[str, ...], float]]:
        return sorted(self.values.items())


class Gauge:
    """A gauge whose value a function returns at each scrape."""

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.name = name
        self.help_text = help_text
        self.label_names: tuple[str, ...] = ()
        self.read = read

    def samples(self) -> list[tuple[tuple[str, ...], float]]:
        return [((), float(self.read()))]


class MetricsRegistry:
    """Metrics in registration order, rendered as one exposition text."""

    def __init__(self) -> None:
        self._metrics: list[Counter | Gauge] = []

    def counter(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> Counter:
        metric = Counter(name, help_text, label_names)
        self._add(metric)
        return metric

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> Gauge:
        metric = Gauge(name, help_text, read)
        self._add(metric)
        return metric

    def _add(self, metric: Counter | Gauge) -> None:
        if any(existing.name == metric.name for existing in self._metrics):
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics.append(metric)

    def render(self) -> str:
        """Format every metric in text exposition format 0.0.4.

        A gauge whose function raises is left out, with the error logged.
        """
        lines: list[str] = []
        for metric in self._metrics:
            try:
                samples = metric.samples()
            except Exception:
                logger.exception("metric %s not rendered: reading its value failed", metric.name)
                continue
            kind = "counter" if isinstance(metric, Counter) else "gauge"
            lines.append(f"# HELP {metric.name} {_escape_help(metric.help_text)}")
            lines.append(f"# TYPE {metric.name} {kind}")
            for label_values, value in samples:
                lines.append(
                    metric.name
                    + _format_labels(metric.label_names, label_values)
                    + " "
                    + _format_number(value)
                )
        return "".join(line + "\n" for line in lines)


def _format_labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    pairs = ",".join(
        f'{name}="{_escape_label_value(value)}"' for name, value in zip(names, values)
    )
    return "{" + pairs + "}"


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large"}


def _response(status: int, body: bytes, content_type: str, extra: str = "") -> bytes:
    head = (
        f"HTTP/1.0 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class MetricsServer:
    """HTTP server of one registry's exposition text. Call start(), then close()."""

    def __init__(self, registry: MetricsRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=MAX_REQUEST_BYTES
        )
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("metrics listening on %s:%s%s", self.host, self.port, METRICS_PATH)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        logger.info("metrics server stopped")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            response = await self._respond(reader, peer)
            if response is not None:
                writer.write(response)
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.drain()
                await _discard_input(reader, writer)
        except (ConnectionError, TimeoutError) as error:
            logger.debug("metrics peer=%s connection ended: %r", peer, error)
        except Exception:
            logger.exception("metrics peer=%s request failed", peer)
        finally:
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader, peer: object) -> bytes | None:
        """Read one request head and return the response, or None after a timeout."""
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await _read_head(reader)
        except TimeoutError:
            logger.debug("metrics peer=%s request not complete after %s s", peer, READ_TIMEOUT)
            return None
        if head is None:
            return _response(431, b"request head too long\n", "text/plain")
        request_line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            logger.debug("metrics peer=%s invalid request line %s", peer, log_text(request_line))
            return _response(400, b"invalid request line\n", "text/plain")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target != METRICS_PATH.encode():
            return _response(404, b"not found: try /metrics\n", "text/plain")
        if method != b"GET":
            return _response(405, b"method not allowed: use GET\n", "text/plain", "Allow: GET\r\n")
        body = self.registry.render().encode("utf-8")
        return _response(200, body, CONTENT_TYPE)


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """Read lines up to the empty line. Returns None when the head is too long.

    A head that ends early (EOF) is returned as read, so that a bare request line works.
    """
    head = bytearray()
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as error:
            head += error.partial
            return bytes(head)
        except asyncio.LimitOverrunError:
            return None
        head += line
        if len(head) > MAX_REQUEST_BYTES:
            return None
        if line in (b"\r\n", b"\n"):
            return bytes(head)


async def _discard_input(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then read and drop client input until EOF or a limit."""
    if writer.can_write_eof():
        writer.write_eof()
    discarded = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DISCARD_TIMEOUT):
            while discarded < DISCARD_MAX_BYTES:
                chunk = await reader.read(DISCARD_MAX_BYTES)
                if not chunk:
                    return
                discarded += len(chunk)
