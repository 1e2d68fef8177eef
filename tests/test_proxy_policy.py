"""Tests of the Postfix policy service on a real loopback server."""

from __future__ import annotations

import asyncio
import logging

import pytest

from spamflow.proxy.flowid import compute_mac, verify_flow_header_value
from spamflow.proxy.policy import (
    MAX_ATTRIBUTE_LINE_BYTES,
    PolicyServer,
    decide_action,
    parse_attribute_lines,
    PolicyRequestError,
)

KEY = b"policy-test-key"

# Attributes as Postfix 3.7 sends them in smtpd_data_restrictions (abridged).
POSTFIX_REQUEST = (
    b"request=smtpd_access_policy\n"
    b"protocol_state=DATA\n"
    b"protocol_name=ESMTP\n"
    b"client_address=10.77.1.2\n"
    b"client_name=unknown\n"
    b"client_port=40211\n"
    b"reverse_client_name=unknown\n"
    b"helo_name=mx.example.net\n"
    b"sender=a@example.net\n"
    b"recipient=\n"
    b"recipient_count=1\n"
    b"queue_id=4Bq1x95Rz6z9sPc\n"
    b"instance=1f3a.66a1b2c3.4d5e6.0\n"
    b"size=0\n"
    b"server_address=10.77.0.1\n"
    b"server_port=25\n"
    b"\n"
)


@pytest.fixture
async def policy_server():
    server = PolicyServer("127.0.0.1", 0, KEY)
    await server.start()
    yield server
    await server.close()


async def _exchange(server: PolicyServer, data: bytes, replies: int) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(data)
    await writer.drain()
    answers = []
    for _ in range(replies):
        answers.append(await asyncio.wait_for(reader.readuntil(b"\n\n"), 5))
    writer.close()
    await writer.wait_closed()
    return answers


def _prepend_value(answer: bytes) -> str:
    prefix = b"action=PREPEND X-Spamflow-Flow: "
    assert answer.startswith(prefix), answer
    assert answer.endswith(b"\n\n")
    return answer[len(prefix) : -2].decode("ascii")


async def test_prepend_signed_flow(policy_server):
    (answer,) = await _exchange(policy_server, POSTFIX_REQUEST, 1)
    value = _prepend_value(answer)
    identity = verify_flow_header_value(value, KEY)
    assert identity.ip == "10.77.1.2"
    assert identity.port == 40211
    assert identity.mac == compute_mac(KEY, "10.77.1.2", 40211, identity.timestamp)


async def test_several_requests_one_connection(policy_server):
    second = POSTFIX_REQUEST.replace(b"client_port=40211", b"client_port=40999")
    answers = await _exchange(policy_server, POSTFIX_REQUEST + second + POSTFIX_REQUEST, 3)
    flows = [verify_flow_header_value(_prepend_value(a), KEY).port for a in answers]
    assert flows == [40211, 40999, 40211]


async def test_missing_client_port_dunno(policy_server):
    request = POSTFIX_REQUEST.replace(b"client_port=40211\n", b"")
    assert await _exchange(policy_server, request, 1) == [b"action=DUNNO\n\n"]


async def test_unknown_client_address_dunno(policy_server):
    request = POSTFIX_REQUEST.replace(b"client_address=10.77.1.2", b"client_address=unknown")
    assert await _exchange(policy_server, request, 1) == [b"action=DUNNO\n\n"]


async def test_malformed_then_valid(policy_server):
    malformed = b"request=smtpd_access_policy\nthis line has no equals sign\n\n"
    answers = await _exchange(policy_server, malformed + POSTFIX_REQUEST, 2)
    assert answers[0] == b"action=DUNNO\n\n"
    assert verify_flow_header_value(_prepend_value(answers[1]), KEY).port == 40211


async def test_binary_garbage_dunno(policy_server):
    answers = await _exchange(policy_server, b"\xff\xfe\x00=\x80\n\n" + POSTFIX_REQUEST, 2)
    assert answers[0] == b"action=DUNNO\n\n"
    assert answers[1].startswith(b"action=PREPEND ")


async def test_overlong_line_dunno(policy_server):
    long_line = b"ccert_subject=" + b"x" * (MAX_ATTRIBUTE_LINE_BYTES * 3) + b"\n"
    request = POSTFIX_REQUEST.replace(b"size=0\n", b"size=0\n" + long_line)
    answers = await _exchange(policy_server, request + POSTFIX_REQUEST, 2)
    assert answers[0] == b"action=DUNNO\n\n"
    assert answers[1].startswith(b"action=PREPEND ")


async def test_crlf_lines_accepted(policy_server):
    request = POSTFIX_REQUEST.replace(b"\n", b"\r\n")
    (answer,) = await _exchange(policy_server, request, 1)
    assert answer.startswith(b"action=PREPEND X-Spamflow-Flow: 10.77.1.2:40211; t=")


async def test_close_mid_request_keeps_serving(policy_server):
    reader, writer = await asyncio.open_connection("127.0.0.1", policy_server.port)
    writer.write(b"request=smtpd_access_policy\nclient_addr")
    writer.close()
    await writer.wait_closed()
    (answer,) = await _exchange(policy_server, POSTFIX_REQUEST, 1)
    assert answer.startswith(b"action=PREPEND ")


