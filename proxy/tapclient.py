"""Client of the tap's Unix socket: the TCP features of one flow."""

from __future__ import annotations

import asyncio
import logging
import math

from spamflow.nfqueue_tap.protocol import ProtocolError, format_request, parse_response
from spamflow.proxy.ratelimit import RateLimitedLog

logger = logging.getLogger(__name__)
_failures = RateLimitedLog(logger)

# Maximum size of one response line from the tap, in bytes.
MAX_RESPONSE_LINE_BYTES = 64 * 1024


# Results of one tap query, as query_tap returns them.
TAP_RESULTS = ("ok", "not_found", "error", "timeout")


async def query_tap_features(
    socket_path: str, ip: str, port: int, timeout: float
) -> dict[str, float] | None:
    """Ask the tap for the features of the flow ip:port, or return None without them.

    query_tap describes when the features are missing.
    """
    _, features = await query_tap(socket_path, ip, port, timeout)
    return features


async def query_tap(
    socket_path: str, ip: str, port: int, timeout: float
) -> tuple[str, dict[str, float] | None]:
    """Ask the tap for the features of the flow ip:port and return (result, features).

    result is one of TAP_RESULTS. The features are None unless it is "ok": when the tap
    does not know the flow ("not_found"), fails ("error") or does not respond within
    timeout seconds, connect included ("timeout"). Failures are logged at a limited rate,
    and a not-found flow at DEBUG.
    """
    try:
        async with asyncio.timeout(timeout):
            response = await _exchange(socket_path, format_request(ip, port))
    except TimeoutError:
        _failures.warning("tap query for %s:%s timed out after %.3f s", ip, port, timeout)
        return "timeout", None
    except (OSError, ProtocolError, ValueError) as error:
        _failures.warning("tap query for %s:%s failed: %s", ip, port, error)
        return "error", None

    status = response.get("status")
    if status == "not-found":
        logger.debug("tap has no flow %s:%s", ip, port)
        return "not_found", None
    if status != "ok":
        _failures.warning(
            "tap returned status %r for %s:%s: %s", status, ip, port, response.get("message")
        )
        return "error", None
    features = _features(response.get("features"), ip, port)
    return ("error", None) if features is None else ("ok", features)


async def _exchange(socket_path: str, request: bytes) -> dict:
    reader, writer = await asyncio.open_unix_connection(
        socket_path, limit=MAX_RESPONSE_LINE_BYTES
    )
    try:
        writer.write(request)
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
    if not line.endswith(b"\n"):
        raise ProtocolError("tap closed the connection before a full response line")
    return parse_response(line)


def _features(raw: object, ip: str, port: int) -> dict[str, float] | None:
    if not isinstance(raw, dict):
        _failures.warning("tap response for %s:%s has no features object", ip, port)
        return None
    features: dict[str, float] = {}
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _failures.warning("tap feature %r for %s:%s is not a number", name, ip, port)
            return None
        if not math.isfinite(value):
            _failures.warning("tap feature %r for %s:%s is not finite", name, ip, port)
            return None
        features[str(name)] = float(value)
    return features
