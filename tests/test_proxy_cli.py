"""Tests of the ``spamflow proxy`` and ``spamflow policy`` commands as subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from spamflow.proxy.flowid import verify_flow_header_value
from spamflow.replay.spamd import pick_free_port

KEY = b"cli-test-key"
REQUEST = (
    b"request=smtpd_access_policy\nprotocol_state=DATA\nclient_address=192.0.2.9\n"
    b"client_port=5025\nqueue_id=ABC123\n\n"
)


def _start(*arguments: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "spamflow", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _connect(port: int, process: subprocess.Popen, timeout: float = 20.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionRefusedError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


def _stop(process: subprocess.Popen) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    return process.returncode, stderr.decode()


def _key_file(tmp_path, mode: int = 0o600) -> str:
    path = tmp_path / "flow.key"
    path.write_bytes(KEY)
    os.chmod(path, mode)
    return str(path)


def _receive_all(connection: socket.socket) -> bytes:
    chunks = []
    while chunk := connection.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_policy_command_serves_and_stops(tmp_path):
    port = pick_free_port()
    process = _start(
        "policy", "--listen", f"127.0.0.1:{port}", "--flow-key-file", _key_file(tmp_path)
    )
    try:
        with _connect(port, process) as connection:
            connection.sendall(REQUEST)
            reply = connection.recv(4096)
    finally:
        returncode, stderr = _stop(process)
    prefix = b"action=PREPEND X-Spamflow-Flow: "
    assert reply.startswith(prefix)
    assert reply.endswith(b"\n\n")
    identity = verify_flow_header_value(reply[len(prefix) : -2].decode(), KEY)
    assert identity.flow == "192.0.2.9:5025"
    assert returncode == 0
    assert "queue_id=ABC123 client=192.0.2.9:5025" in stderr
    assert "policy service stopped" in stderr


def test_policy_command_rejects_shared_key(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "spamflow", "policy", "--flow-key-file",
         _key_file(tmp_path, 0o644)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "chmod 600" in result.stderr.decode()


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:99999", "127.0.0.1:", ":783"])
def test_proxy_command_bad_address(address):
    result = subprocess.run(
        [sys.executable, "-m", "spamflow", "proxy", "--spamd", address],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid address" in result.stderr.decode()


def test_proxy_command_config_and_override(tmp_path):
    config_port = pick_free_port()
    port = pick_free_port()
    closed_port = pick_free_port()
    config = tmp_path / "spamflow.toml"
    config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{config_port}"\nspamd = "127.0.0.1:{closed_port}"\n'
        f'db = "{tmp_path}/state/examples.sqlite"\nmodel = "{tmp_path}/state/model.joblib"\n'
    )
    process = _start("-c", str(config), "proxy", "--listen", f"127.0.0.1:{port}")
    try:
        with _connect(port, process) as connection:
            connection.sendall(b"PING SPAMC/1.5\r\n\r\n")
            connection.shutdown(socket.SHUT_WR)
            reply = _receive_all(connection)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", config_port), timeout=5)
    finally:
        returncode, stderr = _stop(process)
    assert reply == b""  # spamd is unreachable, so the proxy closes the connection
    assert returncode == 0
    assert f"spamd 127.0.0.1:{closed_port} unreachable" in stderr
    assert "proxy stopped" in stderr
    assert (tmp_path / "state" / "examples.sqlite").exists()


def test_policy_command_port_in_use():
    with socket.socket() as occupied:
        occupied.bind(("127.0.0.1", 0))
        occupied.listen()
        port = occupied.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "spamflow", "policy", "--listen", f"127.0.0.1:{port}"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert f"policy service failed on 127.0.0.1:{port}" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


def test_proxy_command_bad_learn_config(tmp_path):
    config = tmp_path / "spamflow.toml"
    config.write_text(
        f'[proxy]\ndb = "{tmp_path}/examples.sqlite"\nmodel = "{tmp_path}/model.joblib"\n'
        '[learn]\nmodel_kind = "oracle"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "spamflow", "-c", str(config), "proxy"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid learn.model_kind 'oracle'" in result.stderr.decode()


def test_proxy_command_rejects_own_address(tmp_path):
    port = pick_free_port()
    result = subprocess.run(
        [sys.executable, "-m", "spamflow", "proxy", "--listen", f"0.0.0.0:{port}",
         "--spamd", f"127.0.0.1:{port}", "--db", str(tmp_path / "examples.sqlite")],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "is the proxy's own listen address" in result.stderr.decode()
    assert not (tmp_path / "examples.sqlite").exists()


def test_policy_stop_with_idle_connection_quiet():
    port = pick_free_port()
    process = _start("policy", "--listen", f"127.0.0.1:{port}")
    try:
        with _connect(port, process) as connection:
            # A kept-alive connection after one request, as Postfix leaves it.
            connection.sendall(REQUEST)
            reply = connection.recv(4096)
            started = time.monotonic()
            returncode, stderr = _stop(process)
            elapsed = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert reply.startswith(b"action=PREPEND ")
    assert returncode == 0
    assert "Traceback" not in stderr
    assert " ERROR " not in stderr
    assert elapsed < 10
