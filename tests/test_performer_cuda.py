"""The CUDA backend of the performer family (csrc/performer*.{h,cu,cpp}, fastvit/csrc/performer.py).

CPU, in CI: the ops have the Triton ops' schemas, fakes and autograd; the front's and the C++ checks' errors;
"auto" falls back. The kernels' own code (csrc/performer_kernel.h) runs on CPU through the warp emulator
(csrc/emulate.h), judged by DESIGN.md's numerics rule through the ops' autograd, in float32, float16 and
bfloat16; the fused dropout draws the Triton kernels' mask. GPU (``gpu`` marker): T2T-ViT-14 / -24's layers
on the device, opcheck, torch.compile of the T2T module, determinism; compute-sanitizer runs in
``fastvit-gpu-check``.
"""

import importlib

import pytest
import torch
from numerics import check_against_reference, expanded_grad, noncontiguous, run_without_interpreter
from test_performer import EMB, T2T_LAYERS, edge_inputs, masked_reference, t2t_inputs

import fastvit
from fastvit import backend, ops, reference
from fastvit._library import get_op
from fastvit.backend import BackendUnavailableError

CUDA = {"performer": "cuda"}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(scope="module")
def emu(emulator):
    """The CUDA performer ops' CPU kernels: the kernel bodies under the warp emulator."""
    from fastvit.csrc import performer as cuda

    return cuda


def op_args(inputs, dropout_p=0.0, seed=None):
    i = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    return (i["x"], i["kqv_weight"], i["kqv_bias"], i["w"], i["proj_weight"], i["proj_bias"], i["eps"], dropout_p, seed)


# ---------------------------------------------------------------------------------------------
# CPU: schemas, fakes, errors, fallbacks
# ---------------------------------------------------------------------------------------------


def test_extension_has_the_triton_schemas(ext):
    from fastvit.kernels import performer  # noqa: F401  (registers the Triton ops)

    for stage in ("fwd", "infer", "bwd"):
        c, t = get_op("performer_attention", "cuda", stage)._schema, get_op("performer_attention", "triton", stage)._schema
        assert [(a.name, str(a.type)) for a in c.arguments] == [(a.name, str(a.type)) for a in t.arguments], stage
        assert [str(r.type) for r in c.returns] == [str(r.type) for r in t.returns], stage


def test_cuda_ops_fake_tensors_and_make_fx(ext):
    out = run_without_interpreter(
        """
        import torch
        from torch.fx.experimental.proxy_tensor import make_fx
        from fastvit import _ext
        _ext.load(build_if_missing=False)
        from fastvit.csrc import performer as K

        def step(x, kw, kb, w, pw, pb):
            y = K.performer_attention(x, kw, kb, w, pw, pb, 1e-8, 0.1)
            return torch.autograd.grad(y.float().sum(), (x, kw, kb, w, pw, pb))

        r = lambda *s: torch.empty(*s, device="meta", dtype=torch.bfloat16, requires_grad=True)
        args = (r(2, 49, 147), r(192, 147), r(192), torch.empty(32, 64, device="meta", requires_grad=True), r(64, 64), r(64))
        gm = make_fx(step, tracing_mode="fake")(*args)
        targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        for stage in ("fwd", "bwd"):
            assert f"fastvit.performer_attention_cuda_{stage}.default" in targets, sorted(targets)
        grads = step(*args)
        assert [g.shape for g in grads] == [a.shape for a in args] and grads[3].dtype == torch.float32
        print("ok")
        """
    )
    assert "ok" in out


