"""timm's swaps: ``PatchEmbed``, ``Attention`` (timm <= 1.0.15 in vision_transformer.py, >= 1.0.16
in timm.layers.attention), ``Block`` (norm2 + Mlp as one ops.layernorm_mlp). Recognised by class
identity; a forward that reads attributes fastvit does not know is left alone."""

from __future__ import annotations

import inspect
import numbers

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Proxy

from fastvit import ops
from fastvit.ops import _checks as check
from fastvit.swap.core import (
    _activation_name,
    _dropout_p,
    _drop_path_inactive,
    _head_dim_reason,
    _ln_into_gemm,
    _MlpBlock,
    _mlp_tail_reason,
    _norm2_reason,
    _orig_type,
    _Pin,
    _Swapped,
    _unknown_attrs,
)

_TIMM_ATTENTION_ATTRS = {
    "qkv", "num_heads", "head_dim", "attn_dim", "q_norm", "k_norm", "fused_attn", "attn_drop", "training",
    "scale", "norm", "gate", "proj", "proj_drop",
}
_TIMM_ATTENTION_NEEDS = ("qkv", "num_heads", "head_dim", "q_norm", "k_norm", "fused_attn", "attn_drop", "scale", "proj",
                         "proj_drop")
_TIMM_BLOCK_ATTRS = {"norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"}
_TIMM_MLP_ATTRS = {"fc1", "act", "drop1", "norm", "fc2", "drop2"}
_TIMM_HYBRID_EMBED_ATTRS = {"backbone", "dynamic_img_pad", "patch_size", "proj", "flatten", "output_fmt"}
_TIMM_PATCH_EMBED_ATTRS = {
    "img_size", "strict_img_size", "patch_size", "dynamic_img_pad", "proj", "flatten", "output_fmt", "norm",
}


def _missing_attrs(m, names) -> str | None:
    missing = [n for n in names if not hasattr(m, n)]
    if missing:
        return f"{type(m).__qualname__} has no {', '.join(missing)} (a timm older than 1.0 is not supported)"
    return None


def _forward_kwargs(cls: type) -> tuple[str, ...]:
    """Which of attn_mask / is_causal a class's forward takes (timm <= 1.0.15: none; 1.0.16: attn_mask)."""
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return ()
    return tuple(k for k in ("attn_mask", "is_causal") if k in params)


def _mask_needs_timm(attn_mask) -> bool:
    """A mask fastvit's attention does not take (differentiable, over 4 dims, not a tensor). Under FX
    tracing the mask is a Proxy: it goes to the op, which checks it when the graph runs."""
    if attn_mask is None or isinstance(attn_mask, Proxy):
        return False
    return not isinstance(attn_mask, torch.Tensor) or attn_mask.requires_grad or attn_mask.dim() > 4


class _TimmAttention(_Swapped):
    """timm ``Attention``: qkv Linear -> ops.attention_qkvpacked (or ops.attention after qk_norm) ->
    scale_norm -> gate -> proj -> proj_drop. ``is_causal=True`` runs timm's own forward."""

    _fv_kind, _fv_label, _fv_flag = "timm_attention", "timm Attention", "attention"
    _fv_attention_layer = True  # calls ops.attention(_qkvpacked): fastvit.viz captures its maps
    _fv_classes = "timm_attention"

    @classmethod
    def _fv_why_not(cls, m, ctx):
        reason = _unknown_attrs(type(m), "forward", _TIMM_ATTENTION_ATTRS) or _missing_attrs(m, _TIMM_ATTENTION_NEEDS)
        if reason:
            return reason
        if not isinstance(m.attn_drop, nn.Dropout):
            return "attn_drop is not an nn.Dropout"
        width = getattr(m.qkv, "out_features", None)
        if width is not None and width != 3 * m.num_heads * m.head_dim:
            return f"qkv has {width} outputs, not 3 * num_heads * head_dim = {3 * m.num_heads * m.head_dim}"
        if not isinstance(m.scale, numbers.Real):
            return f"scale is a {type(m.scale).__name__}, not a number"
        return _head_dim_reason(m.head_dim, ctx)

    @classmethod
    def _fv_describe(cls, m, ctx):
        extras = []
        qk_norm = not isinstance(m.q_norm, nn.Identity) or not isinstance(m.k_norm, nn.Identity)
        if qk_norm:
            extras.append("qk_norm applied to the q, k views first")
        if getattr(m, "norm", None) is not None and not isinstance(m.norm, nn.Identity):
            extras.append("scale_norm on the op's output")
        if getattr(m, "gate", None) is not None:
            extras.append("sigmoid gate on the op's output")
        op = "ops.attention" if qk_norm else "ops.attention_qkvpacked"
        return op + (f" ({'; '.join(extras)})" if extras else "")

    @classmethod
    def _fv_configure(cls, m, ctx):
        return {"base_kwargs": _forward_kwargs(type(m))}

    @classmethod
    def _fv_input_feeds_linear(cls, m, env):
        return _orig_type(m) in env.timm_attention

    def forward(self, x, attn_mask=None, is_causal=False):
        if is_causal is True or _mask_needs_timm(attn_mask):
            # fastvit's attention is non-causal and takes no differentiable mask: timm's own forward.
            kw = {}
            if attn_mask is not None:
                kw["attn_mask"] = attn_mask
            if is_causal:
                kw["is_causal"] = is_causal
            return type(self)._fastvit_base.forward(self, x, **kw)
        width = getattr(self.qkv, "in_features", None)
        if width is not None:
            x = check.last_dim(x, width, "qkv.weight")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        # timm's fused path (SDPA) uses the default scale head_dim ** -0.5, its other path self.scale
        scale = None if self.fused_attn else float(self.scale)
        p = _dropout_p(self.attn_drop)
        with _Pin(self._fastvit_backend):
            qkv = self.qkv(x)
            if isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity):
                o = ops.attention_qkvpacked(qkv, self.num_heads, mask=attn_mask, scale=scale, dropout_p=p)
            else:
                q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
                q, k = self.q_norm(q), self.k_norm(k)
                o = ops.attention(q, k, v, mask=attn_mask, scale=scale, dropout_p=p)
                o = o.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        norm = getattr(self, "norm", None)
        if norm is not None:
            o = norm(o)
        if gate is not None:
            o = o * gate
        return self.proj_drop(self.proj(o))


