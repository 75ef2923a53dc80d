"""Files written safely: atomic writes beside the target, stale temporaries, file-name stems from user text."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import socket
import stat
import tempfile
import time
import unicodedata
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from connectome.errors import ConnectomeError, ExportError

_TMP_MARK = "cntmp"
# .<name, at most 80 bytes>.cntmp-<host hash>-<pid>.<mkstemp's 8 random chars>.tmp
_TMP_RE = re.compile(r"\..*\.cntmp-([0-9a-f]{8})-([0-9]+)\.[a-z0-9_]+\.tmp", re.S)
_TMP_NAME_BYTES = 80
STALE_AFTER_S = 60.0  # a temp file untouched this long, whose writer has died, is garbage
_LAST_SCAN: dict[str, float] = {}  # folder -> when this process last looked for stale temp files
STALE_OTHER_HOST_S = 86400.0  # on a shared folder another host's writer cannot be asked: wait a day


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, and belongs to someone else
        return True
    return True


def _remove_stale_temps(folder: Path) -> None:
    """Delete temporary files of our own naming whose writer was killed (``kill -9``, power loss).

    A file is stale when its writer ran on this host and no longer exists, or it was written
    on another host and has not changed for a day; and in both cases it has not changed for
    :data:`STALE_AFTER_S` seconds. Files of live writers (other processes saving into the same
    folder, such as the ranks of a distributed run) are never touched.
    """
    if os.name != "posix":  # os.kill(pid, 0) is not a probe elsewhere
        return
    host, me, now = _host_tag(), os.getpid(), time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        m = _TMP_RE.fullmatch(entry.name)
        if m is None or (m.group(1) == host and int(m.group(2)) == me):
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
            if not entry.is_file(follow_symlinks=False) or age < STALE_AFTER_S:
                continue
            if (m.group(1) == host and not _pid_alive(int(m.group(2)))) or age > STALE_OTHER_HOST_S:
                os.unlink(entry.path)
        except OSError:  # another process removed it first, or we may not: leave it
            continue


def _short_name(name: str, limit: int = _TMP_NAME_BYTES) -> str:
    """``name`` cut to at most ``limit`` bytes in the file system's encoding."""
    return os.fsdecode(os.fsencode(name)[:limit])


STEM_BYTES = 100  # file-name stems from user text: room for a hash, a suffix and a temp prefix in 255


def file_stem(name: str, max_bytes: int = STEM_BYTES, hashed: bool = False) -> str:
    """A file name stem for ``name``: the name itself when it is a safe, short file name,
    else its safe characters (cut to ``max_bytes``) and a hash of the whole name.

    Safe characters are letters, digits, ``-``, ``_`` and ``.`` (not leading). Distinct names
    give distinct stems (the hash), and a name always gives the same stem. ``hashed`` adds
    the hash to safe names too (to tell apart names a case-insensitive file system merges).

    Examples
    --------
    >>> file_stem("circle")
    'circle'
    >>> file_stem("a b") == file_stem("a?b")
    False
    """
    safe = "".join(ch if (ch.isalnum() or ch in "-_.") and ch.isprintable() else "_" for ch in name)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    raw = name.encode("utf-8", "surrogatepass")
    if safe == name and 0 < len(raw) <= max_bytes and not hashed:
        return name
    cut = safe.encode("utf-8", "surrogatepass")[:max_bytes].decode("utf-8", "ignore") or "_"
    return f"{cut}-{hashlib.sha256(raw).hexdigest()[:10]}"


def folded_name(name: str) -> str:
    """``name`` as case-insensitive file systems compare it: Unicode NFC, then case-folded.

    macOS and Windows file systems treat ``Conv_0.png`` and ``conv_0.png`` as one file, and
    macOS treats the NFC and NFD spellings of ``é`` as one name too. Case folding can leave a
    name out of NFC (the Angstrom sign folds to a decomposed form), so it is normalised again.
    """
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def file_stems(names: Iterable[str], max_bytes: int = STEM_BYTES) -> dict[str, str]:
    """One file name stem per distinct name (see :func:`file_stem`), distinct on every file system.

    Names whose stems only a case- or normalisation-insensitive file system would merge
    (``Conv``, ``conv``; the NFC and NFD spellings of one word) all get their hash, so no
    file of one is written over a file of another, and a name keeps its stem from run to run
    whatever the other names are, except for the hash it gets beside such a twin.

    Raises
    ------
    ConnectomeError
        Two names still map to one stem (a hash collision in 40 bits): rename one.

    Examples
    --------
    >>> s = file_stems(["circle", "Conv", "conv"])
    >>> s["circle"], s["Conv"] != s["conv"], s["Conv"].startswith("Conv-")
    ('circle', True, True)
    """
    stems = {n: file_stem(n, max_bytes) for n in dict.fromkeys(names)}
    by_folded: dict[str, list[str]] = {}
    for n, stem in stems.items():
        by_folded.setdefault(folded_name(stem), []).append(n)
    for group in by_folded.values():
        if len(group) > 1:
            for n in group:
                stems[n] = file_stem(n, max_bytes, hashed=True)
    seen: dict[str, str] = {}
    for n, stem in stems.items():
        other = seen.setdefault(folded_name(stem), n)
        if other != n:
            raise ConnectomeError(f"names {other!r} and {n!r} map to one file name even with their hashes; rename one")
    return stems


@contextlib.contextmanager
def atomic_write(path: Any, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; rename it onto ``path`` only if the block succeeds.

    The result is the old file or the new one, never a mix, whenever the process stops.
    Overwriting keeps the existing file's permission bits; a new file gets those a plain
    ``open()`` would give it. When ``path`` is a symbolic link the link's target is written,
    as ``open()`` would, and the link stays. Temporary files left behind by a killed writer
    in the folder are removed (see :func:`_remove_stale_temps`; a folder is looked at once per
    :data:`STALE_AFTER_S` seconds, the age a temp file needs to be stale).

    Raises
    ------
    ExportError
        ``path`` is a folder, or its folder does not exist.
    """
    given = Path(path)
    if given.is_dir():
        raise ExportError(f"cannot write {str(given)!r}: it is a folder; give a file name")
    # Through a symlink: replace the file it points to (renaming onto the link would replace the link).
    target = Path(os.path.realpath(given))
    folder = target.parent
    if not folder.is_dir():
        where = folder if given.is_symlink() else (given.parent if str(given.parent) else Path("."))
        raise ExportError(f"cannot write {str(given)!r}: folder {str(where)!r} does not exist; create it first")
    _scan_now = time.monotonic()
    if _scan_now - _LAST_SCAN.get(str(folder), -math.inf) >= STALE_AFTER_S:
        # once per folder and STALE_AFTER_S: a file has to be that old to be stale anyway, and a
        # scan per write made writing a folder of n files (export --examples) quadratic
        _LAST_SCAN[str(folder)] = _scan_now
        _remove_stale_temps(folder)
    try:
        mode_bits = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode_bits = 0o666 & ~umask
    prefix = f".{_short_name(target.name)}.{_TMP_MARK}-{_host_tag()}-{os.getpid()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            os.chmod(tmp, mode_bits)  # mkstemp makes the file 0600
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); best effort where folders cannot be opened."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
