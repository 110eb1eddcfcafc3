"""Performer attention: the reference against a loop over tokens and T2T-ViT's official einsums; the Triton
kernels (kernels/performer.py) against the reference by the numerics rule, forward and backward."""

import math

import pytest
import torch

import fastvit
from fastvit import ops, reference
from fastvit.backend import BackendUnavailableError
import sm90
from numerics import check_against_reference, expanded_grad, noncontiguous, overridden, randn, run_without_interpreter


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


# ------------------------------------------------------------------------------------------------
# Triton kernels (kernels/performer.py): the numerics rule against the reference, fwd and bwd
# ------------------------------------------------------------------------------------------------

EMB, M = 64, 32


def kernels():
    from fastvit.kernels import performer

    return performer


def fused(**kw):
    with fastvit.use_backend({"performer": "triton"}):
        return ops.performer_attention(**kw)


def t2t_inputs(B, T, dim, dtype, emb=EMB, m=M, w_grad=False, bias=True, w_dtype=torch.float32):
    """T2T-ViT-like inputs: token features of unit scale, k/q/v entries of std ~0.5 (exponents ~ -8 +- 3, so the
    normaliser is far above eps), w orthogonal * sqrt(m) as the official model draws it."""
    w = torch.nn.init.orthogonal_(torch.empty(m, emb, dtype=torch.float64)) * math.sqrt(m)
    inputs = {
        "x": randn(B, T, dim, dtype=dtype).requires_grad_(),
        "kqv_weight": randn(3 * emb, dim, dtype=dtype, scale=0.5 * dim**-0.5).requires_grad_(),
        "kqv_bias": randn(3 * emb, dtype=dtype, scale=0.1).requires_grad_() if bias else None,
        "w": w.to(w_dtype).requires_grad_(w_grad),
        "proj_weight": randn(emb, emb, dtype=dtype, scale=emb**-0.5).requires_grad_(),
        "proj_bias": randn(emb, dtype=dtype, scale=0.1).requires_grad_() if bias else None,
        "eps": 1e-8,
    }
    return inputs


@pytest.fixture
def save_kqv():
    """Force kernels/performer.py's recompute-or-save choice; restored afterwards."""
    k = kernels()
    before = k.FORCE_SAVE_KQV
    yield lambda v: setattr(k, "FORCE_SAVE_KQV", v)
    k.FORCE_SAVE_KQV = before


@pytest.fixture
def small_tiles():
    """Small fixed tiles: several token tiles, splits, K steps and weight-gradient tiles, all with tails."""
    with overridden(kernels().INTERPRETER_TILES, BLOCK_T=16, BLOCK_K=16, SPLIT=3, BLOCK_R=16, SPLITK=3, BLOCK_O=32,
                    BLOCK_D=16):
        yield


# The grid (T in {1, 49, 196, 784}, dim in {147, 576, 64}, emb 64, m 32, batch 1-3), sampled so that every
# T, dim, dtype and both kqv modes (dim 576 saves kqv, 147/64 recompute it) appear.
@pytest.mark.parametrize(
    "B, T, dim, dtype, w_grad",
    [
        (1, 1, 147, torch.float32, False),
        (3, 49, 576, torch.float16, True),
        (2, 196, 64, torch.float32, True),
        (1, 784, 147, torch.float16, False),
        (2, 784, 576, torch.float32, False),
        (3, 196, 147, torch.float16, True),
        (1, 49, 64, torch.float16, False),
    ],
)
def test_triton_matches_reference(B, T, dim, dtype, w_grad):
    check_against_reference(fused, reference.performer_attention, t2t_inputs(B, T, dim, dtype, w_grad=w_grad), dtype)


@pytest.mark.parametrize("save", [False, True])
def test_triton_noncontiguous_x_and_expanded_grad(save, save_kqv):
    save_kqv(save)
    inputs = t2t_inputs(2, 49, 147, torch.float16, w_grad=True)
    inputs["x"] = noncontiguous(inputs["x"].detach()).requires_grad_()
    check_against_reference(fused, reference.performer_attention, inputs, torch.float16,
                            grad_out=expanded_grad((2, 49, EMB), torch.float16))


