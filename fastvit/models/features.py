"""timm's feature-extraction interface for fastvit's models: ``features_only=True`` wraps a model in
:class:`FeatureGetterNet`, which returns the outputs of chosen blocks (``out_indices``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def take_indices(num_blocks: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's ``feature_take_indices``: the last ``indices`` blocks (int), these blocks (a sequence;
    negative counts from the end) or all of them (None), as indices from the first; and their maximum."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, bool) or not isinstance(indices, (int, Sequence)):
        raise TypeError(f"indices must be an int, a sequence of ints or None, got {indices!r}")
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"indices (the last n blocks) must be in 1..{num_blocks}, got {indices}")
        take = list(range(num_blocks - indices, num_blocks))
    else:
        take = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not -num_blocks <= i < num_blocks:
                raise ValueError(f"indices must be block indices in {-num_blocks}..{num_blocks - 1}, got {list(indices)}")
            take.append(i + num_blocks if i < 0 else i)
        if not take:
            raise ValueError("indices must name at least one block")
    return take, max(take)


class FeatureInfo:
    """What each returned feature is: ``channels()``, ``reduction()`` (stride in pixels), ``module_name()``,
    as timm's ``FeatureInfo`` (``info`` is the list of dicts, ``out_indices`` the blocks taken)."""

    def __init__(self, feature_info: list[dict], out_indices: Sequence[int]):
        self.out_indices = tuple(out_indices)
        self.info = [dict(feature_info[i]) for i in self.out_indices]

    def get(self, key: str, idx: int | Sequence[int] | None = None):
        if idx is None:
            return [f[key] for f in self.info]
        if isinstance(idx, int):
            return self.info[idx][key]
        return [self.info[i][key] for i in idx]

    def channels(self, idx=None):
        return self.get("num_chs", idx)

    def reduction(self, idx=None):
        return self.get("reduction", idx)

    def module_name(self, idx=None):
        return self.get("module", idx)

    def __getitem__(self, item):
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)


class FeatureGetterNet(nn.ModuleDict):
    """A model that returns features: x -> [block outputs], each (B, D, gh, gw) (``output_fmt='NCHW'``)
    or (B, gh * gw, D) (``'NLC'``), by the model's ``forward_intermediates``. As timm's
    ``FeatureGetterNet`` (``features_only=True``): the blocks after the last index are pruned, and so
    is the final norm unless ``norm`` (then it normalises each feature); keys ``model.*``."""

    def __init__(self, model: nn.Module, out_indices: int | Sequence[int] = 4, output_fmt: str = "NCHW",
                 norm: bool = False, prune: bool = True):
        super().__init__()
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if prune:
            out_indices = model.prune_intermediate_layers(out_indices, prune_norm=not norm)
        else:
            out_indices, _ = take_indices(len(model.blocks), out_indices)
        self.feature_info = FeatureInfo(model.feature_info, out_indices)
        self.model = model
        self.out_indices = out_indices
        self.output_fmt = output_fmt
        self.norm = norm

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.out_indices, norm=self.norm,
                                                output_fmt=self.output_fmt, intermediates_only=True)
