"""Model files: atomic save, and load only from files no other user can have written."""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spamflow.models.classifier import FlowModel, train_model
from spamflow.models.persist import (
    IncompatibleModelError,
    ModelLoadError,
    UnsafeModelError,
    load_model,
    remove_stale_temporaries,
    save_model,
)
from spamflow.nfqueue_tap.schema import FEATURE_NAMES

OTHER_UID = 54321


@pytest.fixture(scope="module")
def model() -> FlowModel:
    rng = np.random.default_rng(3)
    shape = (15, len(FEATURE_NAMES))
    X = np.vstack([rng.normal(0.0, 1.0, shape), rng.normal(6.0, 1.0, shape)])
    y = np.array([0] * 15 + [1] * 15)
    return train_model(X, y, "tree")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir(mode=0o700)
    return directory


def test_round_trip(model: FlowModel, model_dir: Path) -> None:
    path = model_dir / "model.joblib"
    save_model(model, path)
    loaded = load_model(path)
    probe = {name: 6.0 for name in FEATURE_NAMES}
    assert loaded.name == model.name
    assert loaded.kind == "tree"
    assert loaded.trained_at == model.trained_at
    assert loaded.predict_spam_probability(probe) == model.predict_spam_probability(probe)


def test_saved_file_private(model: FlowModel, model_dir: Path) -> None:
    path = model_dir / "model.joblib"
    save_model(model, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_leaves_no_temporary(model: FlowModel, model_dir: Path) -> None:
    path = model_dir / "model.joblib"
    save_model(model, path)
    save_model(model, path)
    assert sorted(entry.name for entry in model_dir.iterdir()) == ["model.joblib"]


def test_save_creates_directory(model: FlowModel, tmp_path: Path) -> None:
    path = tmp_path / "new" / "model.joblib"
    save_model(model, path)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_model(path).name == model.name


def test_save_replaces_atomically(model: FlowModel, model_dir: Path) -> None:
    path = model_dir / "model.joblib"
    save_model(model, path)
    inode_before = path.stat().st_ino
    save_model(model, path)
    assert path.stat().st_ino != inode_before


def test_rejects_world_writable_file(model: FlowModel, model_dir: Path) -> None:
    path = model_dir / "model.joblib"
    save_model(model, path)
    path.chmod(0o666)
    with pytest.raises(UnsafeModelError, match="model file .* writable by group or others"):
        load_model(path)


def test_rejects_group_writable_file(model: FlowModel, model_dir: Path) -> None:
    path = model_dir / "model.joblib"
    save_model(model, path)
    path.chmod(0o620)
    with pytest.raises(UnsafeModelError, match="chmod go-w"):
        load_model(path)


def test_rejects_world_writable_dir(model: FlowModel, model_dir: Path) -> None:
    path = model_dir / "model.joblib"
    save_model(model, path)
    model_dir.chmod(0o777)
    with pytest.raises(UnsafeModelError, match="model directory .* writable by group"):
        load_model(path)


def test_rejects_sticky_world_writable_dir(model: FlowModel, model_dir: Path) -> None:
    path = model_dir / "model.joblib"
    save_model(model, path)
    model_dir.chmod(0o1777)
    with pytest.raises(UnsafeModelError, match="model directory"):
        load_model(path)


def test_rejects_symlink(model: FlowModel, model_dir: Path) -> None:
    target = model_dir / "model.joblib"
    save_model(model, target)
    link = model_dir / "link.joblib"
    link.symlink_to(target)
    with pytest.raises(UnsafeModelError, match="symbolic link"):
        load_model(link)


def test_rejects_link_in_writable_dir(model: FlowModel, model_dir: Path,
                                      tmp_path: Path) -> None:
    save_model(model, model_dir / "model.joblib")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "models").symlink_to(model_dir)
    # Any user could point shared/models at another directory.
    with pytest.raises(UnsafeModelError, match="directory above the model .*shared"):
        load_model(shared / "models" / "model.joblib")


def test_rejects_directory(model_dir: Path) -> None:
    path = model_dir / "model.joblib"
    path.mkdir()
    with pytest.raises(UnsafeModelError, match="not a regular file"):
        load_model(path)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_rejects_foreign_owner(model: FlowModel, model_dir: Path) -> None:
    path = model_dir / "model.joblib"
    save_model(model, path)
    os.chown(path, OTHER_UID, OTHER_UID)
    with pytest.raises(UnsafeModelError, match=f"owned by uid {OTHER_UID}"):
        load_model(path)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_rejects_foreign_owned_dir(model: FlowModel, model_dir: Path) -> None:
    path = model_dir / "model.joblib"
    save_model(model, path)
    os.chown(model_dir, OTHER_UID, OTHER_UID)
    with pytest.raises(UnsafeModelError, match="model directory .* owned by uid"):
        load_model(path)


