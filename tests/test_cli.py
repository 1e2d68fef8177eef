"""Tests of the ``spamflow`` command line: global options and help text."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spamflow.cli import build_parser


def help_text(command: str) -> str:
    parser = build_parser()
    subparsers = next(
        action for action in parser._actions if action.dest == "command"
    )
    # Joining the words undoes the line wrapping of argparse.
    return " ".join(subparsers.choices[command].format_help().split())


@pytest.mark.parametrize("command", ["proxy", "policy", "tap", "train", "demo", "replay"])
def test_config_after_command(command):
    extra = ["--corpus", "corpus"] if command == "replay" else []
    args = build_parser().parse_args([command, *extra, "-c", "after.toml"])
    assert args.config == "after.toml"
    assert args.log_level == "INFO"


def test_config_before_command_kept():
    args = build_parser().parse_args(["-c", "before.toml", "--log-level", "DEBUG", "tap"])
    assert args.config == "before.toml"
    assert args.log_level == "DEBUG"


def test_option_after_command_wins():
    argv = ["-c", "before.toml", "tap", "--config", "after.toml", "--log-level", "ERROR"]
    args = build_parser().parse_args(argv)
    assert args.config == "after.toml"
    assert args.log_level == "ERROR"


def test_no_config_is_none():
    args = build_parser().parse_args(["policy"])
    assert args.config is None


@pytest.mark.parametrize(
    "command, expected",
    [
        ("proxy", "(config: proxy.listen, default: 127.0.0.1:7830)"),
        ("proxy", "(config: proxy.spamd, default: 127.0.0.1:783)"),
        ("proxy", "(config: proxy.tap_timeout, default: 0.25)"),
        ("proxy", "(config: proxy.trusted_mta, default: 127.0.0.1, ::1)"),
        ("proxy", "(config: proxy.flow_key_file, default: not set)"),
        ("proxy", "(config: proxy.max_message_size, default: 10485760)"),
        ("policy", "(config: policy.listen, default: 127.0.0.1:10040)"),
        ("tap", "(config: tap.queue, default: 0)"),
        ("tap", "(config: tap.server_port, default: 25)"),
        ("tap", "(config: tap.linger, default: 600.0)"),
        ("train", "(config: proxy.model, default: /var/lib/spamflow/model.joblib)"),
        ("train", "(config: learn.model_kind, default: tree)"),
        ("train", "(config: learn.min_examples_per_class, default: 10)"),
        ("train", "(config: learn.max_training_examples, default: 5000)"),
    ],
)
def test_help_shows_config_default(command, expected):
    assert expected in help_text(command)


def test_help_lists_global_options():
    text = help_text("proxy")
    assert "-c FILE, --config FILE" in text
    assert "--log-level" in text


def test_config_error_after_command(tmp_path):
    config = tmp_path / "spamflow.toml"
    config.write_text('[policy]\nlisten = "nonsense"\n')
    result = subprocess.run(
        [sys.executable, "-m", "spamflow", "policy", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert f"spamflow: invalid policy.listen 'nonsense' in {config}:" in result.stderr
    assert "Traceback" not in result.stderr
