"""timm's feature-extraction interface for fastvit's models: ``features_only=True`` wraps a model in
:class:`FeatureGetterNet`, which returns the outputs of chosen blocks (``out_indices``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def take_indices(num_blocks: int, indices: int | Sequence[int] | None, name: str = "indices") -> tuple[list[int], int]:
    """timm's ``feature_take_indices``: the last ``indices`` blocks (int), these blocks (a sequence;
    negative counts from the end) or all of them (None), as indices from the first; and their maximum.
    Errors name the argument ``name``."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, bool) or not isinstance(indices, (int, Sequence)):
        raise TypeError(f"{name} must be an int, a sequence of ints or None, got {indices!r}")
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"{name} (the last n blocks) must be in 1..{num_blocks}, got {indices}")
        take = list(range(num_blocks - indices, num_blocks))
    else:
        take = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not -num_blocks <= i < num_blocks:
                raise ValueError(f"{name} must be block indices in {-num_blocks}..{num_blocks - 1}, got {list(indices)}")
            take.append(i + num_blocks if i < 0 else i)
        if not take:
            raise ValueError(f"{name} must name at least one block")
    return take, max(take)


def non_causal(is_causal: bool) -> None:
    """timm's ``is_causal`` argument: fastvit's attention is bidirectional (ViTs), so only False."""
    if is_causal:
        raise ValueError("is_causal=True: fastvit's attention is non-causal (bidirectional, as ViTs use it)")


class IntermediatesMixin:
    """timm's feature API for a ViT with ``_tokens(x) -> (tokens, (gh, gw))`` (the tokens entering the first
    block, and the patch grid), ``blocks``, ``norm``, ``num_prefix_tokens``, ``fc_norm`` (optional) and
    ``reset_classifier``. Blocks take ``(x, mask)``."""

    grad_checkpointing = False

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward instead of keeping its activations (the same gradients:
        dropout and drop-path masks are replayed from the saved RNG state)."""
        self.grad_checkpointing = enable

    def _block(self, blk: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, mask, use_reentrant=False)
        return blk(x, mask)

    def _run_blocks(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for blk in self.blocks:
            x = self._block(blk, x, mask)
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ):
        """timm's feature API. x: (B, C, H, W) -> (final tokens after ``norm``, [block outputs]), or only
        the list with ``intermediates_only``, or a dict (``image_features``, ``image_intermediates``,
        ``image_intermediates_prefix``) with ``output_dict``.

        ``indices``: the last n blocks (int), these blocks (sequence, negative from the end), all (None).
        Each intermediate is (B, D, gh, gw) (``output_fmt='NCHW'``) or (B, gh * gw, D) (``'NLC'``), the
        prefix tokens split off ((B, prefix, D) pairs with ``return_prefix_tokens``); ``norm`` applies
        the final norm to each; ``stop_early`` skips the blocks after the last one taken.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        non_causal(is_causal)
        take, max_index = take_indices(len(self.blocks), indices)
        B = x.shape[0]
        x, (gh, gw) = self._tokens(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = self._block(blk, x, attn_mask)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        n = self.num_prefix_tokens
        prefix = [y[:, :n] for y in intermediates] if n else None
        intermediates = [y[:, n:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            out = {"image_intermediates": intermediates}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and prefix is not None:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def get_intermediate_layers(
        self, x: torch.Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
        return_prefix_tokens: bool = False, norm: bool = False, attn_mask: torch.Tensor | None = None,
    ) -> list:
        """DINO's interface: :meth:`forward_intermediates` of blocks ``n``, NCHW when ``reshape``."""
        return self.forward_intermediates(x, n, return_prefix_tokens=return_prefix_tokens, norm=norm,
                                          output_fmt="NCHW" if reshape else "NLC", intermediates_only=True,
                                          attn_mask=attn_mask)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the final norm / the head); returns the kept
        indices, counted from the first block."""
        take, max_index = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            if hasattr(self, "fc_norm"):
                self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take


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
        take_indices(len(model.blocks), out_indices, "out_indices")  # checked here, to name the argument
        if prune:
            out_indices = model.prune_intermediate_layers(out_indices, prune_norm=not norm)
        else:
            out_indices, _ = take_indices(len(model.blocks), out_indices, "out_indices")
        self.feature_info = FeatureInfo(model.feature_info, out_indices)
        self.model = model
        self.out_indices = out_indices
        self.output_fmt = output_fmt
        self.norm = norm

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.out_indices, norm=self.norm,
                                                output_fmt=self.output_fmt, intermediates_only=True)
