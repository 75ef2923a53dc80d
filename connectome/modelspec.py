"""Models and data named on the command line: ``torchvision:resnet18``, ``zoo:NAME``,
``module.path:factory``, ``file.py:factory``; ``zoo:shapes`` or an ImageFolder path."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectome._safety import safe_torch_load
from connectome.errors import ConnectomeError, DataError, UnsafeDependencyError

__all__ = ["ModelSpec", "load_model_spec", "load_data_spec"]


@dataclass
class ModelSpec:
    model: Any
    name: str
    input_shape: tuple[int, ...] | None = None
    classes: list[str] | None = None
    #: What was assumed, for ``meta`` (e.g. ``{"weights": "random init"}``).
    meta: dict[str, Any] = field(default_factory=dict)


def _load_weights(model: Any, weights: str) -> None:
    p = Path(weights)
    if not p.is_file():
        raise ConnectomeError(f"weights file {weights!r} does not exist; pass a state_dict saved with torch.save")
    try:
        state = safe_torch_load(p, what="weights file")
    except UnsafeDependencyError:
        raise
    except Exception as exc:
        raise ConnectomeError(f"cannot read weights file {weights!r} ({type(exc).__name__}: {exc}); save a state_dict with torch.save") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConnectomeError(f"weights file {weights!r} does not fit the model: {first}") from None


def _line(exc: BaseException, n: int = 300) -> str:
    s = " ".join(str(exc).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def load_model_spec(spec: str, weights: str | None = None) -> ModelSpec:
    """Build the model a spec names.

    Parameters
    ----------
    spec : str
        ``torchvision:NAME`` (any torchvision classification model), ``zoo:NAME`` (the embedded
        zoo), ``package.module:factory`` or ``path/to/file.py:factory`` (a callable returning
        an ``nn.Module``).
    weights : str, optional
        A state_dict file (loaded with ``weights_only=True``), or for torchvision models
        ``DEFAULT`` / a weight enum name such as ``IMAGENET1K_V1`` (downloads through
        torchvision's cache).
    """
    if ":" not in spec:
        raise ConnectomeError(
            f"model {spec!r} is not a model spec; use torchvision:resnet18, zoo:simplecnn_a, "
            "package.module:factory or file.py:factory"
        )
    kind, _, name = spec.partition(":")
    if kind == "torchvision":
        import torchvision

        try:
            builder = torchvision.models.get_model_builder(name)
        except ValueError:
            known = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models))[:12])
            raise ConnectomeError(f"torchvision has no model {name!r}; classification models include {known}, ...") from None
        classes = None
        if weights is not None and not Path(weights).is_file():
            try:
                enum = torchvision.models.get_model_weights(name)
                w = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
            except (KeyError, ValueError):
                raise ConnectomeError(
                    f"weights {weights!r} is neither a file nor a weight name of torchvision {name!r}; "
                    "pass a state_dict file or DEFAULT"
                ) from None
            try:
                model = builder(weights=w)
            except Exception as exc:  # no network: urllib errors
                raise ConnectomeError(
                    f"cannot get torchvision weights {w} ({type(exc).__name__}); without network access, "
                    "download them elsewhere and pass --weights FILE"
                ) from None
            classes = list(w.meta.get("categories", [])) or None
        else:
            kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
            model = builder(weights=None, **kwargs)
            if weights is not None:
                _load_weights(model, weights)
        meta = {"weights": str(weights) if weights is not None else "random init"}
        if weights is None:
            # Easy to miss: the same name with --weights DEFAULT is a trained network.
            print(f"connectome: torchvision:{name} has random weights (no --weights given); pass --weights DEFAULT "
                  "for torchvision's pretrained ones or --weights FILE for your own", file=sys.stderr)
        return ModelSpec(model.eval(), f"torchvision:{name}", (3, 224, 224), classes, meta)
    if kind == "zoo":
        from connectome import zoo

        try:
            model = zoo.load_model(name)
        except ValueError as exc:
            raise ConnectomeError(str(exc)) from None
        info = zoo.model_info(name)
        size = int(info.get("image_size", 32))
        if weights is not None:
            _load_weights(model, weights)
        return ModelSpec(model.eval(), f"zoo:{name}", (3, size, size), list(zoo.SHAPE_CLASSES))
    module_name, factory = kind, name
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ConnectomeError(f"model file {module_name!r} does not exist")
        mspec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mspec)
        try:
            mspec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as exc:
            raise ConnectomeError(f"importing {module_name!r} failed: {type(exc).__name__}: {_line(exc)}") from None
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConnectomeError(f"cannot import module {module_name!r} ({exc}); check the spec module.path:factory") from None
        except Exception as exc:  # the module's own code failed while it was imported
            raise ConnectomeError(f"importing {module_name!r} failed: {type(exc).__name__}: {_line(exc)}") from None
    fn = getattr(module, factory, None)
    if fn is None or not callable(fn):
        raise ConnectomeError(f"{module_name!r} has no callable {factory!r}")
    try:
        model = fn()
    except Exception as exc:  # the user's factory: say whose code failed, in one line
        raise ConnectomeError(
            f"the model factory {spec!r} raised {type(exc).__name__}: {_line(exc)}; fix the factory or its arguments"
        ) from None
    import torch.nn as nn

    if not isinstance(model, nn.Module):
        raise ConnectomeError(f"{spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        _load_weights(model, weights)
    return ModelSpec(model.eval(), spec, None, None)


def load_data_spec(spec: str, image_size: int | None = None, n_per_class: int = 24, seed: int = 1) -> Any:
    """``zoo:shapes`` (optionally ``zoo:shapes:N`` images per class) or an ImageFolder path."""
    if spec.startswith("zoo:shapes"):
        from connectome import zoo

        parts = spec.split(":")
        n = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else n_per_class
        return zoo.shapes(n, seed=seed, size=image_size or 32)
    p = Path(spec)
    if not p.exists():
        raise DataError(f"data {spec!r} does not exist; pass an ImageFolder directory (ROOT/<category>/<images>) or zoo:shapes")
    if not p.is_dir():
        raise DataError(f"data {spec!r} is a file; pass an ImageFolder directory (ROOT/<category>/<images>) or zoo:shapes")
    return str(p)
