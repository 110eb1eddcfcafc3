"""The official T2T-ViT's swaps (yitu-opensource/T2T-ViT, which has no importable package):
``Token_performer``, ``Block``, ``Attention``, recognised by class name and structure and only when
their ``forward`` parses to the official code; and T2T soft splits (``nn.Unfold`` in an official
``T2T_module`` or a vit-pytorch ``T2TViT``)."""

from __future__ import annotations

import ast
import functools
import numbers
import textwrap

import torch
from torch import nn

from fastvit import ops
from fastvit.ops import _checks as check
from fastvit.swap.core import (
    _activation_reason,
    _dropout_p,
    _drop_path_inactive,
    _function_ast,
    _head_dim_reason,
    _activation_name,
    _is_ln,
    _ln_into_gemm,
    _MlpBlock,
    _mlp_tail_reason,
    _norm2_reason,
    _orig_type,
    _Pin,
    _plain_dropout,
    _plain_linear,
    _Swapped,
    _unknown_attrs,
)

def _dump_body(node: ast.FunctionDef) -> str:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]  # a docstring does not change what the code computes
    args = [a.arg for a in node.args.args]
    return repr(args) + "".join(ast.dump(s) for s in body)


@functools.lru_cache(maxsize=None)
def _official_dump(key: str) -> str:
    return _dump_body(ast.parse(textwrap.dedent(_OFFICIAL_T2T[key])).body[0])


def _is_official(cls: type, method: str, key: str) -> str | None:
    """None when ``cls.<method>`` is the official T2T-ViT code (whitespace and comments aside)."""
    node = _function_ast(getattr(cls, method, None))
    if node is None:
        return f"the source of {cls.__qualname__}.{method} cannot be read, so it cannot be matched to the official T2T-ViT"
    if _dump_body(node) != _official_dump(key):
        return f"{cls.__qualname__}.{method} is not the official T2T-ViT code ({key})"
    return None


# The official T2T-ViT code (yitu-opensource/T2T-ViT, models/transformer_block.py, token_performer.py,
# t2t_vit.py): a class with one of these names is swapped only when its method parses to the same code.
_OFFICIAL_T2T = {
    "Block.forward": """
        def forward(self, x):
            x = x + self.drop_path(self.attn(self.norm1(x)))
            x = x + self.drop_path(self.mlp(self.norm2(x)))
            return x
    """,
    "Attention.forward": """
        def forward(self, x):
            B, N, C = x.shape
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = (attn @ v).transpose(1, 2).reshape(B, N, C)
            x = self.proj(x)
            x = self.proj_drop(x)
            return x
    """,
    "Mlp.forward": """
        def forward(self, x):
            x = self.fc1(x)
            x = self.act(x)
            x = self.drop(x)
            x = self.fc2(x)
            x = self.drop(x)
            return x
    """,
    "Token_performer.forward": """
        def forward(self, x):
            x = self.single_attn(self.norm1(x))
            x = x + self.mlp(self.norm2(x))
            return x
    """,
    "T2T_module.forward": """
        def forward(self, x):
            x = self.soft_split0(x).transpose(1, 2)
            x = self.attention1(x)
            B, new_HW, C = x.shape
            x = x.transpose(1,2).reshape(B, C, int(np.sqrt(new_HW)), int(np.sqrt(new_HW)))
            x = self.soft_split1(x).transpose(1, 2)
            x = self.attention2(x)
            B, new_HW, C = x.shape
            x = x.transpose(1, 2).reshape(B, C, int(np.sqrt(new_HW)), int(np.sqrt(new_HW)))
            x = self.soft_split2(x).transpose(1, 2)
            x = self.project(x)
            return x
    """,
}


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class _SoftSplit(_Swapped):
    """``nn.Unfold`` in a T2T model (official ``T2T_module``, vit-pytorch ``T2TViT``): ops.soft_split,
    returned transposed to unfold's (B, C*k*k, L) layout (a view; the next step transposes it back)."""

    _fv_kind, _fv_label, _fv_flag = "soft_split", "nn.Unfold (T2T soft split)", "embed"

    @classmethod
    def _fv_matches(cls, m, env):
        return type(m) is nn.Unfold

    @classmethod
    def _fv_why_not(cls, m, ctx):
        if _pair(m.dilation) != (1, 1):
            return "dilated unfold"
        return None

    @classmethod
    def _fv_describe(cls, m, ctx):
        return "ops.soft_split"

    def forward(self, input):
        if input.dim() != 4 or _pair(self.dilation) != (1, 1):
            return nn.Unfold.forward(self, input)
        with _Pin(self._fastvit_backend):
            return ops.soft_split(input, self.kernel_size, self.stride, self.padding).transpose(1, 2)


def _official_mlp_reason(norm2, mlp, env) -> str | None:
    """Why ``norm2`` + the official ``Mlp`` cannot become one ops.layernorm_mlp call."""
    reason = _norm2_reason(norm2, env)
    if reason:
        return reason
    if _orig_type(mlp).__name__ != "Mlp":
        return f"mlp is {type(mlp).__name__}, not the official Mlp"
    return _is_official(_orig_type(mlp), "forward", "Mlp.forward") or _mlp_tail_reason(norm2, mlp, (mlp.drop,), env)


