"""Checkpoint reading, key conversion and position-embedding resampling for timm, vit-pytorch and T2T-ViT.

Three key layouts are known (:func:`checkpoint_format`):

- ``"timm"``: timm's ``VisionTransformer`` and fastvit's (``patch_embed.proj.weight``, ``pos_embed``,
  ``blocks.N.attn.qkv.weight``, ...);
- ``"vit_pytorch"``: vit-pytorch's ``ViT`` / ``SimpleViT`` and fastvit's (``to_patch_embedding.*``,
  ``transformer.layers.N.0.to_qkv.weight``, ...);
- ``"t2t"``: the official T2T-ViT and fastvit's ``T2TViT`` (``tokens_to_token.*``, ``blocks.N.*``).

A checkpoint moves between models of the same layout, fastvit's or the original library's, so
``optimize``-d models and fastvit models load the same files. :func:`load_checkpoint` is the one entry.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

FORMATS = ("timm", "vit_pytorch", "t2t")
HEAD_PREFIXES = ("head.", "mlp_head.", "linear_head.")
_WRAPPERS = ("model", "state_dict")
_EMA_WRAPPERS = ("state_dict_ema", "model_ema", "ema")


class CheckpointError(ValueError):
    """A checkpoint does not fit a model: the message lists missing, unexpected and mis-shaped keys."""


def read_checkpoint(path: str | os.PathLike, map_location="cpu", weights_only: bool = True) -> Mapping:
    """The object stored at ``path``: ``.safetensors`` through safetensors, anything else through
    ``torch.load(weights_only=True)`` (tensors, containers and the ``argparse.Namespace`` that timm's
    training script, used by T2T-ViT, stores as ``args``). ``weights_only=False`` unpickles anything:
    only for files you trust."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint_path {path!r} is not a file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device=str(map_location))
    if not weights_only:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path!r} holds Python objects that torch.load(weights_only=True) refuses ({e}); if you trust the file, "
            f"load it with fastvit.models.convert.read_checkpoint(path, weights_only=False) and pass the dict"
        ) from None


