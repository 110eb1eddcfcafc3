"""Attention: the reference against a plain per-row softmax, its gradients, autocast, bad inputs; the Triton
kernels (interpreter on CPU, float32/float16) by the numerics rule; GPU-only checks marked ``gpu``."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import fastvit
from fastvit import BackendUnavailableError, backend, ops, reference
import sm90
from numerics import check_against_reference, expanded_grad, noncontiguous, randn, run_without_interpreter


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
        (lambda a: {k: t[..., :0] for k, t in a.items()}, ValueError, "must have a head dim >= 1"),
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


# ------------------------------------------------------------------------------------------------
# Triton kernel (interpreter on CPU): judged by DESIGN.md's numerics rule against the reference.

TRITON = {"attention": "triton"}
FLOATS = [torch.float32, torch.float16]


@contextlib.contextmanager
def tiles(**cfg):
    """Override the kernels' launch configuration (small tiles cover the tail masking)."""
    from fastvit.kernels import attention as kern

    before = kern.TILES
    kern.TILES = cfg
    try:
        yield
    finally:
        kern.TILES = before


def fused_attention(**kw):
    with fastvit.use_backend(TRITON):
        return ops.attention(**kw)


def fused_qkvpacked(**kw):
    with fastvit.use_backend(TRITON):
        return ops.attention_qkvpacked(**kw)


def triton_inputs(B, H, Nq, Nk, D, dtype, mask=None, scale=None):
    q, k, v = (randn(B, H, n, D, dtype=dtype).requires_grad_() for n in (Nq, Nk, Nk))
    return {"q": q, "k": k, "v": v, "mask": mask, "scale": scale}


def mask_in(mask, dtype):
    """Additive masks in the test dtype (the numerics harness upcasts them for the reference)."""
    return mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)


F32, F16 = torch.float32, torch.float16


# N in {1, 7, 64, 197} x D in {32, 64, 80} x H in {1, 3}, each N in both dtypes (the interpreter is slow)
@pytest.mark.parametrize(
    "N, D, H, dtype",
    [(1, 64, 3, F32), (1, 32, 1, F16), (7, 32, 1, F32), (7, 80, 3, F16), (64, 64, 3, F16), (64, 80, 1, F32),
     (197, 64, 3, F32), (197, 80, 1, F16), (197, 32, 1, F16)],
)
def test_triton_matches_reference(N, D, H, dtype):
    B = 1 if N == 197 else 2
    check_against_reference(fused_attention, reference.attention, triton_inputs(B, H, N, N, D, dtype), dtype)


# every head dim that is a multiple of 8 is served: 8 (a 16-wide tile), 24, 48 (vit-pytorch configs),
# 72 (SigLIP-so400m), 120; forward and backward, packed and unpacked, at N = 7 and 197
@pytest.mark.parametrize("D, N, dtype", [(8, 7, F32), (24, 7, F16), (48, 7, F32), (72, 7, F16), (120, 7, F32),
                                         (48, 197, F32)])
def test_triton_takes_every_head_dim_multiple_of_8(D, N, dtype):
    from fastvit.ops.attention import HEAD_DIMS

    assert D in HEAD_DIMS
    check_against_reference(fused_attention, reference.attention, triton_inputs(2, 2, N, N, D, dtype), dtype)
    qkv = randn(2, N, 3 * 2 * D, dtype=dtype).requires_grad_()
    check_against_reference(fused_qkvpacked, reference.attention_qkvpacked, {"qkv": qkv, "num_heads": 2}, dtype)


@pytest.mark.parametrize(
    "N, mask_kind, dtype",
    [(7, kind, dt) for kind in ("keypad", "bool", "dead_row", "additive", "additive_inf") for dt in FLOATS]
    + [(197, "dead_row", F16), (197, "additive_inf", F32)],
)
def test_triton_masks(N, mask_kind, dtype):
    B, H, D = 2, 2, 64
    mask = mask_in(masks(B, H, N, N)[mask_kind], dtype)
    check_against_reference(fused_attention, reference.attention, triton_inputs(B, H, N, N, D, dtype, mask), dtype)


