"""The ``spamflow proxy`` and ``spamflow policy`` subcommands."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from spamflow.config import ConfigError, apply_overrides, load_config, parse_host_port

logger = logging.getLogger(__name__)


def _host_port(text: str) -> str:
    """Validate HOST:PORT for argparse, which prints the error and exits with 2."""
    try:
        parse_host_port(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a whole number above 0, got {text!r}")
    return int(text)


def register(subparsers: Any) -> None:
    proxy = subparsers.add_parser(
        "proxy",
        help="run the spamd proxy that adds the flow verdict header",
        description="Relay spamc requests to spamd and add the X-Spamflow verdict header "
        "to messages from trusted MTAs. Options override the [proxy] table of the "
        "configuration file. Learning settings come from its [learn] table.",
    )
    proxy.add_argument(
        "--listen", type=_host_port, metavar="HOST:PORT", help="address to accept spamc on"
    )
    proxy.add_argument(
        "--spamd", type=_host_port, metavar="HOST:PORT", help="address of the real spamd"
    )
    proxy.add_argument("--tap-socket", metavar="PATH", help="Unix socket of the packet tap")
    proxy.add_argument(
        "--tap-timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="maximum time to wait for the tap's response",
    )
    proxy.add_argument(
        "--trusted-mta",
        action="append",
        metavar="ADDR",
        help="client address (or network) whose X-Spamflow-Flow header is believed; "
        "repeat for several (replaces the configured list)",
    )
    proxy.add_argument(
        "--flow-key-file",
        metavar="PATH",
        help="key file shared with the policy service (mode 0600)",
    )
    proxy.add_argument("--db", metavar="PATH", help="SQLite file of recorded examples")
    proxy.add_argument(
        "--model", metavar="PATH", help="model file that training writes and the proxy loads"
    )
    proxy.add_argument(
        "--max-message-size",
        type=_positive_int,
        metavar="BYTES",
        help="maximum message size to rewrite; larger messages pass to spamd unchanged",
    )
    proxy.add_argument(
        "--metrics-listen",
        type=_host_port,
        metavar="HOST:PORT",
        help="address to serve Prometheus metrics on at /metrics",
    )
    proxy.set_defaults(func=run_proxy)

    policy = subparsers.add_parser(
        "policy",
        help="run the Postfix policy service that adds X-Spamflow-Flow",
        description="Reply to Postfix policy requests with PREPEND X-Spamflow-Flow. "
        "Options override the [policy] table of the configuration file.",
    )
    policy.add_argument(
        "--listen", type=_host_port, metavar="HOST:PORT", help="address to accept Postfix on"
    )
    policy.add_argument(
        "--flow-key-file", metavar="PATH", help="key file shared with the proxy (mode 0600)"
    )
    policy.set_defaults(func=run_policy)


def _load_key(path: str | None) -> bytes | None:
    from spamflow.proxy.flowid import FlowKeyError, load_flow_key

    if path is None:
        return None
    try:
        return load_flow_key(path)
    except FlowKeyError as error:
        raise ConfigError(str(error)) from error


def run_proxy(args: argparse.Namespace) -> int:
    import asyncio
    import sqlite3

    from spamflow.proxy.server import check_spamd_address, parse_trusted, serve_proxy

    config = load_config(args.config)
    apply_overrides(
        config.proxy,
        {
            "listen": args.listen,
            "spamd": args.spamd,
            "tap_socket": args.tap_socket,
            "tap_timeout": args.tap_timeout,
            "trusted_mta": args.trusted_mta,
            "flow_key_file": args.flow_key_file,
            "db": args.db,
            "model": args.model,
            "max_message_size": args.max_message_size,
            "metrics_listen": args.metrics_listen,
        },
    )
    check_spamd_address(config.proxy.listen, config.proxy.spamd)
    parse_trusted(config.proxy.trusted_mta)
    key = _load_key(config.proxy.flow_key_file)
    if key is None:
        logger.warning("no flow_key_file: flow headers from trusted MTAs are taken unsigned")

    from spamflow.models.autolearn import AutoLearner
    from spamflow.models.store import ExampleStore

    try:
        store = ExampleStore(config.proxy.db)
    except (OSError, sqlite3.Error) as error:
        raise ConfigError(f"cannot open example database {config.proxy.db}: {error}") from error
    try:
        learner = AutoLearner(store, config.proxy.model, config.learn)
    except ValueError as error:
        raise ConfigError(str(error)) from error

    try:
        asyncio.run(serve_proxy(config.proxy, learner, key))
    except OSError as error:
        logger.error("proxy failed on %s: %s", config.proxy.listen, error)
        return 1
    finally:
        store.close()
    return 0


def run_policy(args: argparse.Namespace) -> int:
    import asyncio

    from spamflow.proxy.policy import serve_policy

    config = load_config(args.config)
    apply_overrides(
        config.policy, {"listen": args.listen, "flow_key_file": args.flow_key_file}
    )
    host, port = parse_host_port(config.policy.listen)
    key = _load_key(config.policy.flow_key_file)
    if key is None:
        logger.warning("no flow_key_file: flow headers are written without t and mac")
    try:
        asyncio.run(serve_policy(host, port, key))
    except OSError as error:
        logger.error("policy service failed on %s: %s", config.policy.listen, error)
        return 1
    return 0
