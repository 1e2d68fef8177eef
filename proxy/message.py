"""Edits of a raw RFC 5322 message that touch only its header block.

The header block runs up to the first empty line, or to the end of a message that
has none. A leading mbox ``From `` separator line stays first, because SpamAssassin
removes it before it parses the header fields. Every edit keeps the body bytes
unchanged and writes new lines with the line ending of the message's first line.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

# Field name as SpamAssassin 4.0 accepts it: printable ASCII without the colon, with
# optional blanks before the colon (obsolete RFC 822 syntax).
_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
_MBOX_SEPARATOR = re.compile(rb"From\s+(?!:)")


@dataclass(frozen=True)
class _Layout:
    """Byte offsets of a message's parts."""

    fields_start: int  # after the mbox separator line, if any
    fields_end: int  # start of the empty line, or len(message)
    line_ending: bytes


def _lines(data: bytes) -> list[bytes]:
    """Split at LF only, keeping each line's ending (a lone CR is not a line break)."""
    lines = [line + b"\n" for line in data.split(b"\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def _layout(message: bytes) -> _Layout:
    first_line_end = message.find(b"\n")
    line_ending = b"\r\n" if first_line_end > 0 and message[first_line_end - 1] == 13 else b"\n"

    fields_start = 0
    if _MBOX_SEPARATOR.match(message) and first_line_end >= 0:
        fields_start = first_line_end + 1

    offset = fields_start
    for line in _lines(message[fields_start:]):
        if line in (b"\n", b"\r\n"):
            return _Layout(fields_start, offset, line_ending)
        offset += len(line)
    return _Layout(fields_start, len(message), line_ending)


def _fields(message: bytes, layout: _Layout) -> list[list[bytes]]:
    """Group the header block's lines into fields, each a first line plus continuations."""
    fields: list[list[bytes]] = []
    for line in _lines(message[layout.fields_start : layout.fields_end]):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    return fields


def _field_name(first_line: bytes) -> bytes | None:
    match = _FIELD_NAME.match(first_line)
    return match.group(1).lower() if match else None


def remove_header(message: bytes, name: str) -> bytes:
    """Remove every header field called name, with its continuation lines.

    The name match ignores case and covers only that exact field name, so removing
    ``X-Spamflow`` keeps ``X-Spamflow-Flow``.
    """
    layout = _layout(message)
    wanted = name.lower().encode("ascii")
    kept = [
        b"".join(field)
        for field in _fields(message, layout)
        if _field_name(field[0]) != wanted
    ]
    return message[: layout.fields_start] + b"".join(kept) + message[layout.fields_end :]


def find_header(message: bytes, name: str) -> str | None:
    """Return the unfolded value of the topmost header field called name, or None.

    Line breaks of a folded value are removed, and surrounding blanks are stripped.
    Bytes that are not UTF-8 become U+FFFD.
    """
    return next(_header_values(message, name), None)


def find_headers(message: bytes, name: str) -> list[str]:
    """Return the unfolded values of every header field called name, topmost first."""
    return list(_header_values(message, name))


def _header_values(message: bytes, name: str) -> Iterator[str]:
    layout = _layout(message)
    wanted = name.lower().encode("ascii")
    for field in _fields(message, layout):
        match = _FIELD_NAME.match(field[0])
        if match is None or match.group(1).lower() != wanted:
            continue
        raw = b"".join(field)[match.end() :]
        unfolded = raw.replace(b"\r\n", b"").replace(b"\n", b"")
        yield unfolded.strip(b" \t").decode("utf-8", errors="replace")


def prepend_header(message: bytes, name: str, value: str) -> bytes:
    """Insert ``name: value`` as the first header field (after an mbox separator).

    Raises ValueError when name or value contains a line break, since that would
    inject another header.
    """
    if any(character in name + value for character in "\r\n"):
        raise ValueError(f"header {name!r} contains a line break")
    layout = _layout(message)
    line = f"{name}: {value}".encode("utf-8") + layout.line_ending
    return message[: layout.fields_start] + line + message[layout.fields_start :]


def body_offset(message: bytes) -> int:
    """Return the offset where the body starts, after the empty line (len if none)."""
    layout = _layout(message)
    if layout.fields_end == len(message):
        return len(message)
    rest = message[layout.fields_end :]
    return layout.fields_end + (2 if rest.startswith(b"\r\n") else 1)
