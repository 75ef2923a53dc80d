"""Names from files and folders made safe to print on a terminal and to draw.

A category folder, a layer or a model name in a graph file is text someone else chose. Sent
raw to a terminal, its control characters act: ``ESC ]0;...BEL`` retitles the window,
``ESC ]52;c;...BEL`` writes the clipboard, ``ESC [2J`` clears the screen, and a bidi override
(U+202E) shows text in an order other than the one it has. Everything the command line
prints that holds such a name passes through :func:`printable`.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["printable", "printable_lines"]

#: Characters shown as escapes: C0 controls, DEL, C1 controls, the line and paragraph
#: separators, and the bidi marks, embeddings, overrides and isolates (Trojan Source).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(m: re.Match[str]) -> str:
    ch = m.group()
    if ch in _SHORT:
        return _SHORT[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(name: Any) -> str:
    """``name`` as text that is safe to print, draw and encode as UTF-8.

    Control characters and bidi controls are written as visible escapes (``\\x1b``,
    ``\\x07``, ``\\t``, ``\\u202e``), so the name stays recognisable but cannot act on the
    terminal; other characters (letters of any script, emoji) are kept. Bytes of a file
    name that are not UTF-8 reach Python as lone surrogates, which neither a UTF-8
    terminal, an HTML file nor matplotlib's fonts accept: each becomes U+FFFD.

    Parameters
    ----------
    name : str or any
        The text; anything else is converted with ``str`` first (a ``Path``).

    Returns
    -------
    str
        One line of text without control characters.

    Examples
    --------
    >>> printable("cat\\x1b]0;pwned\\x07")
    'cat\\\\x1b]0;pwned\\\\x07'
    >>> printable("évier")
    'évier'
    """
    text = name if isinstance(name, str) else str(name)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that no file-name decoding produced
        text = text.encode("utf-8", "replace").decode("utf-8")
    return _UNSAFE.sub(_escape, text)


def printable_lines(text: Any) -> str:
    """Several lines of text (a report, a warning) made :func:`printable` line by line: the
    line breaks stay, every other control character is escaped."""
    return "\n".join(printable(line) for line in str(text).split("\n"))