def _timm_mlp_reason(norm2, mlp, env, norm_name: str = "norm2") -> str | None:
    """Why ``norm2`` (attribute ``norm_name``) + timm's ``Mlp`` cannot become one ops.layernorm_mlp call."""
    reason = _norm2_reason(norm2, env, norm_name)
    if reason:
        return reason
    if _orig_type(mlp) not in env.timm_mlp:
        return f"mlp is {type(mlp).__name__}, not timm's Mlp (GLU / SwiGLU MLPs are not fused)"
    reason = _unknown_attrs(_orig_type(mlp), "forward", _TIMM_MLP_ATTRS) or _missing_attrs(mlp, sorted(_TIMM_MLP_ATTRS))
    if reason:
        return reason
    if not isinstance(mlp.norm, nn.Identity):
        return "Mlp.norm (scale_mlp_norm): a norm between the activation and fc2 cannot be fused"
    return _mlp_tail_reason(norm2, mlp, (mlp.drop1, mlp.drop2), env)


class _TimmBlock(_MlpBlock):
    """timm ``Block``: ``x + drop_path1(ls1(attn(norm1(x))))``, then ``norm2`` + ``Mlp`` as one
    ops.layernorm_mlp call, the residual fused unless ``ls2`` or an active drop path sit between."""

    _fv_kind, _fv_label, _fv_flag = "timm_block", "timm Block", "mlp"
    _fv_mlp_parts = ("fc1", "act", "fc2", "drop1", "drop2", "norm")
    _fv_classes = "timm_block"

    @classmethod
    def _fv_why_not(cls, m, ctx):
        reason = _unknown_attrs(type(m), "forward", _TIMM_BLOCK_ATTRS) or _missing_attrs(m, sorted(_TIMM_BLOCK_ATTRS))
        if reason:
            return reason
        return _timm_mlp_reason(m.norm2, m.mlp, ctx.env)

    @classmethod
    def _fv_describe(cls, m, ctx):
        what = cls._fv_what(m, ctx)
        if not isinstance(m.ls2, nn.Identity):
            return what + ", residual added after the op (layer scale ls2 sits between)"
        if not isinstance(m.drop_path2, nn.Identity):
            return what + ", residual fused (added after the op in training, where drop path is active)"
        return what + ", residual fused"

    @classmethod
    def _fv_configure(cls, m, ctx):
        return {**super()._fv_configure(m, ctx), "base_kwargs": _forward_kwargs(type(m))}

    def forward(self, x, attn_mask=None, is_causal=False):
        # pass attn_mask / is_causal on exactly as this timm version's Block does
        base_kw = self._fastvit_base_kwargs
        kw = {}
        for key, value, default in (("attn_mask", attn_mask, None), ("is_causal", is_causal, False)):
            if key in base_kw:
                kw[key] = value
            elif value is not default:
                raise TypeError(f"{type(self)._fastvit_base.__qualname__}.forward() got an unexpected keyword argument {key!r}")
        if not self._fv_intact() or (self.training and self.mlp.drop1.p != self.mlp.drop2.p):
            return type(self)._fastvit_base.forward(self, x, **kw)  # surgery, hooks, or two dropout rates
        x = check.last_dim(x, self.norm2.normalized_shape[0], "norm2.weight")
        with _Pin(self._fastvit_backend):
            h = _ln_into_gemm(self.norm1, x) if self._fastvit_norm1_fused else self.norm1(x)
            x = x + self.drop_path1(self.ls1(self.attn(h, **kw)))
            n, mlp = self.norm2, self.mlp
            args = (n.weight, n.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, n.eps)
            p = _dropout_p(mlp.drop1)
            if isinstance(self.ls2, nn.Identity) and _drop_path_inactive(self.drop_path2, self.training):
                return ops.layernorm_mlp(x, *args, residual=x, dropout_p=p, activation=self._fastvit_activation)
            return x + self.drop_path2(self.ls2(ops.layernorm_mlp(x, *args, dropout_p=p, activation=self._fastvit_activation)))


