"""Automatic learning: label observations by SpamAssassin's score and retrain in the background.

A message counts as spam when its score without the SPAMFLOW rules reaches
spam_threshold, and as ham when that score is at most ham_threshold, so the flow model
never learns from its own verdicts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from pathlib import Path

from spamflow.config import LearnConfig
from spamflow.models.classifier import MODEL_KINDS, FlowModel, train_model, training_accuracy
from spamflow.models.persist import ModelLoadError, load_model, save_model
from spamflow.models.store import ExampleStore, Observation

log = logging.getLogger(__name__)


class AutoLearner:
    """Owns the current model: labels and records observations and retrains from them.

    observe() runs in the caller's thread (the proxy calls it through asyncio.to_thread)
    and does only an SQLite insert and, when a retrain is due, a count query. Training runs
    in at most one background thread at a time. The new model replaces the old one by a
    single attribute assignment, so ``model`` always returns a complete model.
    """

    def __init__(self, store: ExampleStore, model_path: str | Path, config: LearnConfig) -> None:
        if config.model_kind not in MODEL_KINDS:
            raise ValueError(
                f"invalid learn.model_kind {config.model_kind!r}; "
                f"allowed kinds: {', '.join(MODEL_KINDS)}"
            )
        if config.ham_threshold >= config.spam_threshold:
            raise ValueError(
                f"learn.ham_threshold ({config.ham_threshold}) must be below "
                f"learn.spam_threshold ({config.spam_threshold})"
            )
        if config.max_training_examples < 2:
            raise ValueError(
                "learn.max_training_examples must be at least 2, "
                f"got {config.max_training_examples}"
            )
        if config.retrain_every < 1:
            raise ValueError(f"learn.retrain_every must be at least 1, got {config.retrain_every}")

        self.store = store
        self.model_path = Path(model_path)
        self.config = config
        self.training_count = 0
        self._model: FlowModel | None = None
        self._model_file_signature: tuple[int, int, int] | None = None
        self._new_examples = 0
        self._state_lock = threading.Lock()
        self._training_lock = threading.Lock()
        self._thread: threading.Thread | None = None

        if self.model_path.exists():
            self.reload_if_changed()

    @property
    def model(self) -> FlowModel | None:
        """The current model, or None before the first successful training or load."""
        return self._model

    def label_for(self, base_score: float) -> int | None:
        """Return 1 (spam) at or above spam_threshold, 0 (ham) at or below ham_threshold."""
        if base_score >= self.config.spam_threshold:
            return 1
        if base_score <= self.config.ham_threshold:
            return 0
        return None

    def observe(self, observation: Observation) -> None:
        """Record an observation and start a background retrain when one is due.

        An observation without a label gets one from label_for(base_score). A retrain is
        due after retrain_every new labelled observations with features, once each class
        has min_examples_per_class examples.
        """
        if observation.label is None:
            observation = dataclasses.replace(
                observation, label=self.label_for(observation.base_score)
            )
        self.store.record(observation)
        if observation.label is None or observation.features is None:
            return

        with self._state_lock:
            self._new_examples += 1
            if self._new_examples < self.config.retrain_every:
                return
            if self._thread is not None and self._thread.is_alive():
                return
            counts = self.store.count_examples()
            if min(counts.values()) < self.config.min_examples_per_class:
                log.debug(
                    "retrain postponed: %d ham and %d spam examples, %d per class needed",
                    counts[0], counts[1], self.config.min_examples_per_class,
                )
                return
            self._new_examples = 0
            self._thread = threading.Thread(
                target=self._train_in_background, name="spamflow-train", daemon=True
            )
            self._thread.start()

    def retrain_now(self) -> FlowModel | None:
        """Train and save a model in the calling thread.

        Returns the new model, or None when a class has fewer than
        min_examples_per_class examples.
        """
        with self._state_lock:
            self._new_examples = 0
        return self._train()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait for a running background training. Returns False on timeout."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def reload_if_changed(self) -> bool:
        """Load the model file when it changed since the last load or save.

        Returns True when a new model was loaded. A missing, unsafe or unreadable file
        logs an error and keeps the current model. The file is not retried until it
        changes again. While a training runs, nothing is loaded, because that training
        installs a newer model and a load finishing after it would replace that model.
        """
        if not self._training_lock.acquire(blocking=False):
            return False
        try:
            return self._reload_if_changed()
        finally:
            self._training_lock.release()

    def _reload_if_changed(self) -> bool:
        try:
            status = os.stat(self.model_path)
        except FileNotFoundError:
            return False
        signature = (status.st_mtime_ns, status.st_ino, status.st_size)
        if signature == self._model_file_signature:
            return False

        self._model_file_signature = signature
        try:
            model = load_model(self.model_path)
        except (ModelLoadError, OSError) as error:
            log.error("model not loaded from %s: %s", self.model_path, error)
            return False
        self._model = model
        trained_at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(model.trained_at))
        log.info("model %s loaded from %s, trained at %s", model.name, self.model_path, trained_at)
        return True

    def _train_in_background(self) -> None:
        try:
            self._train()
        # A failed retrain must keep the proxy and the current model working.
        except Exception:
            log.exception("background training of a %s model failed", self.config.model_kind)

    def _train(self) -> FlowModel | None:
        with self._training_lock:
            X, y = self.store.training_data(limit=self.config.max_training_examples)
            ham_count = int((y == 0).sum())
            spam_count = int((y == 1).sum())
            if min(ham_count, spam_count) < self.config.min_examples_per_class:
                log.info(
                    "training skipped: %d ham and %d spam examples, %d per class needed",
                    ham_count, spam_count, self.config.min_examples_per_class,
                )
                return None

            started = time.monotonic()
            model = train_model(X, y, self.config.model_kind)
            accuracy = training_accuracy(model, X, y)
            save_model(model, self.model_path)
            status = os.stat(self.model_path)
            self._model_file_signature = (status.st_mtime_ns, status.st_ino, status.st_size)
            self._model = model
            self.training_count += 1
            log.info(
                "model %s trained: kind %s, %d ham and %d spam examples, %.2f s, "
                "accuracy on training data %.3f, saved to %s",
                model.name, model.kind, ham_count, spam_count,
                time.monotonic() - started, accuracy, self.model_path,
            )
            return model
