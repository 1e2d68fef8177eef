"""The ``spamflow`` command and its subcommands.

Each package registers its own subcommands, and imports its heavy dependencies
(scikit-learn, NetfilterQueue) only when a subcommand runs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from spamflow import __version__
from spamflow.config import ConfigError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
    parser.add_argument(
        "-c", "--config", help="TOML configuration file (default: built-in defaults)"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="minimum level of log messages written to stderr (default: INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (proxy_cli, tap_cli, models_cli, replay_cli):
        module.register(subparsers)
    return parser


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