@pytest.mark.parametrize("save, bias, dtype", [(False, True, torch.float32), (True, False, torch.float16)])
def test_triton_small_tiles_odd_sizes(save, bias, dtype, save_kqv, small_tiles):
    """emb 24 and m 12 (padded feature and channel tiles), dim 37 (K tails), T 45 over 3 splits of 16-token tiles."""
    save_kqv(save)
    inputs = t2t_inputs(2, 45, 37, dtype, emb=24, m=12, w_grad=True, bias=bias)
    check_against_reference(fused, reference.performer_attention, inputs, dtype)


def test_triton_gradient_subsets_and_inference():
    """Only the gradients asked for are computed (dw only when w requires grad); no-grad runs the _infer op."""
    inputs = t2t_inputs(1, 49, 64, torch.float32)
    for name in ("x", "kqv_weight", "kqv_bias", "proj_weight", "proj_bias"):
        inputs[name] = inputs[name].detach()
    inputs["w"].requires_grad_(True)
    check_against_reference(fused, reference.performer_attention, inputs, torch.float32)  # dw alone
    inputs["w"].requires_grad_(False)
    inputs["x"].requires_grad_(True)
    check_against_reference(fused, reference.performer_attention, inputs, torch.float32)  # dx alone
    with torch.no_grad():
        out_infer = fused(**inputs)
    torch.testing.assert_close(out_infer, fused(**inputs), rtol=0, atol=0)


