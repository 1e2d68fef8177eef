"""A private spamd answers the protocol and scores with the SPAMFLOW rules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from spamflow.replay.spamd import (
    SpamdInstance,
    SpamdStartError,
    build_site_config,
    parse_reply,
    send_request,
)

FIXTURES = SHARED_DATA / "spamassassin-fixtures" / "messages"
GTUBE = FIXTURES / "spam" / "gtube.eml"

HAM_WITH_VERDICT = (
    b"Message-ID: <spamflow-test-1@example.com>\r\n"
    b"Date: Fri, 04 Dec 2026 10:00:00 +0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.com>\r\n"
    b"Subject: lunch\r\n"
    b"X-Spamflow: p=0.97; model=nb-10; flow=10.0.0.1:1234\r\n"
    b"\r\n"
    b"Shall we meet at noon?\r\n"
)


@pytest.fixture(scope="module")
def spamd(tmp_path_factory: pytest.TempPathFactory):
    with SpamdInstance(tmp_path_factory.mktemp("spamd")) as instance:
        yield instance


def test_site_config_contents(tmp_path: Path) -> None:
    site = build_site_config(tmp_path / "site")
    names = sorted(path.name for path in site.iterdir())
    local_cf = (site / "local.cf").read_text()
    assert "init.pre" in names
    assert "72_spamflow.cf" in names
    assert "report_safe 0" in local_cf.splitlines()
    assert "use_bayes 0" in local_cf.splitlines()
    assert "skip_rbl_checks 1" in local_cf.splitlines()


def test_site_config_without_rules(tmp_path: Path) -> None:
    site = build_site_config(tmp_path / "site", extra_rule_files=(), extra_config=["x 1"])
    assert not list(site.glob("*spamflow*"))
    assert (site / "local.cf").read_text().endswith("x 1\n")


def test_parse_reply_check() -> None:
    reply = parse_reply(
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\nSpam: True ; 1002.5 / 5.0\r\n\r\n"
    )
    assert reply.status_line == "SPAMD/1.1 0 EX_OK"
    assert reply.is_spam is True
    assert reply.score == 1002.5
    assert reply.threshold == 5.0


@pytest.mark.spamd
def test_ping_answers_pong(spamd: SpamdInstance) -> None:
    reply = send_request(spamd.host, spamd.port, "PING")
    assert reply.status_line == "SPAMD/1.5 0 PONG"


@pytest.mark.spamd
def test_gtube_is_spam(spamd: SpamdInstance) -> None:
    reply = send_request(spamd.host, spamd.port, "CHECK", GTUBE.read_bytes())
    assert reply.status_line.endswith(" 0 EX_OK")
    assert reply.is_spam is True
    assert reply.score >= 1000.0
    assert reply.threshold == 5.0


@pytest.mark.spamd
def test_verdict_header_fires_band(spamd: SpamdInstance) -> None:
    reply = send_request(spamd.host, spamd.port, "SYMBOLS", HAM_WITH_VERDICT)
    spamflow_rules = [name for name in reply.symbols if name.startswith("SPAMFLOW_")]
    assert spamflow_rules == ["SPAMFLOW_P95_100"]


@pytest.mark.spamd
def test_log_names_listen_port(spamd: SpamdInstance) -> None:
    assert f":{spamd.port}" in spamd.log_tail(200)


@pytest.mark.spamd
def test_stop_ends_process_group(tmp_path: Path) -> None:
    instance = SpamdInstance(tmp_path)
    instance.start()
    group = int(instance.pid_path.read_text())
    instance.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)
    # A second stop is harmless.
    instance.stop()


@pytest.mark.spamd
def test_start_failure_shows_log(tmp_path: Path) -> None:
    instance = SpamdInstance(tmp_path, extra_args=["--no-such-option"], start_timeout=20)
    with pytest.raises(SpamdStartError, match="exited with status"):
        instance.start()
    assert instance.log_tail() != ""


def test_stop_without_start(tmp_path: Path) -> None:
    instance = SpamdInstance(tmp_path / "never")
    instance.stop()
    assert not instance.log_path.exists()


@pytest.fixture
def netns():
    name = f"sft-models-{os.getpid()}-spamd"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.mark.root
@pytest.mark.spamd
def test_runs_inside_netns(tmp_path: Path, netns: str) -> None:
    with SpamdInstance(tmp_path, netns=netns) as instance:
        command = [
            "ip", "netns", "exec", netns, sys.executable, "-c",
            "import sys\n"
            "from spamflow.replay.spamd import send_request\n"
            f"print(send_request('127.0.0.1', {instance.port}, 'PING').status_line)\n",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert result.stdout.strip() == "SPAMD/1.5 0 PONG", result.stderr
        # The host namespace has no listener on that port.
        with pytest.raises(OSError):
            send_request("127.0.0.1", instance.port, "PING", timeout=2)


def test_parse_reply_report_ifspam() -> None:
    reply = parse_reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: Yes ; 7.1 / 5.0\r\n\r\nreport text\n")
    assert reply.is_spam is True
    assert reply.score == 7.1
    assert reply.body == b"report text\n"


def test_parse_reply_status_only() -> None:
    reply = parse_reply(b"SPAMD/1.5 0 PONG\r\n")
    assert reply.status_line == "SPAMD/1.5 0 PONG"
    assert reply.headers == {}
    assert reply.body == b""


def test_parse_reply_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="invalid response line"):
        parse_reply(b"HTTP/1.1 200 OK\r\n\r\n")
