"""``spamflow train``: train a flow model from the example store and save it."""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

from spamflow.config import MODEL_KINDS

# The configuration's copy of classifier.MODEL_KINDS, so the CLI starts without loading
# numpy and scikit-learn.
KIND_CHOICES = MODEL_KINDS
CV_FOLDS = 5


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a flow model from the example store",
        description=(
            "Train a flow model on the labelled examples in the store, print the "
            f"examples per class and the {CV_FOLDS}-fold cross-validated accuracy, and "
            "save the model where the proxy loads it."
        ),
    )
    parser.add_argument("--db", metavar="PATH", help="SQLite file of recorded examples")
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="model file to write; its directory must exist unless the path comes from "
        "the configuration",
    )
    parser.add_argument("--kind", choices=KIND_CHOICES, help="model kind")
    parser.add_argument(
        "--min-examples", type=int, metavar="N", help="minimum examples per class"
    )
    parser.add_argument(
        "--max-examples",
        type=int,
        metavar="N",
        help="train on at most this many of the newest examples",
    )
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from spamflow.config import load_config
    from spamflow.models.classifier import cross_validated_accuracy, train_model
    from spamflow.models.persist import save_model
    from spamflow.models.store import ExampleStore

    config = load_config(getattr(args, "config", None))
    db_path = Path(args.db or config.proxy.db)
    model_path = Path(args.model or config.proxy.model)
    kind = args.kind or config.learn.model_kind
    min_examples = (
        args.min_examples if args.min_examples is not None else config.learn.min_examples_per_class
    )

    max_examples = (
        args.max_examples
        if args.max_examples is not None
        else config.learn.max_training_examples
    )

    if max_examples < 2:
        print(f"spamflow train: invalid --max-examples {max_examples}: expected at least 2",
              file=sys.stderr)
        return 1

    # Only the configured model path gets its directories created, so a mistyped --model
    # fails here instead of creating directories.
    if args.model is not None and not model_path.parent.is_dir():
        print(f"spamflow train: directory {model_path.parent} of --model {model_path} not "
              "found; create it first or choose another path", file=sys.stderr)
        return 1

    # Opening a missing store would create an empty one, so check first.
    if not db_path.is_file():
        print(f"spamflow train: example store {db_path} not found; run the proxy first "
              f"or pass --db", file=sys.stderr)
        return 1

    try:
        with ExampleStore(db_path) as store:
            X, y = store.training_data(limit=max_examples)
    except sqlite3.DatabaseError as error:
        print(f"spamflow train: cannot read example store {db_path}: {error}", file=sys.stderr)
        return 1
    ham_count = int((y == 0).sum())
    spam_count = int((y == 1).sum())
    print(f"examples: {ham_count} ham, {spam_count} spam")
    if min(ham_count, spam_count) < max(min_examples, 1):
        print(f"spamflow train: too few examples in {db_path}: each class needs at least "
              f"{min_examples}; lower --min-examples or collect more mail", file=sys.stderr)
        return 1

    accuracy = cross_validated_accuracy(X, y, kind, folds=CV_FOLDS)
    if accuracy is None:
        print(f"{CV_FOLDS}-fold cross-validated accuracy: skipped, a class has fewer "
              f"than {CV_FOLDS} examples")
    else:
        print(f"{CV_FOLDS}-fold cross-validated accuracy ({kind}): {accuracy:.3f}")

    model = train_model(X, y, kind)
    try:
        save_model(model, model_path, create_parent=args.model is None)
    except OSError as error:
        print(f"spamflow train: cannot save model to {model_path}: {error}", file=sys.stderr)
        return 1
    print(f"model {model.name} saved to {model_path}")
    return 0
