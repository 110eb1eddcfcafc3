"""vit-pytorch's swaps: ``Attention``, ``FeedForward`` and ``Transformer`` (vit.py, simple_vit.py)
and the ``to_patch_embedding`` Sequential of ViT / SimpleViT. Recognised by class identity (the
patch embedding by its einops pattern and layers)."""

from __future__ import annotations

import numbers
from collections import OrderedDict

from torch import nn

from fastvit import ops
from fastvit.ops import _checks as check
from fastvit._autocast import autocast_dtype
from fastvit._fx import leaf
from fastvit.swap.core import (
    _activation_reason,
    _dropout_p,
    _head_dim_reason,
    _activation_name,
    _is_ln,
    _ln_into_gemm,
    _ln_torch_dtype,
    _orig_type,
    _Pin,
    _plain_dropout,
    _plain_linear,
    _Swapped,
    _unknown_attrs,
)

_VITP_ATTENTION_ATTRS = {"norm", "to_qkv", "heads", "scale", "attend", "dropout", "to_out"}


class _VitpAttention(_Swapped):
    """vit-pytorch ``Attention`` (vit.py, simple_vit.py): LayerNorm, to_qkv, ops.attention_qkvpacked, to_out."""

    _fv_kind, _fv_label, _fv_flag = "vitp_attention", "vit-pytorch Attention", "attention"
    _fv_attention_layer = True  # calls ops.attention(_qkvpacked): fastvit.viz captures its maps
    _fv_classes = "vitp_attention"

    @classmethod
    def _fv_why_not(cls, m, ctx):
        reason = _unknown_attrs(type(m), "forward", _VITP_ATTENTION_ATTRS)
        if reason:
            return reason
        if not _is_ln(m.norm, ctx.env):
            return f"norm is {type(m.norm).__name__}, not a LayerNorm"
        if not (isinstance(m.attend, nn.Softmax) and m.attend.dim in (-1, 3)):
            return "attend is not a softmax over the keys"
        drop = getattr(m, "dropout", None)
        if drop is not None and not _plain_dropout(drop):
            return "dropout is not an nn.Dropout"
        if not isinstance(m.scale, numbers.Real):
            return f"scale is a {type(m.scale).__name__}, not a number"
        width = m.to_qkv.out_features
        if width % (3 * m.heads):
            return f"to_qkv's {width} outputs are not 3 * heads * dim_head"
        return _head_dim_reason(width // (3 * m.heads), ctx)

    @classmethod
    def _fv_describe(cls, m, ctx):
        return "norm + ops.attention_qkvpacked"

    @classmethod
    def _fv_consumed(cls, m, ctx):
        return (m.norm, m.attend)

    def _fv_parts(self):
        return (self.norm, self.attend, getattr(self, "dropout", None))

    def forward(self, x):
        if not self._fv_intact():
            return type(self)._fastvit_base.forward(self, x)
        x = check.last_dim(x, self.norm.normalized_shape[0], "norm.weight")
        with _Pin(self._fastvit_backend):
            qkv = self.to_qkv(_ln_into_gemm(self.norm, x))
            o = ops.attention_qkvpacked(qkv, self.heads, scale=float(self.scale),
                                        dropout_p=_dropout_p(getattr(self, "dropout", None)))
        return self.to_out(o)


def _feedforward_layout(net, env) -> tuple[tuple[int, ...] | None, str | None]:
    """Indices (ln, fc1, act, drop1 or -1, fc2, drop2 or -1) of a LayerNorm-Linear-GELU-(Dropout)-Linear-(Dropout)
    Sequential, or None and why not."""
    mods = list(net)
    if not mods or not _is_ln(mods[0], env):
        return None, "the FeedForward does not start with a LayerNorm"
    i = 1
    if i >= len(mods) or not _plain_linear(mods[i]):
        return None, "no Linear after the LayerNorm"
    fc1 = i
    i += 1
    if i >= len(mods) or _activation_name(mods[i], env) is None:
        if i < len(mods) and _orig_type(mods[i]) is nn.GELU:
            return None, _activation_reason(mods[i], env)
        return None, f"the layer after fc1 is {type(mods[i]).__name__ if i < len(mods) else 'missing'}, not a GELU"
    act = i
    i += 1
    d1 = -1
    if i < len(mods) and _plain_dropout(mods[i]):
        d1, i = i, i + 1
    if i >= len(mods) or not _plain_linear(mods[i]):
        return None, "no Linear after the activation"
    fc2 = i
    i += 1
    d2 = -1
    if i < len(mods) and _plain_dropout(mods[i]):
        d2, i = i, i + 1
    if i != len(mods):
        return None, f"the FeedForward has extra layers after fc2 ({type(mods[i]).__name__})"
    return (0, fc1, act, d1, fc2, d2), None


class _VitpFeedForward(_Swapped):
    """vit-pytorch ``FeedForward``: ``net`` = LayerNorm, Linear, GELU, (Dropout), Linear, (Dropout) as one
    ops.layernorm_mlp call; ``forward(x, residual=None)`` also takes the residual (the swapped Transformer
    passes it)."""

    _fv_kind, _fv_label, _fv_flag = "vitp_feedforward", "vit-pytorch FeedForward", "mlp"
    _fv_classes = "vitp_feedforward"

    @classmethod
    def _fv_why_not(cls, m, ctx):
        reason = _unknown_attrs(type(m), "forward", {"net"})
        if reason:
            return reason
        if type(m.net) is not nn.Sequential:
            return "net is not an nn.Sequential"
        return _feedforward_layout(m.net, ctx.env)[1]

    @classmethod
    def _fv_describe(cls, m, ctx):
        return "ops.layernorm_mlp (residual fused by the Transformer)"

    @classmethod
    def _fv_consumed(cls, m, ctx):
        return (m.net, *m.net)

    @classmethod
    def _fv_configure(cls, m, ctx):
        layout = _feedforward_layout(m.net, ctx.env)[0]
        return {"layout": layout, "activation": _activation_name(m.net[layout[2]], ctx.env)}

    def _fv_parts(self):
        net = self.net
        return (net, *net._modules.values())

    def forward(self, x, residual=None):
        ln_i, fc1_i, act_i, d1_i, fc2_i, d2_i = self._fastvit_layout
        net = self.net
        p1 = net[d1_i].p if d1_i >= 0 else 0.0
        p2 = net[d2_i].p if d2_i >= 0 else 0.0
        if not self._fv_intact() or (self.training and p1 != p2):
            y = type(self)._fastvit_base.forward(self, x)
            return y if residual is None else y + residual
        ln, fc1, fc2 = net[ln_i], net[fc1_i], net[fc2_i]
        x = check.last_dim(x, ln.normalized_shape[0], f"net.{ln_i}.weight")
        with _Pin(self._fastvit_backend):
            return ops.layernorm_mlp(x, ln.weight, ln.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, ln.eps,
                                     residual=residual, dropout_p=p1 if self.training else 0.0,
                                     activation=self._fastvit_activation)


class _VitpTransformer(_Swapped):
    """vit-pytorch ``Transformer``: ``x = attn(x) + x``, then ``ff(x, residual=x)`` so the FeedForward's
    residual add happens inside ops.layernorm_mlp."""

    _fv_kind, _fv_label, _fv_flag = "vitp_transformer", "vit-pytorch Transformer", "mlp"
    _fv_classes = "vitp_transformer"

    @classmethod
    def _fv_why_not(cls, m, ctx):
        reason = _unknown_attrs(type(m), "forward", {"layers", "norm"})
        if reason:
            return reason
        if not all(isinstance(layer, nn.ModuleList) and len(layer) == 2 for layer in m.layers):
            return "layers are not (attention, feed-forward) pairs"
        return None

    @classmethod
    def _fv_describe(cls, m, ctx):
        return "feed-forward residuals fused into ops.layernorm_mlp"

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x, residual=x) if isinstance(ff, _VitpFeedForward) else ff(x) + x
        return self.norm(x)