@pytest.mark.parametrize("kind, dtype", [("2-D", F32), ("per-head", F16), ("expanded-query-mask", F32)])
def test_triton_broadcast_masks_and_cross_attention(kind, dtype):
    B, H, Nq, Nk, D = 2, 2, 9, 13, 32  # Nq != Nk; masks read through stride 0 where broadcast
    if kind == "2-D":
        mask = torch.rand(Nq, Nk) > 0.4
        mask[:, 0] = True
    elif kind == "per-head":
        mask = randn(1, H, Nq, Nk, dtype=dtype)
    else:
        mask = (torch.rand(B, 1, Nq, 1) > 0.2).expand(B, 1, Nq, Nk)
    check_against_reference(
        fused_attention, reference.attention, triton_inputs(B, H, Nq, Nk, D, dtype, mask, scale=0.3), dtype
    )


@pytest.mark.parametrize("D, dtype", [(64, F32), (96, F16), (128, F32)])
def test_triton_strided_views_noncontiguous_and_expanded_grad(D, dtype):
    B, N, H = 2, 7, 2
    packed = randn(B, N, 3, H, D, dtype=dtype)
    q, k, v = (t.requires_grad_() for t in packed.permute(2, 0, 3, 1, 4).unbind(0))  # views: no copy
    assert not q.is_contiguous()
    inputs = {"q": q, "k": k, "v": v, "mask": None, "scale": None}
    check_against_reference(fused_attention, reference.attention, inputs, dtype, grad_out=expanded_grad((B, H, N, D), dtype))
    nc = {name: noncontiguous(t.detach()).requires_grad_() for name, t in inputs.items() if name in "qkv"}
    check_against_reference(fused_attention, reference.attention, {**inputs, **nc}, dtype)


@pytest.mark.parametrize(
    "N, D, H, mask_kind, dtype",
    [(1, 32, 2, "none", F32), (7, 80, 3, "dead_row", F16), (7, 64, 1, "additive_inf", F32), (197, 64, 1, "keypad", F16)],
)
def test_triton_qkvpacked(N, D, H, mask_kind, dtype):
    B = 2
    mask = mask_in(masks(B, H, N, N)[mask_kind], dtype)
    qkv = randn(B, N, 3 * H * D, dtype=dtype).requires_grad_()
    inputs = {"qkv": qkv, "num_heads": H, "mask": mask, "scale": None}
    check_against_reference(fused_qkvpacked, reference.attention_qkvpacked, inputs, dtype)
    check_against_reference(
        fused_qkvpacked, reference.attention_qkvpacked, inputs, dtype, grad_out=expanded_grad((B, N, H * D), dtype)
    )


def test_triton_qkvpacked_noncontiguous_input_and_layouts():
    B, N, H, D, dtype = 2, 7, 2, 32, torch.float32
    qkv = noncontiguous(randn(B, N, 3 * H * D, dtype=dtype)).requires_grad_()
    check_against_reference(fused_qkvpacked, reference.attention_qkvpacked, {"qkv": qkv, "num_heads": H, "scale": 0.2}, dtype)
    x = randn(B, N, 3 * H * D, dtype=dtype, offset=0.0).requires_grad_()
    with fastvit.use_backend(TRITON):
        out = ops.attention_qkvpacked(x, H)
        (dx,) = torch.autograd.grad(out, (x,), torch.ones_like(out))
    assert out.shape == (B, N, H * D) and out.is_contiguous() and dx.shape == x.shape and dx.is_contiguous()


@pytest.mark.parametrize(
    "cfg",
    [
        {"BLOCK_M": 16, "BLOCK_N": 16, "FUSED_BWD": False},  # dQ pass + dK/dV pass, many tail blocks
        {"BLOCK_M": 16, "FUSED_BWD": True},  # one backward pass looping over 3 query blocks
        {"BLOCK_M": 32, "BLOCK_N": 16, "FUSED_BWD": False},
    ],
    ids=["small-two-pass", "small-fused", "rect-two-pass"],
)
def test_triton_small_tiles_cover_tails(cfg):
    B, H, N, D, dtype = 2, 1, 45, 80, torch.float16  # 16 + 16 + 13: partial tail blocks on both axes
    mask = masks(B, H, N, N)["dead_row"]
    with tiles(**cfg):
        check_against_reference(fused_attention, reference.attention, triton_inputs(B, H, N, N, D, dtype, mask), dtype)
        qkv = randn(B, N, 3 * H * D, dtype=dtype).requires_grad_()
        check_against_reference(
            fused_qkvpacked, reference.attention_qkvpacked, {"qkv": qkv, "num_heads": H, "mask": mask}, dtype
        )


