"""The ``spamflow demo`` and ``spamflow replay`` subcommands (root: namespaces, NFQUEUE)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import IO, Any

from spamflow.config import ConfigError, LearnConfig, validate_section
from spamflow.models.cli import KIND_CHOICES
from spamflow.replay.netns import DEFAULT_PREFIX, check_prefix

# SpamAssassin without Bayes and network tests scores most of the 2002-2003 ham of the
# SpamAssassin public corpus between 0.4 and 2.4 (date rules fire on such old mail), so
# a ham threshold of 0.0 would never yield a ham example. In the bundled sample 104 of 200
# ham messages and no spam score <= 1.5, and 149 of 200 spam and 2 ham score >= 6.0.
DEMO_LEARN = LearnConfig(spam_threshold=6.0, ham_threshold=1.5)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _prefix(text: str) -> str:
    try:
        return check_prefix(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def progress_wanted(no_progress: bool, stream: IO[str]) -> bool:
    """Return True when progress bars should be drawn on stream: not hidden, a terminal."""
    return not no_progress and stream.isatty()


def _add_common(parser: argparse.ArgumentParser, spam: int, ham: int) -> None:
    parser.add_argument("--spam", type=_count, default=spam, metavar="N",
                        help=f"spam messages to send (default: {spam})")
    parser.add_argument("--ham", type=_count, default=ham, metavar="N",
                        help=f"ham messages to send (default: {ham})")
    parser.add_argument("--run-dir", type=Path, metavar="DIR",
                        help="folder for results and logs (default: runs/<UTC timestamp>)")
    parser.add_argument("--prefix", type=_prefix, default=DEFAULT_PREFIX,
                        help="name prefix of the network namespaces, 1 to 24 letters, "
                        "digits, '-' or '_'; runs at the same time need different "
                        f"prefixes (default: {DEFAULT_PREFIX})")
    parser.add_argument("--seed", type=int, default=1,
                        help="seed of the message choice and send order (default: 1)")
    parser.add_argument("--keep", action="store_true",
                        help="leave the testbed running after the replay until Ctrl-C")
    parser.add_argument("--no-progress", action="store_true",
                        help="hide the progress bars (hidden anyway when stderr is not "
                        "a terminal)")
    learn = parser.add_argument_group("auto-learning ([learn] table of the run's config)")
    learn.add_argument("--spam-threshold", type=float, default=DEMO_LEARN.spam_threshold,
                       help="base score at or above which a message becomes a spam example "
                       f"(default: {DEMO_LEARN.spam_threshold})")
    learn.add_argument("--ham-threshold", type=float, default=DEMO_LEARN.ham_threshold,
                       help="base score at or below which a message becomes a ham example "
                       f"(default: {DEMO_LEARN.ham_threshold})")
    learn.add_argument("--retrain-every", type=_count, default=DEMO_LEARN.retrain_every,
                       help=f"new examples between retrainings "
                       f"(default: {DEMO_LEARN.retrain_every})")
    learn.add_argument("--min-examples", type=_count,
                       default=DEMO_LEARN.min_examples_per_class,
                       help="examples of each class needed before the first model "
                       f"(default: {DEMO_LEARN.min_examples_per_class})")
    learn.add_argument("--model-kind", default=DEMO_LEARN.model_kind, choices=KIND_CHOICES,
                       help=f"model kind to train (default: {DEMO_LEARN.model_kind})")


def register(subparsers: Any) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="replay the bundled sample through a full testbed (needs root)",
        description="Build network namespaces with spamd, the tap, the policy service, "
        "the proxy and Postfix, replay the bundled 200 spam and 200 ham messages over "
        "two network paths, and print how SpamAssassin did with and without SPAMFLOW.",
    )
    _add_common(demo, 200, 200)
    demo.set_defaults(func=run_demo, corpus=None)

    replay = subparsers.add_parser(
        "replay",
        help="replay a labelled corpus through a full testbed (needs root)",
        description="Like demo, on a corpus folder that contains an index.tsv and one .tar.xz "
        "(the bundled sample's layout or the SpamAssassin public corpus's).",
    )
    replay.add_argument("--corpus", type=Path, required=True, help="corpus folder")
    _add_common(replay, 200, 200)
    replay.set_defaults(func=run_demo)


def _raise_system_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run_demo(args: argparse.Namespace) -> int:
    """Run ``spamflow demo`` or ``spamflow replay``, with Ctrl-C and SIGTERM handled."""
    # A shell starts background jobs with SIGINT ignored, and Python then installs no
    # handler of its own, so both signals get explicit handlers for the run.
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_system_exit)
    try:
        return _run_demo(args)
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
        signal.signal(signal.SIGTERM, previous_sigterm)


def _run_demo(args: argparse.Namespace) -> int:
    import os

    from spamflow.replay.corpus import CorpusError
    from spamflow.replay.demo import ReplayRequest, ReplayStoppedError, run_replay
    from spamflow.replay.results import format_table
    from spamflow.replay.runlock import TestbedBusyError

    if os.geteuid() != 0:
        raise ConfigError("spamflow demo needs root: it creates network namespaces")
    request = ReplayRequest(spam=args.spam, ham=args.ham, corpus=args.corpus,
                            run_dir=args.run_dir, prefix=args.prefix, seed=args.seed,
                            progress=progress_wanted(args.no_progress, sys.stderr),
                            keep=args.keep,
                            learn=LearnConfig(
                                spam_threshold=args.spam_threshold,
                                ham_threshold=args.ham_threshold,
                                model_kind=args.model_kind,
                                retrain_every=args.retrain_every,
                                min_examples_per_class=args.min_examples))
    # The daemons load the same checks from the run's config file, so a bad value would
    # otherwise surface only after the whole testbed has started.
    validate_section(request.learn, "from the command line")
    try:
        summary = run_replay(request)
    except (CorpusError, TestbedBusyError) as error:
        raise ConfigError(str(error)) from error
    except ReplayStoppedError as error:
        print(f"spamflow {args.command}: {error}", file=sys.stderr)
        return error.exit_status
    print(format_table(summary))
    print(f"results: {summary['run_dir']}")
    return 0 if summary["complete"] else 1