_VITP_PATCH_PATTERN = "b c (h p1) (w p2) -> b (h w) (p1 p2 c)"


def _patch_embedding_layout(seq, env):
    """(ph, pw, i_pre or -1, i_linear, i_post or -1) for vit-pytorch's Rearrange-(LayerNorm)-Linear-(LayerNorm)."""
    mods = list(seq)
    r = mods[0] if mods else None
    if env.rearrange is None or _orig_type(r) is not env.rearrange:
        return None
    if " ".join(str(r.pattern).split()) != _VITP_PATCH_PATTERN or set(r.axes_lengths) != {"p1", "p2"}:
        return None
    ph, pw = int(r.axes_lengths["p1"]), int(r.axes_lengths["p2"])
    i, pre = 1, -1
    if i < len(mods) and _is_ln(mods[i], env):
        pre, i = i, i + 1
    if i >= len(mods) or not _plain_linear(mods[i]):
        return None
    lin = i
    i += 1
    post = -1
    if i < len(mods) and _is_ln(mods[i], env):
        post, i = i, i + 1
    if i != len(mods):
        return None
    return ph, pw, pre, lin, post


def _is_vitp_soft_split(seq, env):
    """Indices of nn.Unfold modules followed by Rearrange('b c n -> b n c') (vit-pytorch's T2TViT)."""
    mods = list(seq)
    out = []
    for i, m in enumerate(mods[:-1]):
        nxt = mods[i + 1]
        if type(m) is nn.Unfold and env.rearrange is not None and _orig_type(nxt) is env.rearrange \
                and " ".join(str(nxt.pattern).split()) == "b c n -> b n c":
            out.append(m)
    return out


