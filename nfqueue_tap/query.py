"""Unix socket server that looks up FLOW requests (see protocol.py) in a flow table."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import Any

from spamflow.nfqueue_tap.flows import FlowTable
from spamflow.nfqueue_tap.protocol import (
    MAX_REQUEST_LINE,
    ProtocolError,
    format_flow,
    format_response,
    parse_request,
)

log = logging.getLogger(__name__)

# Seconds a client may take to send each request line before the server closes it.
REQUEST_TIMEOUT = 30.0

SOCKET_MODE = 0o660


class TapSocketError(OSError):
    """The query socket path cannot be used."""


def answer_request(table: FlowTable, line: bytes, now: float) -> dict[str, Any]:
    """Build the response to one request line (without its line ending)."""
    try:
        ip, port = parse_request(line)
    except ProtocolError as error:
        return {"status": "error", "message": str(error)}

    flow = format_flow(ip, port)
    result = table.lookup(ip, port, now)
    if result is None:
        return {"status": "not-found", "flow": flow}
    return {
        "status": "ok",
        "flow": flow,
        "state": result["state"],
        "features": result["features"],
    }


def prepare_socket_path(path: str) -> None:
    """Create the socket's parent directory and remove a stale socket file.

    Raises TapSocketError if the path is not a socket or another process accepts
    connections on it.
    """
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise TapSocketError(f"{path} exists and is not a socket; remove it or set another path")

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s", path)
        os.unlink(path)
        return
    finally:
        probe.close()
    raise TapSocketError(f"another process is serving on {path}; stop it or set another path")


class QueryServer:
    """Serve FLOW requests for one flow table on a Unix socket.

    Each connection may send several requests, one line each. A connection is closed
    after an over-long line or when no full line arrives within request_timeout.
    """

    def __init__(
        self,
        table: FlowTable,
        path: str,
        *,
        request_timeout: float = REQUEST_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = table
        self.path = path
        self.request_timeout = request_timeout
        self.clock = clock
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._connection_ids = itertools.count(1)
        self._handlers: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Bind the socket with mode 0660. Raises TapSocketError or OSError."""
        prepare_socket_path(self.path)

        # The umask keeps the socket from being wider than 0660 before chmod runs.
        old_umask = os.umask(0o117)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve_connection, path=self.path, limit=MAX_REQUEST_LINE + 2
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.path, SOCKET_MODE)
        self._inode = os.stat(self.path).st_ino
        log.info("query socket listening on %s", self.path)

    async def close(self) -> None:
        """Stop listening, end open connections and remove the socket file if ours."""
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        log.info("query socket %s closed", self.path)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        connection = next(self._connection_ids)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        try:
            await self._serve_requests(connection, reader, writer)
        except (ConnectionError, BrokenPipeError) as error:
            log.debug("connection %d: closed by client: %s", connection, error)
        except Exception:
            log.exception("connection %d: request handling failed", connection)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, BrokenPipeError):
                await writer.wait_closed()

    async def _serve_requests(
        self, connection: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), self.request_timeout)
            except TimeoutError:
                log.debug(
                    "connection %d: no request within %.1f s, closing",
                    connection, self.request_timeout,
                )
                return
            except ValueError:
                log.warning(
                    "connection %d: request line longer than %d bytes, closing",
                    connection, MAX_REQUEST_LINE,
                )
                message = f"request line longer than {MAX_REQUEST_LINE} bytes"
                writer.write(format_response({"status": "error", "message": message}))
                await writer.drain()
                return
            if not line:
                return

            response = self._answer(connection, line.rstrip(b"\r\n"))
            writer.write(format_response(response))
            await writer.drain()

    def _answer(self, connection: int, line: bytes) -> dict[str, Any]:
        try:
            response = answer_request(self.table, line, self.clock())
        except Exception:
            log.exception("connection %d: lookup failed for %r", connection, line[:60])
            return {"status": "error", "message": "internal error during lookup"}
        log.debug(
            "connection %d: %s -> %s",
            connection, response.get("flow", line[:60]), response["status"],
        )
        return response
