"""Pictures of a ViT (matplotlib): attention overlays, position-embedding similarity, patch-embedding
filters. Each plot returns a ``matplotlib.figure.Figure`` (no pyplot, no display needed) and writes a PNG
of ``figsize * dpi`` pixels when given ``out``."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fastvit.swap.core import _unwrap
from fastvit.viz.maps import _patch_size, _prefix_tokens, attention_rollout, class_token_attention


def _figure(figsize):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("fastvit.viz's plots need matplotlib: pip install 'fastvit-kernels[viz]'") from e
    return Figure(figsize=figsize)


def _save(fig, out, dpi: int):
    if out is not None:
        fig.savefig(out, dpi=dpi)
    return fig


def _as_hwc(image) -> np.ndarray:
    """An image (C, H, W) / (H, W) tensor or (H, W[, C]) array, min-max scaled to [0, 1], as (H, W, 3)."""
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() == 3:
            t = t.permute(1, 2, 0)
        a = t.numpy()
    else:
        a = np.asarray(image, dtype=np.float32)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"image must be (C, H, W) or (H, W[, C]) with 1 or 3 channels, got shape {a.shape}")
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a


def overlay(image, heat, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """``heat`` (h, w) upsampled (bilinear) to ``image``'s size, coloured by ``cmap`` and blended over the
    image with weight ``alpha``: an (H, W, 3) float array in [0, 1]."""
    import matplotlib

    img = _as_hwc(image)
    heat = torch.as_tensor(heat).detach().float().cpu()
    if heat.dim() == 3 and heat.shape[0] == 1:
        heat = heat[0]
    if heat.dim() != 2:
        raise ValueError(f"heat must be one map (h, w), got shape {tuple(heat.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    up = torch.nn.functional.interpolate(heat[None, None], size=img.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    lo, hi = float(up.min()), float(up.max())
    up = (up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up)
    colour = matplotlib.colormaps[cmap](up.numpy())[..., :3]
    return (1 - alpha) * img + alpha * colour


def plot_attention(image, maps, discard_ratio: float = 0.9, head_fusion: str = "max", out=None,
                   figsize=(9.0, 3.2), dpi: int = 100):
    """The image, where the class token looks in the last map, and the attention rollout over all maps,
    side by side (``maps``: :func:`fastvit.viz.attention_maps` of one image, or its first image)."""
    panels = [("image", _as_hwc(image))]
    if getattr(maps, "class_token", True):
        panels.append((f"class token, {getattr(maps, 'names', ['last layer'])[-1]}",
                       overlay(image, class_token_attention(maps, head_fusion="mean")[0])))
    panels.append((f"rollout ({head_fusion}, discard {discard_ratio:g})",
                   overlay(image, attention_rollout(maps, discard_ratio, head_fusion)[0])))
    fig = _figure(figsize)
    for i, (title, picture) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(picture)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, out, dpi)


def position_table(model: nn.Module) -> tuple[torch.Tensor, tuple[int, int]]:
    """The learned or fixed position embeddings of the patches (h * w, D) and their grid (h, w):
    ``pos_embed`` (fastvit, timm, T2T-ViT) or ``pos_embedding`` (vit-pytorch), prefix rows dropped."""
    m = _unwrap(model)
    table = getattr(m, "pos_embed", None)
    if not isinstance(table, torch.Tensor):
        table = getattr(m, "pos_embedding", None)
    if not isinstance(table, torch.Tensor):
        raise ValueError(f"{type(m).__name__} has no position embedding table (pos_embed or pos_embedding)")
    table = table.detach().float().cpu().reshape(-1, table.shape[-1])
    prefix = 0 if getattr(m, "no_embed_class", False) else _prefix_tokens(m)
    table = table[prefix:]
    grid = None
    for owner in (getattr(m, "patch_embed", None), getattr(m, "tokens_to_token", None)):
        g = getattr(owner, "grid_size", None)
        if g is not None and g[0] * g[1] == table.shape[0]:
            grid = tuple(g)
    if grid is None:
        side = math.isqrt(table.shape[0])
        if side * side != table.shape[0]:
            raise ValueError(f"{table.shape[0]} position embeddings do not form a square grid")
        grid = (side, side)
    return table, grid


def plot_pos_embed_similarity(model: nn.Module, out=None, figsize=(6.0, 6.0), dpi: int = 100):
    """The ViT paper's figure: for each patch position (row, column), the cosine similarity of its
    position embedding with every other position's, as a small (h, w) tile in a grid of tiles."""
    table, (h, w) = position_table(model)
    unit = torch.nn.functional.normalize(table, dim=-1)
    sim = (unit @ unit.T).reshape(h, w, h, w).numpy()
    mosaic = np.full((h * (h + 1), w * (w + 1)), np.nan, dtype=np.float32)
    for r in range(h):
        for c in range(w):
            mosaic[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = sim[r, c]
    fig = _figure(figsize)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(mosaic, cmap="viridis", vmin=-1, vmax=1)
    ax.set_title(f"Position embedding similarity ({h} x {w} patches)", fontsize=10)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_xticks([c * (w + 1) + w / 2 - 0.5 for c in range(w)], [str(c + 1) for c in range(w)], fontsize=6)
    ax.set_yticks([r * (h + 1) + h / 2 - 0.5 for r in range(h)], [str(r + 1) for r in range(h)], fontsize=6)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    fig.tight_layout()
    return _save(fig, out, dpi)


def patch_filters(model: nn.Module) -> torch.Tensor:
    """The patch embedding's filters (D, C, p, p): ``patch_embed.proj`` (fastvit, timm) or vit-pytorch's
    ``to_patch_embedding`` Linear over (p1 p2 c) patches."""
    m = _unwrap(model)
    pe = getattr(m, "patch_embed", None)
    if pe is not None and hasattr(pe, "backbone"):
        raise ValueError(f"{type(m).__name__} is a hybrid: its patch projection reads a CNN's feature map, not pixels")
    proj = getattr(pe, "proj", None)
    if isinstance(proj, nn.Conv2d):
        return proj.weight.detach().float().cpu()
    size = _patch_size(m)  # vit-pytorch's to_patch_embedding: fastvit's patch_size, or a Rearrange's p1, p2
    linear = None if size is None else next((x for x in m.to_patch_embedding if isinstance(x, nn.Linear)), None)
    if linear is not None:
        w = linear.weight.detach().float().cpu()  # (D, p1 * p2 * c): patches flattened (p1 p2 c)
        return w.reshape(w.shape[0], size[0], size[1], -1).permute(0, 3, 1, 2)
    raise ValueError(f"{type(m).__name__} has no patch-embedding filters fastvit knows (patch_embed.proj or "
                     "to_patch_embedding); T2T-ViT's soft split feeds a Performer, not a patch projection")


def plot_patch_embed_filters(model: nn.Module, components: int = 28, out=None, figsize=(7.0, 4.4), dpi: int = 100):
    """The first principal components of the patch-embedding filters (the ViT paper's figure): the
    filters (D, C * p * p) centred, their top right singular vectors shown as (p, p) pictures (RGB when
    C = 3, else the channel mean)."""
    w = patch_filters(model)
    D, C, ph, pw = w.shape
    if isinstance(components, bool) or not isinstance(components, int) or components < 1:
        raise ValueError(f"components must be a positive int, got {components!r}")
    flat = w.reshape(D, -1)
    flat = flat - flat.mean(dim=0, keepdim=True)
    k = min(components, *flat.shape)
    comps = torch.linalg.svd(flat, full_matrices=False).Vh[:k].reshape(k, C, ph, pw)
    cols = min(7, k)
    rows = -(-k // cols)
    fig = _figure(figsize)
    for i in range(k):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(_as_hwc(comps[i] if C in (1, 3) else comps[i].mean(0)), interpolation="nearest")
        ax.axis("off")
    fig.suptitle(f"Patch embedding: first {k} principal components ({C} x {ph} x {pw} filters)", fontsize=10)
    return _save(fig, out, dpi)
