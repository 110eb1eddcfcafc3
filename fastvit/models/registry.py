"""``create_model`` by timm / T2T-ViT name, with timm's keyword arguments."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from fastvit.models.convert import load_checkpoint, num_classes_of, read_checkpoint, unwrap_state_dict
from fastvit.models.t2t_vit import T2TViT
from fastvit.models.vision_transformer import VisionTransformer


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its class, its fixed arguments and the defaults timm takes from its
    default pretrained config (``img_size``, ``num_classes``)."""

    cls: Callable[..., nn.Module]
    args: dict = field(default_factory=dict)
    img_size: int = 224
    num_classes: int = 1000
    pretrained_args: dict = field(default_factory=dict)


_registry: dict[str, ModelEntry] = {}


def register_model(name: str, entry: ModelEntry) -> None:
    """Make ``create_model(name)`` build ``entry``."""
    _registry[name] = entry


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style ``pattern``, sorted."""
    return sorted(n for n in _registry if fnmatch.fnmatch(n, pattern))


def _vit(name: str, patch: int, dim: int, depth: int, heads: int, img: int = 224, classes: int = 1000, **extra) -> None:
    args = dict(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, **extra)
    register_model(name, ModelEntry(VisionTransformer, args, img, classes))


_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
for _size, _patch, _img, _classes in (
    ("tiny", 16, 224, 1000), ("tiny", 16, 384, 1000),
    ("small", 32, 224, 1000), ("small", 32, 384, 1000), ("small", 16, 224, 1000), ("small", 16, 384, 1000),
    ("small", 8, 224, 0),
    ("base", 32, 224, 1000), ("base", 32, 384, 1000), ("base", 16, 224, 1000), ("base", 16, 384, 1000),
    ("base", 8, 224, 1000),
    ("large", 32, 224, 0), ("large", 32, 384, 1000), ("large", 16, 224, 1000), ("large", 16, 384, 1000),
    ("large", 14, 224, 1000),
):
    _vit(f"vit_{_size}_patch{_patch}_{_img}", _patch, *_SIZES[_size], _img, _classes)
_vit("vit_huge_patch14_224", 14, 1280, 32, 16, classes=0)
_vit("vit_giant_patch14_224", 14, 1408, 40, 16, mlp_ratio=48 / 11)
_vit("vit_gigantic_patch14_224", 14, 1664, 48, 16, mlp_ratio=64 / 13)
_vit("vit_base_patch16_224_miil", 16, 768, 12, 12, classes=11221, qkv_bias=False)
_gap = dict(class_token=False, global_pool="avg", qkv_bias=False, init_values=1e-6, fc_norm=False)
_vit("vit_medium_patch16_gap_240", 16, 512, 12, 8, 240, 11821, **_gap)
_vit("vit_medium_patch16_gap_256", 16, 512, 12, 8, 256, **_gap)
_vit("vit_medium_patch16_gap_384", 16, 512, 12, 8, 384, **_gap)
_vit("vit_betwixt_patch16_gap_256", 16, 640, 12, 10, 256, **_gap)
_vit("vit_base_patch16_gap_224", 16, 768, 12, 16, class_token=False, global_pool="avg", fc_norm=False)
_vit("vit_huge_patch14_gap_224", 14, 1280, 32, 16, classes=0, class_token=False, global_pool="avg", fc_norm=False)
for _name, _dim, _heads in (("tiny", 192, 3), ("small", 384, 6), ("base", 768, 12)):
    _vit(f"deit_{_name}_patch16_224", 16, _dim, 12, _heads)
_vit("deit_base_patch16_384", 16, 768, 12, 12, 384)
_deit3 = dict(no_embed_class=True, init_values=1e-6)
for _name, _patch, _dim, _depth, _heads, _imgs in (
    ("small", 16, 384, 12, 6, (224, 384)), ("medium", 16, 512, 12, 8, (224,)), ("base", 16, 768, 12, 12, (224, 384)),
    ("large", 16, 1024, 24, 16, (224, 384)), ("huge", 14, 1280, 32, 16, (224,)),
):
    for _img in _imgs:
        _vit(f"deit3_{_name}_patch{_patch}_{_img}", _patch, _dim, _depth, _heads, _img, **_deit3)

for _depth, _dim, _heads, _ratio in (
    (7, 256, 4, 2.0), (10, 256, 4, 2.0), (12, 256, 4, 2.0), (14, 384, 6, 3.0), (19, 448, 7, 3.0), (24, 512, 8, 3.0),
):
    register_model(
        f"t2t_vit_{_depth}",
        ModelEntry(
            T2TViT, dict(embed_dim=_dim, depth=_depth, num_heads=_heads, mlp_ratio=_ratio),
            pretrained_args=dict(qk_scale=_dim**-0.5),
        ),
    )


def create_model(name: str, pretrained: bool = False, checkpoint_path: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """Build a registered model (:func:`list_models`) as timm does, optionally loading a local checkpoint.

    ``name`` is a timm name (``vit_base_patch16_224``, ``deit3_small_patch16_224``; a ``.tag`` suffix
    is ignored) or ``t2t_vit_{7,10,12,14,19,24}``; ``kwargs`` are the model's keyword arguments
    (``num_classes``, ``img_size``, ``in_chans``, ``drop_rate``, ``drop_path_rate``, ``global_pool``, ...),
    overriding the registered ones. There is no download: ``pretrained=True`` needs ``checkpoint_path``, a
    local file (timm / vit-pytorch / official T2T-ViT state_dict, wrapped or not, ``.pth`` or
    ``.safetensors``); ``num_classes`` then defaults to the checkpoint's head, a head of another size
    is left freshly initialised, a position table is resampled to ``img_size``, and T2T-ViT takes the
    official pretrained ``qk_scale`` (embed_dim ** -0.5). ``checkpoint_path`` without ``pretrained``
    loads strictly.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    base = name.split(".", 1)[0]
    entry = _registry.get(base)
    if entry is None:
        close = [n for n in _registry if base.split("_")[0] in n][:12]
        raise ValueError(f"unknown model name {name!r}; known names include {close or list_models()[:12]} (see list_models())")
    if pretrained and checkpoint_path is None:
        raise ValueError(
            f"pretrained=True needs checkpoint_path: fastvit does not download weights (no network access); "
            f"pass checkpoint_path= a local .pth / .safetensors file of {base}"
        )
    state_dict = None
    if checkpoint_path is not None:
        state_dict = unwrap_state_dict(read_checkpoint(checkpoint_path))
    args = dict(entry.args, img_size=entry.img_size, num_classes=entry.num_classes)
    if pretrained:
        args.update(entry.pretrained_args)
        stored = num_classes_of(state_dict)
        if stored is not None:
            args["num_classes"] = stored
    args.update(kwargs)
    model = entry.cls(**args)
    if state_dict is not None:
        load_checkpoint(model, state_dict, strict=True, filter_head=pretrained)
    return model