def test_front_reasons_and_auto_fallback(ext, monkeypatch):
    perf = importlib.import_module("fastvit.ops.performer")
    inputs = t2t_inputs(1, 7, 64, F32)
    args = op_args(inputs)[:-1]
    assert "x: the CUDA backend needs CUDA tensors, got one on cpu" in backend._impls["performer_attention"]["cuda"].reason(*args)

    class FakeCuda:
        def __init__(self, shape, dtype=F16):
            self.shape, self.dtype, self.device = shape, dtype, torch.device("cuda", 0)

    x, kw, w, pw = FakeCuda((2, 49, 147)), FakeCuda((3 * 256, 147)), FakeCuda((32, 256), F32), FakeCuda((256, 256))
    assert "emb = 256, m = 32" in perf._cuda_why_not(x, kw, None, w, pw, None, 1e-8, 0.0)
    assert perf._cuda_why_not(x, FakeCuda((192, 147)), None, FakeCuda((32, 64), F32), FakeCuda((64, 64)), None, 1e-8,
                              0.0) is None
    assert "float64" in perf._cuda_why_not(FakeCuda((2, 49, 147), torch.float64), kw, None, w, pw, None, 1e-8, 0.0)
    monkeypatch.setitem(backend._availability, "cuda", lambda: None)
    backend._availability_cache.pop(("cuda", False), None)
    try:
        with fastvit.use_backend(CUDA), pytest.raises(BackendUnavailableError, match="x: the CUDA backend needs CUDA"):
            ops.performer_attention(**{k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()})
    finally:
        backend._availability_cache.pop(("cuda", False), None)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: (a[0].half(), *a[1:]), "kqv_weight and proj_weight must have x's dtype"),
        (lambda a: (*a[:3], torch.randn(200, 64), *a[4:]), r"m \* emb <= 4096"),
        (lambda a: (*a[:7], 0.5, None), "dropout_p > 0 needs a seed tensor"),
        (lambda a: (a[0][0], *a[1:]), r"x must be a 3-D token tensor \(B, T, dim\)"),
        (lambda a: (a[0], a[1][:, :10], *a[2:]), r"kqv_weight must be \(3 \* emb, dim\)"),
    ],
)
def test_cpp_checks_name_the_argument(emu, change, match):
    with pytest.raises(RuntimeError, match=match):
        get_op("performer_attention", "cuda", "infer")(*change(op_args(t2t_inputs(1, 7, 64, F32))))


# ---------------------------------------------------------------------------------------------
# CPU: the kernels under the warp emulator, by the numerics rule
# ---------------------------------------------------------------------------------------------


def fused(cuda):
    return lambda **kw: cuda.performer_attention(**kw)


@pytest.mark.parametrize(
    "B, T, dim, dtype, w_grad",
    [
        (1, 1, 147, F32, False),
        (2, 49, 576, F16, True),
        (2, 196, 64, BF16, True),
        (1, 784, 147, F16, False),
        (3, 49, 147, BF16, True),
        (2, 70, 64, F32, True),
    ],
)
def test_emulated_matches_reference(emu, B, T, dim, dtype, w_grad):
    check_against_reference(fused(emu), reference.performer_attention, t2t_inputs(B, T, dim, dtype, w_grad=w_grad), dtype)


@pytest.mark.parametrize("emb, m, dim, bias, dtype", [(24, 12, 37, False, F32), (72, 56, 20, True, BF16),
                                                      (8, 3, 5, True, F16)])
def test_emulated_odd_sizes(emu, emb, m, dim, bias, dtype):
    inputs = t2t_inputs(2, 23, dim, dtype, emb=emb, m=m, w_grad=True, bias=bias)
    check_against_reference(fused(emu), reference.performer_attention, inputs, dtype)


def test_emulated_noncontiguous_x_expanded_grad_and_subsets(emu):
    inputs = t2t_inputs(2, 49, 147, F16)
    inputs["x"] = noncontiguous(inputs["x"].detach()).requires_grad_()
    check_against_reference(fused(emu), reference.performer_attention, inputs, F16,
                            grad_out=expanded_grad((2, 49, EMB), F16))
    only_w = t2t_inputs(1, 30, 64, F32, w_grad=True)
    for k in ("x", "kqv_weight", "kqv_bias", "proj_weight", "proj_bias"):
        only_w[k] = only_w[k].detach()
    check_against_reference(fused(emu), reference.performer_attention, only_w, F32)
    only_proj = t2t_inputs(1, 30, 64, BF16)
    for k in ("x", "kqv_weight", "kqv_bias"):
        only_proj[k] = only_proj[k].detach()
    check_against_reference(fused(emu), reference.performer_attention, only_proj, BF16)


@pytest.mark.parametrize("dtype", [F32, F16])
def test_emulated_large_exponents_at_the_documented_edge(emu, dtype):
    inputs, A = edge_inputs(49, dtype)
    assert A > 40
    check_against_reference(fused(emu), reference.performer_attention, inputs, dtype)


