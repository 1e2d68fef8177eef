"""Tests of the configuration file reader and the command-line overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from spamflow.config import (
    MODEL_KINDS,
    Config,
    ConfigError,
    apply_overrides,
    load_config,
    validate_section,
)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spamflow.toml"
    path.write_text(text)
    return path


def test_defaults_are_valid():
    config = Config()
    for section in (config.proxy, config.policy, config.tap, config.learn):
        validate_section(section, "in the defaults")


def test_model_kinds_match_classifier():
    from spamflow.models.classifier import MODEL_KINDS as CLASSIFIER_KINDS

    assert MODEL_KINDS == CLASSIFIER_KINDS


def test_valid_file_is_read(tmp_path):
    path = write_config(
        tmp_path,
        '[proxy]\ntap_timeout = 1\nflow_key_file = "/etc/spamflow/flow.key"\n'
        'trusted_mta = ["10.0.0.0/8"]\n'
        '[tap]\nqueue = 3\nlinger = 60\n'
        '[learn]\nham_threshold = -1\nspam_threshold = 8\nmodel_kind = "tree"\n',
    )
    config = load_config(path)
    assert config.proxy.tap_timeout == 1.0
    assert isinstance(config.proxy.tap_timeout, float)
    assert config.proxy.flow_key_file == "/etc/spamflow/flow.key"
    assert config.proxy.trusted_mta == ["10.0.0.0/8"]
    assert config.tap.queue == 3
    assert config.tap.linger == 60.0
    assert config.learn.ham_threshold == -1.0
    assert config.learn.model_kind == "tree"


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "[proxy]\nflow_key_file = 5",
            "invalid proxy.flow_key_file 5 in {path}: expected a string",
        ),
        ("[tap]\nqueue = true", "invalid tap.queue true in {path}: expected an integer"),
        ("[tap]\nmax_flows = 1.5", "invalid tap.max_flows 1.5 in {path}: expected an integer"),
        (
            '[proxy]\ntap_timeout = "1"',
            "invalid proxy.tap_timeout '1' in {path}: expected a number",
        ),
        (
            "[proxy]\ntap_timeout = true",
            "invalid proxy.tap_timeout true in {path}: expected a number",
        ),
        (
            '[proxy]\ntrusted_mta = ["127.0.0.1", 3]',
            "invalid proxy.trusted_mta ['127.0.0.1', 3] in {path}: expected a list of strings",
        ),
        ('[proxy]\ntrusted_mta = "127.0.0.1"', "expected a list of strings"),
        (
            "[proxy]\ntap_timeout = -1",
            "invalid proxy.tap_timeout -1.0 in {path}: expected a number of seconds above 0",
        ),
        ("[proxy]\nclient_timeout = 0", "invalid proxy.client_timeout 0.0 in {path}"),
        ("[proxy]\nspamd_timeout = nan", "invalid proxy.spamd_timeout nan in {path}"),
        ("[proxy]\nmax_message_size = 0", "invalid proxy.max_message_size 0 in {path}"),
        (
            '[proxy]\nspamd = "localhost"',
            "invalid proxy.spamd 'localhost' in {path}: expected HOST:PORT",
        ),
        (
            '[policy]\nlisten = "nonsense"',
            "invalid policy.listen 'nonsense' in {path}: expected HOST:PORT",
        ),
        (
            "[tap]\nqueue = 65536",
            "invalid tap.queue 65536 in {path}: expected a whole number from 0 to 65535",
        ),
        (
            "[tap]\nserver_port = 0",
            "invalid tap.server_port 0 in {path}: expected a whole number from 1",
        ),
        (
            "[tap]\nmax_flows = 0",
            "invalid tap.max_flows 0 in {path}: expected a whole number of at least 1",
        ),
        ("[tap]\nlinger = 0", "invalid tap.linger 0.0 in {path}"),
        (
            '[learn]\nmodel_kind = "oracle"',
            "invalid learn.model_kind 'oracle' in {path}: expected one of nb, tree, svm, xgb",
        ),
        (
            "[learn]\nham_threshold = 7",
            "invalid learn.ham_threshold 7.0 in {path}: expected a score below "
            "learn.spam_threshold (6.0)",
        ),
        ("[learn]\nspam_threshold = inf", "invalid learn.spam_threshold inf in {path}"),
        ("[learn]\nretrain_every = 0", "invalid learn.retrain_every 0 in {path}"),
        (
            "[learn]\nmin_examples_per_class = 0",
            "invalid learn.min_examples_per_class 0 in {path}",
        ),
        ("[learn]\nmax_training_examples = 1", "invalid learn.max_training_examples 1 in {path}"),
        (
            "[proxy]\nbogus = 1",
            "unknown key 'bogus' in [proxy] of {path}; allowed keys: client_timeout, db,",
        ),
        ("[spamd]\nport = 1", "unknown table [spamd] in {path}; allowed tables: proxy,"),
    ],
)
def test_invalid_file_value_raises(tmp_path, text, message):
    path = write_config(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message.format(path=path) in str(caught.value)


@pytest.mark.parametrize(
    "section, options, message",
    [
        (
            "proxy", {"tap_timeout": -1.0},
            "invalid proxy.tap_timeout -1.0 from option --tap-timeout",
        ),
        ("proxy", {"listen": "nonsense"}, "invalid proxy.listen 'nonsense' from option --listen"),
        (
            "tap", {"queue": True},
            "invalid tap.queue true from option --queue: expected an integer",
        ),
        ("tap", {"queue": -1}, "invalid tap.queue -1 from option --queue"),
        ("policy", {"listen": "1.2.3.4:70000"}, "invalid policy.listen '1.2.3.4:70000'"),
        (
            "learn",
            {"ham_threshold": 9.0},
            "invalid learn.ham_threshold 9.0 after the command-line options",
        ),
    ],
)
def test_invalid_override_raises(section, options, message):
    config = Config()
    with pytest.raises(ConfigError) as caught:
        apply_overrides(getattr(config, section), options)
    assert message in str(caught.value)


def test_override_replaces_file_value(tmp_path):
    path = write_config(tmp_path, "[tap]\nqueue = 3\nlinger = 30\n")
    config = load_config(path)
    apply_overrides(config.tap, {"queue": 7, "linger": None, "server_port": 2525})
    assert config.tap.queue == 7
    assert config.tap.linger == 30.0
    assert config.tap.server_port == 2525


def test_override_int_becomes_float():
    config = Config()
    apply_overrides(config.proxy, {"tap_timeout": 2})
    assert config.proxy.tap_timeout == 2.0
    assert isinstance(config.proxy.tap_timeout, float)
