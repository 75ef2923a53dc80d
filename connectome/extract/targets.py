"""What a model-running function is asked about: the target class, and the layers named.

One resolver for targets (:func:`resolve_target`) and one for layer names
(:func:`resolve_layer`), so that :func:`~connectome.extract.attribution`,
:func:`~connectome.analysis.ablate`, :func:`~connectome.analysis.fidelity`, activations
and unit matching accept the same spellings and refuse the same mistakes with the same
message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from connectome.errors import ConnectomeError, DataError, short_list

__all__ = ["Target", "resolve_target", "check_labels", "layer_position", "resolve_layer"]

LABEL, PREDICTED, CLASS, CALLABLE = "label", "predicted", "class", "callable"


@dataclass(frozen=True)
class Target:
    """A resolved target: which logit of each image a run reads.

    Attributes
    ----------
    kind : str
        ``"label"`` (each image's own label), ``"predicted"`` (each image's predicted
        class), ``"class"`` (one fixed class) or ``"callable"``.
    index : int or None
        The class, for kind ``"class"``.
    fn : callable or None
        ``fn(logits) -> (batch,)``, for kind ``"callable"``.
    """

    kind: str
    index: int | None = None
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def logit(self, logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The target value of each image, shape (batch,), differentiable in ``logits``.

        ``labels`` (output units, shape (batch,)) are read for kind ``"label"`` only and are
        not checked here (see :func:`check_labels`). For ``"predicted"`` the class is the
        argmax of these logits, itself held constant.
        """
        if self.kind == LABEL:
            return logits.gather(1, labels[:, None]).squeeze(1)
        if self.kind == PREDICTED:
            return logits.gather(1, logits.detach().argmax(1, keepdim=True)).squeeze(1)
        if self.kind == CLASS:
            return logits[:, self.index]
        return self.fn(logits)

    def classes(self, logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The target class of each image, int64 of shape (batch,).

        ``logits`` are the intact model's (``"predicted"`` reads their argmax); ``labels``
        are checked against the number of classes for kind ``"label"``.

        Raises
        ------
        DataError
            Kind ``"label"`` without labels or with labels out of range.
        TypeError
            Kind ``"callable"``: it gives a value per image, not a class.
        """
        if self.kind == LABEL:
            return check_labels(labels, logits.shape[1])
        if self.kind == PREDICTED:
            return logits.argmax(1)
        if self.kind == CLASS:
            return torch.full((logits.shape[0],), self.index, dtype=torch.long, device=logits.device)
        raise TypeError("a callable target has no class per image; resolve it with allow_callable=False")


def resolve_target(
    target: Any,
    n_classes: int,
    classes: Sequence[str] | None = None,
    *,
    allow_callable: bool = True,
    caller: str = "this function",
) -> Target:
    """Check a ``target=`` argument and say what it means.

    Parameters
    ----------
    target : "label", "predicted", int, str or callable
        Each image's own label; each image's predicted class; a class index (an int, or a
        string of digits such as ``"281"``); a class name from ``classes``; or
        ``callable(logits) -> (batch,)``.
    n_classes : int
        Units of the model's output layer.
    classes : sequence of str, optional
        Class names that a name may refer to, in output-unit order.
    allow_callable : bool, default True
        Whether a callable is allowed (it is not where a class per image is needed, as in
        ablation).
    caller : str, default "this function"
        Named in the message refusing a callable.

    Returns
    -------
    Target

    Raises
    ------
    DataError
        An unknown name, a class index out of range, a value of another type, or a callable
        where ``allow_callable`` is False. Every caller gets the same message for the same
        mistake.

    Examples
    --------
    >>> resolve_target("bee", 2, ["ant", "bee"])
    Target(kind='class', index=1, fn=None)
    >>> resolve_target("1", 2).index
    1
    >>> resolve_target("predicted", 2).kind
    'predicted'
    """
    if isinstance(target, str) and target == LABEL:
        return Target(LABEL)
    if isinstance(target, str) and target == PREDICTED:
        return Target(PREDICTED)
    if isinstance(target, str):
        names = [str(c) for c in classes] if classes else []
        # Digits first: folders named after unit numbers ("281") mean those units.
        if target.lstrip("-").isdigit():
            target = int(target)
        elif target in names:
            target = names.index(target)
        else:
            raise DataError(
                f"target {target!r} is not 'label', 'predicted', a class index or a class name"
                + (f" (classes: {short_list(names)})" if names else "")
            )
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        c = int(target)
        if not 0 <= c < n_classes:
            raise DataError(
                f"target class {c} does not exist; the output layer has {n_classes} units "
                f"({c} is out of range 0..{n_classes - 1})"
            )
        return Target(CLASS, index=c)
    if callable(target):
        if not allow_callable:
            name = getattr(target, "__name__", type(target).__name__)
            raise DataError(
                f"target={name} is a callable, which only attribution takes: {caller} scores one class per "
                "image; pass 'label', 'predicted', a class index or a class name"
            )
        return Target(CALLABLE, fn=target)
    raise DataError(
        "target must be 'label', 'predicted', an int class or a class name (attribution also takes a "
        f"callable); got {target!r}"
    )


def check_labels(labels: torch.Tensor | None, n_classes: int) -> torch.Tensor:
    """Labels for ``target="label"``: present, and output units of the model.

    Parameters
    ----------
    labels : Tensor of int, shape (n_images,), or None
    n_classes : int
        Units of the output layer.

    Returns
    -------
    Tensor
        ``labels`` as int64.

    Raises
    ------
    DataError
        No labels, or labels outside ``0 .. n_classes - 1``.
    """
    if labels is None:
        raise DataError("target='label' needs labels; the data has images only (pass (images, labels) or target=<class>)")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise DataError(
            f"labels {int(labels.min())}..{int(labels.max())} are out of range of the output layer "
            f"({n_classes} units); map dataset labels to output units first"
        )
    return labels.long()


def as_layer_names(layers: Any) -> list[str] | None:
    """A ``layers=`` argument as a list of names: one name alone is a list of one (not of its
    letters); None stays None (all layers)."""
    if layers is None:
        return None
    return [layers] if isinstance(layers, str) else [str(l) for l in layers]


def layer_position(name: str, layers: Sequence[Any], traced: Sequence[Any] | None = None) -> int | None:
    """Position of the layer called ``name``, or None.

    A name is looked up as a layer name of ``layers`` first, then as a name of the traced
    layers ``traced`` (aligned with ``layers``: the output layer is ``logits`` in a graph but
    keeps its module's name when traced), then as a module path (``"layer1.0.conv1"``).

    Parameters
    ----------
    name : str
    layers : sequence of Layer or LayerSpec
        Anything with ``.name`` and ``.module``.
    traced : sequence of LayerSpec, optional
        The traced layers behind ``layers``, in the same order.

    Returns
    -------
    int or None
    """
    name = str(name)
    for i, l in enumerate(layers):
        if l.name == name:
            return i
    for i, s in enumerate(traced or ()):
        if s.name == name:
            return i
    for group in (layers, traced or ()):
        for i, l in enumerate(group):
            if l.module is not None and l.module == name:
                return i
    return None


def resolve_layer(
    name: str,
    layers: Sequence[Any],
    traced: Sequence[Any] | None = None,
    *,
    where: str = "in the model",
    error: type[ConnectomeError] = ConnectomeError,
) -> int:
    """Position of the layer called ``name`` (see :func:`layer_position`), or a clear error.

    Parameters
    ----------
    name : str
        A graph layer name (``"logits"``), a traced layer name or a module path.
    layers, traced
        As in :func:`layer_position`.
    where : str, default "in the model"
        How the message places the missing layer (``"in model B"``, ``"to contract onto"``).
    error : ConnectomeError subclass, default ConnectomeError
        The class raised.

    Returns
    -------
    int

    Raises
    ------
    ConnectomeError
        (or ``error``) naming ``name`` and the layers there are.

    Examples
    --------
    >>> from connectome.graph import Layer
    >>> layers = [Layer("input", "input", 3), Layer("fc", "linear", 2, module="body.fc")]
    >>> resolve_layer("body.fc", layers)
    1
    """
    i = layer_position(name, layers, traced)
    if i is None:
        raise error(f"no layer {str(name)!r} {where}; layers are {short_list([l.name for l in layers], 10)}")
    return i
