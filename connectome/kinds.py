"""The vocabulary of layer kinds: one table, read by extraction, analysis, export and drawing.

A layer's *kind* says how its units come to be and what its incoming edges are:

======== ==================================== ===================== ===============================
kind     units                                incoming edges        flow on an edge (attribution)
======== ==================================== ===================== ===============================
input    the image's channels                 none                  (node: ``x * dT/dx``)
conv     output channels of a conv            ``(out, in/groups)``  ``sum_k W * dT/dW`` over kernel
linear   output features of a Linear          ``(out, in)``         ``W * dT/dW``
residual the sum of its operands (add, sub)   identity, per operand ``x * dT/dx`` of the operand
concat   its operands side by side            identity, per operand ``x * dT/dx`` of the operand
output   the logits (any dense kind, renamed) as its defining kind  as its defining kind
======== ==================================== ===================== ===============================

Graphs read from files may carry kinds outside this table (``"group"`` from
:func:`connectome.analysis.neuron_groups`, ``"other"``); :func:`info` gives them neutral
defaults. This module imports neither torch nor numpy, so ``graph``, ``io`` and ``analysis``
use it freely.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Kind", "KindInfo", "KINDS", "info", "is_hidden", "DENSE", "IDENTITY"]


class Kind:
    """Names of the layer kinds (plain strings, as stored in files)."""

    INPUT = "input"
    CONV = "conv"
    LINEAR = "linear"
    RESIDUAL = "residual"
    CONCAT = "concat"
    OUTPUT = "output"


# Edge shapes: a dense block shaped like the layer's weight, or one identity edge per operand channel.
DENSE = "dense"
IDENTITY = "identity"


@dataclass(frozen=True)
class KindInfo:
    """What a layer kind is: its edge shape, whether its units are hidden, how it is drawn."""

    name: str
    edges: str | None  # DENSE, IDENTITY, or None (no incoming edges)
    hidden: bool  # units that analyses may ablate, match and group (not the image, not the logits)
    hue: float  # HSV hue in Gephi files and figures coloured by kind
    saturation: float = 0.55  # HSV saturation there: 0 draws the kind grey (the image), lower is quieter


KINDS: dict[str, KindInfo] = {
    k.name: k
    for k in (
        KindInfo(Kind.INPUT, None, False, 0.0, 0.0),
        KindInfo(Kind.CONV, DENSE, True, 0.58),
        KindInfo(Kind.LINEAR, DENSE, True, 0.75),
        KindInfo(Kind.RESIDUAL, IDENTITY, True, 0.33),
        KindInfo(Kind.CONCAT, IDENTITY, True, 0.12),
        KindInfo(Kind.OUTPUT, DENSE, False, 0.95),
    )
}

_OTHER = KindInfo("other", None, True, 0.0, 0.3)  # a kind outside the extraction vocabulary: quieter


def info(kind: str) -> KindInfo:
    """The table entry of ``kind`` (a neutral entry for kinds outside the table)."""
    return KINDS.get(kind, _OTHER)


def is_hidden(kind: str) -> bool:
    """Whether units of this kind are hidden units (neither the image nor the logits)."""
    return info(kind).hidden
