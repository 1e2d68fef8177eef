"""The flow-identity header that ties a message to the TCP connection that delivered it.

The Postfix policy service prepends ``X-Spamflow-Flow: IP:PORT; t=UNIX; mac=HEX`` and the
proxy reads it back. ``mac`` is the first 32 hex digits of HMAC-SHA256, keyed with the
key file's bytes, over the ASCII text ``IP:PORT;t`` (IPv6 addresses in brackets, as in
``[2001:db8::1]:40211;1733327000``). Without a key the value is only ``IP:PORT``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import stat
import time
from dataclasses import dataclass

from spamflow.nfqueue_tap.protocol import format_flow

FLOW_HEADER = "X-Spamflow-Flow"
MAC_HEX_DIGITS = 32
# Default maximum age of a flow header, in seconds.
DEFAULT_MAX_AGE = 7 * 24 * 3600.0
# Default tolerance for a timestamp ahead of the local clock, in seconds.
DEFAULT_MAX_SKEW = 300.0
# Key files larger than this are rejected as not being a key.
MAX_KEY_BYTES = 4096

_VALUE = re.compile(
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[0-9.]+):(?P<port>[0-9]{1,5})"
    r"(?:\s*;\s*t=(?P<t>[0-9]{1,12})\s*;\s*mac=(?P<mac>[0-9a-f]+))?\s*"
)


class FlowIdError(ValueError):
    """A flow-identity header value that is malformed, forged or out of date."""


class FlowKeyError(ValueError):
    """A flow key file that is missing, unreadable, empty or unsafely shared."""


@dataclass(frozen=True)
class FlowIdentity:
    ip: str
    port: int
    timestamp: int | None = None
    mac: str | None = None

    @property
    def flow(self) -> str:
        """Flow key ``IP:PORT`` as the tap writes it."""
        return format_flow(self.ip, self.port)


def compute_mac(key: bytes, ip: str, port: int, timestamp: int) -> str:
    """Return the 32 hex digit MAC of a flow and its timestamp."""
    text = f"{format_flow(ip, port)};{timestamp}".encode("ascii")
    return hmac.new(key, text, hashlib.sha256).hexdigest()[:MAC_HEX_DIGITS]


def make_flow_header_value(
    ip: str, port: int, key: bytes | None, now: float | None = None
) -> str:
    """Write the header value for a flow, with t and mac when a key is given.

    Raises ValueError on an invalid IP address or port.
    """
    address = ipaddress.ip_address(ip)
    if not 0 < port < 65536:
        raise ValueError(f"invalid TCP port {port}: expected 1-65535")
    flow = format_flow(str(address), port)
    if key is None:
        return flow
    timestamp = int(time.time() if now is None else now)
    return f"{flow}; t={timestamp}; mac={compute_mac(key, str(address), port, timestamp)}"


def parse_flow_header_value(value: str) -> FlowIdentity:
    """Split a header value into its parts without checking the MAC. Raises FlowIdError."""
    match = _VALUE.fullmatch(value.strip())
    if match is None:
        raise FlowIdError(f"invalid flow header value {value[:80]!r}")
    try:
        ip = str(ipaddress.ip_address(match.group("host").strip("[]")))
    except ValueError as error:
        raise FlowIdError(f"invalid IP address in flow header {value[:80]!r}") from error
    port = int(match.group("port"))
    if not 0 < port < 65536:
        raise FlowIdError(f"invalid TCP port {port} in flow header")
    timestamp = match.group("t")
    return FlowIdentity(
        ip=ip,
        port=port,
        timestamp=int(timestamp) if timestamp is not None else None,
        mac=match.group("mac"),
    )


def verify_flow_header_value(
    value: str,
    key: bytes | None,
    now: float | None = None,
    max_age: float = DEFAULT_MAX_AGE,
    max_skew: float = DEFAULT_MAX_SKEW,
) -> FlowIdentity:
    """Return the flow of a header value, or raise FlowIdError.

    With a key, the value must carry t and a valid mac, and t must lie between
    max_age seconds in the past and max_skew seconds in the future. Without a key,
    t and mac are ignored, because nothing can vouch for them.
    """
    identity = parse_flow_header_value(value)
    if key is None:
        return identity
    if identity.timestamp is None or identity.mac is None:
        raise FlowIdError(f"flow header for {identity.flow} has no t and mac")
    expected = compute_mac(key, identity.ip, identity.port, identity.timestamp)
    if not hmac.compare_digest(expected, identity.mac):
        raise FlowIdError(f"invalid mac in flow header for {identity.flow}")
    current = time.time() if now is None else now
    if identity.timestamp < current - max_age:
        raise FlowIdError(
            f"flow header for {identity.flow} is older than {max_age:.0f} s "
            f"(t={identity.timestamp})"
        )
    if identity.timestamp > current + max_skew:
        raise FlowIdError(
            f"flow header for {identity.flow} is more than {max_skew:.0f} s in the future "
            f"(t={identity.timestamp})"
        )
    return identity


def load_flow_key(path: str) -> bytes:
    """Read a flow key file and return its bytes.

    Raises FlowKeyError when the file is missing, not a regular file, empty, larger
    than MAX_KEY_BYTES, readable or writable by group or others, or owned by a user
    other than root or the effective user.
    """
    try:
        # O_NONBLOCK keeps a FIFO from blocking the open. The type check below rejects it.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        descriptor = os.open(path, flags)
    except OSError as error:
        raise FlowKeyError(f"cannot open flow key file {path}: {error.strerror}") from error
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        raise FlowKeyError(f"flow key file {path} is not a regular file")
    with os.fdopen(descriptor, "rb") as handle:
        if info.st_mode & 0o077:
            raise FlowKeyError(
                f"flow key file {path} has mode {stat.S_IMODE(info.st_mode):04o}, "
                f"which group or others can access; run: chmod 600 {path}"
            )
        if info.st_uid not in (0, os.geteuid()):
            raise FlowKeyError(
                f"flow key file {path} is owned by uid {info.st_uid}, "
                f"expected root or uid {os.geteuid()}"
            )
        key = handle.read(MAX_KEY_BYTES + 1)
    if not key:
        raise FlowKeyError(f"flow key file {path} is empty")
    if len(key) > MAX_KEY_BYTES:
        raise FlowKeyError(f"flow key file {path} is larger than {MAX_KEY_BYTES} bytes")
    return key
