"""One hierarchy of errors: every failure a user can cause names the input and the fix."""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConnectomeError",
    "ExtractionError",
    "EmptyGraphError",
    "ExportError",
    "BadFileError",
    "DataError",
    "UnsafeDependencyError",
]


class ConnectomeError(Exception):
    """Base class: something about the user's input is wrong, and the message says what to do.

    The CLI prints the message on one line and exits with status 2.
    """


class ExtractionError(ConnectomeError):
    """The model cannot be turned into a unit graph (untraceable, unsupported op, bad shape)."""


class EmptyGraphError(ConnectomeError):
    """An operation left no nodes or no edges where some are needed."""


class ExportError(ConnectomeError):
    """A graph cannot be written where or how it was asked."""


class BadFileError(ConnectomeError):
    """A file is not what it claims to be (not a connectome, truncated, wrong version)."""


class DataError(ConnectomeError):
    """Images, labels or targets that cannot be used (empty, undecodable, out of range)."""


class UnsafeDependencyError(ConnectomeError):
    """An installed library is too old to read a file from someone else safely; upgrade it."""


def short_list(items: Any, n: int = 6) -> str:
    """``repr`` of a list for an error message, cut after ``n`` items with the total count.

    Parameters
    ----------
    items : iterable of str
        What to list (layer names, node ids).
    n : int, default 6
        Items shown before the list is cut.

    Returns
    -------
    str

    Examples
    --------
    >>> short_list(["a", "b", "c"], n=2)
    "['a', 'b', ... (3 in all)]"
    """
    items = list(items)
    return repr(items) if len(items) <= n else repr(items[:n])[:-1] + f", ... ({len(items)} in all)]"