def test_emulated_dropout_draws_the_triton_mask_and_backward_uses_it(emu):
    from fastvit.kernels import performer as tk

    p = 0.25
    inputs = t2t_inputs(2, 49, 147, F16, w_grad=True)
    torch.manual_seed(11)
    keep = tk.dropout_keep_mask(tk.draw_seed(torch.device("cpu")), 2, 49, EMB, p)
    torch.manual_seed(11)  # the CUDA entry draws its seed the same way: the same mask, bit for bit
    check_against_reference(lambda **kw: emu.performer_attention(**kw, dropout_p=p), masked_reference(keep, p), inputs, F16)
    # p = 1 keeps only the v skip: bit for bit the v of the kernel's own projection, which the forward returns
    # for the backward (torch's float16 linear on CPU rounds a few of those values the other way on some CPUs)
    out, _, _, kqv = get_op("performer_attention", "cuda", "fwd")(*op_args(inputs, 1.0, tk.draw_seed(torch.device("cpu"))))
    assert torch.equal(out, kqv[..., 2 * EMB:])
    plain = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    assert torch.equal(emu.performer_attention(**plain, dropout_p=1.0), out)  # the inference kernel's the same


def test_emulated_inference_determinism_and_empty(emu):
    inputs = t2t_inputs(2, 40, 64, F32, w_grad=True)
    with torch.no_grad():
        a = emu.performer_attention(**inputs)
    wrt = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    runs = []
    for _ in range(2):
        out = emu.performer_attention(**inputs)
        runs.append((out, *torch.autograd.grad(out, wrt, torch.ones_like(out))))
    assert torch.equal(a, runs[0][0]) and all(torch.equal(u, v) for u, v in zip(*runs))
    empty = t2t_inputs(2, 0, 64, F32, w_grad=True)
    out = emu.performer_attention(**empty)
    assert out.shape == (2, 0, EMB)
    g = torch.autograd.grad(out.sum(), [empty["kqv_weight"], empty["w"], empty["proj_bias"]])
    assert all((t == 0).all() for t in g)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


def on_cuda(**kw):
    with fastvit.use_backend(CUDA):
        return ops.performer_attention(**kw)


def gpu_inputs(B, T, dim, dtype, **kw):
    return {k: (v.detach().cuda().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
            for k, v in t2t_inputs(B, T, dim, dtype, **kw).items()}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("T, dim", T2T_LAYERS)
def test_gpu_t2t_layers(ext, T, dim, dtype):
    """T2T-ViT-14 and -24 share the T2T module: its two Token_performer layers (emb 64, m 32)."""
    B = 8 if dtype == F32 else 16
    check_against_reference(on_cuda, reference.performer_attention, gpu_inputs(B, T, dim, dtype, w_grad=True), dtype,
                            grad_out=torch.randn(B, T, EMB, device="cuda", dtype=dtype))


@pytest.mark.gpu
def test_gpu_noncontiguous_expanded_grad_and_dropout_mask(ext):
    from fastvit.kernels import performer as tk

    inputs = gpu_inputs(8, 784, 576, BF16)
    inputs["x"] = noncontiguous(inputs["x"].detach()).requires_grad_()
    check_against_reference(on_cuda, reference.performer_attention, inputs, BF16,
                            grad_out=expanded_grad((8, 784, EMB), BF16, "cuda"))
    p = 0.1
    torch.manual_seed(5)
    keep = tk.dropout_keep_mask(tk.draw_seed(torch.device("cuda")), 8, 784, EMB, p)
    torch.manual_seed(5)
    check_against_reference(lambda **kw: on_cuda(**kw, dropout_p=p), masked_reference(keep, p),
                            gpu_inputs(8, 784, 576, BF16, w_grad=True), BF16,
                            grad_out=torch.randn(8, 784, EMB, device="cuda", dtype=BF16))


@pytest.mark.gpu
def test_gpu_opcheck(ext):
    from torch.library import opcheck

    args = op_args(gpu_inputs(2, 49, 147, F32, w_grad=True))
    opcheck(get_op("performer_attention", "cuda", "fwd"), args)
    opcheck(get_op("performer_attention", "cuda", "infer"), args)


@pytest.mark.gpu
def test_gpu_compile_fullgraph_of_the_t2t_module(ext):
    from fastvit.models.t2t_vit import T2TModule

    t2t = T2TModule(224, embed_dim=384).cuda().eval()
    x = torch.randn(4, 3, 224, 224, device="cuda", requires_grad=True)
    with fastvit.use_backend({"performer": "cuda", "embed": "cuda"}), torch.autocast("cuda", dtype=BF16):
        eager = t2t(x)
        compiled = torch.compile(t2t, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)
    compiled.float().sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.gpu
def test_gpu_backward_is_bitwise_deterministic(ext):
    inputs = gpu_inputs(16, 3136, 147, BF16, w_grad=True)
    wrt = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    g = torch.randn(16, 3136, EMB, device="cuda", dtype=BF16)
    runs = [torch.autograd.grad(on_cuda(**inputs), wrt, g) for _ in range(3)]
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
