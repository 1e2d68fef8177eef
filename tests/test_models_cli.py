"""``spamflow train`` end to end on a temporary example store."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from spamflow.models import cli as models_cli
from spamflow.models.classifier import MODEL_KINDS
from spamflow.models.persist import load_model
from spamflow.models.store import ExampleStore, Observation

SPAM_FEATURES = {"handshake_rtt_ms": 400.0, "retransmissions_in": 6.0, "syn_ttl": 110.0}
HAM_FEATURES = {"handshake_rtt_ms": 20.0, "retransmissions_in": 0.0, "syn_ttl": 60.0}


def fill_store(path: Path, ham: int, spam: int) -> None:
    with ExampleStore(path) as store:
        for index in range(ham + spam):
            label = 0 if index < ham else 1
            template = HAM_FEATURES if label == 0 else SPAM_FEATURES
            store.record(Observation(
                ts=1733327000.0 + index,
                flow=f"10.77.1.2:{40000 + index}",
                message_id=f"<m{index}@example.com>",
                method="CHECK",
                score=10.0 if label else -1.0,
                base_score=10.0 if label else -1.0,
                threshold=5.0,
                label=label,
                features={name: value + index % 7 for name, value in template.items()},
            ))


def run_spamflow(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    prefix = [sys.executable, "-m", "spamflow"]
    if config is not None:
        prefix += ["--config", str(config)]
    return subprocess.run(
        [*prefix, "train", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_kind_choices_match_classifier() -> None:
    assert models_cli.KIND_CHOICES == MODEL_KINDS


def test_train_writes_model(tmp_path: Path) -> None:
    db = tmp_path / "examples.sqlite"
    model_path = tmp_path / "model" / "model.joblib"
    model_path.parent.mkdir()
    fill_store(db, ham=20, spam=15)
    result = run_spamflow("--db", str(db), "--model", str(model_path), "--kind", "svm")
    assert result.returncode == 0, result.stderr
    assert "examples: 20 ham, 15 spam" in result.stdout
    assert "5-fold cross-validated accuracy (svm): 1.000" in result.stdout
    assert f"model svm-35 saved to {model_path}" in result.stdout
    assert load_model(model_path).name == "svm-35"


def test_train_defaults_from_config(tmp_path: Path) -> None:
    db = tmp_path / "examples.sqlite"
    model_path = tmp_path / "model.joblib"
    fill_store(db, ham=12, spam=12)
    config = tmp_path / "spamflow.toml"
    config.write_text(
        f'[proxy]\ndb = "{db}"\nmodel = "{model_path}"\n\n'
        '[learn]\nmodel_kind = "tree"\nmin_examples_per_class = 12\n'
    )
    result = run_spamflow(config=config)
    assert result.returncode == 0, result.stderr
    assert load_model(model_path).name == "tree-24"


def test_train_reports_save_once(tmp_path: Path) -> None:
    db = tmp_path / "examples.sqlite"
    model_path = tmp_path / "model.joblib"
    fill_store(db, ham=10, spam=10)
    result = run_spamflow("--db", str(db), "--model", str(model_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(f"saved to {model_path}") == 1
    assert "saved to" not in result.stderr


def test_train_missing_model_directory(tmp_path: Path) -> None:
    db = tmp_path / "examples.sqlite"
    model_path = tmp_path / "absent" / "dir" / "model.joblib"
    fill_store(db, ham=10, spam=10)
    result = run_spamflow("--db", str(db), "--model", str(model_path))
    assert result.returncode == 1
    assert f"directory {model_path.parent} of --model {model_path} not found" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "absent").exists()


def test_train_creates_configured_directory(tmp_path: Path) -> None:
    db = tmp_path / "examples.sqlite"
    model_path = tmp_path / "state" / "model.joblib"
    fill_store(db, ham=10, spam=10)
    config = tmp_path / "spamflow.toml"
    config.write_text(f'[proxy]\ndb = "{db}"\nmodel = "{model_path}"\n')
    result = run_spamflow(config=config)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(model_path.parent.stat().st_mode) == 0o700
    assert load_model(model_path).name == "tree-20"


def test_train_config_after_command(tmp_path: Path) -> None:
    db = tmp_path / "examples.sqlite"
    model_path = tmp_path / "model.joblib"
    fill_store(db, ham=10, spam=10)
    config = tmp_path / "spamflow.toml"
    config.write_text(f'[proxy]\ndb = "{db}"\nmodel = "{model_path}"\n')
    result = run_spamflow("-c", str(config))
    assert result.returncode == 0, result.stderr
    assert load_model(model_path).name == "tree-20"


def test_train_missing_store(tmp_path: Path) -> None:
    db = tmp_path / "absent.sqlite"
    result = run_spamflow("--db", str(db), "--model", str(tmp_path / "model.joblib"))
    assert result.returncode == 1
    assert f"example store {db} not found" in result.stderr
    assert not db.exists()


def test_train_too_few_examples(tmp_path: Path) -> None:
    db = tmp_path / "examples.sqlite"
    model_path = tmp_path / "model.joblib"
    fill_store(db, ham=30, spam=4)
    result = run_spamflow("--db", str(db), "--model", str(model_path), "--min-examples", "5")
    assert result.returncode == 1
    assert "examples: 30 ham, 4 spam" in result.stdout
    assert "each class needs at least 5" in result.stderr
    assert not model_path.exists()


def test_train_skips_cross_validation_small(tmp_path: Path) -> None:
    db = tmp_path / "examples.sqlite"
    model_path = tmp_path / "model.joblib"
    fill_store(db, ham=3, spam=3)
    result = run_spamflow("--db", str(db), "--model", str(model_path), "--kind", "nb",
                          "--min-examples", "3")
    assert result.returncode == 0, result.stderr
    assert "cross-validated accuracy: skipped" in result.stdout
    assert load_model(model_path).name == "nb-6"


def test_train_rejects_unknown_kind(tmp_path: Path) -> None:
    result = run_spamflow("--kind", "forest")
    assert result.returncode == 2
    assert "invalid choice: 'forest'" in result.stderr


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_train_each_kind(tmp_path: Path, kind: str) -> None:
    db = tmp_path / "examples.sqlite"
    model_path = tmp_path / "model.joblib"
    fill_store(db, ham=10, spam=10)
    result = run_spamflow("--db", str(db), "--model", str(model_path), "--kind", kind)
    assert result.returncode == 0, result.stderr
    model = load_model(model_path)
    assert model.name == f"{kind}-20"
    assert model.predict_spam_probability(SPAM_FEATURES) > 0.5
    assert model.predict_spam_probability(HAM_FEATURES) < 0.5


def test_train_damaged_store(tmp_path: Path) -> None:
    db = tmp_path / "examples.sqlite"
    db.write_bytes(b"this is not an SQLite database, just text" * 100)
    result = run_spamflow("--db", str(db), "--model", str(tmp_path / "model.joblib"))
    assert result.returncode == 1
    assert f"cannot read example store {db}" in result.stderr


def test_train_newest_examples_only(tmp_path: Path) -> None:
    db = tmp_path / "examples.sqlite"
    model_path = tmp_path / "model.joblib"
    fill_store(db, ham=10, spam=10)
    result = run_spamflow("--db", str(db), "--model", str(model_path), "--kind", "nb",
                          "--min-examples", "5", "--max-examples", "15")
    assert result.returncode == 0, result.stderr
    assert "examples: 5 ham, 10 spam" in result.stdout
    assert load_model(model_path).name == "nb-15"


def test_train_rejects_invalid_max(tmp_path: Path) -> None:
    db = tmp_path / "examples.sqlite"
    fill_store(db, ham=10, spam=10)
    result = run_spamflow("--db", str(db), "--model", str(tmp_path / "model.joblib"),
                          "--max-examples", "0")
    assert result.returncode == 1
    assert "invalid --max-examples 0" in result.stderr
