"""Image files as 8-bit RGB, whatever their bit depth: the one reader of the extraction's data
loader and of the patches cut for reports and the viewer (PIL and numpy only)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["to_rgb", "read_rgb"]

#: Pillow's modes of one-channel integer images wider than 8 bits (16-bit PNG, TIFF, PGM).
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(im: Any) -> Any:
    """A PIL image as 8-bit RGB; 16-bit grey levels scaled by 255/65535, not clipped.

    Pillow's ``convert("RGB")`` clips a 16-bit grey image (modes ``I;16`` and ``I``) at 255,
    which turns nearly every pixel white. Here 0..65535 maps to 0..255 (rounded, so within
    half an 8-bit step of the same image saved with 8 bits); values of a 32-bit ``I`` image
    outside 0..65535 are clipped to that range.
    """
    if im.mode in WIDE_MODES:
        from PIL import Image

        a = np.asarray(im, dtype=np.float64)
        a = np.rint(np.clip(a, 0, 65535) * (255 / 65535)).astype(np.uint8)
        im = Image.fromarray(a, "L")
    return im.convert("RGB")


def read_rgb(path: str) -> Any:
    """The image file ``path`` as an 8-bit RGB PIL image (see :func:`to_rgb`); torchvision's
    ``default_loader`` with 16-bit grey images scaled instead of clipped."""
    from PIL import Image

    with open(path, "rb") as fh:  # closed at once: no ResourceWarning, no file handle per worker
        with Image.open(fh) as im:
            return to_rgb(im)
