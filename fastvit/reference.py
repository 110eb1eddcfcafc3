"""Eager twins of every fastvit op: the ground truth in tests and the "eager" backend.

Written for clarity, in plain PyTorch, for any floating dtype (float64 included). Each function
applies DESIGN.md's autocast rule itself, so it can be called directly under ``torch.autocast``:
GEMM operands take the autocast dtype, LayerNorm statistics are fp32, softmax and the Performer's
features, sums and normaliser are computed in (at least) fp32, and the output is in the autocast
dtype (the residual's dtype when a residual is passed; the Performer's is v's dtype).

Dropout (``dropout_p > 0``) is applied with ``torch``'s RNG, as ``F.dropout(training=True)``:
modules pass ``dropout_p=0`` in eval mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastvit._autocast import autocast_dtype, autocast_off, cast


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def patch_embed(
    x, weight, bias, patch_size, pos_embed=None, cls_token=None, *, patch_order="chw",
    pre_norm=False, pre_norm_weight=None, pre_norm_bias=None,
    post_norm=False, post_norm_weight=None, post_norm_bias=None, norm_eps=1e-5,
):
    """Non-overlapping patch embedding. x: (B, C, H, W) -> (B, L (+1), D), L = (H / p) * (W / p).

    Default: ``conv2d(x, weight, bias, stride=p)`` with a conv-layout weight (D, C, p, p), flattened to
    tokens in row-major patch order. ``patch_order="hwc"``: vit-pytorch's patches
    ``rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)")`` times a linear weight (D, p*p*C).
    ``pre_norm``: LayerNorm over each patch's features (weight, bias: (C*p*p,) in the patch order,
    or None) before the projection; ``post_norm``: LayerNorm over D after it (``norm_eps`` for both;
    fp32 statistics). Then the cls token (``(D,)``, ``(1, D)`` or ``(1, 1, D)``, expanded over the
    batch) put in front, then ``+ pos_embed`` (``(L', D)`` or ``(1, L', D)``, L' = tokens including the
    cls token). Under autocast the GEMM operands take the autocast dtype, except that a pre-norm takes
    x as given (LayerNorm rule); the result is in the GEMM dtype.
    """
    dt = autocast_dtype(x)
    if dt is not None:
        weight, bias, pos_embed, cls_token = cast(dt, weight, bias, pos_embed, cls_token)
        if not pre_norm:
            x = x.to(dt)
    with autocast_off(x):
        p = _pair(patch_size)
        b = None if bias is None else bias.to(weight.dtype)
        if patch_order == "chw" and not pre_norm:
            y = F.conv2d(x, weight, b, stride=p).flatten(2).transpose(1, 2)  # (B, L, D)
        else:
            patches = extract_patches(x, p, patch_order)  # (B, L, K)
            if pre_norm:
                patches = layer_norm(patches, pre_norm_weight, pre_norm_bias, norm_eps)
            y = F.linear(patches.to(weight.dtype), weight.reshape(weight.shape[0], -1), b)
        if post_norm:
            y = layer_norm(y, post_norm_weight, post_norm_bias, norm_eps)
        if cls_token is not None:
            cls = cls_token.to(y.dtype).reshape(1, 1, -1).expand(y.shape[0], 1, -1)
            y = torch.cat([cls, y], dim=1)
        if pos_embed is not None:
            y = y + pos_embed.to(y.dtype).reshape(1, y.shape[1], -1)
        return y


def extract_patches(x, patch_size, patch_order="chw"):
    """(B, C, H, W) -> (B, L, C*ph*pw): the non-overlapping patches in row-major order, each one's
    features ordered (c, i, j) (``"chw"``, conv layout) or (i, j, c) (``"hwc"``, vit-pytorch's (p1 p2 c))."""
    ph, pw = _pair(patch_size)
    B, C, H, W = x.shape
    t = x.reshape(B, C, H // ph, ph, W // pw, pw)
    t = t.permute(0, 2, 4, 1, 3, 5) if patch_order == "chw" else t.permute(0, 2, 4, 3, 5, 1)
    return t.reshape(B, (H // ph) * (W // pw), C * ph * pw)


def soft_split(x, kernel_size, stride, padding):
    """T2T-ViT's overlapping soft split. x: (B, C, H, W) -> (B, L, C * k * k).

    ``F.unfold(x, kernel_size, stride=stride, padding=padding).transpose(1, 2)``; each token's
    features are ordered (c, ki, kj). Pure data movement: the dtype is kept, also under autocast.
    """
    return F.unfold(x, _pair(kernel_size), padding=_pair(padding), stride=_pair(stride)).transpose(1, 2)


def attention(q, k, v, mask=None, scale=None, dropout_p=0.0):
    """softmax(q k^T * scale + mask) v, non-causal. q: (B, H, Nq, D), k, v: (B, H, Nk, D) -> (B, H, Nq, D).

    ``mask`` broadcasts to (B, H, Nq, Nk): boolean (True = attend) or additive float. A query row
    with no key to attend (all False, or all -inf) gives output 0 and gradient 0.
    ``scale`` defaults to D ** -0.5. Scores and softmax are in at least fp32; the probabilities are
    cast to v's dtype for the second GEMM (as a flash kernel does).
    """
    dt = autocast_dtype(q)
    if dt is not None:
        q, k, v = cast(dt, q, k, v)
    with autocast_off(q):
        p = attention_probs(q, k, mask, scale)
        if dropout_p > 0:
            p = F.dropout(p, dropout_p, training=True)
        return torch.matmul(p.to(v.dtype), v)


def attention_probs(q, k, mask=None, scale=None):
    """softmax(q k^T * scale + mask), the attention probabilities. q: (B, H, Nq, D), k: (B, H, Nk, D) ->
    (B, H, Nq, Nk) in at least fp32. A fully masked query row is all zeros; masked keys get 0."""
    acc = _acc(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale  # scores in fp32: no fp16 overflow
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(acc)
    # A row is fully masked when every score is -inf; a NaN score is not masked and must reach the
    # output (as in SDPA and the fused kernels), so test for -inf, not for "> -inf".
    attended = ~(s == float("-inf")).all(dim=-1, keepdim=True)
    p = torch.softmax(torch.where(attended, s, 0.0), dim=-1)
    return torch.where(attended, p, 0.0)


def attention_qkvpacked(qkv, num_heads, mask=None, scale=None, dropout_p=0.0):
    """Attention on a packed qkv projection. qkv: (B, N, 3 * H * D) -> (B, N, H * D).

    The qkv projection's output, laid out (3, H, D) along the last dim as in timm and vit-pytorch,
    to the output projection's input: :func:`attention` on its (B, H, N, D) views, heads merged back.
    """
    B, N, width = qkv.shape
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
    return attention(q, k, v, mask, scale, dropout_p).transpose(1, 2).reshape(B, N, width // 3)


def performer_features(u, w):
    """Positive random features phi(u) = exp(u w^T - |u|^2 / 2) / sqrt(m). u: (..., emb), w: (m, emb) -> (..., m).

    Computed in at least fp32 whatever u's dtype.
    """
    acc = _acc(u.dtype)
    u = u.to(acc)
    return torch.exp(u @ w.to(acc).T - (u * u).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])


def performer_attention(x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps=1e-8, dropout_p=0.0):
    """T2T-ViT's ``Token_performer.single_attn``. x: (B, T, dim) -> (B, T, emb).

    ``k, q, v = split(x @ kqv_weight.T + kqv_bias, emb)`` (k first); features phi (see
    :func:`performer_features`, ``w``: (m, emb)); ``y = phi(q) (phi(k)^T v) / (phi(q) sum_t phi(k) + eps)``;
    output ``v + dropout(y @ proj_weight.T + proj_bias)`` in v's dtype. Features, sums and the
    normaliser are fp32 (float64 for float64 inputs).
    """
    dt = autocast_dtype(x)
    if dt is not None:
        x, kqv_weight, kqv_bias, proj_weight, proj_bias = cast(dt, x, kqv_weight, kqv_bias, proj_weight, proj_bias)
    with autocast_off(x):
        emb = proj_weight.shape[0]
        kqv = F.linear(x, kqv_weight, None if kqv_bias is None else kqv_bias.to(x.dtype))
        k, q, v = kqv.split(emb, dim=-1)
        kp, qp = performer_features(k, w), performer_features(q, w)  # (B, T, m)
        kp_sum = kp.sum(dim=1)  # (B, m)
        kptv = kp.transpose(1, 2) @ v.to(kp.dtype)  # (B, m, emb)
        normaliser = qp @ kp_sum.unsqueeze(-1)  # (B, T, 1)
        y = (qp @ kptv) / (normaliser + eps)  # (B, T, emb)
        out = F.linear(y.to(v.dtype), proj_weight, None if proj_bias is None else proj_bias.to(v.dtype))
        if dropout_p > 0:
            out = F.dropout(out, dropout_p, training=True)
        return v + out


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last dim with fp32 statistics. x: (..., C), weight, bias: (C,) or None -> x's shape.

    The output is in x's dtype, or the autocast dtype under autocast.
    """
    out_dtype = autocast_dtype(x) or x.dtype
    with autocast_off(x):
        acc = _acc(x.dtype)
        xf = x.to(acc)
        mean = xf.mean(dim=-1, keepdim=True)
        var = (xf - mean).square().mean(dim=-1, keepdim=True)
        y = (xf - mean) * torch.rsqrt(var + eps)
        if weight is not None:
            y = y * weight.to(acc)
        if bias is not None:
            y = y + bias.to(acc)
        return y.to(out_dtype)


ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


def apply_activation(h: torch.Tensor, name: str) -> torch.Tensor:
    """The MLP activation: "gelu" exact erf GELU, "gelu_tanh" its tanh approximation (SigLIP),
    "quick_gelu" ``h * sigmoid(1.702 h)`` (CLIP)."""
    if name == "gelu":
        return F.gelu(h)
    if name == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if name == "quick_gelu":
        return h * torch.sigmoid(1.702 * h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def layernorm_mlp(
    x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps=1e-6, residual=None, dropout_p=0.0,
    activation="gelu",
):
    """``fc2(drop(act(fc1(layer_norm(x)))))``, then ``drop``, plus ``residual``. x: (..., C) -> (..., C_out).

    fc1_weight: (hidden, C), fc2_weight: (C_out, hidden); ``act`` by :func:`apply_activation` (default
    exact erf GELU). The LayerNorm output is
    written in the GEMM dtype (the autocast dtype, else fc1_weight's); the result is in the GEMM
    dtype, or residual's dtype when a residual (shape of the result) is given.
    """
    dt = autocast_dtype(x)
    if dt is not None:
        fc1_weight, fc1_bias, fc2_weight, fc2_bias = cast(dt, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    with autocast_off(x):
        gemm_dtype = fc1_weight.dtype
        h = layer_norm(x, ln_weight, ln_bias, eps).to(gemm_dtype)
        h = apply_activation(F.linear(h, fc1_weight, None if fc1_bias is None else fc1_bias.to(gemm_dtype)), activation)
        if dropout_p > 0:
            h = F.dropout(h, dropout_p, training=True)
        y = F.linear(h, fc2_weight, None if fc2_bias is None else fc2_bias.to(gemm_dtype))
        if dropout_p > 0:
            y = F.dropout(y, dropout_p, training=True)
        if residual is not None:
            y = residual + y.to(residual.dtype)
        return y


def soft_split_layer_norm(x, kernel_size, stride, padding, weight=None, bias=None, eps=1e-5):
    """T2T-ViT's soft split followed by the LayerNorm over each token's C*k*k features (the next
    Token_performer's ``norm1``). x: (B, C, H, W) -> (B, L, C * k * k).

    ``layer_norm(soft_split(x, ...), weight, bias, eps)``: fp32 statistics, the output in x's dtype, or
    the autocast dtype under autocast.
    """
    return layer_norm(soft_split(x, kernel_size, stride, padding), weight, bias, eps)
