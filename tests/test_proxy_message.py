"""Tests of header-block edits on raw message bytes."""

from __future__ import annotations

import pytest

from spamflow.proxy.message import (
    body_offset,
    find_header,
    find_headers,
    prepend_header,
    remove_header,
)

LF_MESSAGE = (
    b"Received: from a by b\n"
    b"X-Spamflow: p=0.99; model=nb-1; flow=1.2.3.4:5\n"
    b"X-Spamflow-Flow: 10.0.0.1:4000; t=1; mac=00\n"
    b"Subject: hello\n"
    b"\n"
    b"X-Spamflow: in the body stays\n"
    b"last line\n"
)


def test_remove_lf():
    assert remove_header(LF_MESSAGE, "X-Spamflow") == (
        b"Received: from a by b\n"
        b"X-Spamflow-Flow: 10.0.0.1:4000; t=1; mac=00\n"
        b"Subject: hello\n"
        b"\n"
        b"X-Spamflow: in the body stays\n"
        b"last line\n"
    )


def test_remove_crlf_folded_and_repeated():
    message = (
        b"x-spamflow: p=1.00;\r\n"
        b"\tmodel=forged\r\n"
        b"  ; flow=9.9.9.9:1\r\n"
        b"Subject: s\r\n"
        b"X-SPAMFLOW : p=0.00; model=x; flow=y\r\n"
        b"To: a@example.com\r\n"
        b"\r\n"
        b"body\r\n"
    )
    assert remove_header(message, "X-Spamflow") == (
        b"Subject: s\r\nTo: a@example.com\r\n\r\nbody\r\n"
    )


def test_remove_keeps_similar_names():
    message = b"X-Spamflow-Flow: a\nX-Spamflowx: b\nX-Spam-Flag: c\n\nbody"
    assert remove_header(message, "X-Spamflow") == message


def test_remove_no_blank_line():
    message = b"Subject: a\nX-Spamflow: p=1.00\n continued"
    assert remove_header(message, "X-Spamflow") == b"Subject: a\n"


def test_remove_header_only_message_ending_with_newline():
    message = b"X-Spamflow: p=1.00\nSubject: a\n"
    assert remove_header(message, "X-Spamflow") == b"Subject: a\n"


def test_remove_empty_header_block():
    message = b"\nX-Spamflow: body line\n"
    assert remove_header(message, "X-Spamflow") == message


def test_remove_empty_message():
    assert remove_header(b"", "X-Spamflow") == b""


def test_remove_after_mbox_separator():
    message = b"From sender@example.com Mon Jan  1 00:00:00 2024\nX-Spamflow: p=1.00\nA: b\n\nx"
    assert remove_header(message, "X-Spamflow") == (
        b"From sender@example.com Mon Jan  1 00:00:00 2024\nA: b\n\nx"
    )


def test_remove_body_bytes_identical():
    body = b"\r\n\x00\xff binary \r\nX-Spamflow: nope\n\n\r\n"
    message = b"X-Spamflow: a\r\nSubject: b\r\n\r\n" + body
    result = remove_header(message, "X-Spamflow")
    assert result.endswith(b"\r\n\r\n" + body)
    assert result[body_offset(result):] == body


def test_remove_lone_cr_not_a_line_break():
    message = b"Subject: a\rX-Spamflow: b\nX-Spamflow: c\n\nbody"
    assert remove_header(message, "X-Spamflow") == b"Subject: a\rX-Spamflow: b\n\nbody"


def test_find_topmost():
    message = b"X-Spamflow-Flow: 1.1.1.1:1\nX-Spamflow-Flow: 2.2.2.2:2\n\nX-Spamflow-Flow: 3\n"
    assert find_header(message, "X-Spamflow-Flow") == "1.1.1.1:1"


def test_find_all_in_order():
    message = (
        b"X-Spamflow: a\nSubject: s\nx-spamflow: b;\n\tc\nX-Spamflow-Flow: d\n"
        b"\nX-Spamflow: e\n"
    )
    assert find_headers(message, "X-Spamflow") == ["a", "b;\tc"]
    assert find_headers(message, "Received") == []


def test_find_unfolds_crlf():
    message = b"Subject: x\r\nx-spamflow-flow: 10.0.0.1:25;\r\n t=5; mac=ab  \r\n\r\nbody"
    assert find_header(message, "X-Spamflow-Flow") == "10.0.0.1:25; t=5; mac=ab"


def test_find_absent_and_body_only():
    message = b"Subject: x\n\nX-Spamflow-Flow: 1.1.1.1:1\n"
    assert find_header(message, "X-Spamflow-Flow") is None
    assert find_header(b"", "X-Spamflow-Flow") is None


def test_find_does_not_match_prefix():
    message = b"X-Spamflow-Flow: 1.1.1.1:1\n\n"
    assert find_header(message, "X-Spamflow") is None


def test_find_message_id_without_body():
    assert find_header(b"Message-Id: <a@b>", "Message-ID") == "<a@b>"


def test_prepend_lf():
    assert prepend_header(b"A: b\n\nbody\r\n", "X-New", "v") == b"X-New: v\nA: b\n\nbody\r\n"


def test_prepend_crlf():
    assert prepend_header(b"A: b\r\n\r\nbody\n", "X-New", "v") == (
        b"X-New: v\r\nA: b\r\n\r\nbody\n"
    )


def test_prepend_after_mbox_separator():
    message = b"From a@b Thu Jan  1 00:00:00 1970\r\nA: b\r\n\r\n"
    assert prepend_header(message, "X", "1") == (
        b"From a@b Thu Jan  1 00:00:00 1970\r\nX: 1\r\nA: b\r\n\r\n"
    )


def test_prepend_from_header_is_no_separator():
    assert prepend_header(b"From: a@b\n\n", "X", "1") == b"X: 1\nFrom: a@b\n\n"


def test_prepend_empty_message():
    assert prepend_header(b"", "X", "1") == b"X: 1\n"


def test_prepend_rejects_line_break():
    with pytest.raises(ValueError):
        prepend_header(b"A: b\n\n", "X", "1\r\nBcc: victim@example.com")


def test_body_offset():
    assert body_offset(b"A: b\n\nbody") == 6
    assert body_offset(b"A: b\r\n\r\nbody") == 8
    assert body_offset(b"A: b\n") == 5
    assert body_offset(b"\nbody") == 1
