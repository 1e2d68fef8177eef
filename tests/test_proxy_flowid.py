"""Tests of the flow-identity header value and the key file checks."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest

from spamflow.proxy.flowid import (
    FlowIdError,
    FlowKeyError,
    compute_mac,
    load_flow_key,
    make_flow_header_value,
    parse_flow_header_value,
    verify_flow_header_value,
)

KEY = b"0123456789abcdef-test-key\n"
NOW = 1_733_327_000


def test_mac_is_hmac_sha256_prefix():
    expected = hmac.new(KEY, b"10.77.1.2:40211;1733327000", hashlib.sha256).hexdigest()[:32]
    assert compute_mac(KEY, "10.77.1.2", 40211, NOW) == expected
    assert len(expected) == 32


def test_make_with_key():
    value = make_flow_header_value("10.77.1.2", 40211, KEY, now=NOW + 0.7)
    mac = compute_mac(KEY, "10.77.1.2", 40211, NOW)
    assert value == f"10.77.1.2:40211; t={NOW}; mac={mac}"


def test_make_without_key():
    assert make_flow_header_value("10.77.1.2", 40211, None) == "10.77.1.2:40211"


def test_make_ipv6_brackets():
    value = make_flow_header_value("2001:db8::1", 25, None)
    assert value == "[2001:db8::1]:25"
    identity = parse_flow_header_value(value)
    assert identity.ip == "2001:db8::1"
    assert identity.port == 25


@pytest.mark.parametrize("ip,port", [("10.0.0.300", 1), ("10.0.0.1", 0), ("10.0.0.1", 65536)])
def test_make_invalid(ip, port):
    with pytest.raises(ValueError):
        make_flow_header_value(ip, port, None)


def test_verify_round_trip():
    value = make_flow_header_value("10.77.1.2", 40211, KEY, now=NOW)
    identity = verify_flow_header_value(value, KEY, now=NOW + 60)
    assert identity.flow == "10.77.1.2:40211"
    assert identity.timestamp == NOW


def test_verify_wrong_key():
    value = make_flow_header_value("10.77.1.2", 40211, KEY, now=NOW)
    with pytest.raises(FlowIdError, match="invalid mac"):
        verify_flow_header_value(value, b"other key", now=NOW)


def test_verify_tampered_port():
    value = make_flow_header_value("10.77.1.2", 40211, KEY, now=NOW)
    with pytest.raises(FlowIdError, match="invalid mac"):
        verify_flow_header_value(value.replace("40211", "40212"), KEY, now=NOW)


def test_verify_tampered_timestamp():
    value = make_flow_header_value("10.77.1.2", 40211, KEY, now=NOW)
    with pytest.raises(FlowIdError, match="invalid mac"):
        verify_flow_header_value(value.replace(f"t={NOW}", f"t={NOW + 1}"), KEY, now=NOW)


def test_verify_missing_mac_with_key():
    with pytest.raises(FlowIdError, match="no t and mac"):
        verify_flow_header_value("10.77.1.2:40211", KEY, now=NOW)


def test_verify_too_old():
    value = make_flow_header_value("10.77.1.2", 40211, KEY, now=NOW)
    verify_flow_header_value(value, KEY, now=NOW + 7 * 86400)
    with pytest.raises(FlowIdError, match="older"):
        verify_flow_header_value(value, KEY, now=NOW + 7 * 86400 + 1)
    with pytest.raises(FlowIdError, match="older"):
        verify_flow_header_value(value, KEY, now=NOW + 61, max_age=60)


def test_verify_future():
    value = make_flow_header_value("10.77.1.2", 40211, KEY, now=NOW)
    verify_flow_header_value(value, KEY, now=NOW - 300)
    with pytest.raises(FlowIdError, match="future"):
        verify_flow_header_value(value, KEY, now=NOW - 301)


def test_verify_without_key_ignores_mac():
    identity = verify_flow_header_value("10.0.0.1:25; t=1; mac=00", None)
    assert identity.flow == "10.0.0.1:25"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "10.0.0.1",
        "10.0.0.1:",
        "10.0.0.1:0",
        "10.0.0.1:70000",
        "999.0.0.1:25",
        "10.0.0.1:25; t=1",
        "10.0.0.1:25; mac=00",
        "10.0.0.1:25; t=1; mac=XYZ",
        "10.0.0.1:25 trailing",
        "2001:db8::1:25",
        "host.example:25",
    ],
)
def test_parse_invalid(value):
    with pytest.raises(FlowIdError):
        parse_flow_header_value(value)


def _write_key(path, mode, data=KEY):
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


def test_load_key(tmp_path):
    assert load_flow_key(_write_key(tmp_path / "key", 0o600)) == KEY
    assert load_flow_key(_write_key(tmp_path / "key4", 0o400)) == KEY


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644, 0o666])
def test_load_key_shared_mode(tmp_path, mode):
    path = _write_key(tmp_path / "key", mode)
    with pytest.raises(FlowKeyError, match="chmod 600"):
        load_flow_key(path)


def test_load_key_missing(tmp_path):
    with pytest.raises(FlowKeyError, match="cannot open"):
        load_flow_key(str(tmp_path / "absent"))


def test_load_key_empty(tmp_path):
    with pytest.raises(FlowKeyError, match="empty"):
        load_flow_key(_write_key(tmp_path / "key", 0o600, b""))


def test_load_key_symlink(tmp_path):
    target = _write_key(tmp_path / "key", 0o600)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(FlowKeyError, match="cannot open"):
        load_flow_key(str(link))


def test_load_key_directory(tmp_path):
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(FlowKeyError):
        load_flow_key(str(directory))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_load_key_foreign_owner(tmp_path):
    path = _write_key(tmp_path / "key", 0o600)
    os.chown(path, 65534, 65534)
    with pytest.raises(FlowKeyError, match="owned by uid 65534"):
        load_flow_key(path)
