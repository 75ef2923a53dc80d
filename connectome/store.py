"""Many graphs of one model in one folder: the output of ``connectome extract``.

:class:`WriterLock` keeps a second writer out of a folder while a run writes into it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from connectome.errors import ConnectomeError

__all__ = ["WriterLock", "LOCK_NAME"]

LOCK_NAME = "extract.lock"


class WriterLock:
    """An exclusive lock on an output folder: the file ``FOLDER/extract.lock`` naming its holder.

    The lock file holds the holder's pid, host and start time as JSON. It is created with
    ``os.link`` from a complete temporary file, so it exists only with its contents and two
    writers can never both create it. A lock left by a process that no longer runs on this
    host is taken over with a warning; a lock of a live process, or of another host (whose
    processes cannot be asked), is refused. Released (deleted) on exit from the ``with`` block.

    Parameters
    ----------
    folder : str or Path
        The output folder (created if missing).
    what : str
        How the folder is named in messages (e.g. ``"--out 'graphs'"``).

    Raises
    ------
    ConnectomeError
        Another live writer holds the folder.
    """

    def __init__(self, folder: str | os.PathLike[str], what: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what or repr(str(folder))
        self.mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        self.held = False

    def __enter__(self) -> "WriterLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _holder(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, UnicodeDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def acquire(self) -> None:
        from connectome.io import _pid_alive

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{LOCK_NAME}.{self.mine['pid']}.{int(self.mine['started'] * 1e6)}.tmp"
        tmp.write_text(json.dumps(self.mine), encoding="utf-8")
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)  # atomic, and fails when the lock exists
                    self.held = True
                    return
                except FileExistsError:
                    pass
                holder = self._holder()
                if holder is None:  # released meanwhile: try again
                    continue
                pid, host = holder.get("pid"), holder.get("host")
                if isinstance(pid, int) and host == self.mine["host"] and not _pid_alive(pid):
                    warnings.warn(f"{self.what}: taking over the lock of process {pid}, which is no longer running "
                                  "(a run that was killed)", stacklevel=3)
                    os.replace(tmp, self.path)
                    if self._holder() == self.mine:  # another process taking over at once would win here
                        self.held = True
                        return
                    tmp.write_text(json.dumps(self.mine), encoding="utf-8")
                    continue
                who = f"process {pid} on {host}" if isinstance(pid, int) else "another process (unreadable lock)"
                raise ConnectomeError(
                    f"{self.what} is being written by {who}; wait for that run to end, or delete "
                    f"{str(self.path)!r} if it is no longer running"
                )
            raise ConnectomeError(f"{self.what}: could not take the lock {str(self.path)!r}; try again")
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held and self._holder() == self.mine:
            self.path.unlink(missing_ok=True)
        self.held = False