_FORMATS = ("NCHW", "NHWC", "NCL", "NLC")


def _patch_conv_reason(m) -> str | None:
    """Why ``m.proj`` is not a plain patch projection (a Conv2d with kernel = stride = ``m.patch_size``)."""
    proj = m.proj
    if _orig_type(proj) is not nn.Conv2d:
        return f"proj is {type(proj).__name__}, not nn.Conv2d"
    k = tuple(proj.kernel_size)
    if tuple(proj.stride) != k or tuple(m.patch_size) != k:
        return f"proj's kernel {k} / stride {tuple(proj.stride)} differ from the patch size {tuple(m.patch_size)}"
    if isinstance(proj.padding, str) or tuple(proj.padding) != (0, 0) or tuple(proj.dilation) != (1, 1) \
            or proj.groups != 1 or proj.padding_mode != "zeros":
        return "proj has padding, dilation or groups: not a plain patch projection"
    return None


def _format_reason(m) -> str | None:
    if not m.flatten and getattr(m.output_fmt, "value", m.output_fmt) not in _FORMATS:
        return f"output_fmt {m.output_fmt!r} is not one fastvit knows"
    return None


def _embed_patches(m, x: torch.Tensor) -> torch.Tensor:
    """timm's dynamic padding, then ``m.proj`` as ops.patch_embed, in ``m``'s output format. x: (B, C, H, W)."""
    B, _, H, W = x.shape
    ph, pw = m.patch_size
    if getattr(m, "dynamic_img_pad", False):
        x = F.pad(x, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
    gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
    x = x[..., : gh * ph, : gw * pw]  # a stride-p conv ignores the remainder (a no-op view when none)
    with _Pin(m._fastvit_backend):
        y = ops.patch_embed(x, m.proj.weight, m.proj.bias, (ph, pw))  # (B, gh * gw, D)
    if not m.flatten:
        fmt = getattr(m.output_fmt, "value", m.output_fmt)
        if fmt == "NCHW":
            y = y.transpose(1, 2).reshape(B, -1, gh, gw)
        elif fmt == "NHWC":
            y = y.reshape(B, gh, gw, -1)
        elif fmt == "NCL":
            y = y.transpose(1, 2)
    return y


class _TimmPatchEmbed(_Swapped):
    """timm ``PatchEmbed``: size checks and dynamic padding as timm, then the conv as ops.patch_embed,
    then ``output_fmt`` and ``norm``."""

    _fv_kind, _fv_label, _fv_flag = "timm_patch_embed", "timm PatchEmbed", "embed"
    _fv_classes = "timm_patch_embed"


    @classmethod
    def _fv_why_not(cls, m, ctx):
        reason = _unknown_attrs(type(m), "forward", _TIMM_PATCH_EMBED_ATTRS) \
            or _missing_attrs(m, ("img_size", "patch_size", "proj", "flatten", "output_fmt", "norm"))
        if reason:
            return reason
        return _patch_conv_reason(m) or _format_reason(m)

    @classmethod
    def _fv_describe(cls, m, ctx):
        return "ops.patch_embed"

    def _fv_parts(self):
        return (self.proj,)

    def forward(self, x):
        if not self._fv_intact() or _patch_conv_reason(self) is not None:
            return type(self)._fastvit_base.forward(self, x)
        H, W = x.shape[-2:]
        ph, pw = self.patch_size
        if self.img_size is not None:
            if getattr(self, "strict_img_size", True):
                torch._assert(H == self.img_size[0], f"Input height ({H}) doesn't match model ({self.img_size[0]}).")
                torch._assert(W == self.img_size[1], f"Input width ({W}) doesn't match model ({self.img_size[1]}).")
            elif not getattr(self, "dynamic_img_pad", False):
                torch._assert(H % ph == 0, f"Input height ({H}) should be divisible by patch size ({ph}).")
                torch._assert(W % pw == 0, f"Input width ({W}) should be divisible by patch size ({pw}).")
        return self.norm(_embed_patches(self, x))


class _TimmHybridEmbed(_Swapped):
    """timm ``HybridEmbed`` (the hybrid ViTs): the CNN backbone as it is, then its feature map's patch
    projection as ops.patch_embed (a 1x1 conv is patch size 1), in timm's output format."""

    _fv_kind, _fv_label, _fv_flag = "timm_hybrid_embed", "timm HybridEmbed", "embed"
    _fv_classes = "timm_hybrid_embed"

    @classmethod
    def _fv_why_not(cls, m, ctx):
        reason = _unknown_attrs(type(m), "forward", _TIMM_HYBRID_EMBED_ATTRS) \
            or _missing_attrs(m, ("backbone", "patch_size", "proj", "flatten", "output_fmt"))
        return reason or _patch_conv_reason(m) or _format_reason(m)

    @classmethod
    def _fv_describe(cls, m, ctx):
        return "backbone, then ops.patch_embed"

    def _fv_parts(self):
        return (self.proj,)

    def forward(self, x):
        if not self._fv_intact() or _patch_conv_reason(self) is not None:
            return type(self)._fastvit_base.forward(self, x)
        x = self.backbone(x)
        if isinstance(x, (list, tuple)):
            x = x[-1]  # the last feature map of a multi-output backbone
        return _embed_patches(self, x)


_TIMM_POOL_ATTRS = {
    "pos_embed", "latent", "latent_len", "num_heads", "head_dim", "q", "kv", "q_norm", "k_norm", "fused_attn",
    "scale", "proj", "proj_drop", "mlp", "norm", "pool",
}


class _TimmAttentionPool(_Swapped):
    """timm's ``AttentionPoolLatent`` (the ``map`` head of SigLIP): the latent queries (projected once,
    shared by the batch) against all tokens as ops.attention, ``proj``, then ``norm`` + ``mlp`` as one
    ops.layernorm_mlp call with the residual fused, then timm's pooling. A mask, a position embedding
    or a changed submodule runs timm's own forward."""

    _fv_kind, _fv_label, _fv_flag = "timm_attention_pool", "timm AttentionPoolLatent", "attention"
    _fv_classes = "timm_attention_pool"

    @classmethod
    def _fv_why_not(cls, m, ctx):
        reason = _unknown_attrs(type(m), "forward", _TIMM_POOL_ATTRS) or _missing_attrs(m, sorted(_TIMM_POOL_ATTRS))
        if reason:
            return reason
        if m.pos_embed is not None:
            return "pos_embed='abs': its table is added to the tokens first (timm's own forward)"
        if m.mlp is not None:
            return _timm_mlp_reason(m.norm, m.mlp, ctx.env, "norm")
        return None

    @classmethod
    def _fv_describe(cls, m, ctx):
        return "ops.attention" + (", norm + Mlp as ops.layernorm_mlp, residual fused" if m.mlp is not None else "")

    @classmethod
    def _fv_consumed(cls, m, ctx):
        return () if m.mlp is None else (m.norm, m.mlp, *m.mlp.children())

    @classmethod
    def _fv_configure(cls, m, ctx):
        return {"activation": "gelu" if m.mlp is None else _activation_name(m.mlp.act, ctx.env)}

    def _fv_parts(self):
        mlp = self.mlp
        return (self.q, self.kv, self.q_norm, self.k_norm, self.proj, self.proj_drop, self.norm, mlp,
                *(getattr(mlp, name, None) for name in ("fc1", "act", "fc2", "drop1", "drop2", "norm")))

    def forward(self, x, attn_mask=None):
        if attn_mask is not None or self.pos_embed is not None or not self._fv_intact():
            return type(self)._fastvit_base.forward(self, x, **({} if attn_mask is None else {"attn_mask": attn_mask}))
        B, N, C = x.shape
        H, D, L = self.num_heads, self.head_dim, self.latent_len
        with _Pin(self._fastvit_backend):
            q = self.q(self.latent).reshape(1, L, H, D).transpose(1, 2).expand(B, -1, -1, -1)
            k, v = self.kv(x).reshape(B, N, 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)
            o = ops.attention(self.q_norm(q), self.k_norm(k), v, scale=self.scale)
            x = self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, L, C)))
            if self.mlp is not None:
                n, mlp = self.norm, self.mlp
                x = ops.layernorm_mlp(x, n.weight, n.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
                                      n.eps, residual=x, dropout_p=_dropout_p(mlp.drop1),
                                      activation=self._fastvit_activation)
        if self.pool == "token":
            return x[:, 0]
        if self.pool == "avg":
            return x.mean(1)
        return x
