"""``create_model`` by timm / T2T-ViT name, with timm's keyword arguments."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from fastvit.models._pretrained_cfgs import PRETRAINED_CFGS, T2T_CFG
from fastvit.models.features import FeatureGetterNet
from fastvit.models.convert import load_checkpoint, num_classes_of, read_checkpoint, unwrap_state_dict
from fastvit.models.t2t_vit import T2TViT
from fastvit.models.vision_transformer import VisionTransformer, VisionTransformerDistilled


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its class, its fixed arguments, the defaults timm takes from its default
    pretrained config (``img_size``, ``num_classes``) and that config (``model.pretrained_cfg``)."""

    cls: Callable[..., nn.Module]
    args: dict = field(default_factory=dict)
    img_size: int = 224
    num_classes: int = 1000
    pretrained_args: dict = field(default_factory=dict)
    pretrained_cfg: dict = field(default_factory=dict)


_registry: dict[str, ModelEntry] = {}


def register_model(name: str, entry: ModelEntry) -> None:
    """Make ``create_model(name)`` build ``entry``."""
    _registry[name] = entry


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style ``pattern``, sorted."""
    return sorted(n for n in _registry if fnmatch.fnmatch(n, pattern))


class _TimmOptimized:
    """Builds a name through ``timm.create_model`` (its weights loading and feature API included), then
    ``fastvit.optimize``: for architectures whose parts fastvit does not build itself (the hybrids'
    ResNet stems), so that each has one implementation."""

    def __init__(self, what: str):
        self.what = what

    def __call__(self, name: str, pretrained: bool, checkpoint_path, **kwargs) -> nn.Module:
        try:
            import timm
        except ImportError as e:
            raise ImportError(f"{name} ({self.what}) is built by timm and then optimized: pip install timm") from e
        from fastvit.swap import optimize

        if pretrained:
            kwargs["pretrained_cfg_overlay"] = dict(file=os.fspath(checkpoint_path))
        elif checkpoint_path is not None:
            kwargs["checkpoint_path"] = os.fspath(checkpoint_path)
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
        optimize(model)
        return model


def _vit(name: str, patch: int, dim: int, depth: int, heads: int, img: int = 224, cls=VisionTransformer, **extra) -> None:
    args = dict(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, **extra)
    cfg = dict(PRETRAINED_CFGS[name], input_size=(3, img, img))
    if cls is VisionTransformerDistilled:
        cfg["classifier"] = ("head", "head_dist")
    register_model(name, ModelEntry(cls, args, img, cfg["num_classes"], pretrained_cfg=cfg))


_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
for _size, _patch, _img in (
    ("tiny", 16, 224), ("tiny", 16, 384),
    ("small", 32, 224), ("small", 32, 384), ("small", 16, 224), ("small", 16, 384),
    ("small", 8, 224),
    ("base", 32, 224), ("base", 32, 384), ("base", 16, 224), ("base", 16, 384),
    ("base", 8, 224),
    ("large", 32, 224), ("large", 32, 384), ("large", 16, 224), ("large", 16, 384),
    ("large", 14, 224),
):
    _vit(f"vit_{_size}_patch{_patch}_{_img}", _patch, *_SIZES[_size], _img)
_vit("vit_huge_patch14_224", 14, 1280, 32, 16)
_vit("vit_giant_patch14_224", 14, 1408, 40, 16, mlp_ratio=48 / 11)
_vit("vit_gigantic_patch14_224", 14, 1664, 48, 16, mlp_ratio=64 / 13)
_vit("vit_base_patch16_224_miil", 16, 768, 12, 12, qkv_bias=False)
_gap = dict(class_token=False, global_pool="avg", qkv_bias=False, init_values=1e-6, fc_norm=False)
_vit("vit_medium_patch16_gap_240", 16, 512, 12, 8, 240, **_gap)
_vit("vit_medium_patch16_gap_256", 16, 512, 12, 8, 256, **_gap)
_vit("vit_medium_patch16_gap_384", 16, 512, 12, 8, 384, **_gap)
_vit("vit_betwixt_patch16_gap_256", 16, 640, 12, 10, 256, **_gap)
_vit("vit_base_patch16_gap_224", 16, 768, 12, 16, class_token=False, global_pool="avg", fc_norm=False)
_vit("vit_huge_patch14_gap_224", 14, 1280, 32, 16, class_token=False, global_pool="avg", fc_norm=False)
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
for _name, _dim, _heads in (("tiny", 192, 3), ("small", 384, 6), ("base", 768, 12)):
    _vit(f"deit_{_name}_distilled_patch16_224", 16, _dim, 12, _heads, cls=VisionTransformerDistilled)
_vit("deit_base_distilled_patch16_384", 16, 768, 12, 12, 384, cls=VisionTransformerDistilled)

# DINOv2: patch 14, layer scale, 518 px (the giant's SwiGLU MLP is not fused: build it with timm and optimize)
for _size in ("small", "base", "large"):
    _dim, _depth, _heads = _SIZES[_size]
    _vit(f"vit_{_size}_patch14_dinov2", 14, _dim, _depth, _heads, 518, init_values=1e-5)
    _vit(f"vit_{_size}_patch14_reg4_dinov2", 14, _dim, _depth, _heads, 518, init_values=1e-5, reg_tokens=4,
         no_embed_class=True)

# CLIP image towers: LayerNorm before the blocks, no patch bias, eps 1e-5; QuickGELU where the name says so
_WIDE = {
    "xsmall": (256, 10, 4, 4.0), "medium": (512, 12, 8, 4.0), "betwixt": (640, 12, 10, 4.0),
    "base": (768, 12, 12, 4.0), "base_plus": (896, 12, 14, 4.0), "large": (1024, 24, 16, 4.0),
    "huge": (1280, 32, 16, 4.0), "giant": (1408, 40, 16, 48 / 11), "gigantic": (1664, 48, 16, 64 / 13),
    "so400m": (1152, 27, 16, 3.7362), "giantopt": (1536, 40, 16, 4.0),
}
for _size, _patch, _quick, _imgs in (
    ("xsmall", 16, False, (224,)), ("medium", 16, False, (224,)), ("medium", 32, False, (224,)),
    ("betwixt", 32, False, (224,)), ("base", 16, False, (224, 384)), ("base", 32, False, (224, 256, 384, 448)),
    ("base_plus", 16, False, (240,)), ("large", 14, False, (224, 336)), ("huge", 14, False, (224, 336, 378)),
    ("giant", 14, False, (224,)), ("gigantic", 14, False, (224, 378)),
    ("base", 16, True, (224,)), ("base", 32, True, (224,)), ("large", 14, True, (224, 336)),
    ("huge", 14, True, (224, 378)), ("gigantic", 14, True, (224,)),
):
    _dim, _depth, _heads, _ratio = _WIDE[_size]
    _kind = "clip_quickgelu" if _quick else "clip"
    _name = f"vit_base_patch16_plus_clip_{_imgs[0]}" if _size == "base_plus" else None
    for _img in _imgs:
        _vit(_name or f"vit_{_size}_patch{_patch}_{_kind}_{_img}", _patch, _dim, _depth, _heads, _img, mlp_ratio=_ratio,
             pre_norm=True, norm_eps=1e-5, act_layer="quick_gelu" if _quick else None)

# SigLIP: no class token, the attention-pool head ("map") or average pooling ("gap"); tanh GELU where timm has it
for _size, _patch, _act, _map_imgs, _gap_imgs in (
    ("base", 16, None, (224, 256, 384, 512), (224, 256, 384, 512)), ("large", 16, None, (256, 384), (256, 384)),
    ("so400m", 14, None, (224, 378, 384), (224, 378, 384, 448, 896)), ("base", 32, "gelu_tanh", (256,), (256,)),
    ("large", 16, "gelu_tanh", (512,), (512,)), ("giantopt", 16, "gelu_tanh", (256, 384), (256, 384)),
    ("so400m", 16, "gelu_tanh", (256, 384, 512), (256, 384, 512)),
):
    _dim, _depth, _heads, _ratio = _WIDE[_size]
    for _pool, _imgs in ((dict(global_pool="map"), _map_imgs), (dict(global_pool="avg", fc_norm=False), _gap_imgs)):
        for _img in _imgs:
            _gap = "gap_" if _pool["global_pool"] == "avg" else ""
            _vit(f"vit_{_size}_patch{_patch}_siglip_{_gap}{_img}", _patch, _dim, _depth, _heads, _img,
                 mlp_ratio=_ratio, class_token=False, act_layer=_act, **_pool)

# hybrid ViTs: timm's ResNetV2 stem, then the patch embedding (fused by optimize) on its feature map
_hybrid = _TimmOptimized("a ResNet stem from timm, then a ViT")
for _name, _img, _classes in (
    ("vit_tiny_r_s16_p8", 224, 1000), ("vit_tiny_r_s16_p8", 384, 1000), ("vit_small_r26_s32", 224, 1000),
    ("vit_small_r26_s32", 384, 1000), ("vit_base_r50_s16", 224, 0), ("vit_base_r50_s16", 384, 1000),
    ("vit_large_r50_s32", 224, 1000), ("vit_large_r50_s32", 384, 1000),
):
    register_model(f"{_name}_{_img}", ModelEntry(_hybrid, img_size=_img, num_classes=_classes))

for _depth, _dim, _heads, _ratio in (
    (7, 256, 4, 2.0), (10, 256, 4, 2.0), (12, 256, 4, 2.0), (14, 384, 6, 3.0), (19, 448, 7, 3.0), (24, 512, 8, 3.0),
):
    register_model(
        f"t2t_vit_{_depth}",
        ModelEntry(
            T2TViT, dict(embed_dim=_dim, depth=_depth, num_heads=_heads, mlp_ratio=_ratio),
            pretrained_args=dict(qk_scale=_dim**-0.5), pretrained_cfg=dict(T2T_CFG, input_size=(3, 224, 224)),
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
    if isinstance(entry.cls, _TimmOptimized):
        return entry.cls(base, pretrained, checkpoint_path, **kwargs)
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", 3)
    if kwargs.pop("feature_cls", "getter") != "getter":
        raise ValueError("fastvit's models extract features with feature_cls='getter' (forward_intermediates) only")
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
    model.pretrained_cfg = model.default_cfg = dict(entry.pretrained_cfg, architecture=base)
    if features_only:
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"{base} has no forward_intermediates: features_only=True is not available for it")
        cfg = model.pretrained_cfg
        model = FeatureGetterNet(model, out_indices)
        model.pretrained_cfg = model.default_cfg = cfg
    return model