async def test_logs_queue_id_and_client(policy_server, caplog):
    caplog.set_level(logging.INFO, logger="spamflow.proxy.policy")
    await _exchange(policy_server, POSTFIX_REQUEST, 1)
    lines = [r.getMessage() for r in caplog.records if "queue_id=" in r.getMessage()]
    assert len(lines) == 1
    assert "queue_id=4Bq1x95Rz6z9sPc" in lines[0]
    assert "client=10.77.1.2:40211" in lines[0]


async def test_unsigned_without_key():
    server = PolicyServer("127.0.0.1", 0, None)
    await server.start()
    try:
        (answer,) = await _exchange(server, POSTFIX_REQUEST, 1)
    finally:
        await server.close()
    assert answer == b"action=PREPEND X-Spamflow-Flow: 10.77.1.2:40211\n\n"


def test_decide_action_other_request_type():
    attributes = {"request": "junk", "client_address": "10.0.0.1", "client_port": "5"}
    assert decide_action(attributes, None) == "DUNNO"


@pytest.mark.parametrize("port", ["", "0", "65536", "-1", "25x"])
def test_decide_action_invalid_port(port):
    attributes = {
        "request": "smtpd_access_policy", "client_address": "10.0.0.1", "client_port": port
    }
    assert decide_action(attributes, None) == "DUNNO"


def test_decide_action_ipv6():
    attributes = {
        "request": "smtpd_access_policy",
        "protocol_state": "DATA",
        "client_address": "2001:db8::7",
        "client_port": "587",
    }
    assert decide_action(attributes, None) == "PREPEND X-Spamflow-Flow: [2001:db8::7]:587"


def test_parse_attribute_value_with_equals():
    assert parse_attribute_lines([b"sasl_username=a=b"]) == {"sasl_username": "a=b"}


def test_parse_attribute_no_name():
    with pytest.raises(PolicyRequestError):
        parse_attribute_lines([b"=value"])


@pytest.mark.parametrize("state", ["RCPT", "CONNECT", "END-OF-MESSAGE", "", None])
def test_decide_action_outside_data_dunno(state):
    attributes = {
        "request": "smtpd_access_policy", "client_address": "10.0.0.1", "client_port": "5"
    }
    if state is not None:
        attributes["protocol_state"] = state
    assert decide_action(attributes, None) == "DUNNO"


async def test_rcpt_state_dunno_warned_once(policy_server, caplog):
    caplog.set_level(logging.INFO, logger="spamflow.proxy.policy")
    rcpt_request = POSTFIX_REQUEST.replace(b"protocol_state=DATA", b"protocol_state=RCPT")
    answers = await _exchange(policy_server, rcpt_request * 3, 3)
    warnings = [
        r.getMessage() for r in caplog.records
        if r.levelno == logging.WARNING and "protocol_state=RCPT" in r.getMessage()
    ]
    assert answers == [b"action=DUNNO\n\n"] * 3
    assert len(warnings) == 1
    assert "smtpd_data_restrictions" in warnings[0]


async def test_logs_ipv6_client_bracketed(policy_server, caplog):
    caplog.set_level(logging.INFO, logger="spamflow.proxy.policy")
    request = POSTFIX_REQUEST.replace(b"client_address=10.77.1.2", b"client_address=2001:db8::7")
    (answer,) = await _exchange(policy_server, request, 1)
    lines = [r.getMessage() for r in caplog.records if "queue_id=" in r.getMessage()]
    assert answer.startswith(b"action=PREPEND X-Spamflow-Flow: [2001:db8::7]:40211; t=")
    assert len(lines) == 1
    assert "client=[2001:db8::7]:40211 " in lines[0]


async def test_logs_peer_as_address_port(policy_server, caplog):
    caplog.set_level(logging.INFO, logger="spamflow.proxy.policy")
    await _exchange(policy_server, b"no equals sign\n\n", 1)
    lines = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("peer=127.0.0.1:")
    assert "('127.0.0.1'" not in lines[0]


async def test_logs_attribute_values_escaped(policy_server, caplog):
    caplog.set_level(logging.INFO, logger="spamflow.proxy.policy")
    request = POSTFIX_REQUEST.replace(
        b"queue_id=4Bq1x95Rz6z9sPc", b"queue_id=\x1b[2J\rfake action=OK"
    )
    await _exchange(policy_server, request, 1)
    lines = [r.getMessage() for r in caplog.records if "queue_id=" in r.getMessage()]
    assert len(lines) == 1
    assert "queue_id='\\x1b[2J\\rfake action=OK'" in lines[0]
    assert "\x1b" not in lines[0]
    assert "\r" not in lines[0]


async def test_close_with_idle_connection_quiet(caplog):
    server = PolicyServer("127.0.0.1", 0, KEY)
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(POSTFIX_REQUEST)
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
    await asyncio.wait_for(server.close(), 10)
    end = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    # Let the loop run the done callbacks of the ended handler tasks.
    await asyncio.sleep(0.1)
    errors = [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert end == b""
    assert errors == []
