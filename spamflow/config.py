"""Configuration for every spamflow daemon, read from one TOML file.

Each daemon reads its own table (``[proxy]``, ``[policy]``, ``[tap]``, ``[learn]``).
Command-line options override the file, and the file overrides the defaults below.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = Path("/etc/spamflow/spamflow.toml")


class ConfigError(ValueError):
    """An invalid or unreadable configuration file or value."""


@dataclass
class ProxyConfig:
    listen: str = "127.0.0.1:7830"
    spamd: str = "127.0.0.1:783"
    tap_socket: str = "/run/spamflow/tap.sock"
    # Seconds to wait for the tap's answer before scanning without a verdict.
    tap_timeout: float = 0.25
    # Client addresses whose flow-identity header is believed.
    trusted_mta: list[str] = field(default_factory=lambda: ["127.0.0.1", "::1"])
    # Key shared with the policy service. When set, a flow header needs a valid MAC.
    flow_key_file: str | None = None
    # Messages larger than this (bytes) pass through to spamd unchanged.
    max_message_size: int = 10 * 1024 * 1024
    # Seconds a client may take to send its whole request.
    client_timeout: float = 30.0
    # Seconds spamd may take to answer one request.
    spamd_timeout: float = 300.0
    db: str = "/var/lib/spamflow/examples.sqlite"
    model: str = "/var/lib/spamflow/model.joblib"


@dataclass
class PolicyConfig:
    listen: str = "127.0.0.1:10040"
    flow_key_file: str | None = None


@dataclass
class TapConfig:
    queue: int = 0
    socket: str = "/run/spamflow/tap.sock"
    # Local TCP port of the mail server; the other end of each flow is the remote peer.
    server_port: int = 25
    max_flows: int = 65536
    # Seconds a closed flow stays queryable.
    linger: float = 600.0


@dataclass
class LearnConfig:
    # A message whose SpamAssassin score without SPAMFLOW rules is >= spam_threshold
    # becomes a spam example, <= ham_threshold a ham example.
    spam_threshold: float = 6.0
    ham_threshold: float = 0.0
    model_kind: str = "nb"
    # Retrain after this many new examples.
    retrain_every: int = 25
    min_examples_per_class: int = 10
    # Train on at most this many of the newest examples, which bounds training time.
    max_training_examples: int = 5000


@dataclass
class Config:
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    tap: TapConfig = field(default_factory=TapConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)


def _fill_section(section: Any, table: dict[str, Any], name: str) -> None:
    known = {f.name: f for f in dataclasses.fields(section)}
    for key, value in table.items():
        if key not in known:
            allowed = ", ".join(sorted(known))
            raise ConfigError(f"unknown key {key!r} in [{name}]; allowed keys: {allowed}")
        default = getattr(section, key)
        if isinstance(default, float) and isinstance(value, int):
            value = float(value)
        if default is not None and not isinstance(value, type(default)):
            raise ConfigError(
                f"invalid value for {name}.{key}: {value!r} "
                f"(expected {type(default).__name__})"
            )
        setattr(section, key, value)


def parse_host_port(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[IPV6]:PORT``, port 0 included. Raises ConfigError."""
    host, separator, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not separator or not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ConfigError(f"invalid address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:783")
    return host, int(port_text)


def load_config(path: str | Path | None) -> Config:
    """Read a TOML configuration file, or return the defaults when path is None.

    Raises ConfigError naming the file and the bad key or value.
    """
    config = Config()
    if path is None:
        return config
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"invalid TOML in config file {path}: {error}") from error

    for name, table in document.items():
        section = getattr(config, name, None)
        if section is None or not isinstance(table, dict):
            allowed = ", ".join(f.name for f in dataclasses.fields(config))
            raise ConfigError(f"unknown table [{name}] in {path}; allowed tables: {allowed}")
        _fill_section(section, table, name)
    return config


def apply_overrides(section: Any, options: dict[str, Any]) -> None:
    """Set each option that is not None on the section (command-line values win)."""
    for key, value in options.items():
        if value is not None:
            setattr(section, key, value)
