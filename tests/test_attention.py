"""Attention: the reference against a plain per-row softmax, its gradients, autocast, bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastvit import ops, reference


def plain_attention(q, k, v, mask=None, scale=None):
    """softmax(q k^T) v one query row at a time; rows with nothing to attend give 0."""
    B, H, Nq, D = q.shape
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros_like(q)
    full = None if mask is None else mask.expand(B, H, Nq, k.shape[2])
    for b in range(B):
        for h in range(H):
            for i in range(Nq):
                s = (k[b, h] @ q[b, h, i]) * scale
                if full is not None:
                    m = full[b, h, i]
                    s = s.masked_fill(~m, -math.inf) if m.dtype == torch.bool else s + m
                if torch.isinf(s).all() and (s < 0).all():
                    continue
                e = torch.exp(s - s.max())
                out[b, h, i] = (e / e.sum()) @ v[b, h]
    return out


def qkv(B, H, Nq, Nk, D, dtype=torch.float64, grad=False):
    q = torch.randn(B, H, Nq, D, dtype=dtype, requires_grad=grad)
    k = torch.randn(B, H, Nk, D, dtype=dtype, requires_grad=grad)
    v = torch.randn(B, H, Nk, D, dtype=dtype, requires_grad=grad)
    return q, k, v


def masks(B, H, Nq, Nk):
    keypad = torch.ones(B, 1, 1, Nk, dtype=torch.bool)
    keypad[0, ..., Nk // 2 :] = False
    full = torch.rand(B, H, Nq, Nk) > 0.3
    full[..., 0] = True
    dead_row = full.clone()
    dead_row[0, 0, Nq - 1] = False  # a query row with nothing to attend
    additive = torch.randn(B, H, Nq, Nk, dtype=torch.float64)
    additive_inf = additive.masked_fill(~dead_row, -math.inf)
    return {"none": None, "keypad": keypad, "bool": full, "dead_row": dead_row, "additive": additive, "additive_inf": additive_inf}


@pytest.mark.parametrize("N", [1, 7, 197])
@pytest.mark.parametrize("mask_kind", ["none", "keypad", "bool", "dead_row", "additive", "additive_inf"])
def test_reference_matches_plain_softmax(N, mask_kind):
    B, H, D = 2, 3, 16
    q, k, v = qkv(B, H, N, N, D)
    mask = masks(B, H, N, N)[mask_kind]
    torch.testing.assert_close(reference.attention(q, k, v, mask), plain_attention(q, k, v, mask))


def test_reference_matches_sdpa_and_scale():
    q, k, v = qkv(2, 3, 9, 13, 32)  # Nq != Nk
    torch.testing.assert_close(reference.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(
        reference.attention(q, k, v, scale=0.3), F.scaled_dot_product_attention(q, k, v, scale=0.3)
    )


def test_fully_masked_row_gives_zero_output_and_gradient():
    B, H, N, D = 1, 2, 5, 8
    q, k, v = qkv(B, H, N, N, D, grad=True)
    for mask in (masks(B, H, N, N)["dead_row"], masks(B, H, N, N)["additive_inf"]):
        out = ops.attention(q, k, v, mask)
        assert torch.equal(out[0, 0, N - 1], torch.zeros(D, dtype=out.dtype))
        gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
        assert torch.isfinite(gq).all() and torch.isfinite(gk).all() and torch.isfinite(gv).all()
        assert torch.equal(gq[0, 0, N - 1], torch.zeros(D, dtype=gq.dtype))
    everything_masked = torch.zeros(B, 1, 1, N, dtype=torch.bool)
    out = ops.attention(q, k, v, everything_masked)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("mask_kind", ["none", "keypad", "dead_row", "additive_inf"])
def test_gradcheck(mask_kind):
    q, k, v = qkv(1, 2, 5, 5, 4, grad=True)
    mask = masks(1, 2, 5, 5)[mask_kind]
    assert torch.autograd.gradcheck(lambda q, k, v: reference.attention(q, k, v, mask), (q, k, v))


def test_strided_views_of_packed_qkv():
    B, N, H, D = 2, 7, 3, 16
    packed = torch.randn(B, N, 3, H, D, dtype=torch.float64)
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    torch.testing.assert_close(ops.attention(q, k, v), plain_attention(q, k, v))


def test_autocast_rule():
    q, k, v = qkv(2, 2, 7, 7, 16, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.attention(q, k, v)
        ref = reference.attention(q, k, v)
    assert out.dtype == torch.bfloat16 and ref.dtype == torch.bfloat16
    expected = reference.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert torch.equal(out, expected) and torch.equal(ref, expected)


def test_dropout_statistics_and_seed():
    q, k, v = qkv(2, 2, 64, 64, 16, dtype=torch.float32)
    v = torch.ones_like(v)  # each output element = sum of kept probabilities / (1 - p)
    torch.manual_seed(0)
    a = ops.attention(q, k, v, dropout_p=0.25)
    torch.manual_seed(0)
    b = ops.attention(q, k, v, dropout_p=0.25)
    assert torch.equal(a, b)
    assert abs(float(a.mean()) - 1.0) < 0.05 and float(a.std()) > 0.01
    assert torch.equal(ops.attention(q, k, v, dropout_p=1.0), torch.zeros_like(a))


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: {**a, "q": a["q"][0]}, ValueError, "q must be a 4-D"),
        (lambda a: {**a, "k": a["k"][..., :8]}, ValueError, "k must have shape"),
        (lambda a: {**a, "v": a["v"][:, :, :3]}, ValueError, "v must have shape"),
        (lambda a: {**a, "q": a["q"].long()}, TypeError, "q must be a floating-point"),
        (lambda a: {**a, "k": a["k"].double()}, TypeError, "k has dtype torch.float64 but q has torch.float32"),
        (lambda a: {**a, "v": a["v"].to("meta")}, ValueError, "v is on meta but q is on cpu"),
        (lambda a: {**a, "mask": torch.ones(2, 5, dtype=torch.bool)}, ValueError, "mask must broadcast"),
        (lambda a: {**a, "mask": torch.ones(2, 1, 1, 7, dtype=torch.int32)}, TypeError, "mask must be boolean"),
        (lambda a: {**a, "mask": torch.zeros(7, 7, requires_grad=True)}, ValueError, "mask must not require grad"),
        (lambda a: {**a, "scale": float("nan")}, ValueError, "scale must be a finite float"),
        (lambda a: {**a, "dropout_p": 1.5}, ValueError, "dropout_p must be a float in"),
        (lambda a: {**a, "q": a["q"][:, :, :0]}, ValueError, "at least one token"),
    ],
)
def test_bad_inputs(change, error, match):
    q, k, v = qkv(2, 3, 7, 7, 16, dtype=torch.float32)
    with pytest.raises(error, match=match):
        ops.attention(**change({"q": q, "k": k, "v": v}))


def test_qkvpacked_matches_attention_on_views():
    B, N, H, D = 2, 7, 3, 16
    qkv = torch.randn(B, N, 3 * H * D, dtype=torch.float64)
    q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    keypad = masks(B, H, N, N)["keypad"]
    expected = plain_attention(q, k, v, keypad, 0.2).transpose(1, 2).reshape(B, N, H * D)
    torch.testing.assert_close(ops.attention_qkvpacked(qkv, H, keypad, 0.2), expected)
    x = qkv.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: reference.attention_qkvpacked(t, H)[:, :3], (x[:1, :4, :],))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.attention_qkvpacked(qkv.float(), H).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.randn(2, 7, 96), 5), ValueError, r"qkv's last dim \(96\) must be 3 \* num_heads"),
        ((torch.randn(2, 7, 96), 0), ValueError, "num_heads must be a positive int"),
        ((torch.randn(7, 96), 2), ValueError, "qkv must be a 3-D"),
        ((torch.randn(2, 7, 96).long(), 2), TypeError, "qkv must be a floating-point"),
        ((torch.randn(2, 7, 96), 2, torch.ones(2, 1, 1, 6, dtype=torch.bool)), ValueError, "mask must broadcast"),
    ],
)
def test_qkvpacked_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        ops.attention_qkvpacked(*args)
