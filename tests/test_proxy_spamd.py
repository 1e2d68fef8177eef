"""The proxy between the real spamc binary and a real private spamd.

Direct and proxied responses are compared after removing what spamd varies between two
runs of the same message: the order of report lines and the address hints in them.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from spamflow.config import LearnConfig, ProxyConfig
from spamflow.models.autolearn import AutoLearner
from spamflow.models.classifier import train_model
from spamflow.models.persist import save_model
from spamflow.models.store import ExampleStore
from spamflow.nfqueue_tap.schema import FEATURE_NAMES, features_to_vector
from spamflow.proxy.flowid import make_flow_header_value
from spamflow.proxy.message import body_offset, find_header, prepend_header, remove_header
from spamflow.proxy.server import ProxyServer
from spamflow.replay.results import parse_delivered
from spamflow.replay.spamd import SpamdInstance, pick_free_port

pytestmark = pytest.mark.spamd

MESSAGES = Path(__file__).parent / "data" / "spamassassin"
HAM = "nice-001.eml"
SPAM = "spam-001.eml"
CRLF_HAM = "nice-crlf-endings.eml"
KEY = b"spamd-test-key"
FLOW_IP = "10.77.1.2"
FLOW_PORT = 40211
SPAMMY_FEATURES = {name: 1.0 for name in FEATURE_NAMES} | {"retransmissions_in": 9.0}


def _read(name: str) -> bytes:
    return (MESSAGES / name).read_bytes()


@pytest.fixture(scope="module")
def spamd(tmp_path_factory):
    with SpamdInstance(tmp_path_factory.mktemp("spamd")) as instance:
        yield instance


class ProxyThread:
    """A ProxyServer (and optionally a fake tap) on an event loop in a thread."""

    def __init__(self, config: ProxyConfig, learner=None, key=None, tap_socket=None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tap_queries: list[bytes] = []
        self._tap_server = None
        if tap_socket is not None:
            self._run(self._start_tap(tap_socket))
        self.server = ProxyServer(config, learner, key)
        self._run(self.server.start())
        self.port = self.server.listen_port

    def _run(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _start_tap(self, path: str) -> None:
        async def serve(reader, writer):
            self.tap_queries.append(await reader.readline())
            response = {"status": "ok", "flow": "x", "features": SPAMMY_FEATURES}
            writer.write(json.dumps(response).encode() + b"\n")
            await writer.drain()
            writer.close()

        self._tap_server = await asyncio.start_unix_server(serve, path)

    def drain(self) -> None:
        self._run(self.server.wait_idle(60))

    def stop(self) -> None:
        self._run(self.server.shutdown(timeout=10))
        if self._tap_server is not None:
            self._tap_server.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def plain_proxy(spamd):
    config = ProxyConfig(listen="127.0.0.1:0", spamd=spamd.address, trusted_mta=[])
    proxy = ProxyThread(config)
    yield proxy
    proxy.stop()


def _spamc(port: int, options: list[str], data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["spamc", "-d", "127.0.0.1", "-p", str(port), "-t", "60", *options],
        input=data,
        capture_output=True,
        timeout=120,
        check=False,
    )


def _status(output: bytes) -> tuple[bool, float, frozenset[str]]:
    """Return (is spam, score, tests) from the X-Spam-Status header of a PROCESS output."""
    headers = parse_delivered(output)
    assert headers.is_spam is not None, output[: body_offset(output)]
    assert headers.score is not None, headers.spam_status
    return headers.is_spam, headers.score, frozenset(headers.tests)


def _report(output: bytes) -> tuple[str, frozenset[str]]:
    """Return the score line and the rule names of a REPORT output."""
    text = output.decode("utf-8", "replace")
    first_line = text.split("\n", 1)[0] if re.match(r"-?[\d.]+/", text) else ""
    rules = frozenset(re.findall(r"^\s*\*?\s*-?\d+\.\d+ ([A-Z][A-Z0-9_]+)", text, re.M))
    return first_line, rules


def _normalized(options: list[str], output: bytes):
    if options in ([], ["--headers"], ["-u", "someone"]):
        return _status(output), output[body_offset(output):]
    if options in (["-r"], ["-R"]):
        return _report(output)
    if options == ["-y"]:
        return frozenset(output.strip().split(b","))
    return output


SPAMC_OPTIONS = [[], ["-c"], ["-y"], ["-r"], ["-R"], ["--headers"], ["-K"], ["-L", "spam"],
                 ["-z"], ["-u", "someone"]]


@pytest.mark.parametrize("options", SPAMC_OPTIONS, ids=lambda o: " ".join(o) or "process")
@pytest.mark.parametrize("name", [HAM, SPAM, CRLF_HAM])
def test_spamc_same_answer(spamd, plain_proxy, options, name):
    data = _read(name)
    direct = _spamc(spamd.port, options, data)
    proxied = _spamc(plain_proxy.port, options, data)
    assert proxied.returncode == direct.returncode
    assert _normalized(options, proxied.stdout) == _normalized(options, direct.stdout)


def test_spamc_check_scores_exact(spamd, plain_proxy):
    for name in (HAM, SPAM):
        direct = _spamc(spamd.port, ["-c"], _read(name))
        proxied = _spamc(plain_proxy.port, ["-c"], _read(name))
        assert proxied.stdout == direct.stdout
    assert direct.returncode == 1  # the spam message is spam


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        connection.sendall(request)
        connection.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _status_and_spam(response: bytes) -> tuple[bytes, bytes | None]:
    status_line = response.split(b"\r\n", 1)[0]
    spam = re.search(rb"\r\nSpam: ([^\r]*)\r\n", response)
    return status_line, spam.group(1) if spam else None


MESSAGE = _read(HAM)
MALFORMED = {
    "unknown method": b"CHEK SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(MESSAGE) + MESSAGE,
    "bad version": b"CHECK SPAMC/abc\r\nContent-length: %d\r\n\r\n" % len(MESSAGE) + MESSAGE,
    "missing content-length": b"CHECK SPAMC/1.5\r\nUser: x\r\n\r\n" + MESSAGE,
    "non-numeric content-length": b"CHECK SPAMC/1.5\r\nContent-length: 1x\r\n\r\n" + MESSAGE,
    "short body": b"CHECK SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % (len(MESSAGE) + 9)
    + MESSAGE,
    "header without colon": b"CHECK SPAMC/1.5\r\nNoColon\r\n\r\n" + MESSAGE,
    "bad zlib": b"CHECK SPAMC/1.5\r\nCompress: zlib\r\nContent-length: 5\r\n\r\nabcde",
    "unknown compression": b"CHECK SPAMC/1.5\r\nCompress: lzma\r\nContent-length: 5\r\n\r\nabcde",
    "empty": b"",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_same_spamd_answer(spamd, plain_proxy, name):
    direct = _raw(spamd.port, MALFORMED[name])
    proxied = _raw(plain_proxy.port, MALFORMED[name])
    assert _status_and_spam(proxied) == _status_and_spam(direct)


def _raw_open(port: int, request: bytes) -> bytes:
    """Send request without half-closing, then read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(request)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# The declared body ends inside the second line, so spamd reads on to that line's end.