def _official_attention_reason(m, ctx) -> str | None:
    t = _orig_type(m)
    reason = _is_official(t, "forward", "Attention.forward")
    if reason:
        return reason
    for name in ("qkv", "attn_drop", "proj", "proj_drop"):
        if not isinstance(getattr(m, name, None), nn.Module):
            return f"no {name} submodule"
    if not _plain_dropout(m.attn_drop):
        return "attn_drop is not an nn.Dropout"
    width = getattr(m.qkv, "out_features", None)
    dim = getattr(m.qkv, "in_features", None)
    if width is None or dim is None or width != 3 * dim or dim % m.num_heads:
        return "qkv is not a Linear(dim, 3 * dim) with dim divisible by num_heads"
    if not isinstance(m.scale, numbers.Real):
        return f"scale is a {type(m.scale).__name__}, not a number"
    return _head_dim_reason(dim // m.num_heads, ctx)


class _T2TAttention(_Swapped):
    """The official T2T-ViT ``Attention`` (transformer_block.py): qkv -> ops.attention_qkvpacked with
    its ``scale`` (``qk_scale`` or head_dim ** -0.5) -> proj -> proj_drop."""

    _fv_kind, _fv_label, _fv_flag = "t2t_attention", "T2T-ViT Attention", "attention"
    _fv_attention_layer = True  # calls ops.attention(_qkvpacked): fastvit.viz captures its maps

    @classmethod
    def _fv_matches(cls, m, env):
        return type(m).__name__ == "Attention" and set(m._modules) == {"qkv", "attn_drop", "proj", "proj_drop"} \
            and hasattr(m, "num_heads") and hasattr(m, "scale")

    @classmethod
    def _fv_why_not(cls, m, ctx):
        return _official_attention_reason(m, ctx)

    @classmethod
    def _fv_input_feeds_linear(cls, m, env):
        t = _orig_type(m)
        return t.__name__ == "Attention" and _is_official(t, "forward", "Attention.forward") is None

    @classmethod
    def _fv_describe(cls, m, ctx):
        return "ops.attention_qkvpacked"

    def _fv_parts(self):
        return (self.attn_drop,)

    def forward(self, x):
        if not self._fv_intact():
            return type(self)._fastvit_base.forward(self, x)
        with _Pin(self._fastvit_backend):
            o = ops.attention_qkvpacked(self.qkv(x), self.num_heads, scale=float(self.scale),
                                        dropout_p=_dropout_p(self.attn_drop))
        return self.proj_drop(self.proj(o))


class _T2TBlock(_MlpBlock):
    """The official T2T-ViT ``Block``: ``x + drop_path(attn(norm1(x)))``, then norm2 + Mlp as one
    ops.layernorm_mlp call with the residual fused (added after the op while drop path is active)."""

    _fv_kind, _fv_label, _fv_flag = "t2t_block", "T2T-ViT Block", "mlp"
    _fv_mlp_parts = ("fc1", "act", "fc2", "drop")

    @classmethod
    def _fv_matches(cls, m, env):
        return type(m).__name__ == "Block" and set(m._modules) == {"norm1", "attn", "drop_path", "norm2", "mlp"}

    @classmethod
    def _fv_why_not(cls, m, ctx):
        reason = _is_official(type(m), "forward", "Block.forward")
        if reason:
            return reason
        return _official_mlp_reason(m.norm2, m.mlp, ctx.env)

    @classmethod
    def _fv_describe(cls, m, ctx):
        what = cls._fv_what(m, ctx)
        if isinstance(m.drop_path, nn.Identity):
            return what + ", residual fused"
        return what + ", residual fused (added after the op in training, where drop path is active)"

    def forward(self, x):
        if not self._fv_intact():
            return type(self)._fastvit_base.forward(self, x)
        x = check.last_dim(x, self.norm2.normalized_shape[0], "norm2.weight")
        with _Pin(self._fastvit_backend):
            h = _ln_into_gemm(self.norm1, x) if self._fastvit_norm1_fused else self.norm1(x)
            x = x + self.drop_path(self.attn(h))
            n, mlp = self.norm2, self.mlp
            args = (n.weight, n.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, n.eps)
            p = _dropout_p(mlp.drop)
            if _drop_path_inactive(self.drop_path, self.training):
                return ops.layernorm_mlp(x, *args, residual=x, dropout_p=p, activation=self._fastvit_activation)
            return x + self.drop_path(ops.layernorm_mlp(x, *args, dropout_p=p, activation=self._fastvit_activation))


class _TokenPerformer(_Swapped):
    """The official T2T-ViT ``Token_performer``: ``single_attn(norm1(x))`` as ops.performer_attention,
    then ``x + mlp(norm2(x))`` as ops.layernorm_mlp (the MLP only drops its output: in training with
    dropout the residual is added after the op). The MLP half is fused only with ``mlp=True``."""

    _fv_kind, _fv_label, _fv_flag = "token_performer", "T2T-ViT Token_performer", "performer"

    @classmethod
    def _fv_matches(cls, m, env):
        return type(m).__name__ == "Token_performer" and {"kqv", "dp", "proj", "norm1", "norm2", "mlp"} <= set(m._modules)

    @classmethod
    def _fv_why_not(cls, m, ctx):
        t = type(m)
        reason = _is_official(t, "forward", "Token_performer.forward") \
            or _unknown_attrs(t, "single_attn", {"kqv", "emb", "prm_exp", "dp", "proj", "epsilon"}) \
            or _unknown_attrs(t, "prm_exp", {"m", "w"})
        if reason:
            return reason
        if getattr(m, "head_cnt", 1) != 1:
            return f"head_cnt = {m.head_cnt}: the official code (and fastvit) use one head"
        if not (_plain_linear(m.kqv) and _plain_linear(m.proj) and _plain_dropout(m.dp)):
            return "kqv / proj / dp are not plain Linear / Dropout"
        emb, w = m.emb, m.w
        if not (isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape == (m.m, emb)):
            return "w is not an (m, emb) tensor"
        if m.kqv.out_features != 3 * emb or tuple(m.proj.weight.shape) != (emb, emb):
            return "kqv / proj do not have the official shapes (3 * emb, dim) / (emb, emb)"
        if not _is_ln(m.norm1, ctx.env):
            return f"norm1 is {type(m.norm1).__name__}, not a LayerNorm"
        if not isinstance(m.epsilon, numbers.Real) or m.epsilon <= 0:
            return f"epsilon = {m.epsilon!r} is not a positive number"
        return None

    @classmethod
    def _fv_mlp_reason(cls, m, env) -> str | None:
        mlp = m.mlp
        if type(mlp) is not nn.Sequential or len(mlp) != 4:
            return "mlp is not the official Sequential(Linear, GELU, Linear, Dropout)"
        if not (_plain_linear(mlp[0]) and _plain_linear(mlp[2]) and _plain_dropout(mlp[3])):
            return "mlp is not the official Sequential(Linear, GELU, Linear, Dropout)"
        if _activation_name(mlp[1], env) is None:
            return _activation_reason(mlp[1], env)
        if not _is_ln(m.norm2, env):
            return f"norm2 is {type(m.norm2).__name__}, not a LayerNorm"
        return None

    @classmethod
    def _fv_fuse_mlp(cls, m, ctx) -> bool:
        return ctx.flags["mlp"] and cls._fv_mlp_reason(m, ctx.env) is None

    @classmethod
    def _fv_describe(cls, m, ctx):
        if cls._fv_fuse_mlp(m, ctx):
            return "ops.performer_attention + ops.layernorm_mlp"
        why = "mlp=False" if not ctx.flags["mlp"] else cls._fv_mlp_reason(m, ctx.env)
        return f"ops.performer_attention (MLP half left as it is: {why})"

    @classmethod
    def _fv_consumed(cls, m, ctx):
        out = (m.norm1, m.dp)
        if cls._fv_fuse_mlp(m, ctx):
            out += (m.norm2, m.mlp, *m.mlp)
        return out

    @classmethod
    def _fv_configure(cls, m, ctx):
        fuse = cls._fv_fuse_mlp(m, ctx)
        return {"fuse_mlp": fuse, "activation": _activation_name(m.mlp[1], ctx.env) if fuse else "gelu"}

    def _fv_parts(self):
        parts = (self.norm1, self.kqv, self.proj, self.dp)
        if self._fastvit_fuse_mlp:
            parts = parts + (self.norm2, self.mlp, *self.mlp._modules.values())
        return parts

    def forward(self, x):
        if not self._fv_intact():
            return type(self)._fastvit_base.forward(self, x)
        x = check.last_dim(x, self.norm1.normalized_shape[0], "norm1.weight")
        with _Pin(self._fastvit_backend):
            x = ops.performer_attention(
                _ln_into_gemm(self.norm1, x), self.kqv.weight, self.kqv.bias, self.w, self.proj.weight,
                self.proj.bias, eps=float(self.epsilon), dropout_p=_dropout_p(self.dp),
            )
            if not self._fastvit_fuse_mlp:
                return x + self.mlp(self.norm2(x))
            n, fc1, fc2, drop = self.norm2, self.mlp[0], self.mlp[2], self.mlp[3]
            args = (n.weight, n.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, n.eps)
            if self.training and drop.p > 0:
                # the official MLP drops only its output; the op would also drop the hidden layer
                return x + drop(ops.layernorm_mlp(x, *args, activation=self._fastvit_activation))
            return ops.layernorm_mlp(x, *args, residual=x, activation=self._fastvit_activation)


def _is_official_t2t_module(m) -> bool:
    return type(m).__name__ == "T2T_module" and _is_official(type(m), "forward", "T2T_module.forward") is None
