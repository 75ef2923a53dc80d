"""What tracing produces: where each tensor's units are, the layers of units and their inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.fx as fx

from connectome.errors import ExtractionError
from connectome.extract.rules import ChainOp

__all__ = ["Units", "Operand", "LayerSpec", "UnitGraph"]


@dataclass
class Units:
    """Where the units of a tensor are: layer, tensor dims that index units, unit of each index.

    ``index`` has the shape of the tensor along ``dims`` (None: ``arange(layer size)`` along one
    dim, the natural order). ``dims == ()`` means every element belongs to the one unit
    ``int(index)``.
    """

    layer: int
    dims: tuple[int, ...] = (1,)
    index: np.ndarray | None = None
    batch: int = 0  # the batch dim (a layout op may move it for a while: timm's qkv permute)
    # rows of the batch dim per image: positions folded into the batch (a window partition,
    # LeViT's flatten(0, 1)) make row r of the batch dim part of image r // windows. When
    # ``batch`` is also in ``dims`` (heads folded into the batch), the units vary with the row
    # of an image: ``index`` has ``windows`` entries along it, row r holding entry r % windows
    windows: int = 1

    @property
    def natural(self) -> bool:
        return self.index is None and len(self.dims) == 1 and self.batch == 0 and self.windows == 1

    def along(self, dim: int, size: int, layer_size: int) -> np.ndarray | None:
        """Unit of each index of ``dim`` when units lie along that one dim, else None."""
        if self.batch != 0 or self.batch in self.dims:
            return None
        if self.dims == ():
            return np.full(size, int(self.index), dtype=np.int64)
        if self.dims != (dim,):
            return None
        return np.arange(layer_size, dtype=np.int64) if self.index is None else np.asarray(self.index, np.int64)


@dataclass
class Operand:
    """One input of a layer: the value of fx node ``node``, whose channels are units of ``layer``.

    A dense layer reads ``group`` consecutive input features per column of its edge block
    (a flattened ``C x H x W`` map: positions per unit), and column ``c`` of that block is
    unit ``cols[c]`` of the source (None: unit ``c``). An identity operand (residual, concat)
    fills the units ``offset ...`` of its layer along ``dim``, channel ``c`` from unit ``cols[c]``.
    """

    layer: int
    node: str
    group: int = 1
    offset: int = 0  # first unit of the destination this operand fills (concat)
    sign: float = 1.0  # residual sub gives -1
    path: list[str] = field(default_factory=list)  # per-unit ops between the source's value and this read
    cols: np.ndarray | None = None
    width: int = 0  # channels read (columns of the edge block after grouping)
    dim: int = 1  # the dim of the destination's value holding its units (of this operand's value with a span)
    # positions of the destination this operand fills, (dim, start, length, stacked), when
    # operands are joined along positions (torch.cat along tokens, torch.stack: `stacked`, the
    # operand lacks that dim); each then fills all the units, from `offset` 0
    span: tuple[int, int, int, bool] | None = None
    # (dim, index): the slice of this operand's value it reads, when a sum over a dim that holds
    # units adds its slices (ResNeSt's radix groups); the slice holds its units along `dim`
    select: tuple[int, int] | None = None
    # units on several dims of the destination's value (heads and channels of a product or a sum
    # before the heads are merged), or on none (``()``: one unit per tensor); ``cols`` then lists
    # the unit at each place along them, in order. None: the units lie along ``dim``
    dims: tuple[int, ...] | None = None


@dataclass
class LayerSpec:
    """A layer of units in the traced model."""

    name: str
    kind: str  # a key of connectome.kinds.KINDS
    size: int
    node: str  # fx node that defines the units
    module: str | None = None
    operands: list[Operand] = field(default_factory=list)
    groups: int = 1
    out_node: str = ""  # end of the unbranched per-unit chain: the value passed on (A)
    chain: list[str] = field(default_factory=list)  # fx nodes of the unbranched chain after `node`
    bias_ops: list[ChainOp] = field(default_factory=list)
    nonlinear: list[str] = field(default_factory=list)  # element-wise non-linear ops on these units
    weight_node: str | None = None  # for F.conv2d/F.linear calls: the node giving the weight
    call: dict[str, Any] = field(default_factory=dict)  # conv hyper-parameters
    dim: int = 1  # the dim of the defining value that holds the units
    dense: str = ""  # dense layers: the name of their strategy in connectome.extract.dense.STRATEGIES


@dataclass
class UnitGraph:
    """The model's data flow mapped onto layers of units."""

    gm: fx.GraphModule
    layers: list[LayerSpec]
    units: dict[str, Units]  # fx node -> where its units are
    output_layer: int
    output_node: str
    shapes: dict[str, tuple[int, ...]]
    rules: list[str] = field(default_factory=list)  # names of the linearisation rules used
    # ops that cast the data to a floating type less precise than the input's (a float64 run of a
    # model that computes its attention in float32): flows there are as exact as that type
    casts: list[str] = field(default_factory=list)

    def unit_dim(self, node: str) -> int:
        """The one dim that holds the units of ``node``'s value (1 for NCHW, -1 for channels-last)."""
        u = self.units.get(node)
        return u.dims[0] if u is not None and len(u.dims) == 1 else 1

    def one_unit_dim(self, node: str, what: str) -> int:
        """:meth:`unit_dim`, for a use that reads or masks ``node``'s value per image and unit
        (``what``): refused with a one-line error when its units are on several dims, in a
        different order, or share the batch dim with positions or heads folded into it."""
        u = self.units.get(node)
        if u is not None and (len(u.dims) != 1 or u.index is not None or u.batch != 0 or u.windows != 1):
            raise ExtractionError(
                f"{what}: layer {self.layers[u.layer].name!r} holds its units on several dims of its value, "
                "in another order, or with positions or heads folded into the batch; pick a layer whose "
                "units are the channels (or the last dim) of its value")
        return self.unit_dim(node)

    def layer_index(self, name: str) -> int:
        from connectome.extract.targets import resolve_layer

        return resolve_layer(name, self.layers, where="in the traced model", error=ExtractionError)