class _VitpPatchEmbedding(_Swapped):
    """vit-pytorch's ``to_patch_embedding`` Sequential (Rearrange to (p1 p2 c) patches, LayerNorm, Linear,
    LayerNorm) as one ops.patch_embed(patch_order="hwc") call. Under autocast the last LayerNorm runs
    on its own, in torch's output dtype (its output becomes the residual stream)."""

    _fv_kind, _fv_label, _fv_flag = "vitp_patch_embedding", "vit-pytorch patch embedding", "embed"

    @classmethod
    def _fv_matches(cls, m, env):
        return type(m) is nn.Sequential and _patch_embedding_layout(m, env) is not None

    @classmethod
    def _fv_describe(cls, m, ctx):
        ph, pw, pre, lin, post = _patch_embedding_layout(m, ctx.env)
        norms = " + ".join(n for n, i in (("pre-norm", pre), ("post-norm", post)) if i >= 0)
        return "ops.patch_embed(patch_order='hwc'" + (f", {norms})" if norms else ")")

    @classmethod
    def _fv_consumed(cls, m, ctx):
        return tuple(m)

    @classmethod
    def _fv_configure(cls, m, ctx):
        return {"layout": _patch_embedding_layout(m, ctx.env)}

    def _fv_parts(self):
        return tuple(self._modules.values())

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # a slice is a new, plain Sequential of those layers
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return nn.Sequential.__getitem__(self, idx)

    def forward(self, input):
        if not self._fv_intact():
            return nn.Sequential.forward(self, input)
        ph, pw, pre_i, lin_i, post_i = self._fastvit_layout
        lin = self[lin_i]
        pre = (self[pre_i].weight, self[pre_i].bias, self[pre_i].eps) if pre_i >= 0 else None
        post = (self[post_i].weight, self[post_i].bias, self[post_i].eps) if post_i >= 0 else None
        with _Pin(self._fastvit_backend):
            return _vitp_patch_embed(input, lin.weight, lin.bias, (ph, pw), pre, post)


@leaf
def _vitp_patch_embed(x, weight, bias, patch_size, pre, post):
    """ops.patch_embed(patch_order="hwc") with the (weight, bias, eps) of the pre- and post-LayerNorm
    (or None). Under autocast the post-norm runs on its own, in torch's output dtype."""
    eps = pre[2] if pre is not None else (post[2] if post is not None else 1e-5)
    fuse_post = post is not None and autocast_dtype(x) is None and (pre is None or pre[2] == post[2])
    y = ops.patch_embed(
        x, weight, bias, patch_size, patch_order="hwc",
        pre_norm=pre is not None, pre_norm_weight=None if pre is None else pre[0],
        pre_norm_bias=None if pre is None else pre[1],
        post_norm=fuse_post, post_norm_weight=post[0] if fuse_post else None,
        post_norm_bias=post[1] if fuse_post else None, norm_eps=eps,
    )
    if post is not None and not fuse_post:
        y = _ln_torch_dtype(y, post[0], post[1], post[2])
    return y