@pytest.mark.parametrize("fused_bwd", [True, False])
def test_triton_fully_masked_rows_give_zero_output_gradient_and_inf_lse(fused_bwd):
    from fastvit._library import get_op

    B, H, N, D = 1, 2, 7, 32
    q, k, v = qkv(B, H, N, N, D, dtype=torch.float32, grad=True)
    with fastvit.use_backend(TRITON), tiles(FUSED_BWD=fused_bwd):
        for mask in (masks(B, H, N, N)["dead_row"], masks(B, H, N, N)["additive_inf"].float()):
            out = ops.attention(q, k, v, mask)
            assert torch.equal(out[0, 0, N - 1], torch.zeros(D))
            gq, gk, gv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
            assert all(torch.isfinite(g).all() for g in (gq, gk, gv))
            assert torch.equal(gq[0, 0, N - 1], torch.zeros(D))
        _, lse = get_op("attention", "triton", "fwd")(q, k, v, masks(B, H, N, N)["dead_row"], 0.5)
        assert lse.shape == (B, H, N) and lse.dtype == torch.float32
        assert lse[0, 0, N - 1] == -math.inf and torch.isfinite(lse[0, 0, :-1]).all() and torch.isfinite(lse[0, 1]).all()
        nothing = torch.zeros(B, 1, 1, N, dtype=torch.bool)
        out = ops.attention(q, k, v, nothing)
        gq, gk, gv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        assert not out.any() and not gq.any() and not gk.any() and not gv.any()


def test_triton_infer_op_when_no_grad_and_deterministic_backward():
    q, k, v = qkv(2, 3, 33, 33, 32, dtype=torch.float32, grad=True)
    with fastvit.use_backend(TRITON):
        with torch.no_grad():
            a = ops.attention(q, k, v)
        b = ops.attention(q, k, v)
        assert torch.equal(a, b) and b.requires_grad and not a.requires_grad
        g = torch.randn_like(b)
        first = torch.autograd.grad(b, (q, k, v), g)
        second = torch.autograd.grad(ops.attention(q, k, v), (q, k, v), g)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_triton_backend_serves_nn_attention():
    import fastvit.nn as fnn

    attn = fnn.Attention(64, num_heads=2, qkv_bias=True)  # head dim 32
    x = torch.randn(2, 7, 64, requires_grad=True)
    mask = masks(2, 2, 7, 7)["keypad"]
    expected = attn(x, mask)
    (gx_ref,) = torch.autograd.grad(expected.sum(), (x,))
    with fastvit.use_backend(TRITON):
        out = attn(x, mask)
        (gx,) = torch.autograd.grad(out.sum(), (x,))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)


def test_triton_double_backward_says_so():
    q, k, v = qkv(1, 1, 5, 5, 32, dtype=torch.float32, grad=True)
    with fastvit.use_backend(TRITON), pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(ops.attention(q, k, v).sum(), (q,), create_graph=True)


def test_triton_dropout_uses_the_reference_with_torch_rng():
    q, k, v = qkv(2, 2, 16, 16, 32, dtype=torch.float32)
    x = torch.randn(2, 16, 3 * 2 * 32)
    torch.manual_seed(0)
    with fastvit.use_backend(TRITON):
        a, pa = ops.attention(q, k, v, dropout_p=0.3), ops.attention_qkvpacked(x, 2, dropout_p=0.3)
    torch.manual_seed(0)
    b, pb = reference.attention(q, k, v, dropout_p=0.3), reference.attention_qkvpacked(x, 2, dropout_p=0.3)
    assert torch.equal(a, b) and torch.equal(pa, pb)