def test_missing_file(model_dir: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_model(model_dir / "absent.joblib")


def test_rejects_other_object(model_dir: Path) -> None:
    path = model_dir / "model.joblib"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as handle:
        pickle.dump({"not": "a model"}, handle)
    with pytest.raises(IncompatibleModelError, match="contains a dict"):
        load_model(path)


def test_rejects_damaged_file(model_dir: Path) -> None:
    path = model_dir / "model.joblib"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(b"\x80\x04not a pickle")
    with pytest.raises(ModelLoadError, match="cannot unpickle"):
        load_model(path)


def test_rejects_other_schema(model: FlowModel, model_dir: Path) -> None:
    path = model_dir / "model.joblib"
    old = FlowModel(
        kind=model.kind,
        estimator=model.estimator,
        feature_names=("syn_ttl", "old_feature"),
        n_examples=model.n_examples,
        trained_at=model.trained_at,
    )
    save_model(old, path)
    with pytest.raises(IncompatibleModelError, match="other features than the current schema"):
        load_model(path)


def ended_pid() -> int:
    """Return the id of a child process that has exited and been reaped."""
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                             capture_output=True, text=True, check=True)
    return int(process.stdout)


def test_save_missing_parent_not_created(model: FlowModel, tmp_path: Path) -> None:
    path = tmp_path / "absent" / "model.joblib"
    with pytest.raises(FileNotFoundError, match="directory .*absent of model file"):
        save_model(model, path, create_parent=False)
    assert not path.parent.exists()


def test_save_removes_stale_temporary(model: FlowModel, model_dir: Path) -> None:
    path = model_dir / "model.joblib"
    stale = model_dir / f".model.joblib.{ended_pid()}.k2x9q0ab.tmp"
    stale.write_bytes(b"partial")
    save_model(model, path)
    assert not stale.exists()
    assert sorted(entry.name for entry in model_dir.iterdir()) == ["model.joblib"]


def test_load_removes_stale_temporary(model: FlowModel, model_dir: Path) -> None:
    path = model_dir / "model.joblib"
    save_model(model, path)
    stale = model_dir / f".model.joblib.{os.getpid()}.k2x9q0ab.tmp"
    stale.write_bytes(b"partial")
    assert load_model(path).name == model.name
    assert not stale.exists()


def test_stale_cleanup_keeps_other_files(model_dir: Path) -> None:
    path = model_dir / "model.joblib"
    pid = ended_pid()
    kept = [
        # A save of a process that still runs: the parent of this test process.
        f".model.joblib.{os.getppid()}.k2x9q0ab.tmp",
        # Temporary files of another model and names outside the pattern.
        f".other.joblib.{pid}.k2x9q0ab.tmp",
        f".model.joblib.{pid}.k2x9q0ab.tmp.keep",
        f"model.joblib.{pid}.k2x9q0ab.tmp",
        ".model.joblib.k2x9q0ab.tmp",
    ]
    for name in kept:
        (model_dir / name).write_bytes(b"x")
    link_target = model_dir / "target"
    link_target.write_bytes(b"x")
    link = model_dir / f".model.joblib.{pid}.linkabcd.tmp"
    link.symlink_to(link_target)

    assert remove_stale_temporaries(path) == []
    for name in kept:
        assert (model_dir / name).exists(), name
    assert link.is_symlink()


@pytest.mark.root
def test_stale_cleanup_keeps_foreign_file(model_dir: Path) -> None:
    path = model_dir / "model.joblib"
    foreign = model_dir / f".model.joblib.{ended_pid()}.k2x9q0ab.tmp"
    foreign.write_bytes(b"x")
    os.chown(foreign, OTHER_UID, OTHER_UID)
    assert remove_stale_temporaries(path) == []
    assert foreign.exists()


def test_stale_cleanup_skips_save_in_progress(model: FlowModel, model_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A cleanup that runs while this process writes a temporary file leaves it alone."""
    import joblib

    from spamflow.models import persist

    path = model_dir / "model.joblib"
    results: list[list[Path]] = []
    real_dump = joblib.dump

    def dump_then_clean(value: object, handle: object) -> None:
        real_dump(value, handle)
        results.append(remove_stale_temporaries(path))

    monkeypatch.setattr(persist.joblib, "dump", dump_then_clean)
    save_model(model, path)
    assert results == [[]]
    assert load_model(path).name == model.name
