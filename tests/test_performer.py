"""Performer attention: the reference against a loop over tokens and T2T-ViT's official einsums."""

import math

import pytest
import torch

from fastvit import ops, reference


def loop_over_tokens(x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps):
    """Each output token on its own: y_t = sum_s <phi(q_t), phi(k_s)> v_s / (sum_s <phi(q_t), phi(k_s)> + eps)."""
    emb, m = proj_weight.shape[0], w.shape[0]
    kqv = x @ kqv_weight.T + kqv_bias
    k, q, v = kqv[..., :emb], kqv[..., emb : 2 * emb], kqv[..., 2 * emb :]

    def phi(u):
        return torch.exp(w @ u - u.dot(u) / 2) / math.sqrt(m)

    out = torch.empty_like(v)
    for b in range(x.shape[0]):
        kf = [phi(k[b, s]) for s in range(x.shape[1])]
        for t in range(x.shape[1]):
            qf = phi(q[b, t])
            weights = torch.stack([qf.dot(f) for f in kf])
            y = (weights[:, None] * v[b]).sum(0) / (weights.sum() + eps)
            out[b, t] = v[b, t] + y @ proj_weight.T + proj_bias
    return out


def official_single_attn(x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps):
    """T2T-ViT's Token_performer.prm_exp / single_attn, with its einsums (dropout off)."""
    emb, m = proj_weight.shape[0], w.shape[0]
    k, q, v = torch.split(x @ kqv_weight.T + kqv_bias, emb, dim=-1)

    def prm_exp(x):
        xd = ((x * x).sum(dim=-1, keepdim=True)).repeat(1, 1, m) / 2
        wtx = torch.einsum("bti,mi->btm", x, w)
        return torch.exp(wtx - xd) / math.sqrt(m)

    kp, qp = prm_exp(k), prm_exp(q)
    D = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(dim=2)
    kptv = torch.einsum("bin,bim->bnm", v, kp)
    y = torch.einsum("bti,bni->btn", qp, kptv) / (D.repeat(1, 1, emb) + eps)
    return v + y @ proj_weight.T + proj_bias


def params(dim, emb=16, m=8, dtype=torch.float64, grad=False):
    def r(*s, scale=1.0):
        return (torch.randn(*s, dtype=torch.float64) * scale).to(dtype).requires_grad_(grad)

    return {
        "kqv_weight": r(3 * emb, dim, scale=dim**-0.5),
        "kqv_bias": r(3 * emb, scale=0.1),
        "w": r(m, emb, scale=0.5),
        "proj_weight": r(emb, emb, scale=emb**-0.5),
        "proj_bias": r(emb, scale=0.1),
    }


@pytest.mark.parametrize("T, dim", [(1, 147), (7, 64), (49, 576)])
def test_reference_matches_loop_and_official(T, dim):
    x = torch.randn(2, T, dim, dtype=torch.float64)
    p = params(dim)
    out = reference.performer_attention(x, **p, eps=1e-8)
    torch.testing.assert_close(out, loop_over_tokens(x, **p, eps=1e-8))
    torch.testing.assert_close(out, official_single_attn(x, **p, eps=1e-8))


def test_gradcheck_including_w():
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    p = params(12, emb=6, m=3, grad=True)
    names = list(p)
    fn = lambda x, *ps: reference.performer_attention(x, **dict(zip(names, ps)), eps=1e-8)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *p.values()))


def test_autocast_rule_features_in_fp32():
    x = torch.randn(2, 9, 20)
    p = params(20, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.performer_attention(x, **p)
    assert out.dtype == torch.bfloat16
    # GEMM operands rounded to bf16; features, sums and normaliser stay fp32 (w is not rounded).
    cast = {k: (v if k == "w" else v.bfloat16()) for k, v in p.items()}
    assert torch.equal(out, reference.performer_attention(x.bfloat16(), **cast))
    kp = reference.performer_features(torch.randn(3, 16, dtype=torch.bfloat16), p["w"])
    assert kp.dtype == torch.float32


def test_output_in_v_dtype_with_fp32_w():
    x = torch.randn(2, 9, 20, dtype=torch.float16)
    p = {k: (v if k == "w" else v.half()) for k, v in params(20, dtype=torch.float32).items()}
    assert ops.performer_attention(x, **p).dtype == torch.float16


def test_dropout_on_projection_only():
    x = torch.randn(2, 33, 20)
    p = params(20, dtype=torch.float32)
    torch.manual_seed(1)
    a = ops.performer_attention(x, **p, dropout_p=0.5)
    torch.manual_seed(1)
    assert torch.equal(a, ops.performer_attention(x, **p, dropout_p=0.5))
    v = (x @ p["kqv_weight"].T + p["kqv_bias"])[..., 32:]
    torch.testing.assert_close(ops.performer_attention(x, **p, dropout_p=1.0), v)  # only the v skip is left


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: {**a, "x": a["x"][0]}, ValueError, "x must be a 3-D"),
        (lambda a: {**a, "kqv_weight": a["kqv_weight"][:, :5]}, ValueError, "kqv_weight must have shape"),
        (lambda a: {**a, "kqv_bias": a["kqv_bias"][:5]}, ValueError, "kqv_bias must have shape"),
        (lambda a: {**a, "w": a["w"][:, :3]}, ValueError, "w must have shape"),
        (lambda a: {**a, "proj_weight": a["proj_weight"][:, :3]}, ValueError, "proj_weight must have shape"),
        (lambda a: {**a, "proj_weight": a["proj_weight"].double()}, TypeError, "proj_weight has dtype"),
        (lambda a: {**a, "eps": 0.0}, ValueError, "eps must be a positive float"),
        (lambda a: {**a, "dropout_p": -0.1}, ValueError, "dropout_p must be"),
        (lambda a: {**a, "w": a["w"].to("meta")}, ValueError, "w is on meta"),
    ],
)
def test_bad_inputs(change, error, match):
    args = {"x": torch.randn(2, 5, 20), **params(20, dtype=torch.float32)}
    with pytest.raises(error, match=match):
        ops.performer_attention(**change(args))
