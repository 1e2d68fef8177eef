"""Tests of the spamd proxy against fake spamd and tap servers on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from dataclasses import dataclass, field

import pytest

from spamflow.config import ConfigError, ProxyConfig
from spamflow.proxy.flowid import make_flow_header_value
from spamflow.proxy.server import ProxyServer, check_spamd_address

KEY = b"unit-test-key"
FLOW_IP = "10.77.1.2"
FLOW_PORT = 40211
FEATURES = {"syn_ttl": 52.0, "handshake_rtt_ms": 180.5, "retransmissions_in": 3.0}
# Scores the fake spamd gives a message with and without the verdict header.
SCORE_WITH_VERDICT = 7.5
SCORE_WITHOUT_VERDICT = 6.5

MESSAGE_BODY = b"Hello,\r\n\r\nX-Spamflow: p=0.00; this line is body text\r\n.\r\n"


def _message(flow_value: str | None, forged: bool = False) -> bytes:
    headers = b""
    if flow_value is not None:
        headers += b"X-Spamflow-Flow: " + flow_value.encode() + b"\r\n"
    headers += b"Received: from mx.example.net (10.77.1.2) by mail.example.org\r\n"
    if forged:
        headers += b"X-Spamflow: p=0.00; model=forged-1;\r\n flow=1.1.1.1:1\r\n"
    headers += b"Message-Id: <unit-1@example.net>\r\nSubject: test\r\n\r\n"
    return headers + MESSAGE_BODY


def _signed_message(forged: bool = False) -> bytes:
    return _message(make_flow_header_value(FLOW_IP, FLOW_PORT, KEY), forged)


def _request(method: str, message: bytes, extra: bytes = b"") -> bytes:
    head = (
        f"{method} SPAMC/1.5\r\nUser: mailuser\r\n".encode()
        + extra
        + f"Content-length: {len(message)}\r\n\r\n".encode()
    )
    return head + message


@dataclass
class FakeSpamd:
    """Records each request (read to EOF) and replies to it as spamd would."""

    requests: list[bytes] = field(default_factory=list)
    fixed_response: bytes | None = None
    server: asyncio.Server | None = None
    port: int = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer) -> None:
        data = await reader.read()
        self.requests.append(data)
        writer.write(self._answer(data))
        await writer.drain()
        writer.close()

    def _answer(self, data: bytes) -> bytes:
        if self.fixed_response is not None:
            return self.fixed_response
        head, _, body = data.partition(b"\r\n\r\n")
        if b"Compress: zlib" in head:
            body = zlib.decompress(body)
        message_head = b"\n" + body.partition(b"\r\n\r\n")[0]
        score = SCORE_WITH_VERDICT if b"\nX-Spamflow:" in message_head else SCORE_WITHOUT_VERDICT
        spam = f"Spam: True ; {score} / 5.0".encode()
        if head.startswith(b"PROCESS"):
            return (
                b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\n" % len(body)
                + spam + b"\r\n\r\n" + body
            )
        return b"SPAMD/1.1 0 EX_OK\r\n" + spam + b"\r\n\r\n"

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


@dataclass
class FakeTap:
    path: str
    delay: float = 0.0
    queries: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, self.path)

    async def _serve(self, reader, writer) -> None:
        line = await reader.readline()
        self.queries.append(line)
        await asyncio.sleep(self.delay)
        response = {"status": "ok", "flow": f"{FLOW_IP}:{FLOW_PORT}", "features": FEATURES}
        writer.write(json.dumps(response).encode() + b"\n")
        await writer.drain()
        writer.close()

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


class FakeModel:
    name = "fake-3"

    def __init__(self, p: float = 0.93, error: Exception | None = None) -> None:
        self.p = p
        self.error = error
        self.inputs: list[dict] = []

    def predict_spam_probability(self, features):
        self.inputs.append(dict(features))
        if self.error is not None:
            raise self.error
        return self.p


class FakeLearner:
    def __init__(self, model) -> None:
        self.model = model
        self.observations: list[dict] = []

    def label_for(self, base_score: float):
        if base_score >= 6.0:
            return 1
        if base_score <= 0.0:
            return 0
        return None

    def observe(self, observation) -> None:
        self.observations.append(observation)

    reloads = 0

    def reload_if_changed(self) -> bool:
        self.reloads += 1
        if self.reloads == 2:
            raise OSError("model file unreadable")
        return False


@pytest.fixture
async def spamd():
    fake = FakeSpamd()
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def tap(tmp_path):
    fake = FakeTap(str(tmp_path / "tap.sock"))
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
def learner():
    return FakeLearner(FakeModel())


async def _start_proxy(spamd, tap, learner, reload_interval=30.0, **overrides) -> ProxyServer:
    config = ProxyConfig(
        listen="127.0.0.1:0",
        spamd=f"127.0.0.1:{spamd.port}",
        tap_socket=tap.path,
        tap_timeout=0.5,
        trusted_mta=["127.0.0.1"],
        flow_key_file="(unused)",
        client_timeout=5.0,
        spamd_timeout=5.0,
    )
    for name, value in overrides.items():
        setattr(config, name, value)
    server = ProxyServer(
        config, learner, KEY, observation_factory=dict, model_reload_interval=reload_interval
    )
    await server.start()
    return server


@pytest.fixture
async def proxy(spamd, tap, learner):
    server = await _start_proxy(spamd, tap, learner)
    yield server
    await server.shutdown(timeout=5)


async def _send(port: int, data: bytes, half_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    if half_close:
        writer.write_eof()
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return response


async def _drain(server: ProxyServer) -> None:
    await server.wait_idle(10)


def _forwarded_message(request: bytes) -> bytes:
    return request.partition(b"\r\n\r\n")[2]


async def test_verdict_inserted(proxy, spamd, tap, learner):
    message = _signed_message()
    response = await _send(proxy.listen_port, _request("PROCESS", message))
    await _drain(proxy)

    forwarded = spamd.requests[0]
    head, _, body = forwarded.partition(b"\r\n\r\n")
    verdict = b"X-Spamflow: p=0.93; model=fake-3; flow=10.77.1.2:40211\r\n"
    assert body == verdict + message
    assert head == b"PROCESS SPAMC/1.5\r\nUser: mailuser\r\nContent-length: %d" % len(body)
    assert response == spamd._answer(forwarded)
    assert tap.queries == [b"FLOW 10.77.1.2 40211\n"]
    assert learner.model.inputs == [FEATURES]


async def test_base_score_from_internal_check(proxy, spamd, learner):
    message = _signed_message()
    await _send(proxy.listen_port, _request("CHECK", message))
    await _drain(proxy)

    assert len(spamd.requests) == 2
    internal = spamd.requests[1]
    assert internal == b"CHECK SPAMC/1.5\r\nUser: mailuser\r\nContent-length: %d\r\n\r\n" % len(
        message
    ) + message
    (observation,) = learner.observations
    assert observation["score"] == SCORE_WITH_VERDICT
    assert observation["base_score"] == SCORE_WITHOUT_VERDICT
    assert observation["threshold"] == 5.0
    assert observation["label"] == 1
    assert observation["p"] == 0.93
    assert observation["model"] == "fake-3"
    assert observation["flow"] == "10.77.1.2:40211"
    assert observation["features"] == FEATURES
    assert observation["method"] == "CHECK"
    assert observation["message_id"] == "<unit-1@example.net>"


async def test_forged_header_stripped(proxy, spamd):
    message = _signed_message(forged=True)
    await _send(proxy.listen_port, _request("PROCESS", message))
    body = _forwarded_message(spamd.requests[0])
    assert body.count(b"X-Spamflow:") == 2  # our verdict and the body line
    assert b"forged-1" not in body
    assert b" flow=1.1.1.1:1" not in body
    assert body.endswith(b"Subject: test\r\n\r\n" + MESSAGE_BODY)


async def test_untrusted_client_no_verdict(spamd, tap, learner):
    server = await _start_proxy(spamd, tap, learner, trusted_mta=["10.9.9.9"])
    try:
        message = _signed_message(forged=True)
        await _send(server.listen_port, _request("SYMBOLS", message))
        await _drain(server)
    finally:
        await server.shutdown(timeout=5)

    body = _forwarded_message(spamd.requests[0])
    assert b"forged-1" not in body
    assert not body.startswith(b"X-Spamflow:")
    assert tap.queries == []
    assert len(spamd.requests) == 1
    (observation,) = learner.observations
    assert observation["flow"] is None
    assert observation["p"] is None
    assert observation["base_score"] == SCORE_WITHOUT_VERDICT


async def test_invalid_mac_no_verdict(proxy, spamd, tap):
    value = make_flow_header_value(FLOW_IP, FLOW_PORT, b"another key")
    await _send(proxy.listen_port, _request("PROCESS", _message(value)))
    assert not _forwarded_message(spamd.requests[0]).startswith(b"X-Spamflow:")
    assert tap.queries == []


async def test_only_topmost_flow_header(proxy, spamd, tap):
    valid = make_flow_header_value(FLOW_IP, FLOW_PORT, KEY)
    message = b"X-Spamflow-Flow: 10.1.1.1:1\r\n" + _message(valid)
    await _send(proxy.listen_port, _request("PROCESS", message))
    assert not _forwarded_message(spamd.requests[0]).startswith(b"X-Spamflow:")
    assert tap.queries == []


async def test_tap_timeout_no_verdict(spamd, tap, learner):
    tap.delay = 10.0
    server = await _start_proxy(spamd, tap, learner, tap_timeout=0.2)
    try:
        started = time.monotonic()
        await _send(server.listen_port, _request("PROCESS", _signed_message()))
        elapsed = time.monotonic() - started
        await _drain(server)
    finally:
        await server.shutdown(timeout=5)
    # Far below the tap's delay, with room for a slow, shared machine.
    assert elapsed < tap.delay / 2
    assert not _forwarded_message(spamd.requests[0]).startswith(b"X-Spamflow:")
    (observation,) = learner.observations
    assert observation["flow"] == "10.77.1.2:40211"
    assert observation["features"] is None


async def test_no_model_records_features(spamd, tap):
    learner = FakeLearner(None)
    server = await _start_proxy(spamd, tap, learner)
    try:
        await _send(server.listen_port, _request("CHECK", _signed_message()))
        await _drain(server)
    finally:
        await server.shutdown(timeout=5)
    assert not _forwarded_message(spamd.requests[0]).startswith(b"X-Spamflow:")
    (observation,) = learner.observations
    assert observation["features"] == FEATURES
    assert observation["p"] is None
    assert observation["base_score"] == SCORE_WITHOUT_VERDICT


async def test_model_error_fails_open(spamd, tap):
    learner = FakeLearner(FakeModel(error=RuntimeError("broken model")))
    server = await _start_proxy(spamd, tap, learner)
    try:
        message = _signed_message(forged=True)
        response = await _send(server.listen_port, _request("PROCESS", message))
        await _drain(server)
    finally:
        await server.shutdown(timeout=5)
    body = _forwarded_message(spamd.requests[0])
    assert response.startswith(b"SPAMD/1.1 0 EX_OK\r\n")
    assert not body.startswith(b"X-Spamflow:")
    assert b"forged-1" not in body


async def test_compressed_round_trip(proxy, spamd):
    message = _signed_message()
    compressed = zlib.compress(message)
    request = _request("PROCESS", compressed, extra=b"Compress: zlib\r\n")
    response = await _send(proxy.listen_port, request)

    head, _, body = spamd.requests[0].partition(b"\r\n\r\n")
    assert head == (
        b"PROCESS SPAMC/1.5\r\nUser: mailuser\r\nCompress: zlib\r\nContent-length: %d"
        % len(body)
    )
    inflated = zlib.decompress(body)
    assert inflated == b"X-Spamflow: p=0.93; model=fake-3; flow=10.77.1.2:40211\r\n" + message
    assert response.endswith(inflated)


MALFORMED_REQUESTS = {
    "unknown method": b"CHEK SPAMC/1.5\r\nContent-length: 3\r\n\r\nabc",
    "bad version": b"CHECK SPAMC/one\r\nContent-length: 3\r\n\r\nabc",
    "old version": b"CHECK SPAMC/1.0\r\nabc",
    "missing content-length": b"CHECK SPAMC/1.5\r\nUser: a\r\n\r\nabc",
    "non-numeric content-length": b"CHECK SPAMC/1.5\r\nContent-length: 3x\r\n\r\nabc",
    "lower-case content-length": b"CHECK SPAMC/1.5\r\ncontent-length: 3\r\n\r\nabc",
    "short body": b"CHECK SPAMC/1.5\r\nContent-length: 300\r\n\r\nabc",
    "bare LF head": b"CHECK SPAMC/1.5\nContent-length: 3\n\nabc",
    "header without colon": b"CHECK SPAMC/1.5\r\nGarbage\r\nContent-length: 3\r\n\r\nabc",
    "bad zlib": b"CHECK SPAMC/1.5\r\nCompress: zlib\r\nContent-length: 3\r\n\r\nabc",
    "unknown compression": b"CHECK SPAMC/1.5\r\nCompress: lzma\r\nContent-length: 3\r\n\r\nabc",
    "binary": b"\x00\xff\xfe garbage without newline",
    "empty": b"",
    "ping": b"PING SPAMC/1.5\r\n\r\n",
    "skip": b"SKIP SPAMC/1.5\r\n\r\n",
    "tell": b"TELL SPAMC/1.5\r\nMessage-class: spam\r\nSet: local\r\nContent-length: 3\r\n\r\nabc",
}


@pytest.mark.parametrize("name", sorted(MALFORMED_REQUESTS))
async def test_forwarded_unchanged(proxy, spamd, name):
    request = MALFORMED_REQUESTS[name] + (b"X-Spamflow: forged\r\n" if name == "tell" else b"")
    spamd.fixed_response = b"SPAMD/1.0 76 Bad header line: (test)\r\n"
    response = await _send(proxy.listen_port, request)
    assert spamd.requests == [request]
    assert response == spamd.fixed_response


async def test_oversized_forwarded_unchanged(spamd, tap, learner):
    server = await _start_proxy(spamd, tap, learner, max_message_size=100)
    try:
        message = _signed_message(forged=True)
        request = _request("PROCESS", message)
        spamd.fixed_response = b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 0.0 / 5.0\r\n\r\n"
        response = await _send(server.listen_port, request)
    finally:
        await server.shutdown(timeout=5)
    assert spamd.requests == [request]
    assert response == spamd.fixed_response


async def test_decompressed_oversize_forwarded_unchanged(spamd, tap, learner):
    server = await _start_proxy(spamd, tap, learner, max_message_size=1000)
    try:
        compressed = zlib.compress(b"Subject: a\r\n\r\n" + b"a" * 5000)
        request = _request("CHECK", compressed, extra=b"Compress: zlib\r\n")
        await _send(server.listen_port, request)
    finally:
        await server.shutdown(timeout=5)
    assert spamd.requests == [request]


async def test_client_timeout_forwards_partial(spamd, tap, learner):
    server = await _start_proxy(spamd, tap, learner, client_timeout=0.3)
    try:
        spamd.fixed_response = b"SPAMD/1.0 79 Timeout: (test)\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", server.listen_port)
        writer.write(b"CHECK SPAMC/1.5\r\nContent-length: 50\r\n\r\nabc")
        await writer.drain()
        # The client neither sends more nor half-closes. The fake spamd replies only at
        # end of input, so a response shows that the proxy half-closed towards spamd.
        response = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    finally:
        await server.shutdown(timeout=5)
    assert spamd.requests == [b"CHECK SPAMC/1.5\r\nContent-length: 50\r\n\r\nabc"]
    assert response == spamd.fixed_response


async def test_spamd_unreachable_closes_client(spamd, tap, learner):
    await spamd.close()
    server = await _start_proxy(spamd, tap, learner)
    try:
        response = await _send(server.listen_port, _request("PROCESS", _signed_message()))
        ping = await _send(server.listen_port, b"PING SPAMC/1.5\r\n\r\n")
    finally:
        await server.shutdown(timeout=5)
    assert response == b""
    assert ping == b""
    assert learner.observations == []


async def test_error_response_not_recorded(proxy, spamd, learner):
    spamd.fixed_response = b"SPAMD/1.0 69 Service Unavailable: (test)\r\n"
    response = await _send(proxy.listen_port, _request("CHECK", _signed_message()))
    await _drain(proxy)
    assert response == spamd.fixed_response
    assert learner.observations == []


async def test_queue_full_drops(spamd, tap, learner):
    server = await _start_proxy(spamd, tap, learner)
    await server.shutdown(timeout=5)  # workers stopped: the queue never drains
    server._queue = asyncio.Queue(1)
    server.listen_port = 0
    await server.start()
    for worker in server._background:
        worker.cancel()
    try:
        for _ in range(3):
            await _send(server.listen_port, _request("CHECK", _message(None)))
    finally:
        server._queue = asyncio.Queue()
        await server.shutdown(timeout=5)
    assert server.dropped_jobs == 2


async def test_shutdown_finishes_inflight(spamd, tap, learner):
    server = await _start_proxy(spamd, tap, learner)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.listen_port)
    request = _request("CHECK", _signed_message())
    writer.write(request[:40])
    await writer.drain()
    await asyncio.sleep(0.1)
    shutdown = asyncio.create_task(server.shutdown(timeout=5))
    await asyncio.sleep(0.1)
    writer.write(request[40:])
    writer.write_eof()
    response = await asyncio.wait_for(reader.read(), 5)
    await asyncio.wait_for(shutdown, 10)
    assert response.startswith(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 7.5 / 5.0")
    assert len(learner.observations) == 1
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.listen_port)


async def test_model_reload_periodic(spamd, tap, learner):
    server = await _start_proxy(spamd, tap, learner, reload_interval=0.05)
    try:
        await asyncio.sleep(0.5)
        response = await _send(server.listen_port, _request("CHECK", _signed_message()))
    finally:
        await server.shutdown(timeout=5)
    assert learner.reloads >= 3  # the failing second reload did not stop the task
    assert response.startswith(b"SPAMD/1.1 0 EX_OK\r\n")


@pytest.mark.parametrize("p", [float("nan"), 1.5, -0.1])
async def test_invalid_probability_no_verdict(spamd, tap, p):
    learner = FakeLearner(FakeModel(p=p))
    server = await _start_proxy(spamd, tap, learner)
    try:
        await _send(server.listen_port, _request("CHECK", _signed_message()))
        await _drain(server)
    finally:
        await server.shutdown(timeout=5)
    assert not _forwarded_message(spamd.requests[0]).startswith(b"X-Spamflow:")
    (observation,) = learner.observations
    assert observation["p"] is None
    assert observation["features"] == FEATURES


async def test_probability_edges_formatted(spamd, tap):
    cases = [(0.0, b"p=0.00;"), (-0.0, b"p=0.00;"), (1.0, b"p=1.00;"), (0.345, b"p=0.34;"),
             (0.999, b"p=1.00;")]
    for p, text in cases:
        learner = FakeLearner(FakeModel(p=p))
        spamd.requests.clear()
        server = await _start_proxy(spamd, tap, learner)
        try:
            await _send(server.listen_port, _request("PROCESS", _signed_message()))
        finally:
            await server.shutdown(timeout=5)
        assert _forwarded_message(spamd.requests[0]).startswith(b"X-Spamflow: " + text)


async def test_queue_byte_limit_drops(spamd, tap, learner):
    config = ProxyConfig(
        listen="127.0.0.1:0",
        spamd=f"127.0.0.1:{spamd.port}",
        tap_socket=tap.path,
        trusted_mta=["127.0.0.1"],
    )
    server = ProxyServer(
        config,
        learner,
        KEY,
        observation_factory=dict,
        scoring_queue_max_bytes=100,
    )
    await server.start()
    try:
        await _send(server.listen_port, _request("CHECK", _message(None)))
        await _send(server.listen_port, _request("CHECK", _signed_message()))
        await _drain(server)
    finally:
        await server.shutdown(timeout=5)
    assert server.dropped_jobs == 1  # only the verdict job keeps its message bytes
    (observation,) = learner.observations
    assert observation["flow"] is None
    assert server._queued_bytes == 0


async def test_failed_header_edit_not_learned(proxy, spamd, learner, monkeypatch):
    def broken_remove_header(message: bytes, name: str) -> bytes:
        raise RuntimeError("header edit failed")

    monkeypatch.setattr("spamflow.proxy.message.remove_header", broken_remove_header)
    request = _request("CHECK", _signed_message(forged=True))
    response = await _send(proxy.listen_port, request)
    await _drain(proxy)

    assert spamd.requests == [request]
    assert response == spamd._answer(request)
    # spamd scored the forged verdict header, so that score is no base score.
    assert learner.observations == []


async def test_stalled_spamd_send_times_out(tap, learner):
    connected = asyncio.Event()
    release = asyncio.Event()

    async def never_read(reader, writer) -> None:
        connected.set()
        await release.wait()
        writer.close()

    stalled = await asyncio.start_server(never_read, "127.0.0.1", 0)
    spamd = FakeSpamd(port=stalled.sockets[0].getsockname()[1])
    # Larger than what loopback socket buffers hold, so sending blocks on spamd.
    message = _message(None) + b"x" * (32 * 1024 * 1024)
    server = await _start_proxy(
        spamd, tap, learner, spamd_timeout=1.0, max_message_size=64 * 1024 * 1024
    )
    try:
        response = await _send(server.listen_port, _request("CHECK", message))
    finally:
        await server.shutdown(timeout=5)
        release.set()
        stalled.close()
        await stalled.wait_closed()
    assert connected.is_set()
    assert response == b""
    assert learner.observations == []


def _connection_handlers() -> list[asyncio.Task]:
    return [
        task for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "") == "ProxyServer._handle_connection"
    ]


async def test_stalled_client_connection_aborted(spamd, tap, learner, monkeypatch):
    monkeypatch.setattr("spamflow.proxy.server.CLIENT_CLOSE_TIMEOUT", 0.5)
    # A response larger than the socket buffers between proxy and client.
    message = _message(None) + b"x" * (32 * 1024 * 1024)
    server = await _start_proxy(
        spamd, tap, learner, spamd_timeout=0.5, max_message_size=64 * 1024 * 1024
    )
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.listen_port)
        writer.write(_request("PROCESS", message))
        await writer.drain()
        writer.write_eof()

        # The client reads nothing, so the proxy's relay stalls and times out.
        deadline = time.monotonic() + 20.0
        while _connection_handlers() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        handlers = _connection_handlers()
        writer.close()
    finally:
        await server.shutdown(timeout=5)
    assert handlers == []


async def test_input_after_body_forwarded_unchanged(proxy, spamd):
    message = _message(None)
    # The declared body ends inside a header line, and the rest of the message follows.
    request = b"CHECK SPAMC/1.5\r\nContent-length: 10\r\n\r\n" + message
    await _send(proxy.listen_port, request)
    await _drain(proxy)
    assert spamd.requests == [request]


async def test_input_after_line_end_scanned(proxy, spamd):
    message = _message(None)
    first_line = message.partition(b"\n")[0] + b"\n"
    # spamd stops at a line end that matches Content-length, and so does the proxy.
    request = b"CHECK SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(first_line) + message
    await _send(proxy.listen_port, request)
    await _drain(proxy)
    head = b"CHECK SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(first_line)
    assert spamd.requests == [head + first_line]


async def test_input_after_zlib_body_forwarded(proxy, spamd):
    compressed = zlib.compress(_message(None))
    request = (
        b"CHECK SPAMC/1.5\r\nCompress: zlib\r\nContent-length: %d\r\n\r\n" % len(compressed)
        + compressed + b"trailing"
    )
    await _send(proxy.listen_port, request)
    await _drain(proxy)
    assert spamd.requests == [request]


async def test_client_timeout_keeps_partial_line(spamd, tap, learner):
    server = await _start_proxy(spamd, tap, learner, client_timeout=0.3)
    try:
        spamd.fixed_response = b"SPAMD/1.0 76 Bad header line: (test)\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", server.listen_port)
        writer.write(b"CHECK SPAMC/1.5\r\nContent-le")
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    finally:
        await server.shutdown(timeout=5)
    assert spamd.requests == [b"CHECK SPAMC/1.5\r\nContent-le"]
    assert response == spamd.fixed_response


async def test_method_logged_escaped(proxy, spamd, caplog):
    caplog.set_level(logging.INFO, logger="spamflow.proxy.server")
    await _send(proxy.listen_port, b"\x1b[2J\rX\x00 SPAMC/1.5\r\n\r\n")
    await _drain(proxy)
    lines = [
        record.getMessage() for record in caplog.records
        if "passed through" in record.getMessage()
    ]
    assert len(lines) == 1
    assert "method='\\x1b[2J\\rX\\x00'" in lines[0]
    assert "\x1b" not in lines[0]
    assert "\r" not in lines[0]


async def test_empty_connection_logged_debug(proxy, spamd, caplog):
    caplog.set_level(logging.DEBUG, logger="spamflow.proxy.server")
    await _send(proxy.listen_port, b"")
    await _drain(proxy)
    records = [record for record in caplog.records if "passed through" in record.getMessage()]
    assert len(records) == 1
    assert records[0].levelno == logging.DEBUG
    assert spamd.requests == [b""]


def _asyncio_errors(caplog) -> list[logging.LogRecord]:
    return [
        record for record in caplog.records
        if record.name == "asyncio" and record.levelno >= logging.ERROR
    ]


async def test_shutdown_with_open_connection_quiet(spamd, tap, learner, caplog):
    server = await _start_proxy(spamd, tap, learner, client_timeout=60.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.listen_port)
    writer.write(b"CHECK SPAMC/1.5\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await server.shutdown(timeout=0.2)
    elapsed = time.monotonic() - started
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    # Let the loop run the done callbacks of the cancelled handler tasks.
    await asyncio.sleep(0.1)
    assert response == b""
    assert elapsed < 3
    assert _asyncio_errors(caplog) == []
    assert _connection_handlers() == []


async def test_spamd_closed_without_response_logged(proxy, spamd, caplog):
    caplog.set_level(logging.INFO, logger="spamflow.proxy.server")
    spamd.fixed_response = b""
    response = await _send(proxy.listen_port, _request("CHECK", _message(None)))
    await _drain(proxy)
    messages = [record.getMessage() for record in caplog.records]
    assert response == b""
    assert any("spamd closed the connection without a response" in m for m in messages)
    assert not any("not parsed" in m for m in messages)


async def test_spamd_unreachable_log_rate_limited(spamd, tap, learner, caplog):
    await spamd.close()
    server = await _start_proxy(spamd, tap, learner)
    try:
        for _ in range(3):
            await _send(server.listen_port, b"PING SPAMC/1.5\r\n\r\n")
    finally:
        await server.shutdown(timeout=5)
    lines = [record for record in caplog.records if "unreachable" in record.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelno == logging.ERROR


async def test_no_learner_skips_tap(spamd, tap):
    server = await _start_proxy(spamd, tap, None)
    try:
        response = await _send(server.listen_port, _request("CHECK", _signed_message()))
        await _drain(server)
    finally:
        await server.shutdown(timeout=5)
    assert response.startswith(b"SPAMD/1.1 0 EX_OK\r\n")
    assert tap.queries == []


@pytest.mark.parametrize(
    ("listen", "spamd_address"),
    [
        ("127.0.0.1:24850", "127.0.0.1:24850"),
        ("127.0.0.1:24850", "localhost:24850"),
        ("0.0.0.0:24850", "127.0.0.1:24850"),
        ("0.0.0.0:24850", "127.0.0.2:24850"),
        ("[::]:24850", "127.0.0.1:24850"),
        ("[::1]:24850", "[::1]:24850"),
        ("127.0.0.1:24850", "0.0.0.0:24850"),
    ],
)
def test_spamd_address_own_listen_rejected(listen, spamd_address):
    with pytest.raises(ConfigError, match="own listen address"):
        check_spamd_address(listen, spamd_address)


@pytest.mark.parametrize(
    ("listen", "spamd_address"),
    [
        ("127.0.0.1:24850", "127.0.0.1:783"),
        ("127.0.0.1:24850", "127.0.0.2:24850"),
        ("127.0.0.1:0", "127.0.0.1:0"),
        ("0.0.0.0:24850", "192.0.2.1:24850"),
    ],
)
def test_spamd_address_other_accepted(listen, spamd_address):
    check_spamd_address(listen, spamd_address)


def test_proxy_server_rejects_own_address():
    config = ProxyConfig(listen="127.0.0.1:24850", spamd="127.0.0.1:24850")
    with pytest.raises(ConfigError):
        ProxyServer(config)


@pytest.mark.parametrize(("spamd_timeout", "warned"), [(300.0, True), (5.0, True), (330.0, False)])
async def test_short_spamd_timeout_warned(spamd, tap, learner, caplog, spamd_timeout, warned):
    caplog.set_level(logging.WARNING, logger="spamflow.proxy.server")
    server = await _start_proxy(spamd, tap, learner, spamd_timeout=spamd_timeout)
    await server.shutdown(timeout=5)
    warnings = [r for r in caplog.records if "--timeout-child" in r.getMessage()]
    assert len(warnings) == (1 if warned else 0)