def test_triton_unsupported_inputs_raise_explicitly_and_auto_falls_back(monkeypatch):
    q84 = torch.randn(1, 2, 5, 84)  # not a multiple of 8
    q64 = torch.randn(1, 2, 5, 64)
    with fastvit.use_backend(TRITON):
        with pytest.raises(BackendUnavailableError, match="cannot serve attention here: head dim 84"):
            ops.attention(q84, q84, q84)
        with pytest.raises(BackendUnavailableError, match="attention_qkvpacked here: head dim 84"):
            ops.attention_qkvpacked(torch.randn(1, 5, 3 * 2 * 84), 2)
        with pytest.raises(BackendUnavailableError, match="float64"):
            ops.attention(q64.double(), q64.double(), q64.double())
        with pytest.raises(BackendUnavailableError, match="float64"):
            ops.attention_qkvpacked(torch.randn(1, 5, 3 * 2 * 64, dtype=torch.float64), 2)
    monkeypatch.setattr(backend, "_auto_arch", lambda args, kwargs: 9)  # as for inputs on an sm_90 GPU
    assert backend.select("attention", q84, q84, q84, None, None, 0.0).backend == "eager"
    assert backend.select("attention", q64.double(), q64, q64, None, None, 0.0).backend == "eager"
    assert backend.select("attention", q64, q64, q64, None, None, 0.0).backend == "triton"
    assert backend.select("attention_qkvpacked", torch.randn(1, 5, 3 * 84), 1, None, None, 0.0).backend == "eager"
    assert backend.select("attention_qkvpacked", torch.randn(1, 5, 3 * 2 * 80), 2, None, None, 0.0).backend == "triton"
    torch.testing.assert_close(ops.attention(q84, q84, q84), reference.attention(q84, q84, q84))


def test_triton_fake_tensors_and_make_fx_trace_forward_and_backward():
    out = run_without_interpreter(
        """
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.proxy_tensor import make_fx
        from fastvit.kernels import attention as kern

        def step(q, k, v, qkv, mask):
            o = kern.attention(q, k, v, mask, 0.3)
            p = kern.attention_qkvpacked(qkv, 3, mask)
            return torch.autograd.grad((o.sum(), p.sum()), (q, k, v, qkv))

        def inputs():
            q, k, v = (torch.randn(2, 3, 197, 80, requires_grad=True) for _ in range(3))
            qkv = torch.randn(2, 197, 3 * 3 * 80, requires_grad=True)
            return q, k, v, qkv, torch.ones(2, 1, 1, 197, dtype=torch.bool)

        with FakeTensorMode():
            grads = step(*inputs())
            assert [tuple(g.shape) for g in grads] == [(2, 3, 197, 80)] * 3 + [(2, 197, 720)], grads
            with torch.no_grad():
                assert kern.attention_qkvpacked(inputs()[3], 3).shape == (2, 197, 240)
        gm = make_fx(step, tracing_mode="fake")(*inputs())
        targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        for stage in ("fwd", "bwd"):
            for fn in ("attention", "attention_qkvpacked"):
                assert f"fastvit.{fn}_triton_{stage}.default" in targets, (fn, stage, targets)

        # Dynamo traces the public fronts (checks, why_not, dispatch, FusedOp) into one graph holding
        # the triton ops. CPU tensors cannot run the kernels here, so the backend records and stubs.
        import sys
        import fastvit
        from fastvit import backend, ops

        backend.register_availability("triton", lambda: None)
        sys.modules["fastvit.ops.attention"].device_ok = lambda t: None
        graphs = []

        def record(gm, example_inputs):
            graphs.append(gm)
            n_out = len(next(n for n in gm.graph.nodes if n.op == "output").args[0])
            return lambda *args: tuple(torch.zeros(()) for _ in range(n_out))

        def front(q, k, v, qkv, mask):
            return ops.attention(q, k, v, mask, scale=0.3), ops.attention_qkvpacked(qkv, 3, mask)

        with fastvit.use_backend({"attention": "triton"}):
            torch.compile(front, fullgraph=True, backend=record)(*inputs())
        targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
        assert any("attention_triton_fwd" in t for t in targets), targets
        assert any("attention_qkvpacked_triton_fwd" in t for t in targets), targets
        print("ok")
        """
    )
    assert out.strip().endswith("ok")


