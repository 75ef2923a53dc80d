"""Hugging Face ``transformers`` image classifiers from small configs through attribution, exact in float64.

For each model type of ``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES`` (its first class where
it names several), the class built from its default config made small below (few layers,
narrow, 10 labels, a small image), random weights (``torch.manual_seed(0)``; all-zero
Linear/Conv weights get random values), float64, eval mode. As users have them: the model gets
``pixel_values`` positionally and returns a ``ModelOutput`` whose ``.logits`` are the target
(its first field where it has no ``logits``: PPLCNet).
A type that does not build here (an extra package) or does not run on pixel values alone is
skipped with the reason. See ``tools/_sweep.py`` for the five results.

Usage: python tools/sweep_hf.py [--only vit,swin] [--jobs 1] [--timeout 600]
                                [--json tools/sweep_results/hf.json] [--readme README.md]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import _sweep

NAME, WHAT = "hf", "Hugging Face model types"  # README markers <!-- sweep:hf -->, the counts line
JSON = _sweep.ROOT / "tools" / "sweep_results" / "hf.json"
NUM_LABELS = 10

_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)
_SWIN = dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)
_SEGFORMER = dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
                  strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2])
_TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
              patch_size=8)
_TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
# model type -> (config keyword arguments, image side)
SMALL: dict[str, tuple[dict[str, Any], int]] = {
    "beit": (_VIT, 32),
    "bit": (dict(embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8), 32),
    "clip": (dict(vision_config=_TOWER, text_config=_TEXT), 32),
    "convnext": (dict(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], image_size=32), 32),
    "convnextv2": (dict(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], image_size=32), 32),
    # CvT indexes its per-block drop rates by stage: each stage needs more blocks than the one before
    "cvt": (dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3]), 64),
    "data2vec-vision": (_VIT, 32),
    "deit": (_VIT, 32),
    "dinat": (dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], kernel_size=3), 32),
    "dinov2": (dict(_VIT, intermediate_size=None), 32),
    "dinov2_with_registers": (dict(_VIT, intermediate_size=None), 32),
    "donut-swin": (_SWIN, 32),
    "efficientnet": (dict(image_size=64, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320), 64),
    "focalnet": (dict(image_size=32, embed_dim=16, depths=[1, 1], hidden_sizes=[32, 64], focal_levels=[2, 2],
                      focal_windows=[3, 3]), 32),
    "hgnet_v2": (dict(embedding_size=16, depths=[1, 1], hidden_sizes=[32, 64], stem_channels=[3, 16, 16],
                      stage_in_channels=[16, 32], stage_mid_channels=[16, 16], stage_out_channels=[32, 64],
                      stage_num_blocks=[1, 1], stage_downsample=[False, True], stage_downsample_strides=[2, 2],
                      stage_light_block=[False, True], stage_kernel_size=[3, 5], stage_numb_of_layers=[2, 2]), 64),
    "hiera": (dict(image_size=[64, 64], embed_dim=16, depths=[1, 1], num_heads=[1, 2], num_query_pool=1), 64),
    "ijepa": (_VIT, 32),
    "imagegpt": (dict(n_embd=32, n_layer=2, n_head=2, n_positions=64), 8),
    "levit": (dict(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4], depths=[1, 1, 1],
                   key_dim=[8, 8, 8]), 64),
    "metaclip_2": (dict(vision_config=_TOWER, text_config=_TEXT), 32),
    "mobilenet_v1": (dict(image_size=32, depth_multiplier=0.25), 32),
    "mobilenet_v2": (dict(image_size=32, depth_multiplier=0.35), 32),
    "mobilevit": (dict(image_size=64, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 64],
                       num_attention_heads=2), 64),
    "mobilevitv2": (dict(image_size=64, width_multiplier=0.25), 64),
    "perceiver": (dict(image_size=16, d_latents=32, num_latents=8, num_self_attends_per_block=1,
                       num_self_attention_heads=1, num_cross_attention_heads=1), 16),
    "poolformer": (dict(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
                        strides=[4, 2], padding=[2, 1]), 32),
    "pp_lcnet": ({}, 64),
    "pvt": (dict(image_size=32, num_encoder_blocks=2, depths=[1, 1], sequence_reduction_ratios=[2, 1],
                 hidden_sizes=[16, 32], patch_sizes=[4, 2], strides=[4, 2], num_attention_heads=[1, 2],
                 mlp_ratios=[2, 2]), 32),
    "pvt_v2": (dict(_SEGFORMER, image_size=[32, 32]), 32),
    "regnet": (dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8), 32),
    "resnet": (dict(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="basic"), 32),
    "segformer": (_SEGFORMER, 32),
    "shieldgemma2": ({}, 32),
    "siglip": (dict(vision_config=_TOWER, text_config=_TEXT), 32),
    "siglip2": (dict(vision_config=dict(_TOWER, num_patches=16), text_config=_TEXT), 32),
    "swiftformer": (dict(image_size=64, depths=[1, 1, 1, 1], embed_dims=[16, 16, 32, 32]), 64),
    "swin": (_SWIN, 32),
    "swinv2": (_SWIN, 32),
    "textnet": (dict(image_size=[32, 32], stem_out_channels=16, hidden_sizes=[16, 16, 32], depths=[1, 1],
                     conv_layer_kernel_sizes=[[[3, 3]], [[3, 3]]], conv_layer_strides=[[1], [2]]), 32),
    "timm_wrapper": (dict(architecture="resnet10t"), 32),
    "vit": (_VIT, 32),
    "vit_msn": (_VIT, 32),
}
# types that take something else than images: they are skipped with this reason
NOT_IMAGES = {
    "imagegpt": "takes colour-cluster token ids (input_ids), not pixel values",
    "shieldgemma2": "a vision-language model: takes a text prompt (input_ids) with the image",
    "siglip2": "takes flattened patches with spatial_shapes and pixel_attention_mask, not images",
}


def _mapping() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as names

    return {t: (c[0] if isinstance(c, tuple) else c) for t, c in names.items()}


def families() -> list[str]:
    return sorted(_mapping())


def preload() -> None:
    """The imports every model needs, made once in the sweep server before it forks: each type's modeling module."""
    import transformers

    import connectome.extract  # noqa: F401  (imported once, before the forks)

    for name in _mapping().values():
        try:
            getattr(transformers, name)
        except Exception:  # a type whose module needs an extra package: its own run says so
            pass


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}