def test_triton_deterministic():
    inputs = t2t_inputs(1, 49, 147, torch.float32, w_grad=True)
    wrt = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    runs = []
    for _ in range(2):
        out = fused(**inputs)
        runs.append((out, *torch.autograd.grad(out, wrt, torch.ones_like(out))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def edge_inputs(T, dtype, beyond: float = 0.0):
    """Inputs whose largest feature exponent A sits at the documented edge 2A + ln(T max(1, max|v|)) = 88.7 - 1
    (plus ``beyond``): half the tokens equal w_0 (exponent |w_0|^2 / 2 = A for k and q), the rest are random."""
    emb, m = EMB, M
    wv = torch.randn(emb, emb, dtype=torch.float64) * 0.5 / math.sqrt(emb)
    kqv_weight = torch.cat([torch.eye(emb), torch.eye(emb), wv])  # k = q = x, v = x wv^T
    w_dir = torch.nn.init.orthogonal_(torch.empty(m, emb, dtype=torch.float64))
    x = torch.randn(1, T, emb, dtype=torch.float64)
    v_max = float((x @ wv.T).abs().max())
    # v of the aligned tokens is w_0 wv^T: |w_0| = sqrt(2A), so bound it by a fixed point iteration.
    A = 20.0
    for _ in range(20):
        v_max_all = max(v_max, float((w_dir[0] * math.sqrt(2 * A) @ wv.T).abs().max()))
        A = (88.7 - 1.0 + beyond - math.log(T * max(1.0, v_max_all))) / 2
    w = w_dir * math.sqrt(2 * A)
    x[:, : T // 2] = w[0]
    return {
        "x": x.to(dtype).requires_grad_(),
        "kqv_weight": kqv_weight.to(dtype).requires_grad_(),
        "kqv_bias": torch.zeros(3 * emb, dtype=dtype).requires_grad_(),
        "w": w.float().requires_grad_(),
        "proj_weight": (torch.randn(emb, emb, dtype=torch.float64) / math.sqrt(emb)).to(dtype).requires_grad_(),
        "proj_bias": torch.zeros(emb, dtype=dtype).requires_grad_(),
        "eps": 1e-8,
    }, A


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_large_exponents_at_the_documented_edge(dtype):
    inputs, A = edge_inputs(49, dtype)
    assert A > 40  # exp(2A) ~ 1e35: the fp32 sums are within a few e-folds of overflowing
    check_against_reference(fused, reference.performer_attention, inputs, dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_triton_beyond_the_edge_overflows_like_the_reference():
    """Past the edge the fp32 normaliser overflows: inf/NaN in the output, as in the fp32 reference (documented)."""
    inputs, _ = edge_inputs(49, torch.float32, beyond=6.0)
    inputs = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    ref = reference.performer_attention(**inputs)
    out = fused(**inputs)
    assert not torch.isfinite(ref).all() and not torch.isfinite(out).all()


def masked_reference(keep, p):
    """reference.performer_attention with dropout replaced by the given keep mask (scaled by 1 / (1 - p))."""

    def ref(x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p=None):
        emb = proj_weight.shape[0]
        kqv = torch.nn.functional.linear(x, kqv_weight, kqv_bias)
        k, q, v = kqv.split(emb, dim=-1)
        acc = torch.promote_types(x.dtype, torch.float32)
        kp, qp = reference.performer_features(k, w), reference.performer_features(q, w)
        y = (qp @ (kp.transpose(1, 2) @ v.to(acc))) / (qp @ kp.sum(dim=1).unsqueeze(-1) + eps)
        out = torch.nn.functional.linear(y.to(v.dtype), proj_weight, proj_bias)
        return v + out * keep.to(out.dtype) / (1 - p)

    return ref


def test_triton_dropout_statistics_and_reproducibility():
    k = kernels()
    p = 0.3
    inputs = {n: (v.detach() if isinstance(v, torch.Tensor) else v) for n, v in t2t_inputs(2, 98, 64, torch.float32).items()}
    torch.manual_seed(7)
    a = fused(**inputs, dropout_p=p)
    torch.manual_seed(7)
    b = fused(**inputs, dropout_p=p)
    assert torch.equal(a, b)  # reproducible under torch.manual_seed
    c = fused(**inputs, dropout_p=p)
    assert not torch.equal(a, c)  # and a fresh draw otherwise
    torch.manual_seed(7)
    keep = k.dropout_keep_mask(k.draw_seed(torch.device("cpu")), 2, 98, EMB, p)
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.02, frac  # 12544 draws: std 0.004
    assert not torch.equal(keep[0], keep[1])  # batches draw their own masks
    # the output is v + kept proj / (1 - p): compare with the mask applied to the reference
    torch.testing.assert_close(a, masked_reference(keep, p)(**inputs, dropout_p=p))
    # p = 1 keeps only the v skip
    v = (inputs["x"] @ inputs["kqv_weight"].T + inputs["kqv_bias"])[..., 2 * EMB :]
    torch.testing.assert_close(fused(**inputs, dropout_p=1.0), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_dropout_backward_uses_the_same_mask(dtype):
    k = kernels()
    p = 0.25
    inputs = t2t_inputs(2, 49, 147, dtype, w_grad=True)
    torch.manual_seed(11)
    keep = k.dropout_keep_mask(k.draw_seed(torch.device("cpu")), 2, 49, EMB, p)
    torch.manual_seed(11)
    check_against_reference(lambda **kw: fused(**kw, dropout_p=p), masked_reference(keep, p), inputs, dtype)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {**a, **{n: a[n].double() for n in ("x", "kqv_weight", "kqv_bias", "proj_weight", "proj_bias")}},
         "x: Triton kernels take float16, bfloat16 or float32, got torch.float64"),
        (lambda a: {**a, "w": a["w"].double()}, "w: Triton kernels take"),
        (lambda a: t2t_inputs(1, 3, 20, torch.float32, emb=160, m=8), "emb = 160 > 128"),
        (lambda a: t2t_inputs(1, 3, 20, torch.float32, emb=16, m=130), "m = 130 random features > 128"),
        (lambda a: {**a, "x": a["x"][..., :0], "kqv_weight": a["kqv_weight"][:, :0]}, "x has no features"),
    ],
)
def test_triton_unsupported_inputs(change, match):
    """Explicit "triton" names the reason; "auto" serves the same inputs (eager)."""
    args = {n: (v.detach() if isinstance(v, torch.Tensor) else v) for n, v in change(t2t_inputs(1, 3, 20, torch.float32)).items()}
    with pytest.raises(BackendUnavailableError, match=match):
        fused(**args)
    impl = fastvit.backend._impls["performer_attention"]["triton"]
    assert impl.reason(*args.values(), 0.0) is not None
    with fastvit.use_backend({"performer": "auto"}):
        out = ops.performer_attention(**args)
    torch.testing.assert_close(out, reference.performer_attention(**args), equal_nan=True)


def test_token_performer_under_triton():
    from fastvit import nn as fnn

    mod = fnn.TokenPerformer(147, EMB).eval()
    x = torch.randn(2, 49, 147)
    with fastvit.use_backend({"performer": "triton"}):
        got = mod(x)
    torch.testing.assert_close(got, mod(x), rtol=1e-4, atol=1e-4)


def test_triton_fake_tensors_and_make_fx():
    """The triton ops' fake implementations and autograd wiring trace (needs triton without the interpreter)."""
    out = run_without_interpreter(
        """
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.proxy_tensor import make_fx
        from fastvit.kernels import performer as k

        def step(x, kw, kb, w, pw, pb):
            y = k.performer_attention(x, kw, kb, w, pw, pb, 1e-8, 0.1)
            return (y, *torch.autograd.grad(y.sum(), (x, kw, kb, w, pw, pb)))

        for dim in (147, 576):  # recompute and save-kqv modes
            args = [torch.randn(2, 49, dim), torch.randn(192, dim), torch.randn(192), torch.randn(32, 64),
                    torch.randn(64, 64), torch.randn(64)]
            with FakeTensorMode() as mode:
                fargs = [mode.from_tensor(a).requires_grad_() for a in args]
                res = step(*fargs)
                assert [tuple(r.shape) for r in res] == [(2, 49, 64)] + [tuple(a.shape) for a in args], res
                with torch.no_grad():
                    assert k.performer_attention(*fargs, 1e-8, 0.0).shape == (2, 49, 64)
            gm = make_fx(step, tracing_mode="fake")(*[a.requires_grad_() for a in args])
            targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            assert {"fastvit.performer_attention_triton_fwd.default",
                    "fastvit.performer_attention_triton_bwd.default"} <= targets, targets
        print("ok")
        """
    )
    assert out.strip().endswith("ok")


# ------------------------------------------------------------------------------------------------
# GPU checks (run on the device machine)
# ------------------------------------------------------------------------------------------------

T2T_LAYERS = [(3136, 147), (784, 576)]  # T2T-ViT-14's two Token_performer layers: (tokens, dim)


def cuda_inputs(B, T, dim, dtype, w_grad=False):
    return {n: (v.detach().cuda().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
            for n, v in t2t_inputs(B, T, dim, dtype, w_grad=w_grad).items()}


@pytest.mark.gpu
@pytest.mark.parametrize("T, dim", T2T_LAYERS)
@pytest.mark.parametrize("B", [64, 256])
def test_gpu_bf16_t2t_layers(B, T, dim):
    """bf16 (what autocast gives the GEMM operands; w stays fp32) by the numerics rule at T2T-ViT-14's layers."""
    inputs = cuda_inputs(B, T, dim, torch.bfloat16, w_grad=(B == 64))
    check_against_reference(fused, reference.performer_attention, inputs, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("T, dim", T2T_LAYERS)
def test_gpu_autocast_equals_explicit_bf16(T, dim):
    inputs = {n: (v.detach() if isinstance(v, torch.Tensor) else v) for n, v in cuda_inputs(8, T, dim, torch.float32).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fused(**inputs)
    cast = {n: (v.bfloat16() if isinstance(v, torch.Tensor) and n != "w" else v) for n, v in inputs.items()}
    assert out.dtype == torch.bfloat16 and torch.equal(out, fused(**cast))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T, dim", T2T_LAYERS)
def test_gpu_fp32_fp16_t2t_layers(T, dim, dtype):
    check_against_reference(fused, reference.performer_attention, cuda_inputs(4, T, dim, dtype, w_grad=True), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("save", [False, True])
def test_gpu_odd_sizes_and_expanded_grad(save, save_kqv):
    save_kqv(save)
    inputs = {n: (v.detach().cuda().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
              for n, v in t2t_inputs(3, 785, 37, torch.bfloat16, emb=24, m=12, w_grad=True).items()}
    inputs["x"] = noncontiguous(inputs["x"].detach()).requires_grad_()
    check_against_reference(fused, reference.performer_attention, inputs, torch.bfloat16,
                            grad_out=torch.randn((), dtype=torch.bfloat16, device="cuda").expand(3, 785, 24))


@pytest.mark.gpu
def test_gpu_opcheck():
    from fastvit._library import get_op

    k = kernels()
    args = [v for v in cuda_inputs(2, 49, 147, torch.float32, w_grad=True).values()]
    seed = k.draw_seed(torch.device("cuda"))
    torch.library.opcheck(get_op("performer_attention", "triton", "fwd"), (*args, 0.1, seed))
    torch.library.opcheck(get_op("performer_attention", "triton", "infer"),
                          (*[a.detach() if isinstance(a, torch.Tensor) else a for a in args], 0.0, None))


@pytest.mark.gpu
@pytest.mark.parametrize("T, dim", T2T_LAYERS)
def test_gpu_compile_fullgraph(T, dim):
    inputs = cuda_inputs(2, T, dim, torch.float32, w_grad=True)
    wrt = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]

    def step(**kw):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = ops.performer_attention(**kw)
        return (out, *torch.autograd.grad(out.float().square().sum(), wrt))

    with fastvit.use_backend({"performer": "triton"}):
        expected = step(**inputs)
        compiled = torch.compile(step, fullgraph=True)(**inputs)
    for a, b in zip(compiled, expected):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("T, dim", T2T_LAYERS)
def test_gpu_deterministic_and_dropout(T, dim):
    k = kernels()
    inputs = cuda_inputs(16, T, dim, torch.bfloat16, w_grad=True)
    wrt = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        out = fused(**inputs, dropout_p=0.1)
        runs.append((out, *torch.autograd.grad(out, wrt, torch.ones_like(out))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    torch.manual_seed(3)
    keep = k.dropout_keep_mask(k.draw_seed(torch.device("cuda")), 16, T, EMB, 0.1)
    assert abs(keep.float().mean().item() - 0.9) < 0.005
    plain = {n: (v.detach() if isinstance(v, torch.Tensor) else v) for n, v in inputs.items()}
    torch.testing.assert_close(runs[0][0], masked_reference(keep, 0.1)(**plain, dropout_p=0.1), rtol=2e-2, atol=2e-2)


SM90_DRIVER = """
import torch
from fastvit.kernels import performer as K

B, E, M = 2, 64, 32
for dtype, w_dtype in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float32),
                       (torch.bfloat16, torch.bfloat16)):
    for T, dim in ((3136, 147), (784, 576)):  # T2T-ViT-14's two Token_performer layers
        x = torch.randn(B, T, dim, dtype=dtype)
        w = torch.randn(M, E, dtype=w_dtype)
        ps = (torch.randn(3 * E, dim, dtype=dtype), torch.randn(3 * E, dtype=dtype), w,
              torch.randn(E, E, dtype=dtype), torch.randn(E, dtype=dtype))
        for p, seed in ((0.0, None), (0.1, K.draw_seed(x.device))):
            args = (x, *ps, 1e-8, p, seed)
            out, ksum, kptv, kqv = K._fwd_op(*args)
            K._infer_op(*args)
            g = torch.randn(B, T, E, dtype=dtype)
            for needs in ((True, True, True), (True, True, False)):  # dw when w requires grad (not T2T-ViT's default)
                K._bwd_op(g, *args, ksum, kptv, kqv, *needs)
        # an expanded gradient (stride 0, from .sum())
        K._bwd_op(torch.randn((), dtype=dtype).expand(B, T, E), *args, ksum, kptv, kqv, True, True, False)
        K.dropout_keep_mask(K.draw_seed(x.device), B, T, E, 0.1)
"""


@pytest.mark.slow
@sm90.OPT_IN
def test_kernels_compile_for_sm90_without_a_gpu():
    """Every launch the real launchers make (T2T-ViT-14's two layers; forward, inference, backward with and
    without dx and dw, dropout; bf16 / fp16 / fp32) compiled for sm_90 through Triton's whole pipeline, without
    a GPU."""
    sm90.check(SM90_DRIVER)