# ---------------------------------------------------------------------------------------- GPU only


def cuda_inputs(B, H, N, D, dtype, grad=True):
    return [torch.randn(B, H, N, D, device="cuda", dtype=dtype, requires_grad=grad) for _ in range(3)]


def cuda_check(fused_fn, ref_fn, inputs, dtype, grad_out=None):
    """check_against_reference on CUDA tensors (the harness draws its random grad on the CPU)."""
    if grad_out is None:
        out_shape = ref_fn(**{k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}).shape
        grad_out = torch.randn(out_shape, device="cuda", dtype=dtype)
    check_against_reference(fused_fn, ref_fn, inputs, dtype, grad_out=grad_out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N", [197, 729])
@pytest.mark.parametrize("D", [8, 24, 48, 72, 120])
def test_gpu_head_dims_multiple_of_8(N, D, dtype):
    """Head dims padded inside the kernel: 8 (a 16-wide tile), 24, 48, 72 (SigLIP-so400m at N = 729), 120."""
    B, H = 2, 3
    q, k, v = cuda_inputs(B, H, N, D, dtype)
    cuda_check(fused_attention, reference.attention, {"q": q, "k": k, "v": v, "mask": None, "scale": None}, dtype)
    qkv_ = torch.randn(B, N, 3 * H * D, device="cuda", dtype=dtype, requires_grad=True)
    cuda_check(fused_qkvpacked, reference.attention_qkvpacked, {"qkv": qkv_, "num_heads": H}, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N", [197, 577, 785, 3136])
@pytest.mark.parametrize("D", [64, 80])
def test_gpu_numerics(N, D, dtype):
    B, H = 2, 3
    q, k, v = cuda_inputs(B, H, N, D, dtype)
    keypad = torch.ones(B, 1, 1, N, dtype=torch.bool, device="cuda")
    keypad[0, ..., N // 3:] = False
    for mask in (None, keypad):
        cuda_check(fused_attention, reference.attention, {"q": q, "k": k, "v": v, "mask": mask, "scale": None}, dtype)
    qkv_ = torch.randn(B, N, 3 * H * D, device="cuda", dtype=dtype, requires_grad=True)
    cuda_check(fused_qkvpacked, reference.attention_qkvpacked, {"qkv": qkv_, "num_heads": H, "mask": keypad}, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [32, 96, 128])
@pytest.mark.parametrize(
    "N, cfg",
    [(100, {"FUSED_BWD": True, "BLOCK_M": 32, "num_warps": 8}),
     (197, {"FUSED_BWD": False, "BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4}),
     (197, {})],  # {}: the autotuned default
    ids=["one-pass", "two-pass", "default"],
)
def test_gpu_head_dims_and_backward_paths(D, N, cfg):
    B, H, dtype = 2, 4, torch.bfloat16
    mask = masks(B, H, N, N)["dead_row"].cuda()
    q, k, v = cuda_inputs(B, H, N, D, dtype)
    inputs = {"q": q, "k": k, "v": v, "mask": mask, "scale": None}
    with tiles(**cfg) if cfg else contextlib.nullcontext():
        cuda_check(fused_attention, reference.attention, inputs, dtype)
        cuda_check(fused_attention, reference.attention, inputs, dtype, grad_out=expanded_grad((B, H, N, D), dtype).cuda())


@pytest.mark.gpu
def test_gpu_vit_b_shape_and_autocast():
    B, N, H, D = 64, 197, 12, 64
    x = torch.randn(B, N, 3 * H * D, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with fastvit.use_backend(TRITON):
            out = ops.attention_qkvpacked(x, H)
        ref = reference.attention_qkvpacked(x, H)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    qkv_ = torch.randn(B, N, 3 * H * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cuda_check(fused_qkvpacked, reference.attention_qkvpacked, {"qkv": qkv_, "num_heads": H}, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_opcheck():
    from fastvit._library import get_op

    q, k, v = cuda_inputs(2, 3, 197, 64, torch.bfloat16)
    mask = torch.rand(2, 1, 1, 197, device="cuda") > 0.3
    qkv_ = torch.randn(2, 197, 3 * 3 * 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for mk in (None, mask):
        torch.library.opcheck(get_op("attention", "triton", "fwd"), (q, k, v, mk, 0.125))
        torch.library.opcheck(get_op("attention", "triton", "infer"), (q.detach(), k.detach(), v.detach(), mk, 0.125))
        torch.library.opcheck(get_op("attention_qkvpacked", "triton", "fwd"), (qkv_, 3, mk, 0.125))
        torch.library.opcheck(get_op("attention_qkvpacked", "triton", "infer"), (qkv_.detach(), 3, mk, 0.125))
        with torch.no_grad():  # the _bwd ops have no autograd of their own: call them on plain tensors
            o, lse = get_op("attention", "triton", "fwd")(q, k, v, mk, 0.125)
            po, plse = get_op("attention_qkvpacked", "triton", "fwd")(qkv_, 3, mk, 0.125)
        qd, kd, vd, xd = (t.detach() for t in (q, k, v, qkv_))
        torch.library.opcheck(get_op("attention", "triton", "bwd"), (torch.randn_like(o), qd, kd, vd, o, lse, mk, 0.125))
        torch.library.opcheck(
            get_op("attention_qkvpacked", "triton", "bwd"), (torch.randn_like(po), xd, po, plse, mk, 3, 0.125)
        )


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    import fastvit.nn as fnn

    B, N, H, D = 4, 197, 6, 64
    x = torch.randn(B, N, 3 * H * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = cuda_inputs(B, H, N, 80, torch.bfloat16)
    mask = torch.rand(B, 1, 1, N, device="cuda") > 0.2

    def step(x, q, k, v, mask):
        return ops.attention_qkvpacked(x, H, mask).float().square().sum() + ops.attention(q, k, v, mask).float().sum()

    def grads(fn):
        return torch.autograd.grad(fn(x, q, k, v, mask), (x, q, k, v))

    with fastvit.use_backend(TRITON):
        eager = grads(step)
        compiled = grads(torch.compile(step, fullgraph=True))
    for a, c in zip(eager, compiled):  # Inductor may re-tune the kernels' tiles: bf16 rounding may differ
        torch.testing.assert_close(a, c, atol=2e-2, rtol=2e-2)
    attn = fnn.Attention(H * D, H, qkv_bias=True).cuda()
    y = torch.randn(B, N, H * D, device="cuda")
    with fastvit.use_backend(TRITON), torch.autocast("cuda", dtype=torch.bfloat16):
        eager_out = attn(y)
        compiled_out = torch.compile(attn, fullgraph=True)(y)
    torch.testing.assert_close(compiled_out, eager_out, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [197, 3136])
def test_gpu_backward_is_deterministic(N):
    B, H, D = 4, 6, 64
    x = torch.randn(B, N, 3 * H * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(B, N, H * D, device="cuda", dtype=torch.bfloat16)
    torch.use_deterministic_algorithms(True)
    try:
        with fastvit.use_backend(TRITON):
            grads = [torch.autograd.grad(ops.attention_qkvpacked(x, H), (x,), g)[0] for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(grads[0], gr) for gr in grads[1:])


SM90_DRIVER = """
import torch
from fastvit.kernels import attention as K

B, H = 2, 12


def run(D, N, dtype, mask=None, expanded_grad=False):
    q, k, v = (torch.randn(B, H, N, D, dtype=dtype) for _ in range(3))
    o, lse = K._attention_fwd(q, k, v, mask, D**-0.5)
    K._attention_infer(q, k, v, mask, D**-0.5)
    K._attention_bwd(torch.randn(B, H, N, D, dtype=dtype), q, k, v, o, lse, mask, D**-0.5)
    qkv = torch.randn(B, N, 3 * H * D, dtype=dtype)
    o, lse = K._qkvpacked_fwd(qkv, H, mask, D**-0.5)
    K._qkvpacked_infer(qkv, H, mask, D**-0.5)
    do = torch.randn((), dtype=dtype).expand(B, N, H * D) if expanded_grad else torch.randn(B, N, H * D, dtype=dtype)
    K._qkvpacked_bwd(do, qkv, o, lse, mask, H, D**-0.5)


for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for D in (32, 64, 80, 96, 128):
        for N in (50, 197, 577):  # N = 50 (ViT-B/32): the one-pass backward; 197, 577: dQ pass + dK/dV pass
            masks = (None, torch.rand(B, 1, 1, N) > 0.1, torch.rand(1, 1, N, N) > 0.1,  # key padding, full
                     torch.randn(1, 1, N, N, dtype=dtype))  # additive
            for mask in masks:
                run(D, N, dtype, mask)
        run(D, 197, dtype, expanded_grad=True)  # a stride-0 gradient, as from .sum()
    for D in (8, 48, 72):  # BLOCK_D 16 (tl.dot's smallest K), 64 and 128 with the tail masked
        run(D, 50, dtype)
        run(D, 197, dtype)
    run(64, 3136, dtype)
torch.backends.cuda.matmul.allow_tf32 = True  # fp32 through TF32 tensor cores
for D in (32, 64, 128):
    for N in (50, 197):
        run(D, N, torch.float32)
"""


@pytest.mark.slow
@sm90.OPT_IN
def test_kernels_compile_for_sm90_without_a_gpu():
    """Every launch the real launchers make (attention and attention_qkvpacked, forward / inference /
    one-pass and two-pass backward, masks; head dims 8-128 at N = 50, 197, 577 and 3136; bf16 / fp16 /
    fp32 with and without TF32) compiled for sm_90 through Triton's whole pipeline, without a GPU."""
    sm90.check(SM90_DRIVER)


def test_one_pass_backward_covers_vit_sequences(monkeypatch):
    """On a GPU the backward takes one pass (5 matmul-equivalents, dQ written by the program that owns all
    keys) up to 256 keys at head dim <= 64 and 128 keys at 80-128, in 16-bit dtypes; the wide tiles
    autotune over the 8-warp configs only (the 4-warp ones spill at sm_90)."""
    from fastvit.kernels import attention as kern

    monkeypatch.setattr(kern, "interpreting", lambda: False)
    bf16, fp32 = torch.bfloat16, torch.float32
    assert kern._fused_bwd(197, 64, bf16) and kern._fused_bwd(256, 32, bf16) and kern._fused_bwd(100, 128, bf16)
    assert kern._fused_bwd(50, 64, fp32) and not kern._fused_bwd(197, 64, fp32)
    assert not kern._fused_bwd(197, 80, bf16) and not kern._fused_bwd(300, 32, bf16) and not kern._fused_bwd(577, 64, bf16)
    wide = kern._configs("dkdv_fused", False, wide=True)
    assert wide and all(c.num_warps == 8 and c.kwargs["BLOCK_M"] <= 32 for c in wide)


def test_configs_that_spill_at_head_dim_128_are_pruned_for_it_only():
    """At BLOCK_D = 128 (head dims 80-128, 16-bit) the forward's 128x64 / 4-warp and 128x128 / 8-warp
    tiles and dK/dV's 64x64 / 4-warp tile spilled at sm_90: the autotuner does not try them there; at
    head dim 64 it does, and fp32 keeps its own list."""
    from fastvit.kernels import attention as kern

    q16, q32 = torch.empty(1, 1, 1, 1, dtype=torch.bfloat16), torch.empty(1, 1, 1, 1)
    for kind in ("fwd", "dkdv"):
        configs = kern._configs(kind)
        prune = kern._pruner(kind)
        tiles = lambda cs: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in cs}  # noqa: E731
        kept = tiles(prune(configs, {"Q": q16}, BLOCK_D=128))
        assert kept and not kept & kern._SPILL_AT_D128[kind] and kept < tiles(configs)
        assert prune(configs, {"Q": q16}, BLOCK_D=64) == configs
        assert prune(configs, {"Q": q32}, BLOCK_D=128) == configs
    one = [c for c in kern._configs("fwd") if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) == (128, 64, 4)]
    assert kern._pruner("fwd")(one, {"Q": q16}, BLOCK_D=128) == one  # never prunes everything
