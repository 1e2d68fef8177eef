"""Save and load FlowModel files.

A model file is a pickle, and unpickling runs code chosen by the file's writer. So
load_model unpickles only a regular file that no user other than root and the current
user can have written, in a directory that no other user can have changed.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tempfile
import threading
from pathlib import Path

import joblib

from spamflow.models.classifier import MODEL_KINDS, FeatureSchemaError, FlowModel

log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """A model file could not be loaded."""


class UnsafeModelError(ModelLoadError):
    """A model file or one of its directories could have been written by another user."""


class IncompatibleModelError(ModelLoadError):
    """A model file contains something other than a FlowModel for the current schema."""


# Temporary files of a save are named ".<model file name>.<pid>.<random>.tmp", so a later
# save or load can tell the files that a process left behind when it ended mid-save.
_saves_in_progress: set[str] = set()
_saves_lock = threading.Lock()


def save_model(model: FlowModel, path: str | Path, create_parent: bool = True) -> None:
    """Write model to path atomically with mode 0600.

    The model goes to a temporary file in the same directory, which is flushed to disk
    and then renamed over path, so a reader sees either the old or the new file. With
    create_parent, missing parent directories are created with mode 0700. Without it,
    a missing parent raises FileNotFoundError. Temporary files of this model left by
    ended processes are removed first.
    """
    path = Path(path)
    if create_parent:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise FileNotFoundError(f"directory {path.parent} of model file {path} not found")
    remove_stale_temporaries(path)

    # mkstemp creates the file with mode 0600 whatever the umask. Registering the name
    # under the lock keeps remove_stale_temporaries in another thread off this file.
    with _saves_lock:
        descriptor, temporary_name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"
        )
        _saves_in_progress.add(os.path.abspath(temporary_name))
    try:
        with os.fdopen(descriptor, "wb") as handle:
            joblib.dump(model, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary_name, path)
    except BaseException:
        try:
            os.unlink(temporary_name)
        except FileNotFoundError:
            pass
        raise
    finally:
        with _saves_lock:
            _saves_in_progress.discard(os.path.abspath(temporary_name))

    # Persist the rename itself.
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove temporary files that a save of path left behind, and return their paths.

    Removes only regular files that match the temporary name pattern of save_model, are
    owned by the current effective user, and belong to a process that no longer exists
    or to this process without a save in progress. Errors other than a vanished file are
    logged and skipped.
    """
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)\.[^.]+\.tmp")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError as error:
        log.warning("stale temporary model files not checked in %s: %s", path.parent, error)
        return removed

    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _save_may_be_running(os.path.abspath(entry.path),
                                                 int(match.group(1))):
            continue
        try:
            status = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(status.st_mode) or status.st_uid != os.geteuid():
                continue
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        except OSError as error:
            log.warning("stale temporary model file %s not removed: %s", entry.path, error)
            continue
        log.info("removed stale temporary model file %s of process %s", entry.path,
                 match.group(1))
        removed.append(Path(entry.path))
    return removed


def _save_may_be_running(temporary_name: str, pid: int) -> bool:
    if pid == os.getpid():
        with _saves_lock:
            return temporary_name in _saves_in_progress
    # NOTE: a process in another PID namespace that shares the model directory looks
    # ended here, so its save in progress could lose its temporary file.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_model_file(path: str | Path) -> os.stat_result:
    """Raise UnsafeModelError unless path is safe to unpickle, else return its lstat.

    Checks: path is a regular file and not a symbolic link, and the file and its parent
    directory are owned by root or the current effective user and are not writable by
    group or others. Directories above the parent, on the given and on the resolved path,
    may be writable by others only when their sticky bit is set (as on /tmp), because then
    only an entry's owner or root can rename or delete it.
    Raises FileNotFoundError when path does not exist.
    """
    path = Path(path)
    file_status = os.lstat(path)
    if stat.S_ISLNK(file_status.st_mode):
        raise UnsafeModelError(
            f"model file {path} is a symbolic link; point the model option at the real "
            f"file ({os.path.realpath(path)}) instead"
        )
    if not stat.S_ISREG(file_status.st_mode):
        raise UnsafeModelError(f"model file {path} is not a regular file")
    _check_owner_and_mode(path, file_status, "model file")

    parent = path.absolute().parent
    parent_status = os.stat(parent)
    _check_owner_and_mode(parent, parent_status, "model directory")

    # Both spellings count: a symbolic link in the given path sits in a directory that
    # the resolved path does not pass through.
    for ancestor in sorted({*parent.parents, *parent.resolve().parents}):
        ancestor_status = os.stat(ancestor)
        sticky = bool(ancestor_status.st_mode & stat.S_ISVTX)
        if not sticky:
            _check_owner_and_mode(ancestor, ancestor_status, "directory above the model")
    return file_status


def load_model(path: str | Path) -> FlowModel:
    """Load a model saved by save_model after check_model_file accepts the file.

    Raises UnsafeModelError when a safety check fails, IncompatibleModelError when the
    file contains no FlowModel for the current feature schema, ModelLoadError when it
    cannot be unpickled, and FileNotFoundError when it is missing.
    """
    path = Path(path)
    checked_status = check_model_file(path)
    remove_stale_temporaries(path)

    # O_NOFOLLOW and the inode comparison catch a file swapped after the checks.
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(descriptor, "rb") as handle:
        opened_status = os.fstat(handle.fileno())
        if (opened_status.st_dev, opened_status.st_ino) != (
            checked_status.st_dev,
            checked_status.st_ino,
        ):
            raise UnsafeModelError(f"model file {path} was replaced while it was checked")
        try:
            model = joblib.load(handle)
        # Unpickling a damaged file can raise almost any exception type.
        except Exception as error:
            raise ModelLoadError(
                f"cannot unpickle model file {path}: {type(error).__name__}: {error}; "
                f"retrain it with 'spamflow train'"
            ) from error

    if not isinstance(model, FlowModel):
        raise IncompatibleModelError(
            f"model file {path} contains a {type(model).__name__}, expected a FlowModel; "
            f"retrain it with 'spamflow train'"
        )
    if model.kind not in MODEL_KINDS:
        raise IncompatibleModelError(
            f"model file {path} has unknown kind {model.kind!r}; "
            f"allowed kinds: {', '.join(MODEL_KINDS)}"
        )
    try:
        model.check_schema()
    except FeatureSchemaError as error:
        raise IncompatibleModelError(f"model file {path}: {error}") from error
    return model


def _check_owner_and_mode(path: Path, status: os.stat_result, role: str) -> None:
    allowed_owners = {0, os.geteuid()}
    if status.st_uid not in allowed_owners:
        raise UnsafeModelError(
            f"{role} {path} is owned by uid {status.st_uid}, not by root or the current "
            f"user (uid {os.geteuid()}); chown it to one of them"
        )
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeModelError(
            f"{role} {path} is writable by group or others "
            f"(mode {stat.filemode(status.st_mode)}); run chmod go-w {path}"
        )
