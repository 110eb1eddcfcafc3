"""Embed: patch_embed against explicit patch extraction, soft_split against explicit slicing; the Triton
kernels (kernels/embed.py) against fastvit.reference by the numerics rule."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastvit
from fastvit import BackendUnavailableError, backend, ops, reference
import sm90
from numerics import check_against_reference, expanded_grad, noncontiguous, overridden, randn, run_without_interpreter


def explicit_patch_embed(x, weight, bias, p, pos_embed=None, cls_token=None):
    """Cut (B, C, H, W) into p x p patches by reshaping and project each with an einsum."""
    B, C, H, W = x.shape
    D = weight.shape[0]
    patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
    y = patches @ weight.reshape(D, -1).T
    if bias is not None:
        y = y + bias
    if cls_token is not None:
        y = torch.cat([cls_token.reshape(1, 1, D).expand(B, 1, D), y], dim=1)
    if pos_embed is not None:
        y = y + pos_embed.reshape(1, -1, D)
    return y


def explicit_soft_split(x, k, s, p):
    """Every k x k window of the zero-padded input, in row-major window order, features (c, ki, kj)."""
    B, C, H, W = x.shape
    xp = F.pad(x, (p, p, p, p))
    rows, cols = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    tokens = [xp[:, :, i * s : i * s + k, j * s : j * s + k].reshape(B, -1) for i in range(rows) for j in range(cols)]
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("H, W, p, C, D", [(32, 32, 4, 3, 24), (48, 40, 8, 1, 16), (64, 64, 16, 64, 96)])
@pytest.mark.parametrize("extras", ["none", "cls", "pos", "cls+pos"])
def test_patch_embed_matches_explicit(H, W, p, C, D, extras):
    x = torch.randn(2, C, H, W, dtype=torch.float64)
    weight, bias = torch.randn(D, C, p, p, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    L = (H // p) * (W // p) + ("cls" in extras)
    cls = torch.randn(1, 1, D, dtype=torch.float64) if "cls" in extras else None
    pos = torch.randn(1, L, D, dtype=torch.float64) if "pos" in extras else None
    out = ops.patch_embed(x, weight, bias, p, pos, cls)
    assert out.shape == (2, L, D)
    torch.testing.assert_close(out, explicit_patch_embed(x, weight, bias, p, pos, cls))


def test_patch_embed_accepted_shapes_and_channels_last():
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    w, b = torch.randn(8, 3, 4, 4, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    expected = explicit_patch_embed(x, w, b, 4, torch.ones(17, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64))
    for cls in (torch.ones(8), torch.ones(1, 8), torch.ones(1, 1, 8)):
        for pos in (torch.ones(17, 8), torch.ones(1, 17, 8)):
            got = ops.patch_embed(x.to(memory_format=torch.channels_last), w, b, (4, 4), pos.double(), cls.double())
            torch.testing.assert_close(got, expected)
    torch.testing.assert_close(ops.patch_embed(x, w, None, 4), explicit_patch_embed(x, w, None, 4))


@pytest.mark.parametrize("H, W, k, s, p", [(32, 32, 7, 4, 2), (14, 14, 3, 2, 1), (13, 9, 3, 2, 1), (5, 5, 5, 1, 0)])
def test_soft_split_matches_slicing(H, W, k, s, p):
    x = torch.randn(2, 5, H, W, dtype=torch.float64)
    torch.testing.assert_close(ops.soft_split(x, k, s, p), explicit_soft_split(x, k, s, p), rtol=0, atol=0)


def test_gradcheck():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    cls = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: reference.patch_embed(a[0], a[1], a[2], 4, a[3], a[4]), (x, w, b, pos, cls))
    assert torch.autograd.gradcheck(lambda x: reference.soft_split(x, 3, 2, 1), (x,))


def test_autocast_rule():
    x, w, b = torch.randn(2, 3, 16, 16), torch.randn(8, 3, 4, 4), torch.randn(8)
    pos = torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.patch_embed(x, w, b, 4, pos)
        assert ops.soft_split(x, 3, 2, 1).dtype == torch.float32  # data movement keeps the dtype
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference.patch_embed(x.bfloat16(), w.bfloat16(), b.bfloat16(), 4, pos.bfloat16()))


def _pe_args():
    return {"x": torch.randn(2, 3, 16, 16), "weight": torch.randn(8, 3, 4, 4), "bias": torch.randn(8), "patch_size": 4}


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: {**a, "x": a["x"][0]}, ValueError, "x must be a 4-D image batch"),
        (lambda a: {**a, "x": torch.randn(2, 3, 18, 16)}, ValueError, "multiple of patch_size"),
        (lambda a: {**a, "weight": torch.randn(8, 4, 4, 4)}, ValueError, "weight must have shape"),
        (lambda a: {**a, "weight": torch.randn(8, 3, 4, 4).double()}, TypeError, "weight has dtype"),
        (lambda a: {**a, "bias": torch.randn(9)}, ValueError, "bias must have shape"),
        (lambda a: {**a, "patch_size": 0}, ValueError, "patch_size must be an int >= 1"),
        (lambda a: {**a, "pos_embed": torch.randn(17, 8)}, ValueError, r"pos_embed must have shape \(16, 8\)"),
        (lambda a: {**a, "cls_token": torch.randn(2, 8)}, ValueError, "cls_token must have shape"),
        (lambda a: {**a, "x": a["x"].int()}, TypeError, "x must be a floating-point"),
        (lambda a: {**a, "bias": torch.randn(8, device="meta")}, ValueError, "bias is on meta"),
    ],
)
def test_patch_embed_bad_inputs(change, error, match):
    with pytest.raises(error, match=match):
        ops.patch_embed(**change(_pe_args()))


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.randn(3, 8, 8), 3, 2, 1), ValueError, "x must be a 4-D"),
        ((torch.randn(1, 3, 8, 8), 0, 2, 1), ValueError, "kernel_size must be"),
        ((torch.randn(1, 3, 8, 8), 3, (2, 0), 1), ValueError, "stride must be"),
        ((torch.randn(1, 3, 8, 8), 3, 2, -1), ValueError, "padding must be"),
        ((torch.randn(1, 3, 4, 4), 7, 4, 1), ValueError, "larger than x's padded size"),
    ],
)
def test_soft_split_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        ops.soft_split(*args)


def test_reference_vit_pytorch_form_matches_einops_layernorm_linear_layernorm():
    """patch_order="hwc" + pre/post norms means vit-pytorch's to_patch_embedding, then cls, then pos."""
    from einops.layers.torch import Rearrange
    from torch import nn

    B, C, H, W, p, D = 2, 3, 32, 24, 8, 40
    K = p * p * C
    to_patch = nn.Sequential(
        Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p), nn.LayerNorm(K), nn.Linear(K, D), nn.LayerNorm(D)
    ).double()
    with torch.no_grad():
        for norm in (to_patch[1], to_patch[3]):
            norm.weight.normal_(1, 0.2)
            norm.bias.normal_(0, 0.2)
    x = torch.randn(B, C, H, W, dtype=torch.float64) + 3.0
    L = (H // p) * (W // p)
    cls, pos = torch.randn(1, D, dtype=torch.float64), torch.randn(L + 1, D, dtype=torch.float64)
    expected = torch.cat([cls.expand(B, 1, D), to_patch(x)], dim=1) + pos
    norms = dict(pre_norm=True, pre_norm_weight=to_patch[1].weight, pre_norm_bias=to_patch[1].bias,
                 post_norm=True, post_norm_weight=to_patch[3].weight, post_norm_bias=to_patch[3].bias)
    for fn in (reference.patch_embed, ops.patch_embed):
        got = fn(x, to_patch[2].weight, to_patch[2].bias, p, pos, cls, patch_order="hwc", **norms)
        torch.testing.assert_close(got, expected)
    # each option alone, and the conv order with a pre-norm (features ordered (c, i, j))
    patches = Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)(x)
    w2 = to_patch[2].weight
    torch.testing.assert_close(reference.patch_embed(x, w2, None, p, patch_order="hwc"), patches @ w2.T)
    chw = explicit_patch_embed(x, w2.reshape(D, p, p, C).permute(0, 3, 1, 2), None, p)
    torch.testing.assert_close(reference.patch_embed(x, w2, None, p, patch_order="hwc"), chw)
    w4 = torch.randn(D, C, p, p, dtype=torch.float64)
    flat = Rearrange("b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)(x)
    torch.testing.assert_close(
        reference.patch_embed(x, w4, None, p, pre_norm=True, post_norm=True),
        F.layer_norm(F.layer_norm(flat, (K,)) @ w4.reshape(D, -1).T, (D,)),
    )


def test_soft_split_layer_norm_reference_and_autocast():
    x = torch.randn(2, 3, 13, 10, dtype=torch.float64)
    w, b = torch.randn(27, dtype=torch.float64), torch.randn(27, dtype=torch.float64)
    expected = F.layer_norm(explicit_soft_split(x, 3, 2, 1), (27,), w, b, 1e-5)
    torch.testing.assert_close(ops.embed.soft_split_layer_norm(x, 3, 2, 1, w, b), expected)
    torch.testing.assert_close(reference.soft_split_layer_norm(x, 3, 2, 1, w, b), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.embed.soft_split_layer_norm(x.float(), 3, 2, 1, w.float(), b.float())
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: {**a, "patch_order": "cwh"}, ValueError, "patch_order must be one of"),
        (lambda a: {**a, "patch_order": "hwc"}, ValueError, "weight must be a linear weight"),
        (lambda a: {**a, "patch_order": "hwc", "weight": torch.randn(8, 47)}, ValueError, r"weight must have shape \(8, 48\)"),
        (lambda a: {**a, "pre_norm_weight": torch.randn(48)}, ValueError, "pre_norm_weight was given but pre_norm=False"),
        (lambda a: {**a, "pre_norm": True, "pre_norm_bias": torch.randn(47)}, ValueError, r"pre_norm_bias must have shape \(48\)"),
        (lambda a: {**a, "post_norm": True, "post_norm_weight": torch.randn(9)}, ValueError, r"post_norm_weight must have shape \(8\)"),
        (lambda a: {**a, "post_norm": 1}, TypeError, "post_norm must be a bool"),
        (lambda a: {**a, "post_norm": True, "norm_eps": 0.0}, ValueError, "norm_eps must be a positive float"),
    ],
)
def test_patch_embed_bad_options(change, error, match):
    with pytest.raises(error, match=match):
        ops.patch_embed(**change(_pe_args()))


