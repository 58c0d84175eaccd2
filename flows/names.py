"""Names that opticam gives to Prefect objects (flow runs, task runs) made from file names.

A shard's file name is data: it may hold a newline, a terminal escape or a right-to-left
mark, which would break a log line or reorder what the UI shows. :func:`printable`
escapes those characters and keeps every other one, accents and scripts included.
"""

from __future__ import annotations

import unicodedata

__all__ = ["printable"]

# Unicode categories escaped: control (Cc), format (Cf: bidi marks and embeddings,
# zero-width characters), surrogates (Cs), private use (Co), unassigned (Cn), and the
# line and paragraph separators (Zl, Zp).
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str) -> str:
    r"""``text`` with control, format (bidi) and separator characters escaped.

    Each such character becomes its Python escape (a newline ``\n``, a right-to-left
    mark ``\u200f``), so the name stays on one line and in its order; accented letters
    and other scripts are kept as they are.
    """
    return "".join(
        _escape(c) if unicodedata.category(c) in _ESCAPED_CATEGORIES else c for c in text
    )
