"""Configuration for every spamflow daemon, read from one TOML file.

Each daemon reads its own table (``[proxy]``, ``[policy]``, ``[tap]``, ``[learn]``).
Command-line options override the file, and the file overrides the defaults below.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = Path("/etc/spamflow/spamflow.toml")

# Model kinds that [learn] model_kind accepts. spamflow.models.classifier.MODEL_KINDS lists
# the same kinds, and this copy lets the configuration load without scikit-learn.
MODEL_KINDS: tuple[str, ...] = ("nb", "tree", "svm", "xgb")


class ConfigError(ValueError):
    """An invalid or unreadable configuration file or value."""


@dataclass
class ProxyConfig:
    listen: str = "127.0.0.1:7830"
    spamd: str = "127.0.0.1:783"
    tap_socket: str = "/run/spamflow/tap.sock"
    # Seconds to wait for the tap's response before scanning without a verdict.
    tap_timeout: float = 0.25
    # Client addresses whose flow-identity header is believed.
    trusted_mta: list[str] = field(default_factory=lambda: ["127.0.0.1", "::1"])
    # Key shared with the policy service. When set, a flow header needs a valid MAC.
    flow_key_file: str | None = None
    # Messages larger than this (bytes) pass through to spamd unchanged.
    max_message_size: int = 10 * 1024 * 1024
    # Seconds a client may take to send its whole request.
    client_timeout: float = 30.0
    # Seconds spamd may take to respond to one request. It exceeds spamd's own 300 s child
    # timeout (spamd 4.0.1 default), so a client gets spamd's timeout reply, not ours.
    spamd_timeout: float = 330.0
    db: str = "/var/lib/spamflow/examples.sqlite"
    model: str = "/var/lib/spamflow/model.joblib"
    # HOST:PORT of the Prometheus endpoint (GET /metrics). None serves no metrics.
    metrics_listen: str | None = None


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
    # A C4.5-style tree by default: Gaussian naive Bayes gave p=1.0 to large ham messages
    # on the demo's ham path, because their byte and packet counts lay far outside the
    # narrow ham distribution, while the tree splits on the path features (TTL, RTT).
    model_kind: str = "tree"
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


def parse_host_port(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[IPV6]:PORT``, port 0 included. Raises ConfigError."""
    host, separator, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not separator or not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ConfigError(f"invalid address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:783")
    return host, int(port_text)


