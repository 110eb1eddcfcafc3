"""``fastvit.optimize(model)``: swap fastvit's fused ops into an existing ViT, in place.

What is recognised, and what its forward becomes (``fastvit.ops``):

- timm ``PatchEmbed``: ``patch_embed`` (size checks, dynamic padding, ``output_fmt`` and ``norm`` as timm);
- timm ``HybridEmbed`` (hybrid CNN-stem ViTs): the backbone as it is, then ``patch_embed`` on its feature map;
- timm ``AttentionPoolLatent`` (SigLIP's ``map`` head): ``attention`` of the latent queries against the
  tokens, then ``norm`` + ``mlp`` as one ``layernorm_mlp`` call;
- timm ``Attention``: ``attention_qkvpacked`` on the qkv projection's output (``attention`` on the
  normalised q, k with ``qk_norm``); ``scale_norm`` and the gate applied to the op's output as timm does;
- timm ``Block``: ``norm2`` + ``Mlp`` as one ``layernorm_mlp`` call (exact GELU, tanh GELU or QuickGELU
  as the Mlp's activation), the residual fused when ``ls2`` and drop path allow (else added after the
  op); ``norm1`` as ``layer_norm``;
- ``nn.LayerNorm`` and timm's ``LayerNorm`` over the last dim: ``layer_norm``;
- vit-pytorch ``Attention`` (its LayerNorm, then ``attention_qkvpacked``), ``FeedForward``
  (``layernorm_mlp``, the residual passed in by its ``Transformer``), the ``to_patch_embedding`` of
  ``ViT`` / ``SimpleViT`` (``patch_embed(patch_order="hwc")`` with the pre- and post-LayerNorms);
- the official T2T-ViT ``Token_performer`` (``performer_attention`` + ``layernorm_mlp``), ``Block`` and
  ``Attention`` (as timm's), and ``nn.Unfold`` soft splits in an official ``T2T_module`` or a
  vit-pytorch ``T2TViT`` (``soft_split``).

How a module is rebound: its ``__class__`` becomes a subclass of its own class (``FastvitAttention``
for timm's ``Attention``, ...) whose ``forward`` calls the ops. Nothing closes over the module, no
parameter is copied or re-registered: ``state_dict`` keys, shapes and values are unchanged,
optimizers built before the call keep working, ``isinstance`` checks against the original classes
still hold, and ``copy.deepcopy`` (timm's EMA), ``torch.save(model)`` / pickling (the subclass is
rebuilt on load by :func:`_new_swapped`), ``torch.compile``, DDP and ``train()``/``eval()`` work as
before. Dropout and drop path read ``module.training`` and the module's own ``p`` at each call.

Every swapped forward computes the same function as the one it replaces (up to the numerics of the
fused ops, DESIGN.md). Where it cannot, the module is left alone and the report says why. At each
call a swapped module also checks that the submodules it reads directly (e.g. a Block's ``mlp.fc1``)
are still of the classes seen by ``optimize`` and carry no hooks; if not (model surgery after
``optimize``, LoRA wrappers, a FLOP counter's hooks) that call runs the original forward.

Classes from the official T2T-ViT repository (which are not importable from a package) are
recognised by class name and structure, and ``Block`` / ``Attention`` / ``Mlp`` / ``Token_performer``
/ ``T2T_module`` only when their ``forward`` parses to the official code. timm and vit-pytorch
classes are recognised by identity; their ``forward`` may only use attributes fastvit knows
(a newer timm whose ``Attention.forward`` reads, say, ``self.rope`` is left alone, not guessed at).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from torch import nn

from fastvit.models import convert as _convert
from fastvit.swap.core import (
    OptimizeReport,
    SwapEntry,
    _Ctx,
    _describe_backend,
    _Env,
    _LayerNorm,
    _new_swapped,  # noqa: F401  (pickles of swapped modules name fastvit.swap._new_swapped)
    _parse_backend,
    _record_types,
    _swap,
    _Swapped,
    _unwrap,
    restore,
)
from fastvit.swap.t2t_vit import _is_official_t2t_module, _SoftSplit, _T2TAttention, _T2TBlock, _TokenPerformer
from fastvit.swap.timm import _TimmAttention, _TimmAttentionPool, _TimmBlock, _TimmHybridEmbed, _TimmPatchEmbed
from fastvit.swap.vit_pytorch import (
    _is_vitp_soft_split,
    _VitpAttention,
    _VitpFeedForward,
    _VitpPatchEmbedding,
    _VitpTransformer,
)

__all__ = ["OptimizeReport", "SwapEntry", "load_checkpoint", "optimize", "restore"]

logger = logging.getLogger("fastvit")

# Recognised kinds, most specific first.
_MIXINS: tuple[type, ...] = (
    _TimmBlock, _TimmAttention, _TimmPatchEmbed, _TimmHybridEmbed, _TimmAttentionPool,
    _VitpTransformer, _VitpAttention, _VitpFeedForward, _VitpPatchEmbedding,
    _TokenPerformer, _T2TBlock, _T2TAttention,
    _SoftSplit, _LayerNorm,
)


def optimize(
    model: nn.Module,
    backend: str | Mapping[str, str] = "auto",
    attention: bool = True,
    mlp: bool = True,
    embed: bool = True,
    performer: bool = True,
) -> OptimizeReport:
    """Swap fastvit's fused ops into ``model`` in place; return an :class:`OptimizeReport`.

    Recognised (the module docstring lists what each becomes): timm ``PatchEmbed``, ``Attention``
    (timm <= 1.0.15 in vision_transformer.py and >= 1.0.16 in timm.layers.attention, with
    ``attn_mask``; ``is_causal=True`` runs timm's own forward), ``Block`` (norm2 + Mlp -> one
    ``layernorm_mlp``, residual fused), ``LayerNorm``; vit-pytorch ``Attention``, ``FeedForward``,
    ``Transformer`` and the ``to_patch_embedding`` of ViT / SimpleViT; the official T2T-ViT
    ``Token_performer``, ``Block``, ``Attention`` and soft splits (``nn.Unfold`` in ``T2T_module`` or
    vit-pytorch's ``T2TViT``). Unknown modules are left as they are; recognised ones that cannot be
    swapped without changing what they compute are left alone and listed in the report with the
    reason. Parameters are reused (state_dict unchanged); the swap is a change of ``__class__`` to a
    fastvit subclass, so deepcopy, pickling, ``torch.compile``, DDP and train/eval keep working.
    Call it before ``torch.compile`` / DDP wrapping (a wrapped model is unwrapped first).

    Args:
        model: the model (or any submodule of one), changed in place.
        backend: ``"auto"`` (default) pins nothing: every swapped forward uses fastvit's process-wide
            selection at each call — ``fastvit.use_backend(...)`` / ``FASTVIT_BACKEND``, itself
            ``"auto"`` unless changed (fused kernels for CUDA tensors where they serve the inputs,
            else the eager reference) — exactly as fastvit's own models do, so ``use_backend("eager")``
            still switches an optimized model to the reference for debugging. Any other value
            (``"eager"``, ``"triton"``, ``"cuda"``, or a dict such as ``{"attention": "triton"}``) is
            validated now, as ``use_backend`` would (a backend that cannot run here raises
            :class:`fastvit.BackendUnavailableError`), and *pinned on this model's swapped modules*:
            each of their calls runs under that selection (families the dict does not name follow
            the process selection), and the selection is put back when the call returns, so other
            models are not affected. This is done per call rather than by setting the global
            selection because optimize should change this model, not every fastvit op in the process;
            it is traced by torch.compile (the op fronts read the selection at trace time, as always).
            The pin sets module state around each call, so it is not meant for threads that run
            models concurrently with different pins (DataParallel replicas share one pin: fine).
            An explicitly pinned backend that cannot serve an input raises at that call, as
            ``use_backend`` does.
        attention: swap attention modules (timm, vit-pytorch, T2T-ViT).
        mlp: swap LayerNorm + MLP halves (timm / T2T-ViT Blocks, vit-pytorch FeedForward and Transformer,
            the Token_performer's MLP half) and standalone LayerNorms.
        embed: swap patch embeddings and T2T soft splits.
        performer: swap the official T2T-ViT Token_performer.

    Returns:
        An :class:`OptimizeReport` (also logged on the ``"fastvit"`` logger at INFO).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    flags = {"attention": attention, "mlp": mlp, "embed": embed, "performer": performer}
    for k, v in flags.items():
        if not isinstance(v, bool):
            raise TypeError(f"{k} must be a bool, got {type(v).__name__}")
    pin = _parse_backend(backend)
    root = _unwrap(model)
    ctx = _Ctx(_Env(), pin, flags)
    report = OptimizeReport(root, _describe_backend(pin))

    # soft splits are swapped only where the next step transposes them (T2T contexts)
    for m in root.modules():
        if _is_official_t2t_module(m):
            for name in ("soft_split0", "soft_split1", "soft_split2"):
                s = getattr(m, name, None)
                if type(s) is nn.Unfold:
                    ctx.soft_splits.add(id(s))
        elif type(m) is nn.Sequential:
            ctx.soft_splits.update(id(s) for s in _is_vitp_soft_split(m, ctx.env))

    consumed: set[int] = set()
    swapped: list[nn.Module] = []
    for name, m in root.named_modules():
        if id(m) in consumed:
            continue
        if isinstance(m, _Swapped):
            report.already.append(name)
            consumed.update(id(c) for c in type(m)._fv_consumed(m, ctx))
            continue
        if type(m).__module__.startswith(("fastvit.nn", "fastvit.models")):
            report.native.append(name)
            consumed.update(id(c) for c in m.modules())
            continue
        mixin = next((x for x in _MIXINS if x._fv_matches(m, ctx.env)), None)
        if mixin is None or (mixin is _SoftSplit and id(m) not in ctx.soft_splits):
            continue
        if not flags[mixin._fv_flag]:
            report.left_alone.append(SwapEntry(name, mixin._fv_label, f"{mixin._fv_flag}=False"))
            continue
        reason = "forward is overridden on the instance" if "forward" in m.__dict__ else mixin._fv_why_not(m, ctx)
        if reason:
            report.left_alone.append(SwapEntry(name, mixin._fv_label, reason))
            continue
        detail = mixin._fv_describe(m, ctx)
        consumed.update(id(c) for c in mixin._fv_consumed(m, ctx))
        _swap(m, mixin, ctx)
        swapped.append(m)
        report.replaced.append(SwapEntry(name, mixin._fv_label, detail))
    for m in swapped:  # after all swaps, so a Block records its (swapped) attention's original class
        _record_types(m)
    logger.info("%s", report)
    return report


def _strip_wrapper_prefixes(state_dict: dict) -> dict:
    """Drop the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes every key shares."""
    while state_dict:
        for prefix in ("module.", "_orig_mod."):
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                break
        else:
            return state_dict
    return state_dict


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike | Mapping,
    strict: bool = True,
    use_ema: bool = False,
    filter_head: bool = False,
    old_grid_size=None,
):
    """Load a checkpoint into a (possibly optimized, compiled or DDP-wrapped) timm / vit-pytorch /
    T2T-ViT / fastvit model, through :mod:`fastvit.models.convert`.

    ``path`` is a file (``.safetensors`` or a ``torch.save`` file, read with ``weights_only=True``) or
    an already-loaded dict. The state_dict is unwrapped (``{'model': ...}``, ``{'state_dict': ...}``,
    the EMA weights with ``use_ema``, ``module.`` / ``_orig_mod.`` prefixes), converted to the model's
    key layout (timm, vit-pytorch or T2T-ViT; linear-layout patch weights, DeiT-III ``gamma_1/2``,
    old 3-D vit-pytorch tensors), its position embedding resampled to the model's grid (from a square
    grid unless ``old_grid_size``), and loaded. ``optimize`` leaves keys unchanged, so checkpoints of
    the original model load into the optimized one and back. ``filter_head`` keeps the model's own
    classifier when the checkpoint's has another shape. Raises
    :class:`fastvit.models.convert.CheckpointError` listing missing / unexpected / mis-shaped keys.
    Returns torch's ``(missing_keys, unexpected_keys)``.
    """
    target = _unwrap(model)
    source = path if isinstance(path, Mapping) else _convert.read_checkpoint(path)
    state_dict = _strip_wrapper_prefixes(_convert.unwrap_state_dict(source, use_ema=use_ema))
    result = _convert.load_checkpoint(target, state_dict, strict=strict, filter_head=filter_head,
                                      old_grid_size=old_grid_size)
    where = "a state_dict" if isinstance(path, Mapping) else repr(os.fspath(path))
    logger.info("fastvit.load_checkpoint: %d tensors from %s into %s (%s keys)", len(state_dict), where,
                type(target).__name__, _convert.checkpoint_format(state_dict) or "unknown")
    return result