def unwrap_state_dict(checkpoint: Mapping, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` dict inside a checkpoint.

    Accepts a plain state_dict, ``{'model': ...}``, ``{'state_dict': ...}`` (nested too), and with
    ``use_ema`` the EMA weights (``state_dict_ema``, ``model_ema`` or ``ema``). A ``module.`` prefix
    (DistributedDataParallel) is stripped.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a dict (a state_dict or a wrapper of one), got {type(checkpoint).__name__}")
    if use_ema:
        key = next((k for k in _EMA_WRAPPERS if isinstance(checkpoint.get(k), Mapping)), None)
        if key is None:
            raise ValueError(f"use_ema=True but the checkpoint has none of {_EMA_WRAPPERS}; its keys: {sorted(checkpoint)[:10]}")
        checkpoint = checkpoint[key]
    while True:
        key = next((k for k in _WRAPPERS if isinstance(checkpoint.get(k), Mapping)), None)
        if key is None:
            break
        checkpoint = checkpoint[key]
    bad = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"checkpoint is not a state_dict: {len(bad)} entries are not tensors (e.g. {bad[:5]}); "
            f"expected a plain state_dict or one wrapped as {{'model': ...}} or {{'state_dict': ...}}"
        )
    prefix = "module."
    if checkpoint and all(k.startswith(prefix) for k in checkpoint):
        return {k[len(prefix):]: v for k, v in checkpoint.items()}
    return dict(checkpoint)


def checkpoint_format(state_dict: Mapping[str, object]) -> str | None:
    """``"timm"``, ``"vit_pytorch"``, ``"t2t"``, or None when the keys match none of them."""
    keys = list(state_dict)
    if any(k.startswith("tokens_to_token.") for k in keys):
        return "t2t"
    if any(k.startswith(("to_patch_embedding.", "transformer.layers.")) for k in keys):
        return "vit_pytorch"
    if any(k.startswith(("patch_embed.", "blocks.")) for k in keys) or "pos_embed" in keys:
        return "timm"
    return None


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_size: Sequence[int],
    old_size: Sequence[int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Interpolate a position table to another token grid, keeping the prefix (cls, register) rows.

    pos_embed: (1, P + h*w, D) or (P + h*w, D) -> the same rank with ``new_size`` = (H, W) grid rows.
    ``old_size`` defaults to a square grid. Means timm's ``resample_abs_pos_embed`` (float32
    ``F.interpolate``, result in the input's dtype).
    """
    if pos_embed.dim() not in (2, 3) or (pos_embed.dim() == 3 and pos_embed.shape[0] != 1):
        raise ValueError(f"pos_embed must have shape (L, D) or (1, L, D), got {tuple(pos_embed.shape)}")
    squeeze = pos_embed.dim() == 2
    pe = pos_embed.unsqueeze(0) if squeeze else pos_embed
    new_size = tuple(int(s) for s in new_size)
    n_grid = pe.shape[1] - num_prefix_tokens
    if old_size is None:
        side = math.isqrt(max(n_grid, 0))
        if side * side != n_grid:
            raise ValueError(
                f"pos_embed has {n_grid} grid rows (after {num_prefix_tokens} prefix rows), not a square: pass old_size"
            )
        old_size = (side, side)
    old_size = tuple(int(s) for s in old_size)
    if old_size[0] * old_size[1] != n_grid:
        raise ValueError(f"old_size {old_size} does not match the {n_grid} grid rows of pos_embed {tuple(pos_embed.shape)}")
    if old_size != new_size:
        prefix, grid = pe[:, :num_prefix_tokens], pe[:, num_prefix_tokens:]
        D = pe.shape[-1]
        grid = grid.float().reshape(1, old_size[0], old_size[1], D).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=new_size, mode=interpolation, antialias=antialias)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(pe.dtype)
        pe = torch.cat([prefix, grid], dim=1)
    return pe.squeeze(0) if squeeze else pe


def _grid(model: nn.Module, *paths: str) -> tuple[int, int] | None:
    for path in paths:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return tuple(int(s) for s in obj)
    return None


def _square(n: int) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(f"cannot infer the model's token grid from {n} position rows (not a square)")
    return side, side


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    model: nn.Module,
    old_grid_size: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """``state_dict`` with keys and shapes fitted to ``model`` (of the same layout, see :data:`FORMATS`).

    timm: a linear-layout ``patch_embed.proj.weight`` becomes conv layout, ``pre_logits.*`` is
    dropped, DeiT-III's ``gamma_1/2`` become ``ls1/ls2.gamma``. vit-pytorch: old 3-D ``cls_token``
    / ``pos_embedding`` become 2-D. All: a position table for another image size is resampled
    (bicubic; antialiased except for T2T-ViT, whose official code does not), from a square grid
    unless ``old_grid_size`` says otherwise. Keys the model does not have are kept (they show up as
    unexpected when loading).
    """
    target = model.state_dict()
    src, dst = checkpoint_format(state_dict), checkpoint_format(target)
    if src is not None and dst is not None and src != dst:
        raise CheckpointError(
            f"the checkpoint has {src} keys but {type(model).__name__} expects {dst} keys; "
            f"load it into a model of the {src} layout"
        )
    fmt = dst or src
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if fmt == "timm":
            if k.startswith("pre_logits."):
                continue
            k = re.sub(r"^(blocks\.\d+)\.gamma_([12])$", r"\1.ls\2.gamma", k)
            if k == "patch_embed.proj.weight" and k in target and v.dim() == 2 and target[k].dim() == 4:
                if v.numel() == target[k].numel():
                    v = v.reshape(target[k].shape)
        elif fmt == "vit_pytorch" and k in ("cls_token", "pos_embedding") and k in target:
            if v.dim() == 3 and v.shape[0] == 1 and target[k].dim() == 2:
                v = v[0]
        out[k] = v

    if fmt == "timm" and "pos_embed" in out and "pos_embed" in target and out["pos_embed"].shape != target["pos_embed"].shape:
        n_prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
        new = _grid(model, "patch_embed.grid_size") or _square(target["pos_embed"].shape[-2] - n_prefix)
        out["pos_embed"] = resample_pos_embed(out["pos_embed"], new, old_grid_size, n_prefix)
    elif fmt == "t2t" and "pos_embed" in out and "pos_embed" in target and out["pos_embed"].shape != target["pos_embed"].shape:
        new = _grid(model, "tokens_to_token.grid_size") or _square(target["pos_embed"].shape[-2] - 1)
        out["pos_embed"] = resample_pos_embed(out["pos_embed"], new, old_grid_size, 1, antialias=False)
    elif fmt == "vit_pytorch" and "pos_embedding" in out and "pos_embedding" in target:
        if out["pos_embedding"].shape != target["pos_embedding"].shape:
            n_cls = int(target["cls_token"].shape[0]) if "cls_token" in target else 0
            if "cls_token" in out and int(out["cls_token"].shape[0]) != n_cls:
                raise CheckpointError(
                    f"the checkpoint has {int(out['cls_token'].shape[0])} cls tokens but the model has {n_cls} "
                    f"(pool='cls' and pool='mean' checkpoints do not mix)"
                )
            new = _grid(model, "grid_size") or _square(target["pos_embedding"].shape[0] - n_cls)
            out["pos_embedding"] = resample_pos_embed(out["pos_embedding"], new, old_grid_size, n_cls)
    return out


def _listing(title: str, items: list[str], limit: int = 40) -> str:
    shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
    return f"{title} ({len(items)}): {shown}"


def load_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True, allow_missing: Sequence[str] = ()
):
    """``model.load_state_dict`` that checks first and raises :class:`CheckpointError` naming every
    missing, unexpected and mis-shaped key (missing / unexpected only when ``strict``). Returns torch's
    ``(missing_keys, unexpected_keys)``."""
    target = model.state_dict()
    missing = [k for k in target if k not in state_dict and k not in allow_missing]
    unexpected = [k for k in state_dict if k not in target]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(target[k].shape)}"
        for k in state_dict
        if k in target and state_dict[k].shape != target[k].shape
    ]
    problems = []
    if strict and missing:
        problems.append(_listing("missing keys", missing))
    if strict and unexpected:
        problems.append(_listing("unexpected keys", unexpected))
    if mismatched:
        problems.append(_listing("shape mismatches", mismatched))
    if problems:
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems))
    return model.load_state_dict(dict(state_dict), strict=False)


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping,
    strict: bool = True,
    use_ema: bool = False,
    filter_head: bool = False,
    old_grid_size: Sequence[int] | None = None,
):
    """Load a file path or a (wrapped) state_dict into ``model``: unwrap, convert, resample, check.

    ``filter_head`` drops classifier weights (``head``, ``mlp_head``, ``linear_head``) whose shapes
    differ from the model's (fine-tuning to another ``num_classes``), keeping the model's own.
    Raises :class:`CheckpointError` listing missing / unexpected / mis-shaped keys.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint)
    state_dict = convert_state_dict(unwrap_state_dict(checkpoint, use_ema=use_ema), model, old_grid_size)
    allow_missing: list[str] = []
    if filter_head:
        target = model.state_dict()
        heads = [k for k in set(state_dict) | set(target) if k.startswith(HEAD_PREFIXES)]
        if any(k not in state_dict or k not in target or state_dict[k].shape != target[k].shape for k in heads):
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(HEAD_PREFIXES)}
            allow_missing = [k for k in target if k.startswith(HEAD_PREFIXES)]
    return load_state_dict(model, state_dict, strict=strict, allow_missing=allow_missing)


def num_classes_of(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The classifier width stored in a state_dict (0 without a head), None when unknown."""
    for prefix in HEAD_PREFIXES:
        w = state_dict.get(prefix + "weight")
        if w is not None:
            return int(w.shape[0])
    return 0 if checkpoint_format(state_dict) is not None else None
