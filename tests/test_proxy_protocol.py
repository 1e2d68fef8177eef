"""Tests of the spamd request/response framing with literal protocol bytes."""

from __future__ import annotations

import pytest

from spamflow.proxy import spamd_protocol as protocol
from spamflow.proxy.spamd_protocol import SpamdExitCode, SpamdProtocolError

SPAMC_PROCESS_HEAD = b"PROCESS SPAMC/1.5\r\nUser: root\r\nContent-length: 226\r\n\r\n"


def test_request_head_from_spamc():
    head = protocol.parse_request_head(SPAMC_PROCESS_HEAD)
    assert head.method == "PROCESS"
    assert head.version == (1, 5)
    assert [h.name for h in head.headers] == [b"User", b"Content-length"]
    assert head.content_length() == 226
    assert head.find("user")[0].value == b"root"


def test_request_head_tell_headers_kept():
    raw = b"TELL SPAMC/1.5\r\nMessage-class: spam\r\nSet: local\r\nContent-length: 3\r\n\r\n"
    head = protocol.parse_request_head(raw)
    assert head.method == "TELL"
    assert head.find("Set")[0].value == b"local"
    assert head.find("message-class")[0].raw == b"Message-class: spam"


def test_request_head_ping_without_headers():
    head = protocol.parse_request_head(b"PING SPAMC/1.5\r\n\r\n")
    assert head.method == "PING"
    assert head.headers == ()
    assert head.content_length() is None


@pytest.mark.parametrize(
    "raw",
    [
        b"CHEK SPAMC/1.5\r\n\r\n",
        b"CHECK SPAMD/1.5\r\n\r\n",
        b"CHECK SPAMC/x\r\n\r\n",
        b"check SPAMC/1.5\r\n\r\n",
        b"CHECK  SPAMC/1.5\r\n\r\n",
        b"CHECK SPAMC/1.5\nContent-length: 1\n\n",
        b"CHECK SPAMC/1.5\r\nContent-length 5\r\n\r\n",
        b"CHECK SPAMC/1.5\r\nContent-length: 5\r\n",
        b"CHECK SPAMC/1.5\r\n: 5\r\n\r\n",
    ],
)
def test_request_head_invalid(raw):
    with pytest.raises(SpamdProtocolError):
        protocol.parse_request_head(raw)


def test_request_head_too_many_headers():
    lines = b"".join(b"X-%d: y\r\n" % i for i in range(protocol.MAX_REQUEST_HEADERS + 1))
    with pytest.raises(SpamdProtocolError, match="header lines"):
        protocol.parse_request_head(b"CHECK SPAMC/1.5\r\n" + lines + b"\r\n")


def test_request_head_too_long():
    value = b"a" * protocol.MAX_REQUEST_HEAD_BYTES
    with pytest.raises(SpamdProtocolError, match="longer"):
        protocol.parse_request_head(b"CHECK SPAMC/1.5\r\nX: " + value + b"\r\n\r\n")


@pytest.mark.parametrize(
    "value", [b"abc", b"-1", b"1.5", b""]
)
def test_content_length_invalid(value):
    raw = b"CHECK SPAMC/1.5\r\nContent-length: " + value + b"\r\n\r\n"
    head = protocol.parse_request_head(raw)
    with pytest.raises(SpamdProtocolError):
        head.content_length()


def test_content_length_repeated():
    raw = b"CHECK SPAMC/1.5\r\nContent-length: 1\r\nContent-length: 2\r\n\r\n"
    head = protocol.parse_request_head(raw)
    with pytest.raises(SpamdProtocolError, match="repeated"):
        head.content_length()


def test_content_length_case_insensitive():
    head = protocol.parse_request_head(b"CHECK SPAMC/1.5\r\ncontent-LENGTH:7\r\n\r\n")
    assert head.content_length() == 7


