"""Framing of the spamc/spamd protocol (SPAMC/1.x requests, SPAMD/1.x responses).

The wire format is described in SpamAssassin's spamd/PROTOCOL. Facts that the
description leaves open were read from spamd 4.0.1 (``/usr/sbin/spamd``):

* spamd matches header names case-sensitively (``Content-length``, ``User``,
  ``Compress``) and ignores other spellings. This parser matches names
  case-insensitively, so the proxy checks the spelling before it rewrites a request.
* spamd ends a header line only at CRLF. A bare LF leaves the line unterminated.
* spamd reads at most 256 request header lines.
* The ``Spam`` response header reads ``True``/``False`` and, for REPORT_IFSPAM,
  ``Yes``/``No``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

CRLF = b"\r\n"
HEAD_END = b"\r\n\r\n"

# Maximum size of a request line, in bytes. spamc writes at most ~30 bytes.
MAX_REQUEST_LINE_BYTES = 256
# Maximum number of request header lines. spamd 4.0.1 rejects more than 256.
MAX_REQUEST_HEADERS = 256
# Maximum size of a request head (request line, headers and blank line), in bytes.
# spamc writes fewer than 200 bytes. This limit is the proxy's own choice.
MAX_REQUEST_HEAD_BYTES = 16 * 1024
# Bytes of a response that the proxy keeps to parse its head. A PROCESS response
# relays the whole message, but only the head is parsed.
MAX_RESPONSE_HEAD_BYTES = 16 * 1024

# Methods defined by protocol 1.5.
METHODS = frozenset(
    {"CHECK", "SYMBOLS", "REPORT", "REPORT_IFSPAM", "SKIP", "PING", "PROCESS", "TELL", "HEADERS"}
)
# Methods that make spamd score a message, so a verdict header can take part.
SCORED_METHODS = frozenset({"CHECK", "SYMBOLS", "REPORT", "REPORT_IFSPAM", "PROCESS", "HEADERS"})
# Methods whose request carries a message after the head.
BODY_METHODS = SCORED_METHODS | {"TELL"}


class SpamdExitCode(enum.IntEnum):
    """Response codes of spamd, taken from BSD sysexits.h (as listed in spamd 4.0.1)."""

    EX_OK = 0
    EX_USAGE = 64
    EX_DATAERR = 65
    EX_NOINPUT = 66
    EX_NOUSER = 67
    EX_NOHOST = 68
    EX_UNAVAILABLE = 69
    EX_SOFTWARE = 70
    EX_OSERR = 71
    EX_OSFILE = 72
    EX_CANTCREAT = 73
    EX_IOERR = 74
    EX_TEMPFAIL = 75
    EX_PROTOCOL = 76
    EX_NOPERM = 77
    EX_CONFIG = 78
    EX_TIMEOUT = 79


class SpamdProtocolError(ValueError):
    """An invalid or unsupported request or response head."""


_REQUEST_LINE = re.compile(rb"([A-Z_]+) SPAMC/([0-9]+)\.([0-9]+)")
_RESPONSE_LINE = re.compile(rb"SPAMD/([0-9]+)\.([0-9]+) +([0-9]+)(?: (.*))?")
# Field name: printable ASCII without the colon, as spamd splits at the first colon.
_HEADER_LINE = re.compile(rb"([!-9;-~]+):[ \t]*(.*)")
_SPAM_VALUE = re.compile(
    rb"\s*(True|False|Yes|No)\s*;\s*(-?[0-9]+(?:\.[0-9]+)?)\s*/\s*(-?[0-9]+(?:\.[0-9]+)?)\s*"
)


@dataclass(frozen=True)
class Header:
    """One header line: the name and value as sent, and the raw line without CRLF."""

    name: bytes
    value: bytes
    raw: bytes


@dataclass(frozen=True)
class RequestHead:
    method: str
    version: tuple[int, int]
    headers: tuple[Header, ...]
    raw: bytes

    def find(self, name: str) -> list[Header]:
        """Return the headers whose name equals name, ignoring case, in wire order."""
        wanted = name.lower().encode("ascii")
        return [header for header in self.headers if header.name.lower() == wanted]

    def content_length(self) -> int | None:
        """Return the value of the single Content-length header.

        Returns None when the header is absent. Raises SpamdProtocolError when it is
        repeated or not a decimal number.
        """
        found = self.find("Content-length")
        if not found:
            return None
        if len(found) > 1:
            raise SpamdProtocolError("repeated Content-length header")
        value = found[0].value.strip()
        if not value.isdigit():
            raise SpamdProtocolError(f"invalid Content-length {value[:20]!r}")
        return int(value)

    def with_content_length(self, length: int) -> bytes:
        """Return the raw head with the Content-length value set to length.

        The header name keeps its original spelling and every other line keeps its
        bytes. Raises SpamdProtocolError when there is no single Content-length.
        """
        found = self.find("Content-length")
        if len(found) != 1:
            raise SpamdProtocolError("expected exactly one Content-length header")
        lines = [self.raw.split(CRLF, 1)[0]]
        for header in self.headers:
            if header is found[0]:
                lines.append(header.name + b": " + str(length).encode("ascii"))
            else:
                lines.append(header.raw)
        return CRLF.join(lines) + HEAD_END


@dataclass(frozen=True)
class SpamResult:
    """Value of the ``Spam`` response header."""

    is_spam: bool
    score: float
    threshold: float


@dataclass(frozen=True)
class ResponseHead:
    version: tuple[int, int]
    code: int
    message: str
    headers: tuple[Header, ...]

    def spam(self) -> SpamResult | None:
        """Parse the ``Spam`` header, or return None when the response has none.

        Raises SpamdProtocolError on a malformed value.
        """
        for header in self.headers:
            if header.name.lower() == b"spam":
                return parse_spam_value(header.value)
        return None


def parse_request_line(line: bytes) -> tuple[str, tuple[int, int]]:
    """Return (method, version) of a request line with or without its CRLF.

    Raises SpamdProtocolError unless the line is exactly ``METHOD SPAMC/x.y`` with a
    method that protocol 1.5 defines.
    """
    if len(line) > MAX_REQUEST_LINE_BYTES:
        raise SpamdProtocolError(f"request line longer than {MAX_REQUEST_LINE_BYTES} bytes")
    if line.endswith(CRLF):
        line = line[:-2]
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise SpamdProtocolError(f"invalid request line {line[:40]!r}")
    method = match.group(1).decode("ascii")
    if method not in METHODS:
        raise SpamdProtocolError(f"unknown method {method!r}")
    return method, (int(match.group(2)), int(match.group(3)))


def parse_header_lines(block: bytes) -> tuple[Header, ...]:
    """Parse CRLF-terminated ``Name: value`` lines. Raises SpamdProtocolError."""
    if not block:
        return ()
    if not block.endswith(CRLF):
        raise SpamdProtocolError("header block does not end with CRLF")
    lines = block[:-2].split(CRLF)
    if len(lines) > MAX_REQUEST_HEADERS:
        raise SpamdProtocolError(f"more than {MAX_REQUEST_HEADERS} header lines")
    headers = []
    for line in lines:
        match = _HEADER_LINE.fullmatch(line)
        if match is None or b"\n" in line or b"\r" in line:
            raise SpamdProtocolError(f"invalid header line {line[:40]!r}")
        headers.append(Header(name=match.group(1), value=match.group(2), raw=line))
    return tuple(headers)


def parse_request_head(raw: bytes) -> RequestHead:
    """Parse a request head ending with the blank line (CRLF CRLF).

    Raises SpamdProtocolError on any deviation from the framing spamc writes.
    """
    if len(raw) > MAX_REQUEST_HEAD_BYTES:
        raise SpamdProtocolError(f"request head longer than {MAX_REQUEST_HEAD_BYTES} bytes")
    if not raw.endswith(HEAD_END):
        raise SpamdProtocolError("request head does not end with a blank line")
    line, _, rest = raw.partition(CRLF)
    method, version = parse_request_line(line)
    headers = parse_header_lines(rest[:-2])
    return RequestHead(method=method, version=version, headers=headers, raw=raw)


def parse_response_head(data: bytes) -> ResponseHead:
    """Parse the start of a spamd response: the status line and its headers.

    data may hold more than the head (the body is ignored) or only a status line,
    as in spamd's error and PONG responses. Raises SpamdProtocolError.
    """
    line, separator, rest = data.partition(CRLF)
    if not separator:
        raise SpamdProtocolError("response status line does not end with CRLF")
    match = _RESPONSE_LINE.fullmatch(line)
    if match is None:
        raise SpamdProtocolError(f"invalid response line {line[:60]!r}")
    headers: tuple[Header, ...] = ()
    if rest and not rest.startswith(CRLF):
        block, found_end, _ = rest.partition(HEAD_END)
        if not found_end:
            raise SpamdProtocolError("response head does not end with a blank line")
        headers = parse_header_lines(block + CRLF)
    message = (match.group(4) or b"").decode("utf-8", errors="replace")
    return ResponseHead(
        version=(int(match.group(1)), int(match.group(2))),
        code=int(match.group(3)),
        message=message,
        headers=headers,
    )


def parse_spam_value(value: bytes) -> SpamResult:
    """Parse a ``Spam`` header value such as ``True ; 15.0 / 5.0``."""
    match = _SPAM_VALUE.fullmatch(value)
    if match is None:
        raise SpamdProtocolError(f"invalid Spam header value {value[:60]!r}")
    return SpamResult(
        is_spam=match.group(1) in (b"True", b"Yes"),
        score=float(match.group(2)),
        threshold=float(match.group(3)),
    )


def format_request(method: str, message: bytes, user: bytes | None = None) -> bytes:
    """Build a protocol 1.5 request for method carrying message."""
    lines = [f"{method} SPAMC/1.5".encode("ascii")]
    if user is not None:
        lines.append(b"User: " + user)
    lines.append(b"Content-length: " + str(len(message)).encode("ascii"))
    return CRLF.join(lines) + HEAD_END + message
