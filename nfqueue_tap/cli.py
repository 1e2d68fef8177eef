"""The ``spamflow tap`` subcommand: run the NFQUEUE tap, or read a capture offline."""

from __future__ import annotations

import argparse
import json
import os
import sys

from spamflow.config import TapConfig, apply_overrides, load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tap`` subcommand to the spamflow command line."""
    parser = subparsers.add_parser(
        "tap",
        help="measure TCP features of mail connections from an NFQUEUE (needs root)",
        description=(
            "Accept every packet of an NFQUEUE queue, compute per-connection TCP "
            "features and serve them on a Unix socket. With --pcap, compute the features "
            "of a capture file instead, print one JSON line per flow and exit."
        ),
    )
    parser.add_argument("--queue", type=int, metavar="N", help="NFQUEUE queue number")
    parser.add_argument("--socket", metavar="PATH", help="path of the query Unix socket")
    parser.add_argument(
        "--server-port",
        type=int,
        metavar="PORT",
        help="TCP port of the mail server; the other end is the remote peer",
    )
    parser.add_argument(
        "--max-flows",
        type=int,
        metavar="N",
        help="maximum number of flows kept in memory",
    )
    parser.add_argument(
        "--linger",
        type=float,
        metavar="SECONDS",
        help="seconds a flow stays queryable after its last packet",
    )
    parser.add_argument(
        "--pcap",
        metavar="FILE",
        help="read this pcap or pcapng file (may be gzip-compressed) instead of the queue",
    )
    parser.set_defaults(func=run)


def tap_config(args: argparse.Namespace) -> TapConfig:
    """Read the [tap] table of the config file and apply the command-line options.

    Raises ConfigError for a value of the wrong type or out of range.
    """
    config = load_config(getattr(args, "config", None)).tap
    apply_overrides(
        config,
        {
            "queue": args.queue,
            "socket": args.socket,
            "server_port": args.server_port,
            "max_flows": args.max_flows,
            "linger": args.linger,
        },
    )
    return config


def run(args: argparse.Namespace) -> int:
    config = tap_config(args)
    if args.pcap:
        return _run_offline(args.pcap, config)

    from spamflow.nfqueue_tap.server import run_tap

    return run_tap(config)


def _run_offline(path: str, config: TapConfig) -> int:
    from spamflow.nfqueue_tap.pcap import CaptureFormatError, capture_flows, flow_record

    try:
        flows = capture_flows(path, config.server_port, config.max_flows, config.linger)
    except (OSError, CaptureFormatError) as error:
        print(f"spamflow tap: cannot read capture: {error}", file=sys.stderr)
        return 1
    if not flows:
        print(
            f"spamflow tap: no TCP flows on port {config.server_port} found in {path}; "
            "set --server-port to the mail server's port",
            file=sys.stderr,
        )
        return 0
    try:
        for key, flow in flows:
            print(json.dumps(flow_record(key, flow), separators=(",", ":")))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader closed the pipe (as `head` does). Point stdout at /dev/null so the
        # flush at interpreter exit does not raise again, and stop without a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    return 0
