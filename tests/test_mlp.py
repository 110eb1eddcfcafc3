"""LayerNorm and LayerNorm-MLP: the reference against torch.nn modules, gradients, autocast, bad inputs;
then the Triton kernels (kernels/mlp.py) against the reference by DESIGN.md's numerics rule."""

import contextlib
import pathlib

import pytest
import sm90
import torch
import torch.nn.functional as F
from numerics import check_against_reference, expanded_grad, noncontiguous, overridden, randn, run_without_interpreter
from torch import nn

import fastvit
from fastvit import nn as fnn
from fastvit import ops, reference
from fastvit.backend import BackendUnavailableError
from fastvit.kernels import mlp as mlp_kernels


def torch_mlp(C, hidden, C_out, dtype=torch.float64, eps=1e-6):
    norm = nn.LayerNorm(C, eps=eps, dtype=dtype)
    fc1, fc2 = nn.Linear(C, hidden, dtype=dtype), nn.Linear(hidden, C_out, dtype=dtype)
    with torch.no_grad():
        norm.weight.normal_(1, 0.1)
        norm.bias.normal_(0, 0.1)
    return norm, fc1, fc2


def mlp_args(norm, fc1, fc2):
    return (norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias)


@pytest.mark.parametrize("shape", [(1, 1, 24), (3, 7, 147), (2, 197, 64)])
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_layer_norm_matches_torch(shape, offset):
    x = torch.randn(*shape, dtype=torch.float64) + offset
    w, b = torch.randn(shape[-1], dtype=torch.float64), torch.randn(shape[-1], dtype=torch.float64)
    torch.testing.assert_close(ops.layer_norm(x, w, b, 1e-5), F.layer_norm(x, shape[-1:], w, b, 1e-5))
    torch.testing.assert_close(ops.layer_norm(x), F.layer_norm(x, shape[-1:]))


def test_layer_norm_offset_data_keeps_precision_in_fp32():
    x = torch.randn(4, 384) + 1000.0
    ref = F.layer_norm(x.double(), (384,))
    assert float((ops.layer_norm(x).double() - ref).abs().max()) < 1e-3
    # The test can fail: a one-pass E[x^2] - E[x]^2 variance in fp32 misses this bound.
    one_pass = (x - x.mean(-1, keepdim=True)) * torch.rsqrt((x * x).mean(-1, keepdim=True) - x.mean(-1, keepdim=True) ** 2 + 1e-5)
    assert float((one_pass.double() - ref).abs().max()) > 1e-3