SHORT_CONTENT_LENGTH = b"CHECK SPAMC/1.5\r\nContent-length: 100\r\n\r\n" + MESSAGE


def test_short_content_length_spamd_error(spamd, plain_proxy):
    direct = _raw(spamd.port, SHORT_CONTENT_LENGTH)
    proxied = _raw(plain_proxy.port, SHORT_CONTENT_LENGTH)
    assert direct.startswith(b"SPAMD/1.0 76 Bad header line: (Content-Length mismatch: ")
    assert proxied == direct


def test_short_content_length_open_connection(spamd, plain_proxy):
    direct = _raw_open(spamd.port, SHORT_CONTENT_LENGTH)
    proxied = _raw_open(plain_proxy.port, SHORT_CONTENT_LENGTH)
    assert direct.startswith(b"SPAMD/1.0 76 Bad header line: (Content-Length mismatch: ")
    assert proxied == direct


@pytest.mark.parametrize(
    "partial",
    [b"CHECK SPAMC/1.5\r\n", b"CHECK SPAMC/1.5\r\nContent-length: 50\r\n\r\nabc"],
    ids=["head", "body"],
)
def test_stalled_client_gets_spamd_error(spamd, partial):
    config = ProxyConfig(
        listen="127.0.0.1:0", spamd=spamd.address, trusted_mta=[], client_timeout=0.5
    )
    proxy = ProxyThread(config)
    try:
        started = time.monotonic()
        proxied = _raw_open(proxy.port, partial)
        elapsed = time.monotonic() - started
    finally:
        proxy.stop()
    direct = _raw(spamd.port, partial)
    assert direct.startswith(b"SPAMD/1.0 76 Bad header line: ")
    assert proxied == direct
    assert elapsed < 15


def test_malformed_error_codes(spamd, plain_proxy):
    assert _raw(plain_proxy.port, MALFORMED["unknown method"]).startswith(b"SPAMD/1.0 76 ")
    assert _raw(plain_proxy.port, MALFORMED["bad zlib"]).startswith(b"SPAMD/1.0 69 ")


def test_zlib_request_same_verdict(spamd, plain_proxy):
    data = _read(SPAM)
    compressed = zlib.compress(data)
    request = (
        b"SYMBOLS SPAMC/1.5\r\nCompress: zlib\r\nContent-length: %d\r\n\r\n" % len(compressed)
        + compressed
    )
    direct = _raw(spamd.port, request)
    proxied = _raw(plain_proxy.port, request)
    assert _status_and_spam(proxied) == _status_and_spam(direct)
    assert _status_and_spam(proxied)[1].startswith(b"True ; ")
    direct_symbols = set(direct.partition(b"\r\n\r\n")[2].split(b","))
    proxied_symbols = set(proxied.partition(b"\r\n\r\n")[2].split(b","))
    assert proxied_symbols == direct_symbols


