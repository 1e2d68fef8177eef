"""Postfix policy service that prepends the flow-identity header to each message.

Postfix (SMTPD_POLICY_README, Postfix >= 3.0 for client_port) sends ``name=value``
lines ending with an empty line, and reads back ``action=...`` and an empty line.
Many requests may share one connection. Intended for::

    smtpd_data_restrictions = check_policy_service inet:127.0.0.1:10040

where Postfix sends one request per message, so each message gets one header. Every request
that lacks client_address or client_port, or is malformed, gets ``action=DUNNO``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal

from spamflow.proxy.flowid import FLOW_HEADER, make_flow_header_value

logger = logging.getLogger(__name__)

# Maximum length of one attribute line, in bytes. Postfix's own policy client limits
# attribute values to a few kB, so a longer line is malformed input.
MAX_ATTRIBUTE_LINE_BYTES = 8192
# Maximum number of attributes in one request. Postfix 3.7 sends about 30.
MAX_ATTRIBUTES = 256
# Seconds an idle connection may stay open between requests. Postfix closes idle
# policy connections after smtpd_policy_service_max_idle (300 s by default).
IDLE_TIMEOUT = 600.0

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
    """Return the action for one request: PREPEND of the flow header, or DUNNO."""
    if attributes.get("request") != "smtpd_access_policy":
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

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve_connection, self.host, self.port, limit=MAX_ATTRIBUTE_LINE_BYTES
        )
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]
        logger.info("policy service listening on %s:%s", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            logger.info("policy service stopped")

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                lines = await self._read_request(reader, peer)
                if lines is None:
                    break
                writer.write(self._answer(lines, peer).encode("utf-8"))
                await writer.drain()
        except (ConnectionError, TimeoutError) as error:
            logger.info("policy connection from %s ended: %s", peer, error)
        except Exception:
            logger.exception("policy connection from %s failed", peer)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _read_request(
        self, reader: asyncio.StreamReader, peer: object
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
                logger.warning("policy request from %s has an over-long line", peer)
                lines.append(b"")
                continue
            if not line.endswith(b"\n"):
                if line or lines:
                    logger.warning("policy client %s closed mid-request", peer)
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

    def _answer(self, lines: list[bytes], peer: object) -> str:
        try:
            attributes = parse_attribute_lines(lines)
        except PolicyRequestError as error:
            logger.warning(
                "malformed policy request from %s (%s), replying action=DUNNO", peer, error
            )
            return f"action={DUNNO}\n\n"
        action = decide_action(attributes, self.key)
        logger.info(
            "policy queue_id=%s client=%s:%s state=%s action=%s",
            attributes.get("queue_id", "-") or "-",
            attributes.get("client_address", "-"),
            attributes.get("client_port", "-"),
            attributes.get("protocol_state", "-"),
            action,
        )
        return f"action={action}\n\n"


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