def test_with_content_length_keeps_other_bytes():
    raw = b"CHECK SPAMC/1.5\r\nUser:  odd\tspacing \r\ncontent-length:7\r\nX-Other: a\r\n\r\n"
    head = protocol.parse_request_head(raw)
    rebuilt = head.with_content_length(12345)
    assert rebuilt == (
        b"CHECK SPAMC/1.5\r\nUser:  odd\tspacing \r\ncontent-length: 12345\r\nX-Other: a\r\n\r\n"
    )


def test_with_content_length_missing():
    head = protocol.parse_request_head(b"CHECK SPAMC/1.5\r\nUser: a\r\n\r\n")
    with pytest.raises(SpamdProtocolError):
        head.with_content_length(1)


def test_response_check():
    head = protocol.parse_response_head(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 15.0 / 5.0\r\n\r\n")
    assert head.version == (1, 1)
    assert head.code == SpamdExitCode.EX_OK
    assert head.message == "EX_OK"
    spam = head.spam()
    assert spam is not None
    assert spam.is_spam is True
    assert spam.score == 15.0
    assert spam.threshold == 5.0


def test_response_process_with_body():
    data = (
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 4\r\nSpam: False ; -1.9 / 5.0\r\n\r\n"
        b"ab\r\n"
    )
    spam = protocol.parse_response_head(data).spam()
    assert spam == protocol.SpamResult(is_spam=False, score=-1.9, threshold=5.0)


def test_response_report_ifspam_yes_no():
    yes = protocol.parse_response_head(b"SPAMD/1.1 0 EX_OK\r\nSpam: Yes ; 1000.0 / 5.0\r\n\r\n")
    no = protocol.parse_response_head(b"SPAMD/1.1 0 EX_OK\r\nSpam: No ; 0.1 / 5.0\r\n\r\n")
    assert yes.spam().is_spam is True
    assert no.spam().is_spam is False


def test_response_integer_scores():
    spam = protocol.parse_spam_value(b"False ; 2 / 5")
    assert spam.score == 2.0
    assert spam.threshold == 5.0


def test_response_error_status_only():
    data = b"SPAMD/1.0 76 Bad header line: (Content-Length contains non-numeric bytes)\r\n"
    head = protocol.parse_response_head(data)
    assert head.code == SpamdExitCode.EX_PROTOCOL == 76
    assert head.message.startswith("Bad header line")
    assert head.headers == ()
    assert head.spam() is None


def test_response_pong():
    head = protocol.parse_response_head(b"SPAMD/1.5 0 PONG\r\n")
    assert head.version == (1, 5)
    assert head.message == "PONG"


def test_response_tell_blank_line_first():
    head = protocol.parse_response_head(b"SPAMD/1.1 0 EX_OK\r\n\r\n\r\n")
    assert head.headers == ()
    assert head.spam() is None


@pytest.mark.parametrize(
    "data",
    [b"", b"SPAMD/1.1 0 EX_OK", b"HTTP/1.1 200 OK\r\n", b"SPAMD/1.1 0 EX_OK\r\nSpam: True"],
)
def test_response_invalid(data):
    with pytest.raises(SpamdProtocolError):
        protocol.parse_response_head(data)


@pytest.mark.parametrize("value", [b"Maybe ; 1 / 5", b"True ; x / 5", b"True 1 / 5"])
def test_spam_value_invalid(value):
    with pytest.raises(SpamdProtocolError):
        protocol.parse_spam_value(value)


def test_format_request_with_user():
    assert protocol.format_request("CHECK", b"abc", b"bob") == (
        b"CHECK SPAMC/1.5\r\nUser: bob\r\nContent-length: 3\r\n\r\nabc"
    )


def test_exit_codes_match_sysexits():
    assert SpamdExitCode.EX_USAGE == 64
    assert SpamdExitCode.EX_UNAVAILABLE == 69
    assert SpamdExitCode.EX_TEMPFAIL == 75
    assert SpamdExitCode.EX_TIMEOUT == 79


def test_method_sets():
    assert protocol.SCORED_METHODS < protocol.METHODS
    assert "TELL" in protocol.BODY_METHODS
    assert "PING" not in protocol.BODY_METHODS
    assert protocol.METHODS - protocol.BODY_METHODS == {"PING", "SKIP"}
