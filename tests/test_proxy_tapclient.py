"""Tests of the tap socket client and the rate-limited failure log."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from spamflow.proxy import tapclient
from spamflow.proxy.ratelimit import RateLimitedLog
from spamflow.proxy.tapclient import query_tap_features


@pytest.fixture(autouse=True)
def unlimited_failure_log(monkeypatch):
    monkeypatch.setattr(tapclient, "_failures", RateLimitedLog(tapclient.logger, interval=0))


async def _tap(path: str, reply: bytes, delay: float = 0.0) -> asyncio.Server:
    async def serve(reader, writer):
        await reader.readline()
        await asyncio.sleep(delay)
        writer.write(reply)
        await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(serve, path)


@pytest.mark.parametrize(
    "reply,expected",
    [
        (b'{"status":"ok","features":{"syn_ttl":52,"duration_s":1.5}}\n',
         {"syn_ttl": 52.0, "duration_s": 1.5}),
        (b'{"status":"not-found","flow":"10.0.0.1:1"}\n', None),
        (b'{"status":"error","message":"table full"}\n', None),
        (b'{"status":"ok"}\n', None),
        (b'{"status":"ok","features":{"syn_ttl":"52"}}\n', None),
        (b'{"status":"ok","features":{"syn_ttl":true}}\n', None),
        (b'{"status":"ok","features":{"syn_ttl":NaN}}\n', None),
        (b"not json\n", None),
        (b'{"status":"ok","features":{}}', None),
    ],
)
async def test_query_replies(tmp_path, reply, expected):
    path = str(tmp_path / "tap.sock")
    server = await _tap(path, reply)
    try:
        assert await query_tap_features(path, "10.0.0.1", 1, 1.0) == expected
    finally:
        server.close()


async def test_query_missing_socket(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="spamflow.proxy.tapclient")
    assert await query_tap_features(str(tmp_path / "absent.sock"), "10.0.0.1", 1, 1.0) is None
    assert "tap query for 10.0.0.1:1 failed" in caplog.text


async def test_query_timeout_bounded(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="spamflow.proxy.tapclient")
    path = str(tmp_path / "tap.sock")
    tap_delay = 10.0
    server = await _tap(path, b'{"status":"ok","features":{}}\n', delay=tap_delay)
    try:
        started = time.monotonic()
        assert await query_tap_features(path, "10.0.0.1", 1, 0.2) is None
        elapsed = time.monotonic() - started
    finally:
        server.close()
    # Far below the tap's delay, with room for a slow, shared machine.
    assert elapsed < tap_delay / 2
    assert "timed out after 0.200 s" in caplog.text


def test_rate_limited_log_counts(caplog):
    caplog.set_level(logging.WARNING, logger="test.ratelimit")
    now = [100.0]
    log = RateLimitedLog(logging.getLogger("test.ratelimit"), interval=60.0,
                         clock=lambda: now[0])
    assert log.warning("failure %d", 1) is True
    now[0] = 130.0
    assert log.warning("failure %d", 2) is False
    now[0] = 159.9
    assert log.warning("failure %d", 3) is False
    now[0] = 160.0
    assert log.warning("failure %d", 4) is True
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["failure 1", "failure 4 (2 similar messages suppressed)"]
