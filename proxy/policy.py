"""Postfix policy service that prepends the flow-identity header to each message.

Postfix (SMTPD_POLICY_README, Postfix >= 3.0 for client_port) sends ``name=value``
lines ending with an empty line, and reads back ``action=...`` and an empty line.
Many requests may share one connection. Intended for::

    smtpd_data_restrictions = check_policy_service inet:127.0.0.1:10040

where Postfix sends one request per message, so each message gets one header. Only a
request with ``protocol_state=DATA`` gets PREPEND. Every other request, including one from
smtpd_recipient_restrictions (which Postfix sends once per recipient), one that lacks
client_address or client_port, and a malformed one, gets ``action=DUNNO``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from typing import Any

from spamflow.nfqueue_tap.protocol import format_flow
from spamflow.proxy.flowid import FLOW_HEADER, make_flow_header_value
from spamflow.proxy.logtext import log_text

logger = logging.getLogger(__name__)

# Maximum length of one attribute line, in bytes. Postfix's own policy client limits
# attribute values to a few kB, so a longer line is malformed input.
MAX_ATTRIBUTE_LINE_BYTES = 8192
# Maximum number of attributes in one request. Postfix 3.7 sends about 30.
MAX_ATTRIBUTES = 256
# Seconds an idle connection may stay open between requests. Postfix closes idle
# policy connections after smtpd_policy_service_max_idle (300 s by default).
IDLE_TIMEOUT = 600.0
# Seconds that closing one connection, and shutdown as a whole, may take.
CLOSE_TIMEOUT = 5.0
# The only Postfix protocol_state in which PREPEND adds one header per message.
PREPEND_STATE = "DATA"

DUNNO = "DUNNO"


class PolicyRequestError(ValueError):
    """A policy request that cannot be read as name=value lines."""


def parse_attribute_lines(lines: list[bytes]) -> dict[str, str]:
    """Turn ``name=value`` lines into a dict. Raises PolicyRequestError."""
    if len(lines) > MAX_ATTRIBUTES:
        raise PolicyRequestError(f"more than {MAX_ATTRIBUTES} attributes")
    attributes: dict[str, str] = {}
    for line in lines:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise PolicyRequestError("attribute line is not UTF-8") from error
        name, separator, value = text.partition("=")
        if not separator or not name:
            raise PolicyRequestError(f"attribute line {text[:40]!r} has no name=value")
        attributes[name] = value
    return attributes


def decide_action(attributes: dict[str, str], key: bytes | None) -> str:
    """Return the action for one request: PREPEND of the flow header, or DUNNO.

    PREPEND needs protocol_state DATA, because in an earlier state such as RCPT Postfix
    sends one request per recipient and each PREPEND adds another header.
    """
    if attributes.get("request") != "smtpd_access_policy":
        return DUNNO
    if attributes.get("protocol_state") != PREPEND_STATE:
        return DUNNO
    address = attributes.get("client_address", "")
    port_text = attributes.get("client_port", "")
    if not port_text.isdigit():
        return DUNNO
    try:
        ip = str(ipaddress.ip_address(address))
        value = make_flow_header_value(ip, int(port_text), key)
    except ValueError:
        return DUNNO
    return f"PREPEND {FLOW_HEADER}: {value}"


class PolicyServer:
    """asyncio server that replies to Postfix policy requests with the flow header."""

    def __init__(self, host: str, port: int, key: bytes | None) -> None:
        self.host = host
        self.port = port
        self.key = key
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._state_warned = False

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve_connection, self.host, self.port, limit=MAX_ATTRIBUTE_LINE_BYTES
        )
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]
        logger.info("policy service listening on %s:%s", self.host, self.port)

    async def close(self) -> None:
        """Stop accepting, close open connections and wait at most CLOSE_TIMEOUT for them."""
        if self._server is None:
            return
        self._server.close()
        # Postfix keeps idle policy connections open, and the service replies to each
        # request at once, so ending the connection handlers loses no reply.
        for task in self._connections:
            task.cancel()
        if self._connections:
            await asyncio.wait(set(self._connections), timeout=CLOSE_TIMEOUT)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._server.wait_closed()
        logger.info("policy service stopped")

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = _peer_text(writer.get_extra_info("peername"))
        try:
            while True:
                lines = await self._read_request(reader, peer)
                if lines is None:
                    break
                writer.write(self._answer(lines, peer).encode("utf-8"))
                await writer.drain()
        except asyncio.CancelledError:
            # Not re-raised: asyncio 3.11 logs a handler task that ends cancelled as an
            # "Exception in callback" error with a traceback.
            logger.debug("peer=%s policy connection closed at shutdown", peer)
            writer.transport.abort()
        except (ConnectionError, TimeoutError) as error:
            logger.info("peer=%s policy connection ended: %r", peer, error)
        except Exception:
            logger.exception("peer=%s policy connection failed", peer)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await writer.wait_closed()

    async def _read_request(
        self, reader: asyncio.StreamReader, peer: str
    ) -> list[bytes] | None:
        """Read lines up to the empty line. Returns None at EOF before a full request.

        A line longer than MAX_ATTRIBUTE_LINE_BYTES is replaced by an empty attribute
        line, which has no ``=``, so the reply to the request is DUNNO.
        """
        lines: list[bytes] = []
        while True:
            async with asyncio.timeout(IDLE_TIMEOUT):
                line, overlong = await self._read_line(reader)
            if overlong:
                logger.warning("peer=%s policy request has an over-long line", peer)
                lines.append(b"")
                continue
            if not line.endswith(b"\n"):
                if line or lines:
                    logger.warning("peer=%s policy client closed mid-request", peer)
                return None
            line = line.rstrip(b"\r\n")
            if not line:
                return lines
            lines.append(line)

    @staticmethod
    async def _read_line(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
        """Return the next line and whether it was over-long (and discarded)."""
        overlong = False
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as error:
                return error.partial, overlong
            except asyncio.LimitOverrunError as error:
                overlong = True
                await reader.readexactly(error.consumed)
                continue
            return (b"\n" if overlong else line), overlong

    def _answer(self, lines: list[bytes], peer: str) -> str:
        try:
            attributes = parse_attribute_lines(lines)
        except PolicyRequestError as error:
            logger.warning(
                "peer=%s malformed policy request (%s), replying action=DUNNO", peer, error
            )
            return f"action={DUNNO}\n\n"
        action = decide_action(attributes, self.key)
        state = attributes.get("protocol_state", "")
        if (
            attributes.get("request") == "smtpd_access_policy"
            and state != PREPEND_STATE
            and not self._state_warned
        ):
            self._state_warned = True
            logger.warning(
                "peer=%s policy request in protocol_state=%s gets DUNNO: the flow header is "
                "added only in protocol_state=DATA, so list the service in main.cf as "
                "smtpd_data_restrictions = check_policy_service inet:HOST:PORT "
                "(this warning is logged once)",
                peer, log_text(state),
            )
        logger.info(
            "policy queue_id=%s client=%s state=%s action=%s",
            log_text(attributes.get("queue_id", "") or "-"),
            _client_text(attributes),
            log_text(state or "-"),
            action,
        )
        return f"action={action}\n\n"


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return format_flow(str(peer[0]), peer[1])
    return log_text(str(peer))


def _client_text(attributes: dict[str, str]) -> str:
    """Return the request's client as IP:PORT, or its escaped raw values when invalid."""
    address = attributes.get("client_address", "")
    port = attributes.get("client_port", "")
    try:
        return format_flow(str(ipaddress.ip_address(address)), int(port))
    except ValueError:
        return f"{log_text(address or '-')}:{log_text(port or '-')}"


async def serve_policy(host: str, port: int, key: bytes | None) -> None:
    """Run the policy service until SIGTERM or SIGINT."""
    server = PolicyServer(host, port, key)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await server.close()