# ---------------------------------------------------------------------------------------- Triton
# Every output and gradient judged by DESIGN.md's numerics rule against fastvit.reference (CPU tests run
# the kernels in Triton's interpreter; tl.dot on bf16 is broken there, so bf16 is GPU-only).

TRITON = {"embed": "triton"}


@contextlib.contextmanager
def tiles(**cfg):
    """Override the interpreter's launch configuration (small tiles cover the tail masking)."""
    from fastvit.kernels import embed as kern

    with overridden(kern.INTERPRETER_TILES, **cfg):
        yield


def fused_patch_embed(**kw):
    with fastvit.use_backend(TRITON):
        return ops.patch_embed(**kw)


def fused_soft_split(**kw):
    with fastvit.use_backend(TRITON):
        return ops.soft_split(**kw)


def fused_ssln(**kw):
    with fastvit.use_backend(TRITON):
        return ops.embed.soft_split_layer_norm(**kw)


def pe_inputs(B, C, H, W, p, D, dtype, *, cls=None, pos=None, bias=True, layout="nchw", x_grad=True, offset=0.0,
              hwc=False, norms=""):
    """patch_embed inputs in ``dtype``: cls in shape ``cls`` ("D", "1D", "11D"), pos in ``pos`` ("LD", "1LD")."""
    x = randn(B, C, H, W, dtype=dtype, offset=offset)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "view":  # T2T / hybrid style: channels_last-like view of a (B, HW, C) token tensor
        x = randn(B, H * W, C, dtype=dtype, offset=offset).transpose(1, 2).reshape(B, C, H, W)
    K = C * p * p
    weight = randn(D, K, dtype=dtype, scale=K**-0.5) if hwc else randn(D, C, p, p, dtype=dtype, scale=K**-0.5)
    L = (H // p) * (W // p) + (cls is not None)
    shapes = {"D": (D,), "1D": (1, D), "11D": (1, 1, D), "LD": (L, D), "1LD": (1, L, D)}
    inputs = {
        "x": x.requires_grad_(x_grad),
        "weight": weight.requires_grad_(),
        "bias": randn(D, dtype=dtype).requires_grad_() if bias else None,
        "patch_size": p,
        "pos_embed": None if pos is None else randn(*shapes[pos], dtype=dtype).requires_grad_(),
        "cls_token": None if cls is None else randn(*shapes[cls], dtype=dtype).requires_grad_(),
    }
    if hwc:
        inputs["patch_order"] = "hwc"
    for which, n in (("pre", K), ("post", D)):
        if which in norms:
            inputs[f"{which}_norm"] = True
            if f"{which}-noaffine" not in norms:
                inputs[f"{which}_norm_weight"] = randn(n, dtype=dtype, offset=1.0, scale=0.2).requires_grad_()
                inputs[f"{which}_norm_bias"] = randn(n, dtype=dtype, scale=0.2).requires_grad_()
    return inputs


FLOATS = [torch.float32, torch.float16]


# A sample of the grid images {32x32, 48x40, 64x64} x patch {4, 8, 16} x channels {1, 3, 64} x D <= 96 x
# cls/pos shapes x layouts, each case in float32 and float16.
PE_CASES = [
    # B, H, W, p, C, D, cls, pos, layout
    (2, 32, 32, 4, 3, 24, "11D", "1LD", "nchw"),
    (2, 32, 32, 8, 1, 16, None, None, "nchw"),
    (1, 32, 32, 16, 64, 24, "D", "LD", "channels_last"),
    (2, 48, 40, 8, 3, 32, None, "LD", "channels_last"),
    (1, 48, 40, 4, 64, 48, "1D", "1LD", "view"),
    (2, 64, 64, 16, 3, 96, "1D", "LD", "nchw"),
    (1, 64, 64, 8, 1, 40, "11D", None, "channels_last"),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B, H, W, p, C, D, cls, pos, layout", PE_CASES)
def test_triton_patch_embed(B, H, W, p, C, D, cls, pos, layout, dtype):
    inputs = pe_inputs(B, C, H, W, p, D, dtype, cls=cls, pos=pos, layout=layout)
    check_against_reference(fused_patch_embed, reference.patch_embed, inputs, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "H, W, p, C, D, norms, hwc, x_grad, offset",
    [
        (32, 32, 4, 3, 48, "pre+post", True, False, 0.0),  # vit-pytorch: images need no gradient
        (48, 40, 8, 3, 64, "pre+post", True, True, 100.0),  # offset patches: one-pass variance would fail
        (64, 64, 16, 1, 32, "pre-noaffine", False, True, 0.0),
        (32, 32, 8, 64, 96, "post", True, True, 0.0),
        (48, 40, 4, 3, 24, "post-noaffine", False, False, 0.0),
        (64, 64, 4, 1, 16, "pre+post-noaffine", True, True, 0.0),
    ],
)
def test_triton_patch_embed_vit_pytorch_form(H, W, p, C, D, norms, hwc, x_grad, offset, dtype):
    inputs = pe_inputs(2, C, H, W, p, D, dtype, cls="1D", pos="LD", x_grad=x_grad, offset=offset, hwc=hwc, norms=norms)
    check_against_reference(fused_patch_embed, reference.patch_embed, inputs, dtype)


def test_triton_patch_embed_noncontiguous_and_expanded_grad():
    dtype = torch.float16
    inputs = pe_inputs(3, 3, 48, 40, 8, 40, dtype, cls="11D", pos="1LD", hwc=True, norms="pre+post")
    inputs["weight"] = noncontiguous(inputs["weight"].detach()).requires_grad_()
    inputs["x"] = randn(3, 3, 80, 96, dtype=dtype).transpose(2, 3)[:, :, ::2, ::2].requires_grad_()  # a strided view
    L = 1 + (48 // 8) * (40 // 8)
    check_against_reference(fused_patch_embed, reference.patch_embed, inputs, dtype, grad_out=expanded_grad((3, L, 40), dtype))
    inputs = pe_inputs(2, 3, 32, 32, 8, 24, torch.float32, cls="D", pos="LD", bias=False)
    inputs["pos_embed"] = randn(1, 40, 24).requires_grad_()[:, 3:20]  # a slice of a bigger table
    check_against_reference(fused_patch_embed, reference.patch_embed, inputs, torch.float32, grad_out=expanded_grad((2, 17, 24), torch.float32))


@pytest.mark.parametrize("norms, hwc, dtype", [("", False, torch.float32), ("pre+post", True, torch.float16), ("pre", False, torch.float32)])
def test_triton_patch_embed_small_tiles_cover_tails(norms, hwc, dtype):
    """16/32 tiles: K, N and M tails, several N tiles per row (post-norm), statistics merged over
    chunks, three dW splits with a ragged last one, and row kernels over many blocks."""
    small = {"fwd": {"BM": 16, "BN": 16, "BK": 128}, "dw": {"BM": 16, "BD": 32, "BK": 256}, "dx": {"BM": 16, "BK": 128, "BD": 16},
             "splits": 5, "rows": 16, "colsum": {"BT": 16, "BD": 16}, "finish": {"BD": 16, "BK": 128}}
    with tiles(**small):  # M = 24 tokens, K = 192, D = 40: every dim has a tail
        inputs = pe_inputs(2, 3, 32, 24, 8, 40, dtype, cls="1D", pos="1LD", hwc=hwc, norms=norms, offset=5.0)
        check_against_reference(fused_patch_embed, reference.patch_embed, inputs, dtype)


T2T_SPLITS = [  # B, C, H, W, k, s, p: T2T-ViT's soft splits (k7s4p2, k3s2p1) at reduced size, non-square maps
    (2, 3, 32, 32, 7, 4, 2),
    (2, 64, 14, 14, 3, 2, 1),
    (2, 5, 13, 9, 3, 2, 1),
    (1, 3, 36, 20, 7, 4, 2),
    (2, 4, 6, 11, 2, 3, 0),  # stride > kernel: some pixels belong to no window
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B, C, H, W, k, s, p", T2T_SPLITS)
def test_triton_soft_split(B, C, H, W, k, s, p, dtype):
    x = randn(B, C, H, W, dtype=dtype).requires_grad_()
    check_against_reference(fused_soft_split, reference.soft_split, {"x": x, "kernel_size": k, "stride": s, "padding": p}, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B, C, H, W, k, s, p", T2T_SPLITS)
def test_triton_soft_split_layer_norm(B, C, H, W, k, s, p, dtype):
    F_ = C * k * k
    inputs = {
        "x": randn(B, C, H, W, dtype=dtype, offset=3.0).requires_grad_(), "kernel_size": k, "stride": s, "padding": p,
        "weight": randn(F_, dtype=dtype, offset=1.0, scale=0.2).requires_grad_(), "bias": randn(F_, dtype=dtype).requires_grad_(),
    }
    check_against_reference(fused_ssln, reference.soft_split_layer_norm, inputs, dtype)


def test_triton_soft_split_layouts_noncontiguous_expanded_grad_and_small_tiles():
    B, C, H, W, L = 2, 16, 14, 10, 7 * 5
    x = randn(B, H * W, C).requires_grad_().transpose(1, 2).reshape(B, C, H, W)  # T2T's fold to a map: channels_last strides
    split = {"kernel_size": 3, "stride": 2, "padding": 1}
    check_against_reference(fused_soft_split, reference.soft_split, {"x": x, **split}, torch.float32,
                            grad_out=expanded_grad((B, L, C * 9), torch.float32))
    check_against_reference(fused_ssln, reference.soft_split_layer_norm, {"x": x, **split, "weight": None, "bias": None}, torch.float32)
    with tiles(unfold={"BT": 16, "BF": 32}, fold={"BC": 4, "BP": 64}, rows=8):  # tails in every dim
        x6 = randn(1, 6, H, W, dtype=torch.float16).requires_grad_()
        check_against_reference(fused_soft_split, reference.soft_split, {"x": x6, **split}, torch.float16)
        inputs = {"x": randn(B, 3, 13, 9).requires_grad_(), "kernel_size": 7, "stride": 4, "padding": 2,
                  "weight": randn(147).requires_grad_(), "bias": None}
        check_against_reference(fused_ssln, reference.soft_split_layer_norm, inputs, torch.float32)
    with fastvit.use_backend(TRITON):
        xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        dx, = torch.autograd.grad(ops.soft_split(xc, 3, 2, 1), (xc,), torch.randn(B, L, C * 9))
        assert dx.is_contiguous(memory_format=torch.channels_last)  # dx comes back in x's memory format
        # LayerNorm parameters only (T2T's first split: the image needs no gradient)
        w, xi, g = torch.randn(C * 9, requires_grad=True), randn(B, C, H, W), torch.randn(B, L, C * 9)
        got = torch.autograd.grad(ops.embed.soft_split_layer_norm(xi, 3, 2, 1, w), (w,), g)[0]
    torch.testing.assert_close(got, torch.autograd.grad(reference.soft_split_layer_norm(xi, 3, 2, 1, w), (w,), g)[0])


def test_triton_autocast_rule():
    """Under autocast the fused ops follow the reference's dtype rule (fp16 autocast on CPU: the
    interpreter's bf16 tl.dot is broken)."""
    x, w, b = torch.randn(2, 3, 16, 16), torch.randn(8, 3, 4, 4), torch.randn(8)
    pos = torch.randn(17, 8)
    cls = torch.randn(8)
    pre = torch.randn(48)
    with torch.autocast("cpu", dtype=torch.float16):
        with fastvit.use_backend(TRITON):
            got = ops.patch_embed(x, w, b, 4, pos, cls)
            got_pre = ops.patch_embed(x, w, b, 4, pos, cls, pre_norm=True, pre_norm_weight=pre, post_norm=True)
            got_ss = ops.soft_split(x, 3, 2, 1)
            got_ssln = ops.embed.soft_split_layer_norm(x, 3, 2, 1)
        ref = reference.patch_embed(x, w, b, 4, pos, cls)
        ref_pre = reference.patch_embed(x, w, b, 4, pos, cls, pre_norm=True, pre_norm_weight=pre, post_norm=True)
        ref_ssln = reference.soft_split_layer_norm(x, 3, 2, 1)
    assert got.dtype == got_pre.dtype == got_ssln.dtype == torch.float16 and got_ss.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got_pre, ref_pre, atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(got_ssln, ref_ssln, atol=2e-3, rtol=2e-3)


def test_triton_infer_op_no_grad_and_deterministic_backward():
    inputs = pe_inputs(2, 3, 32, 32, 8, 24, torch.float32, cls="1D", pos="LD", hwc=True, norms="pre+post")
    with fastvit.use_backend(TRITON):
        with torch.no_grad():
            a = ops.patch_embed(**inputs)
        b = ops.patch_embed(**inputs)
        assert torch.equal(a, b) and b.requires_grad and not a.requires_grad
        wrt = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
        g = torch.randn_like(b)
        first = torch.autograd.grad(b, wrt, g)
        second = torch.autograd.grad(ops.patch_embed(**inputs), wrt, g)
    assert all(torch.equal(u, v) for u, v in zip(first, second))


def test_triton_double_backward_says_so():
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 4, 4, requires_grad=True)
    with fastvit.use_backend(TRITON), pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(ops.patch_embed(x, w, None, 4).sum(), (w,), create_graph=True)


def test_triton_unsupported_inputs_raise_explicitly_and_auto_falls_back(monkeypatch):
    x, w = torch.randn(1, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 4, 4, dtype=torch.float64)
    with fastvit.use_backend(TRITON):
        with pytest.raises(BackendUnavailableError, match="cannot serve patch_embed here: .*float64"):
            ops.patch_embed(x, w, None, 4)
        with pytest.raises(BackendUnavailableError, match="cannot serve soft_split here: .*float64"):
            ops.soft_split(x, 3, 2, 1)
        with pytest.raises(BackendUnavailableError, match="cannot serve soft_split_layer_norm here: .*float64"):
            ops.embed.soft_split_layer_norm(x, 3, 2, 1)
        wide = torch.randn(1, 2048, 3, 3)  # 2048 * 9 features > one tile
        with pytest.raises(BackendUnavailableError, match="18432 features in one tile"):
            ops.embed.soft_split_layer_norm(wide, 3, 1, 1)
        # meta tensors carry no data: a named backend serves them by the op's meaning (shapes)
        assert ops.patch_embed(x.float().to("meta"), w.float().to("meta"), None, 4).shape == (1, 4, 4)
    monkeypatch.setattr(backend, "_auto_arch", lambda args, kwargs: 9)  # as for inputs on an sm_90 GPU
    assert backend.select("patch_embed", x, w, None, (4, 4), None, None).backend == "eager"
    assert backend.select("patch_embed", x.float(), w.float(), None, (4, 4), None, None).backend == "triton"
    assert backend.select("soft_split_layer_norm", wide, (3, 3), (1, 1), (1, 1), None, None, 1e-5).backend == "eager"
    assert backend.select("soft_split", x, (3, 3), (2, 2), (1, 1)).backend == "eager"
    torch.testing.assert_close(ops.patch_embed(x, w, None, 4), reference.patch_embed(x, w, None, 4))


def test_triton_fake_tensors_and_make_fx_trace_forward_and_backward():
    out = run_without_interpreter(
        """
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.proxy_tensor import make_fx
        from fastvit.kernels import embed as kern

        def step(x, w, b, pos, cls, w2, pre_w, post_w, img, ln_w):
            y = kern.patch_embed(x, w, b, (8, 8), pos, cls)
            z = kern.patch_embed(x, w2, None, (8, 8), pos, cls, patch_order="hwc", pre_norm=True,
                                 pre_norm_weight=pre_w, post_norm=True, post_norm_weight=post_w)
            s = kern.soft_split(img, (3, 3), (2, 2), (1, 1))
            t = kern.soft_split_layer_norm(img, (7, 7), (4, 4), (2, 2), ln_w, None, 1e-5)
            return torch.autograd.grad((y.sum(), z.sum(), s.sum(), t.sum()), (x, w, b, pos, cls, w2, pre_w, post_w, img, ln_w))

        def inputs():
            r = lambda *s: torch.randn(*s, requires_grad=True)
            return (r(2, 3, 32, 40), r(48, 3, 8, 8), r(48), r(1, 21, 48), r(48), r(48, 192), r(192), r(48),
                    r(2, 16, 24, 20), r(16 * 49))

        with FakeTensorMode():
            grads = step(*inputs())
            assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in inputs()], grads
            with torch.no_grad():
                assert kern.patch_embed(*inputs()[:2], None, (8, 8)).shape == (2, 20, 48)
        gm = make_fx(step, tracing_mode="fake")(*inputs())
        targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        for fn in ("patch_embed", "soft_split", "soft_split_layer_norm"):
            for stage in ("fwd", "bwd"):
                assert f"fastvit.{fn}_triton_{stage}.default" in targets, (fn, stage, targets)
        print("ok")
        """
    )
    assert out.strip().endswith("ok")


# ---------------------------------------------------------------------------------------- GPU only


def cuda_check(fused_fn, ref_fn, inputs, dtype):
    """check_against_reference on CUDA tensors (the harness would draw its random grad on the CPU)."""
    args = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    shape = ref_fn(**args).shape
    check_against_reference(fused_fn, ref_fn, inputs, dtype, grad_out=torch.randn(shape, device="cuda", dtype=dtype))


def cuda_pe_inputs(*args, **kwargs):
    return {k: (v.detach().cuda().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
            for k, v in pe_inputs(*args, **kwargs).items()}


@pytest.mark.gpu
@pytest.mark.parametrize("x_grad", [False, True])
def test_gpu_vit_b16_bf16(x_grad):
    """ViT-B/16 at 224, batch 256: timm's layout (cls (1, 1, D), pos (1, 197, D)), bf16."""
    inputs = cuda_pe_inputs(256, 3, 224, 224, 16, 768, torch.bfloat16, cls="11D", pos="1LD", x_grad=x_grad)
    cuda_check(fused_patch_embed, reference.patch_embed, inputs, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("norms, layout", [("pre+post", "nchw"), ("post", "channels_last"), ("pre-noaffine", "nchw")])
def test_gpu_vit_pytorch_form(dtype, norms, layout):
    """vit-pytorch's ViT-B/16 patch embedding (hwc patches, LayerNorm, Linear, LayerNorm, 2-D cls/pos)."""
    inputs = cuda_pe_inputs(64, 3, 224, 224, 16, 768, dtype, cls="1D", pos="LD", hwc=True, norms=norms, layout=layout)
    cuda_check(fused_patch_embed, reference.patch_embed, inputs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", PE_CASES)
def test_gpu_cpu_grid(case, dtype):
    """The CPU grid on the GPU (autotuned tiles, compiled kernels; fp32 with TF32 off)."""
    B, H, W, p, C, D, cls, pos, layout = case
    cuda_check(fused_patch_embed, reference.patch_embed, cuda_pe_inputs(B, C, H, W, p, D, dtype, cls=cls, pos=pos, layout=layout), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("C, S, k, s, p", [(3, 224, 7, 4, 2), (64, 56, 3, 2, 1), (64, 28, 3, 2, 1), (64, 30, 3, 2, 1)])
def test_gpu_t2t_splits_bf16(C, S, k, s, p):
    """T2T-ViT-14's three soft splits (and an odd map), alone and with the LayerNorm fused, bf16."""
    B, dt = 32, torch.bfloat16
    tokens = torch.randn(B, S * S, C, device="cuda", dtype=dt)
    x = tokens.transpose(1, 2).reshape(B, C, S, S).requires_grad_()  # as T2T-ViT folds tokens back
    Fdim = C * k * k
    cuda_check(fused_soft_split, reference.soft_split, {"x": x, "kernel_size": k, "stride": s, "padding": p}, dt)
    w = (torch.randn(Fdim, device="cuda", dtype=dt) * 0.2 + 1).requires_grad_()
    b = (torch.randn(Fdim, device="cuda", dtype=dt) * 0.2).requires_grad_()
    cuda_check(fused_ssln, reference.soft_split_layer_norm,
               {"x": x, "kernel_size": k, "stride": s, "padding": p, "weight": w, "bias": b}, dt)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fwd", "dw", "dx"])
def test_gpu_every_autotune_config_is_correct(name, monkeypatch):
    """Each tile config the autotuner may pick gives correct results (not only the fastest one)."""
    import triton

    from fastvit.kernels import embed as kern

    original = kern._tuned
    tuned = original(name)
    for cfg in tuned.configs:
        single = triton.autotune([cfg], key=tuned.keys)(tuned.fn)
        monkeypatch.setattr(kern, "_tuned", lambda n, single=single: single if n == name else original(n))
        for norms in ("", "pre+post"):
            inputs = cuda_pe_inputs(3, 3, 48, 40, 8, 200, torch.float16, cls="1D", pos="LD", hwc=bool(norms), norms=norms)
            cuda_check(fused_patch_embed, reference.patch_embed, inputs, torch.float16)


@pytest.mark.gpu
def test_gpu_opcheck():
    from fastvit._library import get_op

    x = torch.randn(2, 3, 32, 24, device="cuda", requires_grad=True)
    w = torch.randn(16, 3, 8, 8, device="cuda", requires_grad=True)
    w2 = torch.randn(16, 192, device="cuda", requires_grad=True)
    b, g2 = torch.randn(16, device="cuda", requires_grad=True), torch.randn(16, device="cuda", requires_grad=True)
    pos, cls = torch.randn(13, 16, device="cuda", requires_grad=True), torch.randn(1, 1, 16, device="cuda", requires_grad=True)
    g1 = torch.randn(192, device="cuda", requires_grad=True)
    for args in ((x, w, b, pos, cls, None, None, None, None, 8, 8, "chw", False, False, 1e-5),
                 (x, w2, b, pos, cls, g1, None, g2, b, 8, 8, "hwc", True, True, 1e-5)):
        torch.library.opcheck(get_op("patch_embed", "triton", "fwd"), args)
        torch.library.opcheck(get_op("patch_embed", "triton", "infer"), tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    img = torch.randn(2, 16, 14, 10, device="cuda", requires_grad=True)
    torch.library.opcheck(get_op("soft_split", "triton", "fwd"), (img, 3, 3, 2, 2, 1, 1))
    wl = torch.randn(144, device="cuda", requires_grad=True)
    torch.library.opcheck(get_op("soft_split_layer_norm", "triton", "fwd"), (img, wl, None, 3, 3, 2, 2, 1, 1, 1e-5, torch.float32))


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    inputs = cuda_pe_inputs(4, 3, 64, 48, 16, 96, torch.bfloat16, cls="11D", pos="1LD")
    hwc = cuda_pe_inputs(4, 3, 64, 48, 16, 96, torch.bfloat16, cls="1D", pos="LD", hwc=True, norms="pre+post")
    img = torch.randn(4, 64, 28, 28, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(576, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step(inputs, hwc, img, w):
        y = ops.patch_embed(**inputs)
        z = ops.patch_embed(**hwc)
        s = ops.soft_split(img, 3, 2, 1)
        t = ops.embed.soft_split_layer_norm(img, 3, 2, 1, w)
        return y.float().sum() + z.float().sum() + s.float().square().sum() + t.float().square().sum()

    def grads(fn):
        wrt = [v for d in (inputs, hwc) for v in d.values() if isinstance(v, torch.Tensor) and v.requires_grad] + [img, w]
        return torch.autograd.grad(fn(inputs, hwc, img, w), wrt)

    with fastvit.use_backend(TRITON):
        eager = grads(step)
        compiled = grads(torch.compile(step, fullgraph=True))
    for a, c in zip(eager, compiled):
        torch.testing.assert_close(a, c)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    torch.use_deterministic_algorithms(True)
    try:
        for norms in ("", "pre+post"):
            inputs = cuda_pe_inputs(64, 3, 224, 224, 16, 768, torch.bfloat16, cls="11D", pos="1LD", hwc=bool(norms), norms=norms)
            wrt = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
            with fastvit.use_backend(TRITON):
                out = ops.patch_embed(**inputs)
                g = torch.randn_like(out)
                first = torch.autograd.grad(ops.patch_embed(**inputs), wrt, g)
                second = torch.autograd.grad(ops.patch_embed(**inputs), wrt, g)
            assert all(torch.equal(a, b) for a, b in zip(first, second))
        x = torch.randn(16, 64, 56, 56, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(576, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        with fastvit.use_backend(TRITON):
            g = torch.randn(16, 784, 576, device="cuda", dtype=torch.bfloat16)
            a = torch.autograd.grad(ops.embed.soft_split_layer_norm(x, 3, 2, 1, w), (x, w), g)
            b = torch.autograd.grad(ops.embed.soft_split_layer_norm(x, 3, 2, 1, w), (x, w), g)
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    finally:
        torch.use_deterministic_algorithms(False)


SM90_DRIVER = """
import torch
from fastvit.kernels import embed as K

B, D, p = 2, 768, 16
bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
# (input dtype, parameter / output dtype); the last is autocast: fp32 input of a pre-norm or of the fused norm1
for x_dtype, dtype in ((bf16, bf16), (fp16, fp16), (fp32, fp32), (fp32, bf16)):
    # patch_embed at ViT-B/16, 224: timm's conv (cls, pos; NCHW or channels_last), vit-pytorch's hwc with pre and
    # post norms (ViT: cls, pos; SimpleViT: pos only); backward with and without dx
    x = torch.randn(B, 3, 224, 224, dtype=x_dtype)
    cls, pos = torch.randn(1, 1, D, dtype=dtype), torch.randn(1, 197, D, dtype=dtype)
    conv = (torch.randn(D, 3, p, p, dtype=dtype), torch.randn(D, dtype=dtype))
    lin = (torch.randn(D, 3 * p * p, dtype=dtype), torch.randn(D, dtype=dtype))
    norms = [torch.randn(3 * p * p), torch.randn(3 * p * p), torch.randn(D, dtype=dtype), torch.randn(D, dtype=dtype)]
    cases = [(x, *lin, pos, cls, norms, "hwc", True), (x, lin[0], None, pos[:, 1:], None, norms, "hwc", True)]
    if x_dtype == dtype:  # autocast casts x unless a pre-norm takes it
        cl = x.to(memory_format=torch.channels_last)
        cases += [(xx, *conv, pos, cls, [None] * 4, "chw", False) for xx in (x, cl)]
        cases += [(x, *conv, None, None, [None] * 4, "chw", False)]
    for xx, w, b, pe, ct, ns, order, norm in cases:
        args = (xx, w, b, pe, ct, *ns, p, p, order, norm, norm, 1e-5)
        out, *saved = K._patch_embed_fwd_op(*args)
        K._patch_embed_infer_op(*args)
        for need_x in (True, False):
            needs = [need_x] + [t is not None for t in (w, b, pe, ct, *ns)]
            dy = torch.randn(out.shape, dtype=dtype)
            K._patch_embed_bwd_op(dy, *args[:9], *saved, p, p, order, norm, norm, needs)
    # soft_split and soft_split_layer_norm at T2T-ViT-14's three splits; the later two read the previous layer's
    # tokens as a (B, 64, H, W) view (channels last), or a contiguous map
    for shape, k, s, pad in (((B, 3, 224, 224), 7, 4, 2), ((B, 64, 56, 56), 3, 2, 1), ((B, 64, 28, 28), 3, 2, 1)):
        C, H, W = shape[1:]
        geo, F = (k, k, s, s, pad, pad), C * k * k
        xs = [torch.randn(shape, dtype=x_dtype)]
        if C == 64:
            xs.append(torch.randn(B, H * W, C, dtype=x_dtype).transpose(1, 2).reshape(shape))
        for xx in xs:
            if x_dtype == dtype:
                (out,) = K._soft_split_fwd_op(xx, *geo)
                K._soft_split_infer_op(xx, *geo)
                K._soft_split_bwd_op(torch.randn(out.shape, dtype=dtype), xx, *geo)
            for ln in ((torch.randn(F), torch.randn(F)), (torch.randn(F, dtype=dtype), torch.randn(F, dtype=dtype))):
                out, mean, rstd = K._ssln_fwd_op(xx, *ln, *geo, 1e-5, dtype)
                K._ssln_infer_op(xx, *ln, *geo, 1e-5, dtype)
                dy = torch.randn(out.shape, dtype=dtype)
                for need_x in (True, False):  # no dx: T2T-ViT's first split reads the image
                    K._ssln_bwd_op(dy, xx, *ln, mean, rstd, *geo, [need_x, True, True])
"""


@pytest.mark.slow
@sm90.OPT_IN
def test_kernels_compile_for_sm90_without_a_gpu():
    """Every launch the real launchers make (patch_embed conv and hwc with cls/pos and pre/post norms at ViT-B/16,
    soft_split and soft_split_layer_norm at T2T-ViT-14's three splits; forward, inference, backward; bf16 / fp16 /
    fp32 and autocast) compiled for sm_90 through Triton's whole pipeline, without a GPU."""
    sm90.check(SM90_DRIVER)


def test_soft_split_layer_norm_rows_are_16_aligned_views_and_the_performer_reads_them():
    """T2T-ViT's first split (3 x 7 x 7 = 147 features): the fused soft_split_layer_norm writes rows 160
    elements apart and returns the (B, L, 147) view, so the Performer's kernels read 16-byte aligned rows;
    values and gradients are the reference's. The public soft_split stays contiguous, and a width that
    is already a multiple of 16 (64 x 3 x 3 = 576) is not padded."""
    from fastvit import nn as fnn

    x = randn(2, 3, 16, 16, dtype=torch.float32).requires_grad_()
    w, b = randn(147, dtype=torch.float32).requires_grad_(), randn(147, dtype=torch.float32).requires_grad_()
    with fastvit.use_backend(TRITON):
        y = ops.soft_split_layer_norm(x, 7, 4, 2, w, b)
        assert y.shape == (2, 16, 147) and y.stride() == (16 * 160, 160, 1)
        assert ops.soft_split(x, 7, 4, 2).is_contiguous()
        wide = ops.soft_split_layer_norm(randn(1, 64, 8, 8, dtype=torch.float32), 3, 2, 1)
        assert wide.shape == (1, 16, 576) and wide.is_contiguous()
    check_against_reference(
        lambda **kw: _with(TRITON, ops.soft_split_layer_norm, **kw), reference.soft_split_layer_norm,
        {"x": x, "kernel_size": (7, 7), "stride": (4, 4), "padding": (2, 2), "weight": w, "bias": b, "eps": 1e-5},
        torch.float32,
    )
    layer = fnn.TokenPerformer(dim=147, in_dim=64, kernel_ratio=0.5).eval()
    split = fnn.SoftSplit(7, 4, 2)
    img = randn(2, 3, 16, 16, dtype=torch.float32).requires_grad_()
    with fastvit.use_backend({"embed": "triton", "performer": "triton", "mlp": "triton"}):
        out = layer(img, split=split)
        (g_fused,) = torch.autograd.grad(out.sum(), img)
    with fastvit.use_backend("eager"):
        ref = layer(img, split=split)
        (g_ref,) = torch.autograd.grad(ref.sum(), img)
    # The op itself is judged by the numerics rule above; this checks that the Performer, MLP and autograd
    # after it read the padded view right (a misread row would be off by O(1), not by fp32 rounding).
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g_fused, g_ref, atol=1e-4, rtol=1e-4)


def _with(spec, fn, **kwargs):
    with fastvit.use_backend(spec):
        return fn(**kwargs)
