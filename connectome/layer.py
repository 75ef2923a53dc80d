"""A layer of units: its name, kind, size, unit labels and module path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["Layer"]


@dataclass(frozen=True)
class Layer:
    """One layer of units.

    Parameters
    ----------
    name : str
        Module path (``"layer1.0.conv1"``) or a synthetic name (``"input"``, ``"logits"``).
    kind : str
        One of ``input, conv, linear, residual, concat, output, group, other``.
    size : int
        Number of units of this layer present in the graph.
    labels : tuple of str, optional
        One label per unit present (class names for the output layer).
    module : str, optional
        Module path in the model, when it differs from ``name``.
    """

    name: str
    kind: str = "other"
    size: int = 0
    labels: tuple[str, ...] | None = None
    module: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or ":" in self.name:
            raise ValueError(f"layer name must be a non-empty string without ':', got {self.name!r}")
        if self.size < 0:
            raise ValueError(f"layer {self.name!r}: size must be >= 0, got {self.size}")
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(str(s) for s in self.labels))
            if len(self.labels) != self.size:
                raise ValueError(
                    f"layer {self.name!r}: {len(self.labels)} labels for {self.size} units"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "size": int(self.size),
            "labels": list(self.labels) if self.labels is not None else None,
            "module": self.module,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Layer:
        labels = d.get("labels")
        return cls(
            name=str(d["name"]),
            kind=str(d.get("kind", "other")),
            size=int(d["size"]),
            labels=tuple(labels) if labels is not None else None,
            module=d.get("module"),
        )
