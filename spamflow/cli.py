"""The ``spamflow`` command and its subcommands.

Each package registers its own subcommands, and imports its heavy dependencies
(scikit-learn, NetfilterQueue) only when a subcommand runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from spamflow import __version__
from spamflow.config import Config, ConfigError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]

# For each subcommand, the configuration key behind each option destination. The help
# text of these options gets the key and its built-in default appended.
_CONFIG_OPTIONS: dict[str, dict[str, str]] = {
    **{
        table: {field.name: f"{table}.{field.name}" for field in dataclasses.fields(section)}
        for table, section in vars(Config()).items()
        if table in ("proxy", "policy", "tap")
    },
    "train": {
        "db": "proxy.db",
        "model": "proxy.model",
        "kind": "learn.model_kind",
        "min_examples": "learn.min_examples_per_class",
        "max_examples": "learn.max_training_examples",
    },
}


def build_parser() -> argparse.ArgumentParser:
    from spamflow.models import cli as models_cli
    from spamflow.nfqueue_tap import cli as tap_cli
    from spamflow.proxy import cli as proxy_cli
    from spamflow.replay import cli as replay_cli

    parser = argparse.ArgumentParser(
        prog="spamflow",
        description="Score mail by the TCP behaviour of the connection that delivered it.",
    )
    parser.add_argument("--version", action="version", version=f"spamflow {__version__}")
    _add_global_options(parser, config_default=None, log_level_default="INFO")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (proxy_cli, tap_cli, models_cli, replay_cli):
        module.register(subparsers)
    for name, subparser in subparsers.choices.items():
        # SUPPRESS keeps a value given before the subcommand when the option is absent
        # after it.
        group = subparser.add_argument_group("global options (also accepted before COMMAND)")
        _add_global_options(
            group, config_default=argparse.SUPPRESS, log_level_default=argparse.SUPPRESS
        )
        _append_config_defaults(subparser, _CONFIG_OPTIONS.get(name, {}))
    return parser


def _add_global_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    config_default: str | None,
    log_level_default: str,
) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=config_default,
        metavar="FILE",
        help="TOML configuration file (default: built-in defaults)",
    )
    parser.add_argument(
        "--log-level",
        default=log_level_default,
        choices=LOG_LEVELS,
        help="minimum level of log messages written to stderr (default: INFO)",
    )


def _append_config_defaults(parser: argparse.ArgumentParser, keys: dict[str, str]) -> None:
    """Append "(config: TABLE.KEY, default: VALUE)" to the help of each configured option."""
    defaults = Config()
    for action in parser._actions:
        key = keys.get(action.dest)
        if key is None or action.help in (None, argparse.SUPPRESS):
            continue
        table, field_name = key.split(".")
        value = getattr(getattr(defaults, table), field_name)
        if value is None:
            default_text = "not set"
        elif isinstance(value, list):
            default_text = ", ".join(str(item) for item in value)
        else:
            default_text = str(value)
        # argparse formats help with the % operator.
        action.help += f" (config: {key}, default: {default_text.replace('%', '%%')})"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT, stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except ConfigError as error:
        print(f"spamflow: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
