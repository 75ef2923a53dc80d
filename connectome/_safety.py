"""The one way connectome reads a torch file: ``weights_only=True`` on a torch that honours it.

``torch.load(weights_only=True)`` is a safety boundary only on recent torch: older releases
could be made to run code (CVE-2025-32434, fixed in 2.6.0) or to corrupt memory
(CVE-2026-24747, fixed in 2.10.0) by a crafted file. pip's resolver keeps an older torch out,
but an environment built with ``--no-deps``, a lock file or a cluster image can still hold
one, so every load checks the version it runs on.
"""

from __future__ import annotations

import os
import re
from typing import Any

from connectome.errors import UnsafeDependencyError

__all__ = ["TORCH_FLOOR", "TORCHVISION_FLOOR", "check_torch", "safe_torch_load"]

# pyproject.toml declares the same floors; tests/test_safety.py keeps them equal.
TORCH_FLOOR = (2, 10)
TORCHVISION_FLOOR = (0, 25)  # the torchvision release built for TORCH_FLOOR


def _release(version: str) -> tuple[int, ...] | None:
    """``"2.10.0+cu128"`` -> ``(2, 10, 0)``; compared as numbers, since ``"2.9" > "2.10"`` as text."""
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", version)
    return None if m is None else tuple(int(p) for p in m.groups() if p is not None)


def _dotted(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


def check_torch(what: str = "a torch file") -> None:
    """Refuse when the installed torch is older than :data:`TORCH_FLOOR`.

    Parameters
    ----------
    what : str
        The file about to be read, as the message should name it.

    Raises
    ------
    UnsafeDependencyError
        If ``torch.__version__`` is older than the floor or cannot be read as a version. The
        message is one line naming the installed version and the ``pip`` command that fixes it.
    """
    import torch

    version = str(torch.__version__)
    release = _release(version)
    if release is None or release < TORCH_FLOOR:
        floor, tv = _dotted(TORCH_FLOOR), _dotted(TORCHVISION_FLOOR)
        raise UnsafeDependencyError(
            f"refusing to read {what}: torch {version} is older than {floor}, and its weights-only loader "
            f"can be made to run code or corrupt memory by a crafted file (CVE-2025-32434, CVE-2026-24747); "
            f"upgrade with: pip install --upgrade 'torch>={floor}' 'torchvision>={tv}'"
        )


def safe_torch_load(path: str | os.PathLike[str], what: str = "torch file") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` after :func:`check_torch`.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by ``torch.save`` holding tensors and plain containers (a state_dict,
        a checkpoint); anything else is refused by torch's weights-only unpickler.
    what : str, default "torch file"
        What the file is, for the error message ("weights file", "checkpoint").

    Returns
    -------
    object
        What was saved, with every tensor on the CPU.

    Raises
    ------
    UnsafeDependencyError
        If torch is older than :data:`TORCH_FLOOR`; the file is not opened.
    """
    check_torch(f"{what} {os.fspath(path)!r}")
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)
