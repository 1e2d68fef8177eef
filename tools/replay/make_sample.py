"""Build the bundled replay sample from the SpamAssassin public corpus.

    python -m spamflow.replay.make_sample --corpus DIR --out tools/replay/sample

writes ``messages.tar.xz`` (raw messages, byte for byte, under their corpus paths) and
``index.tsv`` (name, group, label, md5, bytes). The same corpus, counts and seed give the
same files. SOURCES.md and the licence files beside them are kept by hand.
"""

from __future__ import annotations

import argparse
import csv
import io
import tarfile
from pathlib import Path

from spamflow.replay.corpus import find_archive, read_index, select_entries

DEFAULT_SEED = 20021010
DEFAULT_MAX_BYTES = 200_000


def write_sample(
    corpus: Path, out: Path, *, spam: int, ham: int, seed: int, max_bytes: int
) -> int:
    """Write a seeded sample of corpus into out. Returns the number of messages."""
    entries = read_index(corpus / "index.tsv")
    chosen = select_entries(entries, spam=spam, ham=ham, seed=seed, max_bytes=max_bytes)
    out.mkdir(parents=True, exist_ok=True)

    # The archive keeps the raw bytes, mbox From line included, as the corpus has them.
    wanted = {entry.name for entry in chosen}
    raw_by_name: dict[str, bytes] = {}
    with tarfile.open(find_archive(corpus), "r:xz") as source:
        for member in source:
            handle = source.extractfile(member) if member.name in wanted else None
            if handle is not None:
                raw_by_name[member.name] = handle.read()

    with tarfile.open(out / "messages.tar.xz", "w:xz", format=tarfile.PAX_FORMAT) as tar:
        for entry in chosen:
            data = raw_by_name[entry.name]
            info = tarfile.TarInfo(entry.name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))

    with open(out / "index.tsv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["name", "group", "label", "md5", "bytes"])
        for entry in chosen:
            writer.writerow([entry.name, entry.group, entry.label, entry.md5, entry.size])
    return len(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True,
                        help="folder with the corpus index.tsv and its .tar.xz")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--spam", type=int, default=200, help="spam messages (default: 200)")
    parser.add_argument("--ham", type=int, default=200, help="ham messages (default: 200)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"random seed of the selection (default: {DEFAULT_SEED})")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                        help=f"skip larger messages (default: {DEFAULT_MAX_BYTES})")
    args = parser.parse_args(argv)
    count = write_sample(args.corpus, args.out, spam=args.spam, ham=args.ham,
                         seed=args.seed, max_bytes=args.max_bytes)
    print(f"wrote {count} messages to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