def load_config(path: str | Path | None) -> Config:
    """Read and validate a TOML configuration file, or return the defaults when path is None.

    Raises ConfigError naming the file, the table.key and the bad value.
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
        _fill_section(section, table, name, path)
        validate_section(section, f"in {path}")
    return config


def apply_overrides(section: Any, options: dict[str, Any]) -> None:
    """Set each option that is not None on the section (command-line values win).

    Each key is a field name, and the option that set it is spelled ``--key-with-dashes``
    in error messages. Raises ConfigError for a value of the wrong type or out of range,
    with the same checks that load_config applies to the file.
    """
    table = _table_name(section)
    hints = typing.get_type_hints(type(section))
    for key, value in options.items():
        if value is None:
            continue
        origin = "from option --" + key.replace("_", "-")
        setattr(section, key, _checked_type(value, hints[key], f"{table}.{key}", origin))
        _check_range(section, table, key, origin)
    validate_section(section, "after the command-line options")


def validate_section(section: Any, origin: str) -> None:
    """Check the value range of every field of a configuration section.

    origin completes the error message, e.g. "in /etc/spamflow/spamflow.toml".
    Raises ConfigError for the first invalid value.
    """
    table = _table_name(section)
    for key in _RANGE_CHECKS.get(type(section), {}):
        _check_range(section, table, key, origin)
    if isinstance(section, LearnConfig) and not section.ham_threshold < section.spam_threshold:
        raise ConfigError(
            f"invalid learn.ham_threshold {section.ham_threshold!r} {origin}: expected a "
            f"score below learn.spam_threshold ({section.spam_threshold!r})"
        )


def _check_range(section: Any, table: str, key: str, origin: str) -> None:
    check = _RANGE_CHECKS.get(type(section), {}).get(key)
    if check is None:
        return
    value = getattr(section, key)
    expected = check(value)
    if expected is not None:
        raise ConfigError(
            f"invalid {table}.{key} {_format_value(value)} {origin}: expected {expected}"
        )


def _table_name(section: Any) -> str:
    for name, section_type in typing.get_type_hints(Config).items():
        if isinstance(section, section_type):
            return name
    raise TypeError(f"{type(section).__name__} is not a configuration section")


def _fill_section(section: Any, table: dict[str, Any], name: str, path: str | Path) -> None:
    known = {f.name for f in dataclasses.fields(section)}
    hints = typing.get_type_hints(type(section))
    for key, value in table.items():
        if key not in known:
            allowed = ", ".join(sorted(known))
            raise ConfigError(
                f"unknown key {key!r} in [{name}] of {path}; allowed keys: {allowed}"
            )
        setattr(section, key, _checked_type(value, hints[key], f"{name}.{key}", f"in {path}"))


def _checked_type(value: Any, annotation: Any, name: str, origin: str) -> Any:
    """Return value, an int converted to float where a float is expected.

    Raises ConfigError when value does not match the field's annotation.
    """
    if _matches(value, annotation):
        if _accepts(annotation, float) and type(value) is int:
            return float(value)
        return value
    raise ConfigError(
        f"invalid {name} {_format_value(value)} {origin}: expected {_describe(annotation)}"
    )


def _format_value(value: Any) -> str:
    """Format a value for an error message, with booleans spelled as in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _accepts(annotation: Any, kind: type) -> bool:
    if annotation is kind:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return kind in typing.get_args(annotation)
    return False


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, member) for member in typing.get_args(annotation))
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_matches(item, item_type) for item in value)
    if annotation is type(None):
        return value is None
    # bool is a subclass of int, but true is no queue number or count.
    if annotation is int:
        return type(value) is int
    if annotation is float:
        return type(value) in (int, float)
    return isinstance(value, annotation)


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return " or ".join(_describe(member) for member in members)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        return f"a list of {_describe(item_type).removeprefix('a ').removeprefix('an ')}s"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        annotation, annotation.__name__
    )


def _address(value: str) -> str | None:
    try:
        parse_host_port(value)
    except ConfigError:
        return "HOST:PORT or [IPV6]:PORT with a port of 0-65535, e.g. 127.0.0.1:783"
    return None


def _optional_address(value: str | None) -> str | None:
    return None if value is None else _address(value)


def _seconds(value: float) -> str | None:
    return None if math.isfinite(value) and value > 0 else "a number of seconds above 0"


def _at_least(minimum: int) -> Any:
    return lambda value: None if value >= minimum else f"a whole number of at least {minimum}"


def _between(low: int, high: int) -> Any:
    return lambda value: None if low <= value <= high else f"a whole number from {low} to {high}"


def _finite(value: float) -> str | None:
    return None if math.isfinite(value) else "a finite number"


def _model_kind(value: str) -> str | None:
    return None if value in MODEL_KINDS else f"one of {', '.join(MODEL_KINDS)}"


# Per section, a check for each field with a limited range: it returns None for a valid
# value, else a description of the valid values.
_RANGE_CHECKS: dict[type, dict[str, Any]] = {
    ProxyConfig: {
        "listen": _address,
        "spamd": _address,
        "tap_timeout": _seconds,
        "max_message_size": _at_least(1),
        "client_timeout": _seconds,
        "spamd_timeout": _seconds,
        "metrics_listen": _optional_address,
    },
    PolicyConfig: {"listen": _address},
    TapConfig: {
        "queue": _between(0, 65535),
        "server_port": _between(1, 65535),
        "max_flows": _at_least(1),
        "linger": _seconds,
    },
    LearnConfig: {
        "spam_threshold": _finite,
        "ham_threshold": _finite,
        "model_kind": _model_kind,
        "retrain_every": _at_least(1),
        "min_examples_per_class": _at_least(1),
        # Training needs at least one example of each class.
        "max_training_examples": _at_least(2),
    },
}