@pytest.fixture(scope="module")
def verdict_setup(spamd, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("verdict")
    workdir.chmod(0o700)
    spam_vector = features_to_vector(SPAMMY_FEATURES)
    ham_vector = [value * 0.0 + 60.0 for value in spam_vector]
    X = np.array([spam_vector] * 12 + [ham_vector] * 12, dtype=float)
    y = np.array([1] * 12 + [0] * 12)
    model_path = workdir / "model.joblib"
    save_model(train_model(X, y, "nb"), model_path)

    store = ExampleStore(workdir / "examples.sqlite")
    learner = AutoLearner(store, model_path, LearnConfig(retrain_every=1000))
    assert learner.model is not None
    config = ProxyConfig(
        listen="127.0.0.1:0",
        spamd=spamd.address,
        tap_socket=str(workdir / "tap.sock"),
        tap_timeout=2.0,
        trusted_mta=["127.0.0.1"],
    )
    proxy = ProxyThread(config, learner, KEY, tap_socket=config.tap_socket)
    yield proxy, learner, store
    proxy.stop()
    store.close()


def _flow_message(name: str) -> bytes:
    data = _read(name)
    flow = make_flow_header_value(FLOW_IP, FLOW_PORT, KEY)
    with_flow = prepend_header(data, "X-Spamflow-Flow", flow)
    return prepend_header(with_flow, "X-Spamflow", "p=0.00; model=forged-9; flow=1.1.1.1:1")


@pytest.mark.parametrize("name", [HAM, CRLF_HAM])
def test_verdict_process_output(spamd, verdict_setup, name):
    proxy, learner, store = verdict_setup
    data = _flow_message(name)
    result = _spamc(proxy.port, [], data)
    proxy.drain()

    output = result.stdout
    assert result.returncode == 0
    verdict = find_header(output, "X-Spamflow")
    assert verdict is not None
    assert re.fullmatch(
        r"p=(0\.\d\d|1\.00); model=nb-24; flow=10\.77\.1\.2:40211", verdict
    ), verdict
    assert b"forged-9" not in output
    _, _, tests = _status(output)
    assert any(test.startswith("SPAMFLOW_") for test in tests), tests
    assert output[body_offset(output):] == data[body_offset(data):]
    assert proxy.tap_queries[-1] == b"FLOW 10.77.1.2 40211\n"


def test_verdict_base_score_matches_spamd(spamd, verdict_setup):
    proxy, learner, store = verdict_setup
    data = _flow_message(SPAM)
    before = len(store.observations())
    result = _spamc(proxy.port, ["-c"], data)
    proxy.drain()

    observations = store.observations()
    assert len(observations) == before + 1
    observation = observations[-1]
    without_forged = remove_header(data, "X-Spamflow")
    base = _spamc(spamd.port, ["-c"], without_forged).stdout.decode().split("/")[0]
    verdict = f"p={observation.p:.2f}; model={observation.model}; flow={observation.flow}"
    with_verdict = prepend_header(without_forged, "X-Spamflow", verdict)
    scored = _spamc(spamd.port, ["-c"], with_verdict).stdout.decode().split("/")[0]

    assert result.stdout.decode().split("/")[0] == scored
    assert observation.base_score == pytest.approx(float(base))
    assert observation.score == pytest.approx(float(scored))
    assert observation.score != observation.base_score
    assert observation.label == learner.label_for(observation.base_score)
    assert observation.features == SPAMMY_FEATURES
    assert observation.method == "CHECK"
    assert observation.flow == "10.77.1.2:40211"


def test_spamd_unreachable_spamc_fallback():
    config = ProxyConfig(listen="[::1]:0", spamd=f"127.0.0.1:{pick_free_port()}")
    proxy = ProxyThread(config)
    data = _read(HAM)
    try:
        process = _spamc_ipv6(proxy.port, [], data)
        check = _spamc_ipv6(proxy.port, ["-c"], data)
        strict = _spamc_ipv6(proxy.port, ["-x"], data)
    finally:
        proxy.stop()
    assert process.returncode == 0
    assert process.stdout == data  # spamc's safe fallback returns the message unscanned
    assert check.returncode == 0
    assert check.stdout == b"0/0\n"
    assert strict.returncode == 74  # EX_IOERR without safe fallback
    assert strict.stdout == b""


def _spamc_ipv6(port: int, options: list[str], data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["spamc", "-d", "::1", "-p", str(port), "--connect-retries=1", *options],
        input=data,
        capture_output=True,
        timeout=60,
        check=False,
    )