@pytest.mark.parametrize("rows, C, hidden, C_out", [(1, 24, 96, 24), (7, 147, 64, 147), (197, 64, 192, 32)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layernorm_mlp_matches_torch(rows, C, hidden, C_out, with_residual):
    norm, fc1, fc2 = torch_mlp(C, hidden, C_out)
    x = torch.randn(2, rows, C, dtype=torch.float64)
    residual = torch.randn(2, rows, C_out, dtype=torch.float64) if with_residual else None
    expected = fc2(F.gelu(fc1(norm(x)))) + (0 if residual is None else residual)
    torch.testing.assert_close(ops.layernorm_mlp(x, *mlp_args(norm, fc1, fc2), eps=1e-6, residual=residual), expected)


def test_gradcheck():
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    norm, fc1, fc2 = torch_mlp(6, 10, 6)
    params = mlp_args(norm, fc1, fc2)
    res = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: reference.layernorm_mlp(x, *p[:6], residual=p[6]), (x, *params, res))
    assert torch.autograd.gradcheck(lambda x, w, b: reference.layer_norm(x, w, b), (x, params[0], params[1]))


def test_autocast_rule():
    x = torch.randn(2, 5, 16)
    norm, fc1, fc2 = torch_mlp(16, 32, 16, dtype=torch.float32)
    params = mlp_args(norm, fc1, fc2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ln = ops.layer_norm(x, norm.weight, norm.bias)
        out = ops.layernorm_mlp(x, *params)
        out_res = ops.layernorm_mlp(x, *params, residual=x)
        assert reference.layernorm_mlp(x, *params).dtype == torch.bfloat16
    assert ln.dtype == torch.bfloat16  # statistics in fp32, output in the autocast dtype
    assert torch.equal(ln, F.layer_norm(x, (16,), norm.weight, norm.bias).bfloat16())
    assert out.dtype == torch.bfloat16 and out_res.dtype == torch.float32  # the residual's dtype
    bf = [p.bfloat16() for p in params[2:]]
    assert torch.equal(out, reference.layernorm_mlp(x, *params[:2], *bf))
    assert torch.equal(out_res, x + out.float())


def test_pure_half_precision_and_dropout():
    x = torch.randn(2, 5, 16, dtype=torch.float16)
    norm, fc1, fc2 = torch_mlp(16, 32, 16, dtype=torch.float16)
    assert ops.layernorm_mlp(x, *mlp_args(norm, fc1, fc2)).dtype == torch.float16
    x = torch.randn(4, 64, 16)
    params = mlp_args(*torch_mlp(16, 32, 16, dtype=torch.float32))
    torch.manual_seed(3)
    a = ops.layernorm_mlp(x, *params, dropout_p=0.3)
    torch.manual_seed(3)
    assert torch.equal(a, ops.layernorm_mlp(x, *params, dropout_p=0.3))
    assert not torch.equal(a, ops.layernorm_mlp(x, *params))
    assert torch.equal(ops.layernorm_mlp(x, *params, residual=x, dropout_p=1.0), x)


def _args():
    norm, fc1, fc2 = torch_mlp(16, 32, 8, dtype=torch.float32)
    names = ["ln_weight", "ln_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"]
    return {"x": torch.randn(2, 5, 16), **dict(zip(names, mlp_args(norm, fc1, fc2)))}


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: {**a, "x": torch.randn(2, 5, 15)}, ValueError, r"ln_weight must have shape \(15\)"),
        (lambda a: {**a, "fc1_weight": a["fc1_weight"][:, :8]}, ValueError, "fc1_weight must have shape"),
        (lambda a: {**a, "fc2_weight": a["fc2_weight"][:, :8]}, ValueError, "fc2_weight must have shape"),
        (lambda a: {**a, "fc1_bias": a["fc1_bias"][:3]}, ValueError, "fc1_bias must have shape"),
        (lambda a: {**a, "residual": torch.randn(2, 5, 16)}, ValueError, "residual must have shape"),
        (lambda a: {**a, "fc2_weight": a["fc2_weight"].half()}, TypeError, "fc2_weight has dtype"),
        (lambda a: {**a, "x": a["x"].long()}, TypeError, "x must be a floating-point"),
        (lambda a: {**a, "eps": -1.0}, ValueError, "eps must be a positive float"),
        (lambda a: {**a, "dropout_p": "0.1"}, ValueError, "dropout_p must be"),
        (lambda a: {**a, "fc1_bias": a["fc1_bias"].to("meta")}, ValueError, "fc1_bias is on meta"),
        (lambda a: {**a, "ln_weight": a["ln_weight"][None]}, ValueError, "ln_weight must be a 1-D"),
    ],
)
def test_layernorm_mlp_bad_inputs(change, error, match):
    with pytest.raises(error, match=match):
        ops.layernorm_mlp(**change(_args()))


