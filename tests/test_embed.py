"""Embed: patch_embed against explicit patch extraction, soft_split against explicit slicing."""

import pytest
import torch
import torch.nn.functional as F

from fastvit import ops, reference


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