def logits(out: Any) -> Any:
    """A ``ModelOutput``'s logits (PPLCNet returns its class scores as ``last_hidden_state``: its first field)."""
    found = getattr(out, "logits", None)
    return found if found is not None else out[0]


def build(model_type: str) -> tuple[Any, int]:
    """The small model of a type (float64, eval, random weights) and its image side."""
    import torch
    import transformers
    from transformers import CONFIG_MAPPING

    kwargs, side = SMALL.get(model_type, ({}, 32))
    config = CONFIG_MAPPING[model_type](**{k: v for k, v in kwargs.items() if v is not None}, num_labels=NUM_LABELS)
    torch.manual_seed(0)
    model = getattr(transformers, _mapping()[model_type])(config)
    return _sweep.randomise_zero_weights(model).eval().double(), side


def run_one(model_type: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    base = {"model": _mapping()[model_type]}
    if model_type in NOT_IMAGES:
        return {**base, "result": "skipped", "reason": NOT_IMAGES[model_type]}
    try:
        model, side = build(model_type)
    except Exception as exc:
        return {**base, "result": "skipped", "reason": "does not build: " + _sweep.first_line(exc)}
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([1, 7])
    try:
        with torch.no_grad():
            logits(model(x))
    except Exception as exc:
        return {**base, "result": "skipped", "reason": "does not run on pixel_values: " + _sweep.first_line(exc)}
    base["params"] = sum(p.numel() for p in model.parameters())
    base["input_size"] = [3, side, side]
    return {**base, **_sweep.classify(model, x, y, logits=logits)}


def main(argv: list[str] | None = None) -> int:
    return _sweep.sweep_main(argv, doc=__doc__, script=Path(__file__).resolve(), name=NAME,
                             what=WHAT, families=families, run_one=run_one,
                             versions=versions, default_json=JSON, preload=preload,
                             describe=lambda model_type: {"model": _mapping()[model_type]})


if __name__ == "__main__":
    sys.exit(main())
