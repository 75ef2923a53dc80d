"""Type aliases shared across the package."""

from __future__ import annotations

import os
from typing import Union

import numpy as np
import numpy.typing as npt

PathLike = Union[str, "os.PathLike[str]"]
FloatArray = npt.NDArray[np.floating]
IntArray = npt.NDArray[np.integer]