def test_layer_norm_bad_inputs():
    with pytest.raises(ValueError, match=r"weight must have shape \(16\)"):
        ops.layer_norm(torch.randn(3, 16), torch.ones(15))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.layer_norm([1.0, 2.0])
    with pytest.raises(ValueError, match="x must be a tensor"):
        ops.layer_norm(torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------
# Triton kernels (kernels/mlp.py): judged against fastvit.reference by DESIGN.md's numerics rule.
# On CPU they run in Triton's interpreter (float32, float16); bf16, opcheck and compile on a GPU.
# ---------------------------------------------------------------------------------------------

HAS_GPU = torch.cuda.is_available()
DEV = "cuda" if HAS_GPU else "cpu"
TRITON = {"mlp": "triton"}


def check(fused_fn, ref_fn, inputs, dtype, grad_out=None, autocast_dtype=None):
    """check_against_reference with the upstream gradient on the inputs' device (drawn there on a GPU)."""
    if grad_out is None and DEV == "cuda":
        meta = {k: v.detach().to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        y = getattr(ref_fn, "plain", ref_fn)(**meta)  # shapes only: no autocast on meta
        out_dtype = y.dtype if autocast_dtype is None or inputs.get("residual") is not None else autocast_dtype
        grad_out = torch.randn(y.shape, dtype=out_dtype, device=DEV)
    check_against_reference(fused_fn, ref_fn, inputs, dtype, grad_out=grad_out)


def expanded(shape, dtype):
    """A stride-0 upstream gradient on the test device."""
    return expanded_grad(shape, dtype, DEV)


@contextlib.contextmanager
def interpret_overrides(**kw):
    """Small tiles / split-K / several row blocks per program under the interpreter."""
    from fastvit.kernels import mlp as kernels

    with overridden(kernels.INTERPRET_OVERRIDES, **kw):
        yield


def on_triton(fn, autocast_dtype=None):
    """fn run with the mlp family on Triton (and under autocast when asked)."""

    def run(**kw):
        with fastvit.use_backend(TRITON):
            if autocast_dtype is None:
                return fn(**kw)
            with torch.autocast(kw["x"].device.type, dtype=autocast_dtype):
                return fn(**kw)

    return run


def autocast_ref(fn, autocast_dtype):
    """The reference under autocast, except for float64 inputs (the ground truth runs unrounded)."""

    def run(**kw):
        if kw["x"].dtype == torch.float64:
            return fn(**kw)
        with torch.autocast(kw["x"].device.type, dtype=autocast_dtype):
            return fn(**kw)

    run.plain = fn
    return run


def ln_inputs(shape, dtype, *, offset=0.0, outliers=0, weight=True, bias=True, device=DEV):
    C = shape[-1]
    return {
        "x": randn(*shape, dtype=dtype, offset=offset, outliers=outliers).to(device).requires_grad_(),
        "weight": randn(C, dtype=dtype, offset=1.0, scale=0.2).to(device).requires_grad_() if weight else None,
        "bias": randn(C, dtype=dtype, scale=0.2).to(device).requires_grad_() if bias else None,
        "eps": 1e-5,
    }


def mlp_inputs(lead, C, hidden, C_out=None, dtype=torch.float32, *, residual=True, offset=0.0, outliers=0,
               biases=True, ln_affine=True, param_dtype=None, device=DEV):
    C_out = C_out or C
    pd = param_dtype or dtype

    def param(*shape, scale, offset=0.0):
        return randn(*shape, dtype=pd, scale=scale, offset=offset).to(device).requires_grad_()

    return {
        "x": randn(*lead, C, dtype=dtype, offset=offset, outliers=outliers).to(device).requires_grad_(),
        "ln_weight": param(C, scale=0.2, offset=1.0) if ln_affine else None,
        "ln_bias": param(C, scale=0.2) if ln_affine else None,
        "fc1_weight": param(hidden, C, scale=C ** -0.5),
        "fc1_bias": param(hidden, scale=0.5) if biases else None,
        "fc2_weight": param(C_out, hidden, scale=hidden ** -0.5),
        "fc2_bias": param(C_out, scale=0.5) if biases else None,
        "eps": 1e-6,
        "residual": randn(*lead, C_out, dtype=dtype).to(device).requires_grad_() if residual else None,
    }


# rows in {1, 7, 197, 394}, C in {64, 96, 147, 384}: a sampled grid, each size in both dtypes somewhere.
LN_CASES = [
    ((1, 64), torch.float32, 0.0, 0, True, True),
    ((7, 147), torch.float16, 100.0, 3, True, True),
    ((1, 7, 96), torch.float32, 1000.0, 0, False, True),
    ((1, 197, 147), torch.float32, 100.0, 5, True, False),
    ((197, 384), torch.float16, 0.0, 2, True, True),
    ((2, 197, 64), torch.float16, 0.0, 0, False, False),
    ((2, 197, 384), torch.float32, 100.0, 4, True, True),
    ((1, 394, 96), torch.float16, 0.0, 0, True, True),
]


@pytest.mark.parametrize("shape, dtype, offset, outliers, weight, bias", LN_CASES)
def test_triton_layer_norm(shape, dtype, offset, outliers, weight, bias):
    inputs = ln_inputs(shape, dtype, offset=offset, outliers=outliers, weight=weight, bias=bias)
    check(on_triton(ops.layer_norm), reference.layer_norm, inputs, dtype)


def test_triton_layer_norm_noncontiguous_expanded_grad_and_small_blocks():
    inputs = ln_inputs((3, 23, 147), torch.float32, offset=100.0)
    inputs["x"] = noncontiguous(inputs["x"].detach()).requires_grad_()
    assert not inputs["x"].is_contiguous()
    with interpret_overrides(ln_rows=4, ln_programs=5):  # 69 rows, 18 blocks over 5 looping programs
        check(on_triton(ops.layer_norm), reference.layer_norm, inputs, torch.float32,
                                grad_out=expanded((3, 23, 147), torch.float32))


def test_triton_layer_norm_offset_data_keeps_precision():
    x = torch.randn(4, 384, device=DEV) + 1000.0
    with fastvit.use_backend(TRITON):
        y = ops.layer_norm(x)
    assert float((y.double() - F.layer_norm(x.double(), (384,))).abs().max()) < 1e-3


@pytest.mark.parametrize("autocast_dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_triton_layer_norm_autocast(autocast_dtype):
    """Statistics in fp32 from the fp32 input; the output in the autocast dtype."""
    inputs = ln_inputs((2, 7, 96), torch.float32, offset=10.0)
    with fastvit.use_backend(TRITON), torch.autocast(DEV, dtype=autocast_dtype):
        y = ops.layer_norm(**inputs)
    assert y.dtype == autocast_dtype
    check(on_triton(ops.layer_norm, autocast_dtype), autocast_ref(reference.layer_norm, autocast_dtype),
          inputs, autocast_dtype, autocast_dtype=autocast_dtype)


# (lead, C, hidden, C_out, dtype, residual, offset, outliers)
MLP_CASES = [
    ((1,), 64, 256, None, torch.float32, True, 0.0, 0),
    ((1, 7), 147, 441, None, torch.float32, False, 100.0, 3),
    ((1, 7), 384, 1152, None, torch.float16, True, 0.0, 0),
    ((1, 197), 64, 192, None, torch.float32, True, 0.0, 0),
    ((1, 197), 96, 384, None, torch.float16, True, 0.0, 2),
    ((1, 197), 147, 441, None, torch.float16, False, 100.0, 4),
    ((2, 197), 96, 288, None, torch.float16, True, 0.0, 0),
    ((2, 197), 384, 1536, None, torch.float32, True, 0.0, 0),
    ((1, 7), 96, 288, 64, torch.float16, True, 0.0, 0),  # C_out != C
]


@pytest.mark.parametrize("lead, C, hidden, C_out, dtype, residual, offset, outliers", MLP_CASES)
def test_triton_layernorm_mlp(lead, C, hidden, C_out, dtype, residual, offset, outliers):
    inputs = mlp_inputs(lead, C, hidden, C_out, dtype, residual=residual, offset=offset, outliers=outliers)
    check(on_triton(ops.layernorm_mlp), reference.layernorm_mlp, inputs, dtype)


# SigLIP's tanh GELU and CLIP's QuickGELU: the fused epilogues (forward) and derivative epilogues (backward)
@pytest.mark.parametrize("activation", ["gelu_tanh", "quick_gelu"])
@pytest.mark.parametrize("lead, C, hidden, dtype, residual", [
    ((2, 7), 64, 256, torch.float32, True), ((1, 197), 96, 384, torch.float16, False),
    pytest.param((2, 197), 384, 1536, torch.bfloat16, True, marks=pytest.mark.gpu),
])
def test_triton_layernorm_mlp_activations(activation, lead, C, hidden, dtype, residual):
    inputs = {**mlp_inputs(lead, C, hidden, dtype=dtype, residual=residual), "activation": activation}
    check(on_triton(ops.layernorm_mlp), reference.layernorm_mlp, inputs, dtype)


def test_activation_is_checked():
    inputs = mlp_inputs((2, 3), 16, 32, residual=False)
    with pytest.raises(ValueError, match=r"activation must be one of \('gelu', 'gelu_tanh', 'quick_gelu'\), got 'silu'"):
        ops.layernorm_mlp(**inputs, activation="silu")
    # eager under "auto" means the reference formula
    for act, fn in (("gelu_tanh", lambda h: torch.nn.functional.gelu(h, approximate="tanh")),
                    ("quick_gelu", lambda h: h * torch.sigmoid(1.702 * h))):
        h = torch.randn(5, 7)
        torch.testing.assert_close(reference.apply_activation(h, act), fn(h))


def test_triton_layernorm_mlp_noncontiguous_expanded_grad_no_biases():
    inputs = mlp_inputs((2, 23), 96, 384, dtype=torch.float32, biases=False, ln_affine=False)
    inputs["x"] = noncontiguous(inputs["x"].detach()).requires_grad_()
    inputs["residual"] = noncontiguous(inputs["residual"].detach()).requires_grad_()
    check(on_triton(ops.layernorm_mlp), reference.layernorm_mlp, inputs, torch.float32,
                            grad_out=expanded((2, 23, 96), torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_layernorm_mlp_small_tiles_split_k(dtype):
    """16x16x16 tiles (tails in M, N and K), split-K weight gradients, LN programs looping over rows."""
    inputs = mlp_inputs((1, 21), 40, 72, 24, dtype, offset=3.0)
    with interpret_overrides(mm=(16, 16, 16), split_k=2, ln_rows=4, ln_programs=3):
        check(on_triton(ops.layernorm_mlp), reference.layernorm_mlp, inputs, dtype)


@pytest.mark.parametrize("residual", [False, True])
def test_triton_layernorm_mlp_autocast(residual):
    """fp32 inputs and parameters under autocast: GEMMs in the autocast dtype, the output in it, or in the
    residual's dtype (fp32) with a residual; parameter gradients in fp32."""
    inputs = mlp_inputs((1, 197), 96, 288, dtype=torch.float32, residual=residual, offset=5.0)
    with fastvit.use_backend(TRITON), torch.autocast(DEV, dtype=torch.float16):
        y = ops.layernorm_mlp(**inputs)
    assert y.dtype == (torch.float32 if residual else torch.float16)
    check(on_triton(ops.layernorm_mlp, torch.float16), autocast_ref(reference.layernorm_mlp, torch.float16),
          inputs, torch.float16, autocast_dtype=torch.float16)


def test_triton_layernorm_mlp_saved_outputs_are_written_and_no_grad_uses_infer():
    from fastvit._library import get_op
    from fastvit.kernels import mlp as kernels  # noqa: F401  (registers the ops)

    kw = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in mlp_inputs((3, 7), 64, 192).items()}
    out, h, pre, act, mean, rstd = get_op("layernorm_mlp", "triton", "fwd")(*kw.values())
    for name, t in {"out": out, "h": h, "pre": pre, "act": act, "mean": mean, "rstd": rstd}.items():
        assert torch.isfinite(t).all(), f"{name} has unwritten (NaN-poisoned) elements"
    x2 = kw["x"].reshape(-1, 64)
    torch.testing.assert_close(h, F.layer_norm(x2, (64,), kw["ln_weight"], kw["ln_bias"], 1e-6))
    torch.testing.assert_close(pre, F.linear(h, kw["fc1_weight"], kw["fc1_bias"]))
    torch.testing.assert_close(act, F.gelu(pre))
    torch.testing.assert_close(mean, x2.mean(-1))

    def same(a, b):  # bitwise where the launch config is fixed (interpreter); GPU configs are autotuned
        if DEV == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b)

    same(get_op("layernorm_mlp", "triton", "infer")(*kw.values()), out)
    with fastvit.use_backend(TRITON), torch.no_grad():
        same(ops.layernorm_mlp(**kw), out)


def test_triton_empty_rows():
    kw = mlp_inputs((0,), 64, 128, residual=True)
    with fastvit.use_backend(TRITON):
        y = ops.layernorm_mlp(**kw)
        yl = ops.layer_norm(kw["x"], kw["ln_weight"], kw["ln_bias"])
    assert y.shape == (0, 64) and yl.shape == (0, 64)
    wrt = [v for v in kw.values() if isinstance(v, torch.Tensor)]
    for g, t in zip(torch.autograd.grad(y.sum() + yl.sum(), wrt), wrt):
        assert g.shape == t.shape and not g.any()


def test_triton_layernorm_mlp_dropout_uses_the_reference():
    """dropout_p > 0 is not fused: the Triton backend hands the call to the eager reference (same RNG)."""
    kw = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in mlp_inputs((2, 7), 64, 128).items()}
    torch.manual_seed(5)
    with fastvit.use_backend(TRITON):
        a = ops.layernorm_mlp(**kw, dropout_p=0.25)
    torch.manual_seed(5)
    assert torch.equal(a, reference.layernorm_mlp(**kw, dropout_p=0.25))


def test_triton_unsupported_inputs_raise_and_auto_falls_back():
    x64 = torch.randn(2, 5, 16, dtype=torch.float64, device=DEV)
    w = torch.randn(16, dtype=torch.float64, device=DEV)
    with fastvit.use_backend(TRITON), pytest.raises(BackendUnavailableError, match="float64"):
        ops.layer_norm(x64, w, w)
    kw = {k: (v.detach().double() if isinstance(v, torch.Tensor) else v) for k, v in mlp_inputs((2, 5), 16, 32).items()}
    with fastvit.use_backend(TRITON), pytest.raises(BackendUnavailableError, match="float64"):
        ops.layernorm_mlp(**kw)
    wide = torch.randn(1, 9000, device=DEV)
    with fastvit.use_backend(TRITON), pytest.raises(BackendUnavailableError, match="at most 8192 features, got C = 9000"):
        ops.layer_norm(wide)
    with fastvit.use_backend("auto"):
        torch.testing.assert_close(ops.layer_norm(x64, w, w), reference.layer_norm(x64, w, w))
        torch.testing.assert_close(ops.layernorm_mlp(**kw), reference.layernorm_mlp(**kw))
        assert torch.equal(ops.layer_norm(wide), reference.layer_norm(wide))


def test_triton_backend_serves_the_modules():
    torch.manual_seed(0)
    mlp = fnn.LayerNormMLP(48, 96).to(DEV).eval()
    block = fnn.Block(48, 3, mlp_ratio=2.0).to(DEV).eval()
    x = torch.randn(2, 7, 48, device=DEV)
    with torch.no_grad():
        want_mlp, want_block = mlp(x, residual=x), block(x)
        with fastvit.use_backend(TRITON):
            got_mlp, got_block = mlp(x, residual=x), block(x)
    torch.testing.assert_close(got_mlp, want_mlp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_block, want_block, atol=1e-5, rtol=1e-5)


def test_triton_ops_fake_tensors_and_make_fx():
    """Fake implementations and autograd wiring, traced without the interpreter (kernels are not run)."""
    out = run_without_interpreter(
        """
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.proxy_tensor import make_fx
        from fastvit.kernels import mlp as K

        def make():
            x = torch.randn(2, 7, 32, requires_grad=True)
            ps = [torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True),
                  torch.randn(96, 32, dtype=torch.float16, requires_grad=True), torch.randn(96, dtype=torch.float16, requires_grad=True),
                  torch.randn(24, 96, dtype=torch.float16, requires_grad=True), None]
            return x, ps, torch.randn(2, 7, 24, requires_grad=True)

        with FakeTensorMode():
            x, ps, r = make()
            y = K.layernorm_mlp(x, *ps, 1e-6, r)
            assert y.shape == (2, 7, 24) and y.dtype == torch.float32
            wrt = (x, *ps[:5], r)
            grads = torch.autograd.grad(y.sum(), wrt)
            assert [(g.shape, g.dtype) for g in grads] == [(t.shape, t.dtype) for t in wrt]
            y = K.layernorm_mlp(x, *ps, 1e-6, None)
            assert y.dtype == torch.float16
            yl = K.layer_norm(x, ps[0], None, 1e-5, torch.float16)
            assert yl.dtype == torch.float16
            gx, gw = torch.autograd.grad(yl.float().sum(), (x, ps[0]))
            assert gx.shape == x.shape and gw.shape == (32,) and gx.dtype == torch.float32

        def ops_in(gm):
            return sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "fastvit" in str(n.target)})

        x, ps, r = make()
        train = make_fx(lambda x, *p: torch.autograd.grad(K.layernorm_mlp(x, *p[:5], None, 1e-6, p[5]).sum(), (x, *p)),
                        tracing_mode="fake")(x, *ps[:5], r)
        print(ops_in(train))
        ln = make_fx(lambda x, w, b: torch.autograd.grad(K.layer_norm(x, w, b, 1e-5, x.dtype).sum(), (x, w, b)),
                     tracing_mode="fake")(x, ps[0], ps[1])
        print(ops_in(ln))
        with torch.no_grad():
            print(ops_in(make_fx(lambda x, *p: K.layernorm_mlp(x, *p, 1e-6, None), tracing_mode="fake")(x, *ps)))
        """
    )
    lines = out.strip().splitlines()
    assert lines[0] == "['fastvit.layernorm_mlp_triton_bwd.default', 'fastvit.layernorm_mlp_triton_fwd.default']"
    assert lines[1] == "['fastvit.layer_norm_triton_bwd.default', 'fastvit.layer_norm_triton_fwd.default']"
    assert lines[2] == "['fastvit.layernorm_mlp_triton_infer.default']"


# ---------------------------------------------------------------------------------------------
# GPU: bf16 at ViT sizes, opcheck, torch.compile of a Block, determinism.
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("rows, C, hidden, dtype", [
    ((4, 197), 768, 3072, torch.bfloat16), ((2, 577), 768, 3072, torch.bfloat16), ((1, 785), 384, 1536, torch.bfloat16),
    ((1, 3136), 64, 64, torch.bfloat16), ((2, 197), 1024, 4096, torch.bfloat16), ((4, 197), 768, 3072, torch.float16),
    ((2, 197), 768, 3072, torch.float32), ((1, 577), 147, 441, torch.bfloat16),
])
def test_gpu_layernorm_mlp(rows, C, hidden, dtype):
    inputs = mlp_inputs(rows, C, hidden, dtype=dtype, offset=2.0, outliers=3)
    check(on_triton(ops.layernorm_mlp), reference.layernorm_mlp, inputs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("allow_tf32", [False, True])
def test_gpu_layernorm_mlp_fp32_tf32_rule(allow_tf32):
    """fp32 GEMMs use TF32 only when torch allows it for matmuls (then the eager reference does too)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        inputs = mlp_inputs((2, 197), 384, 1536, dtype=torch.float32)
        check(on_triton(ops.layernorm_mlp), reference.layernorm_mlp, inputs, torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.gpu
@pytest.mark.parametrize("shape, dtype", [((4, 197, 768), torch.bfloat16), ((2, 3136, 64), torch.bfloat16),
                                          ((2, 577, 1024), torch.float16), ((3, 785, 147), torch.float32)])
def test_gpu_layer_norm(shape, dtype):
    inputs = ln_inputs(shape, dtype, offset=100.0, outliers=4)
    check(on_triton(ops.layer_norm), reference.layer_norm, inputs, dtype)


@pytest.mark.gpu
def test_gpu_autocast_bf16():
    inputs = mlp_inputs((4, 197), 768, 3072, dtype=torch.float32)
    check(on_triton(ops.layernorm_mlp, torch.bfloat16), autocast_ref(reference.layernorm_mlp, torch.bfloat16),
          inputs, torch.bfloat16, autocast_dtype=torch.bfloat16)


@pytest.mark.gpu
def test_gpu_opcheck():
    from fastvit._library import get_op
    from fastvit.kernels import mlp as kernels  # noqa: F401  (registers the ops)

    kw = mlp_inputs((2, 7), 64, 256, dtype=torch.bfloat16)
    args = tuple(kw.values())
    torch.library.opcheck(get_op("layernorm_mlp", "triton", "fwd"), args)
    torch.library.opcheck(get_op("layernorm_mlp", "triton", "infer"), tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    det = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    out, h, pre, act, mean, rstd = get_op("layernorm_mlp", "triton", "fwd")(*det)
    x, lw, lb, w1, b1, w2, b2, eps, res = det
    torch.library.opcheck(get_op("layernorm_mlp", "triton", "bwd"),
                          (torch.randn_like(out), x, lw, lb, w1, b1, w2, b2, h, pre, act, mean, rstd))
    ln = ln_inputs((2, 7, 96), torch.float32)
    torch.library.opcheck(get_op("layer_norm", "triton", "fwd"), (ln["x"], ln["weight"], ln["bias"], 1e-5, torch.bfloat16))
    torch.library.opcheck(get_op("layer_norm", "triton", "infer"), (ln["x"].detach(), None, None, 1e-5, torch.float32))


def check_compile_block_fullgraph(spec):
    """A Block under torch.compile(fullgraph=True) matches it uncompiled, with the mlp family on ``spec``."""
    torch.manual_seed(0)
    block = fnn.Block(384, 6, qkv_bias=True).to(DEV)
    x = torch.randn(4, 197, 384, device=DEV, requires_grad=True)
    with fastvit.use_backend(spec):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            want = block(x)
        gx_want = torch.autograd.grad(want.float().sum(), x)[0]
        compiled = torch.compile(block, fullgraph=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = compiled(x)
        gx_got = torch.autograd.grad(got.float().sum(), x)[0]
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gx_got, gx_want, atol=5e-2, rtol=5e-2)


def check_deterministic(spec):
    """Two forward+backward runs on ``spec`` give bitwise-equal outputs and gradients."""
    inputs = mlp_inputs((4, 197), 384, 1536, dtype=torch.bfloat16)
    g = torch.randn(4, 197, 384, device=DEV, dtype=torch.bfloat16)
    runs = []
    with fastvit.use_backend(spec):
        for _ in range(2):
            y = ops.layernorm_mlp(**inputs)
            wrt = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
            runs.append((y, *torch.autograd.grad(y, wrt, g)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_compile_block_fullgraph():
    check_compile_block_fullgraph(TRITON)


@pytest.mark.gpu
def test_gpu_deterministic():
    check_deterministic(TRITON)


SM90_DRIVER = """
import torch
from fastvit.kernels import mlp as K

for gemm_dtype, act_dtype, tf32 in ((torch.bfloat16, torch.float32, False), (torch.float16, torch.float16, False),
                                    (torch.float32, torch.float32, False), (torch.float32, torch.float32, True)):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    B, N, C, H = 2, 197, 768, 3072
    x = torch.randn(B, N, C, dtype=act_dtype)
    ps = [torch.randn(C), torch.randn(C), torch.randn(H, C, dtype=gemm_dtype), torch.randn(H, dtype=gemm_dtype),
          torch.randn(C, H, dtype=gemm_dtype), torch.randn(C, dtype=gemm_dtype)]
    res = torch.randn(B, N, C, dtype=act_dtype)
    out = K._layernorm_mlp_fwd(x, *ps, 1e-6, res)
    K._layernorm_mlp_infer(x, *ps, 1e-6, None)
    K._layernorm_mlp_bwd(torch.randn(B, N, C).expand(B, N, C), x, *ps, *out[1:])
    K._layer_norm_fwd(x, ps[0], ps[1], 1e-5, gemm_dtype)
    K._layer_norm_bwd(torch.randn(B, N, C, dtype=gemm_dtype), x, ps[0], None, out[4], out[5])
    if gemm_dtype == torch.bfloat16:  # tanh GELU and QuickGELU epilogues (forward and derivative)
        for act in (1, 2):
            out = K._layernorm_mlp_fwd(x, *ps, 1e-6, res, act)
            K._layernorm_mlp_bwd(torch.randn(B, N, C).expand(B, N, C), x, *ps, *out[1:], act)
"""


@pytest.mark.slow
@sm90.OPT_IN
def test_kernels_compile_for_sm90_without_a_gpu():
    """Every launch the real launchers make (ViT-B shapes, bf16 / fp16 / fp32 with and without TF32) compiled
    for sm_90 through Triton's whole pipeline (incl. ptxas), without a GPU (tests/sm90.py)."""
    sm90.check(SM90_DRIVER)


# ------------------------------------------------------------------------------------------------
# Split-K of the weight-gradient GEMMs: wave efficiency at ViT shapes, the same rule in C++ and Python
# ------------------------------------------------------------------------------------------------

ROOT = pathlib.Path(__file__).resolve().parents[1]
H100_SMS = 132
VIT_MLPS = {"ViT-S/16": (256, 384, 1536), "ViT-B/16": (256, 768, 3072), "ViT-L/16": (256, 1024, 4096),
            "T2T-ViT-14": (64, 384, 1152), "T2T-ViT-24": (64, 512, 1536)}


@pytest.mark.parametrize("model", VIT_MLPS)
def test_weight_gradient_split_fills_the_waves_at_vit_shapes(model):
    """dW1 (hidden x C) and dW2 (C x hidden), K = batch x 197 rows, 128 x 128 tiles on 132 SMs: at least 0.85
    of every wave busy (ViT-B unsplit: 144 tiles, 2 waves, 0.55)."""
    batch, C, hidden = VIT_MLPS[model]
    K = batch * 197
    for M, N in ((hidden, C), (C, hidden)):
        tiles = -(-M // 128) * -(-N // 128)
        split = mlp_kernels.wave_split_k(tiles, K, H100_SMS)
        assert 1 <= split <= mlp_kernels.SPLIT_K_MAX and K // split >= mlp_kernels.SPLIT_K_MIN_ROWS
        assert mlp_kernels.wave_efficiency(tiles * split, H100_SMS) >= 0.85, (model, M, N, tiles, split)
    tiles_vit_b = 24 * 6
    assert mlp_kernels.wave_efficiency(tiles_vit_b, H100_SMS) < 0.6 and mlp_kernels.wave_split_k(tiles_vit_b, 256 * 197, H100_SMS) == 4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_split_k_weight_gradients(dtype, monkeypatch):
    """32 x 197 rows, C 384, hidden 1536 (ViT-S's MLP at batch 32): the dW GEMMs split K (> 1 slice, fp32
    partials summed in order) and the gradients pass the numerics rule."""
    splits = []
    real = mlp_kernels._split_k
    monkeypatch.setattr(mlp_kernels, "_split_k", lambda *a: splits.append(real(*a)) or splits[-1])
    inputs = mlp_inputs((32, 197), 384, 1536, dtype=dtype)
    with fastvit.use_backend({"mlp": "triton"}):
        check(ops.layernorm_mlp, reference.layernorm_mlp, inputs, dtype)
    assert splits and all(s > 1 for s in splits), splits


def test_weight_gradient_split_is_the_same_rule_in_cuda(tmp_path):
    """csrc/mlp_split_k.h (the CUDA backend's rule), compiled with the host compiler, against kernels/mlp.py."""
    import shutil
    import subprocess

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    cases = [(t, k, s) for t in (1, 3, 27, 36, 96, 144, 256, 1000) for k in (7, 1024, 6304, 12608, 50432, 200000)
             for s in (1, 78, 108, 132)]
    src = tmp_path / "split.cpp"
    src.write_text('#include <cstdio>\n#include "mlp_split_k.h"\nint main() {\n  long long c[][3] = {'
                   + ", ".join(f"{{{t}, {k}, {s}}}" for t, k, s in cases)
                   + '};\n  for (auto& x : c) std::printf("%d\\n", fastvit::mlp::wave_split_k(x[0], x[1], x[2]));\n}\n')
    exe = tmp_path / "split"
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)], check=True)
    got = [int(v) for v in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    assert got == [mlp_kernels.wave_split_k(t, k, s) for t, k, s in cases]
