"""Line protocol between the tap's Unix socket server and its clients.

A client sends one request line and reads one JSON response line per request::

    FLOW 192.0.2.7 40211\n
    {"status": "ok", "flow": "192.0.2.7:40211", "state": "closed", "features": {...}}\n

``status`` is ``ok``, ``not-found`` or ``error`` (with a ``message``). The flow key is
the remote peer's address and TCP port as seen by the mail server.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

# Maximum length of a request line that the server reads, in bytes.
MAX_REQUEST_LINE = 128


class ProtocolError(ValueError):
    """An invalid request or response line."""


def format_flow(ip: str, port: int) -> str:
    """Write a flow key as ``IP:PORT``, with brackets around an IPv6 address."""
    if ":" in ip:
        return f"[{ip}]:{port}"
    return f"{ip}:{port}"


def parse_flow(text: str) -> tuple[str, int]:
    """Read a flow key written by format_flow. Raises ProtocolError."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        raise ProtocolError(f"invalid flow {text!r}: expected IP:PORT")
    return _validate(host.strip("[]"), port_text)


def format_request(ip: str, port: int) -> bytes:
    return f"FLOW {ip} {port}\n".encode("ascii")


def parse_request(line: bytes) -> tuple[str, int]:
    """Return (ip, port) of a FLOW request line. Raises ProtocolError."""
    if len(line) > MAX_REQUEST_LINE:
        raise ProtocolError(f"request line longer than {MAX_REQUEST_LINE} bytes")
    try:
        words = line.decode("ascii").split()
    except UnicodeDecodeError as error:
        raise ProtocolError("request line is not ASCII") from error
    if len(words) != 3 or words[0] != "FLOW":
        raise ProtocolError(f"invalid request {line[:40]!r}: expected 'FLOW IP PORT'")
    return _validate(words[1], words[2])


def format_response(response: dict[str, Any]) -> bytes:
    return json.dumps(response, separators=(",", ":")).encode("utf-8") + b"\n"


def parse_response(line: bytes) -> dict[str, Any]:
    """Decode one response line. Raises ProtocolError unless it is a JSON object."""
    try:
        response = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProtocolError(f"invalid response line: {error}") from error
    if not isinstance(response, dict) or "status" not in response:
        raise ProtocolError("invalid response line: expected an object with 'status'")
    return response


def _validate(ip_text: str, port_text: str) -> tuple[str, int]:
    try:
        ip = str(ipaddress.ip_address(ip_text))
    except ValueError as error:
        raise ProtocolError(f"invalid IP address {ip_text!r}") from error
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ProtocolError(f"invalid TCP port {port_text!r}: expected 1-65535")
    return ip, int(port_text)
