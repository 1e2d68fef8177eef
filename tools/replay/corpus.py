"""Labelled mail for replay: the bundled sample or the full SpamAssassin public corpus.

Both come as a ``.tar.xz`` of raw messages plus a tab-separated index with a header
line. The bundled sample's index has the columns name, group, label, md5, bytes; the
shared corpus's index has path_in_tarball, group, label, bytes, ... and md5. Each raw
message starts with an mbox ``From `` line, which the loader strips.
"""

from __future__ import annotations

import csv
import hashlib
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

LABELS = ("ham", "spam")


class CorpusError(ValueError):
    """A missing, unreadable or inconsistent corpus."""


@dataclass(frozen=True)
class IndexEntry:
    """One message of a corpus index; name is its member path inside the archive."""

    name: str
    group: str
    label: str
    md5: str
    size: int


@dataclass(frozen=True)
class Message:
    """One labelled message with the mbox ``From `` line removed."""

    name: str
    label: str
    raw: bytes


def sample_dir() -> Path:
    """Return the folder of the bundled sample (messages.tar.xz, index.tsv)."""
    return Path(str(resources.files("spamflow.replay") / "sample"))


def strip_mbox_from_line(raw: bytes) -> bytes:
    """Remove a leading mbox ``From `` separator line, if there is one."""
    if raw.startswith(b"From "):
        _, _, rest = raw.partition(b"\n")
        return rest
    return raw


def read_index(path: Path) -> list[IndexEntry]:
    """Read a sample index or a shared-corpus index.tsv. Raises CorpusError."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
    except OSError as error:
        raise CorpusError(f"cannot read corpus index {path}: {error.strerror}") from error

    entries = []
    for number, row in enumerate(rows, start=2):
        name = row.get("name") or row.get("path_in_tarball")
        size = row.get("bytes") or ""
        if not name or row.get("label") not in LABELS or not size.isdigit():
            raise CorpusError(
                f"invalid line {number} in {path}: expected name (or path_in_tarball), "
                f"group, label ({'/'.join(LABELS)}), md5 and bytes (a whole number)"
            )
        entries.append(
            IndexEntry(name, row.get("group", ""), row["label"], row.get("md5", ""), int(size))
        )
    return entries


def find_archive(directory: Path) -> Path:
    """Return the single ``*.tar.xz`` in a corpus folder. Raises CorpusError."""
    archives = sorted(directory.glob("*.tar.xz"))
    if len(archives) != 1:
        raise CorpusError(
            f"expected exactly one .tar.xz in {directory}, found {len(archives)}"
        )
    return archives[0]


def select_entries(
    entries: list[IndexEntry],
    *,
    spam: int | None = None,
    ham: int | None = None,
    seed: int | None = None,
    max_bytes: int | None = None,
) -> list[IndexEntry]:
    """Pick up to ``spam`` spam and ``ham`` ham entries (None: all of that label).

    Entries larger than max_bytes are skipped. Without a seed the first entries in index
    order are taken, with a seed a random sample across all groups. The result keeps
    index order. Raises CorpusError when a label has fewer entries than requested.
    """
    limits = {"spam": spam, "ham": ham}
    chosen: set[str] = set()
    for label, limit in limits.items():
        pool = [
            entry.name
            for entry in entries
            if entry.label == label and (max_bytes is None or entry.size <= max_bytes)
        ]
        if limit is not None and len(pool) < limit:
            raise CorpusError(f"corpus has only {len(pool)} {label} messages, {limit} requested")
        if limit is None:
            chosen.update(pool)
        elif seed is None:
            chosen.update(pool[:limit])
        else:
            chosen.update(random.Random(f"{seed}-{label}").sample(pool, limit))
    return [entry for entry in entries if entry.name in chosen]


def iter_messages(
    directory: Path | None = None,
    entries: list[IndexEntry] | None = None,
    *,
    verify_md5: bool = False,
) -> Iterator[Message]:
    """Yield the messages of a corpus folder in index order.

    directory defaults to the bundled sample. It may also be the shared corpus folder
    (index.tsv plus one .tar.xz). entries restricts the output to those index entries.
    With verify_md5, a message whose raw bytes do not hash to the index's md5 raises
    CorpusError.
    """
    directory = sample_dir() if directory is None else Path(directory)
    if entries is None:
        entries = read_index(directory / "index.tsv")
    archive = find_archive(directory)
    wanted = {entry.name for entry in entries}
    found: dict[str, bytes] = {}

    with tarfile.open(archive, "r:xz") as tar:
        for member in tar:
            if not member.isfile() or member.name not in wanted:
                continue
            handle = tar.extractfile(member)
            assert handle is not None
            found[member.name] = handle.read()

    for entry in entries:
        raw = found.get(entry.name)
        if raw is None:
            raise CorpusError(f"message {entry.name} is listed in the index but not in {archive}")
        if verify_md5 and entry.md5 and hashlib.md5(raw).hexdigest() != entry.md5:
            raise CorpusError(f"md5 of {entry.name} differs from the index")
        yield Message(entry.name, entry.label, strip_mbox_from_line(raw))


def load_messages(
    directory: Path | None = None,
    *,
    spam: int | None = None,
    ham: int | None = None,
    seed: int | None = None,
    max_bytes: int | None = None,
) -> list[Message]:
    """Read the messages chosen by select_entries from a corpus folder (default: sample)."""
    directory = sample_dir() if directory is None else Path(directory)
    entries = read_index(directory / "index.tsv")
    chosen = select_entries(entries, spam=spam, ham=ham, seed=seed, max_bytes=max_bytes)
    return list(iter_messages(directory, chosen))
