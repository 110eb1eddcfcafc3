"""Attention maps out of fused attention: the probabilities the kernels never write, recomputed in fp32
from the q and k each chosen layer passes to fastvit's attention op; the op itself still runs fused."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fastvit import nn as fnn
from fastvit import reference
from fastvit.ops.attention import observing
from fastvit._autocast import autocast_off
from fastvit.swap.core import _Swapped, _unwrap

_NOT_FOUND = ("{what} has no attention layer fastvit recognises: fastvit's models (fastvit.nn.Attention), or "
              "timm / vit-pytorch / T2T-ViT models after fastvit.optimize(model)")


class AttentionMaps(list):
    """A list of attention probabilities (B, H, N, N), one per chosen layer, with ``layers`` (their
    indices into :func:`attention_layers`) and ``names`` (module names), ``prefix_tokens`` (class /
    register / distillation tokens in front of the patches), ``class_token`` (whether token 0 is a class
    token) and ``grid`` (the patch grid (h, w), or None where it cannot be told)."""

    def __init__(self, maps, layers, names, prefix_tokens: int, class_token: bool, grid: tuple[int, int] | None):
        super().__init__(maps)
        self.layers, self.names = list(layers), list(names)
        self.prefix_tokens, self.class_token, self.grid = prefix_tokens, class_token, grid


def _performer(m: nn.Module) -> bool:
    return isinstance(m, fnn.TokenPerformer) or getattr(type(m), "_fv_kind", None) == "token_performer"


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The softmax self-attention layers of ``model``, in order, as (module name, module): fastvit's
    (``fastvit.nn.Attention``, the vit-pytorch-style models' Attention) and the attention modules
    :func:`fastvit.optimize` swapped in (timm, vit-pytorch, official T2T-ViT), the classes marked
    ``_fv_attention_layer``. T2T-ViT's Performer layers have no softmax map and are not listed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in _unwrap(model).named_modules() if getattr(type(m), "_fv_attention_layer", False)]


def _select(name: str, value, count: int, what: str) -> list[int]:
    """``value`` (None: all; an int; a sequence of ints, negative from the end) as indices into ``count``."""
    if value is None:
        return list(range(count))
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, Sequence) or not items:
        raise TypeError(f"{name} must be None, an int or a non-empty sequence of ints, got {value!r}")
    out = []
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count:
            raise ValueError(f"{name} must index the {count} {what} ({-count}..{count - 1}), got {value!r}")
        out.append(i % count)
    return out


def _prefix_tokens(model: nn.Module) -> int:
    n = getattr(model, "num_prefix_tokens", None)
    if isinstance(n, int):
        return n
    cls = getattr(model, "cls_token", None)  # vit-pytorch's ViT: (1, dim), or (0, dim) with pool='mean'
    return (cls.shape[-2] if cls.dim() == 3 else cls.shape[0]) if isinstance(cls, torch.Tensor) else 0


def _has_class_token(model: nn.Module) -> bool:
    flag = getattr(model, "has_class_token", None)  # fastvit's and timm's VisionTransformer
    if isinstance(flag, bool):
        return flag
    cls = getattr(model, "cls_token", None)  # T2T-ViT, vit-pytorch (0 rows with pool='mean')
    return isinstance(cls, torch.Tensor) and cls.numel() > 0


def _patch_size(model: nn.Module) -> tuple[int, int] | None:
    seq = getattr(model, "to_patch_embedding", None)  # vit-pytorch layouts: fastvit's patch_size, or a Rearrange
    size = getattr(seq, "patch_size", None)
    if size is None and isinstance(seq, nn.Sequential):
        r = next((x for x in seq if hasattr(x, "axes_lengths")), None)
        if r is not None and {"p1", "p2"} <= set(r.axes_lengths):
            size = (int(r.axes_lengths["p1"]), int(r.axes_lengths["p2"]))
    return None if size is None else (int(size[0]), int(size[1]))


def _grid(model: nn.Module, n_patches: int, height: int, width: int) -> tuple[int, int] | None:
    """The (h, w) grid of the n_patches patch tokens ``model`` makes of a (height, width) image: from its
    patch embedding, else the grid of the image's aspect that holds them; None if neither fits."""
    grid = None
    pe = getattr(model, "patch_embed", None)
    if hasattr(pe, "dynamic_feat_size"):  # timm's PatchEmbed / HybridEmbed: its padding and CNN stride
        grid = tuple(pe.dynamic_feat_size((height, width)))
    elif getattr(pe, "patch_size", None) is not None:  # fastvit's
        (ph, pw), ceil = pe.patch_size, getattr(model, "dynamic_img_size", False) and getattr(model, "dynamic_img_pad", False)
        grid = (-(-height // ph), -(-width // pw)) if ceil else (height // ph, width // pw)
    elif getattr(model, "tokens_to_token", None) is not None:  # T2T-ViT: total stride 16
        grid = (height // 16, width // 16)
    elif _patch_size(model) is not None:
        ph, pw = _patch_size(model)
        grid = (height // ph, width // pw)
    if grid is not None and grid[0] * grid[1] == n_patches:
        return grid
    if n_patches <= 0:
        return None
    h = max(1, round(math.sqrt(n_patches * height / width)))
    for gh in (h, h - 1, h + 1):
        if gh > 0 and n_patches % gh == 0:
            return gh, n_patches // gh
    return None


def _hook_target(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """The module whose forward brackets ``module``'s attention call without un-fusing anything: the
    swapped Block that reads ``module`` in its fused path (hooks on a part make it fall back), else
    ``module`` itself."""
    if "." in name:
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(parent, _Swapped) and any(p is module for p in parent._fv_parts()):
            return parent
    return module


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor, layers=None, heads=None) -> AttentionMaps:
    """Run ``model`` once on ``images`` (B, C, H, W) (or one (C, H, W) image) and return the softmax
    probabilities (B, H, N, N), fp32, of the chosen attention ``layers`` (indices into
    :func:`attention_layers`; None: all) and ``heads`` (None: all).

    The probabilities are the eager formulation's, softmax(q k^T * scale + mask) over all tokens
    (class, register and distillation tokens included; masked keys 0; before attention dropout),
    computed from the q and k each chosen layer passes to fastvit's attention op. Every layer, the
    chosen ones included, still runs its fused kernels: the layer is bracketed by hooks on the module
    that calls it (an optimized Block where that Block's fused path reads the attention module, which a
    hook on the attention module itself would un-fuse). The model's train / eval mode is left as it is.
    """
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
        raise ValueError(f"images must be a tensor (B, C, H, W) or (C, H, W), got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    found = attention_layers(model)
    if not found:
        performers = [n for n, m in _unwrap(model).named_modules() if _performer(m)]
        extra = f" (its Performer layers {performers} have no softmax map)" if performers else ""
        raise ValueError(_NOT_FOUND.format(what=type(_unwrap(model)).__name__) + extra)
    chosen = _select("layers", layers, len(found), "attention layers")
    captured: dict[int, torch.Tensor] = {}
    current: list[int] = []

    def observe(q, k, mask, scale):
        if current:
            with autocast_off(q):  # the probabilities in fp32 from the q, k the op got (bf16 under autocast)
                captured[current[-1]] = reference.attention_probs(q.float(), k.float(), mask, scale)

    def enter(i):
        def hook(module, args):
            current.append(i)  # returns None: the module's inputs stay as they are
        return hook

    def leave(module, args, out):
        current.pop()  # returns None: the module's output stays as it is

    inner = _unwrap(model)
    handles = []
    for i in sorted(set(chosen)):
        target = _hook_target(inner, *found[i])
        handles.append(target.register_forward_pre_hook(enter(i)))
        handles.append(target.register_forward_hook(leave))
    try:
        with observing(observe):
            try:
                inner(images)
            except AssertionError as e:  # timm's size checks (torch._assert)
                raise ValueError(f"images of shape {tuple(images.shape)}: the model cannot take them ({e})") from e
    finally:
        for h in handles:
            h.remove()
    missing = [found[i][0] for i in chosen if i not in captured]
    if missing:
        raise RuntimeError(f"attention layers {missing} ran without calling fastvit's attention op (a timm Attention "
                           "runs its own forward for is_causal or a differentiable mask): no map to give")
    maps = [captured[i] for i in chosen]
    if heads is not None:
        idx = _select("heads", heads, maps[0].shape[1], "heads")
        maps = [m[:, idx] for m in maps]
    prefix = _prefix_tokens(inner)
    grid = _grid(inner, maps[0].shape[-1] - prefix, images.shape[-2], images.shape[-1])
    return AttentionMaps(maps, chosen, [found[i][0] for i in chosen], prefix, _has_class_token(inner), grid)


_FUSIONS = ("mean", "max", "min")


def _stack(maps) -> torch.Tensor:
    if isinstance(maps, torch.Tensor):
        maps = [maps]
    if not isinstance(maps, Sequence) or not maps or not all(isinstance(m, torch.Tensor) for m in maps):
        raise TypeError("maps must be a tensor (B, H, N, N) or a non-empty sequence of them (attention_maps' result)")
    shape = maps[0].shape
    if len(shape) != 4 or shape[-1] != shape[-2] or any(m.shape != shape for m in maps):
        raise ValueError(f"maps must all be (B, H, N, N) of one shape, got {[tuple(m.shape) for m in maps]}")
    return torch.stack([m.float() for m in maps])  # (L, B, H, N, N)


def _fuse(a: torch.Tensor, head_fusion: str) -> torch.Tensor:
    if head_fusion not in _FUSIONS:
        raise ValueError(f"head_fusion must be one of {_FUSIONS}, got {head_fusion!r}")
    return {"mean": a.mean, "max": a.amax, "min": a.amin}[head_fusion](dim=-3)


def _on_grid(rows: torch.Tensor, maps, prefix_tokens, grid) -> torch.Tensor:
    """(B, N - prefix) patch scores -> (B, h, w), each map scaled to max 1."""
    if grid is None:
        grid = getattr(maps, "grid", None)
        if grid is None:
            side = math.isqrt(rows.shape[-1])
            if side * side != rows.shape[-1]:
                raise ValueError(f"{rows.shape[-1]} patch tokens do not form a square grid: pass grid=(h, w)")
            grid = (side, side)
    h, w = grid
    if h * w != rows.shape[-1]:
        raise ValueError(f"grid {tuple(grid)} does not hold the {rows.shape[-1]} patch tokens "
                         f"(N minus prefix_tokens={prefix_tokens})")
    out = rows.reshape(rows.shape[0], h, w)
    return out / out.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]


def _prefix(maps, prefix_tokens, class_token) -> tuple[int, bool]:
    if prefix_tokens is None:
        prefix_tokens = getattr(maps, "prefix_tokens", 1)
    if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int) or prefix_tokens < 0:
        raise ValueError(f"prefix_tokens must be an int >= 0, got {prefix_tokens!r}")
    if class_token is None:
        class_token = getattr(maps, "class_token", prefix_tokens > 0)
    if class_token and prefix_tokens == 0:
        raise ValueError("class_token=True needs prefix_tokens >= 1 (the class token is token 0)")
    return prefix_tokens, bool(class_token)


def attention_rollout(maps, discard_ratio: float = 0.0, head_fusion: str = "mean", prefix_tokens: int | None = None,
                      grid: tuple[int, int] | None = None, class_token: bool | None = None) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) over ``maps`` (the layers in order, each (B, H, N, N)):
    per layer, the heads fused (``head_fusion``), the lowest ``discard_ratio`` of each map's entries zeroed
    (token 0's own entry kept), the identity added for the residual and the rows renormalised; the product
    over layers. Returns the class token's row over the patches, (B, h, w) scaled to max 1; without a
    class token (registers only, or none), the mean over the patch rows. ``prefix_tokens``,
    ``class_token`` and ``grid`` default to what :func:`attention_maps` recorded."""
    a = _stack(maps)
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio!r}")
    order = getattr(maps, "layers", None)
    if order is not None and any(b <= a_ for a_, b in zip(order, order[1:])):
        raise ValueError(f"attention_rollout multiplies the layers in order: maps of layers {order} are not "
                         "increasing (ask attention_maps for them in order, each once)")
    prefix, cls = _prefix(maps, prefix_tokens, class_token)
    L, B, _, N, _ = a.shape
    eye = torch.eye(N, dtype=a.dtype, device=a.device)
    result = eye.expand(B, N, N)
    for layer in a:
        fused = _fuse(layer, head_fusion)
        if discard_ratio > 0:
            flat = fused.reshape(B, -1).clone()
            low = flat.topk(int(flat.shape[1] * discard_ratio), dim=-1, largest=False).indices
            flat.scatter_(1, low, torch.where(low == 0, flat.gather(1, low), 0.0))
            fused = flat.reshape(B, N, N)
        step = (fused + eye) / 2
        step = step / step.sum(dim=-1, keepdim=True)
        result = step @ result
    rows = result[:, 0, prefix:] if cls else result[:, prefix:, prefix:].mean(dim=1)
    return _on_grid(rows, maps, prefix, grid)


def class_token_attention(maps, head_fusion: str = "mean", prefix_tokens: int | None = None,
                          grid: tuple[int, int] | None = None, class_token: bool | None = None) -> torch.Tensor:
    """Where the class token looks in the last of ``maps``: its attention row over the patches, heads
    fused by ``head_fusion``, as (B, h, w) scaled to max 1."""
    a = _stack(maps)[-1]
    prefix, cls = _prefix(maps, prefix_tokens, class_token)
    if not cls:
        raise ValueError("the model has no class token: use attention_rollout (the mean over the patch rows)")
    return _on_grid(_fuse(a, head_fusion)[:, 0, prefix:], maps, prefix, grid)
