"""Escaping of untrusted wire text for log lines."""

from __future__ import annotations

import re

# Text that goes into a log line as it is: printable ASCII without spaces, so a value
# cannot carry terminal escapes, line breaks or a fake ``name=value`` field.
_PLAIN = re.compile(r"[!-~]*")
# Characters of a value kept in a log line, in characters of the original text.
MAX_LOG_TEXT = 64


def log_text(value: str | bytes, limit: int = MAX_LOG_TEXT) -> str:
    """Return value as one log-safe token: unchanged when plain, else as a Python repr.

    Values longer than limit are cut to limit characters before escaping.
    """
    if isinstance(value, bytes):
        text = value[:limit].decode("latin-1")
    else:
        text = value[:limit]
    if text and _PLAIN.fullmatch(text):
        return text
    return ascii(text)
