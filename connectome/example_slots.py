"""The node columns that hold each unit's top example images: their names, shared by writers and readers."""

from __future__ import annotations

import re

__all__ = ["LISTS", "COLUMN"]

# which images a slot ranks: by activation or by attribution, and the column prefix of each
LISTS = {"activation": "example", "attribution": "example_attr"}
# one column of slot j: the image index, the value it was ranked by, or the position in the map
COLUMN = re.compile(r"^(example|example_attr)_(index|value|pos)_(\d+)$")
