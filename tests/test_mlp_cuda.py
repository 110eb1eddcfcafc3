"""The CUDA backend of the MLP family (csrc/mlp.cu, csrc/bindings.cpp, fastvit/csrc/mlp.py, fastvit/_ext.py).

CPU: the extension builds, links and loads; its ops have the Triton ops' schemas, fakes and autograd;
CPU tensors and unsupported shapes get clear errors. GPU (``gpu`` marker): parity by DESIGN.md's
numerics rule in fp32/fp16/bf16, opcheck, torch.compile, determinism and compute-sanitizer memcheck.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from numerics import noncontiguous, run_without_interpreter
from test_mlp import (
    autocast_ref, check, check_compile_block_fullgraph, check_deterministic, expanded, ln_inputs, mlp_inputs,
)

import fastvit
from fastvit import _ext, backend, ops, reference
from fastvit._library import get_op
from fastvit.backend import BackendUnavailableError

CUDA = {"mlp": "cuda"}
def on_cuda(fn, autocast_dtype=None):
    def run(**kw):
        with fastvit.use_backend(CUDA):
            if autocast_dtype is None:
                return fn(**kw)
            with torch.autocast("cuda", dtype=autocast_dtype):
                return fn(**kw)

    return run


# ---------------------------------------------------------------------------------------------
# CPU: build, load, schemas, fakes, errors
# ---------------------------------------------------------------------------------------------


def test_arch_flags_and_configuration_names(monkeypatch):
    assert _ext.gencode_flags(["8.0", "9.0a", "8.6+PTX"]) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_86,code=compute_86",
    ]
    # the Hopper attention forward is dispatched to only when the build has an sm_90a image
    assert _ext.arch_defines(["8.0", "9.0a"]) == _ext.arch_defines(["9.0a+PTX"]) == ["-DFASTVIT_SM90A"]
    assert _ext.arch_defines(["8.0", "9.0"]) == _ext.arch_defines(["9.0", "9.0a"]) == []
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert _ext.arch_list() == ["8.0", "9.0a"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a 8.0")
    assert _ext.arch_list() == ["9.0a", "8.0"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "sm_90")
    with pytest.raises(_ext.ExtensionError, match="TORCH_CUDA_ARCH_LIST: cannot read arch 'sm_90'"):
        _ext.arch_list()
    # The build directory names the configuration: another arch list is another build.
    assert _ext._digest(["9.0a"], "13.0") != _ext._digest(["8.0", "9.0a"], "13.0")
    assert _ext._digest(["9.0a"], "13.0") == _ext._digest(["9.0a"], "13.0")


def test_missing_toolchain_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CUTLASS_PATH", str(tmp_path))
    with pytest.raises(_ext.ExtensionError, match="has no include/cutlass/cutlass.h"):
        _ext.cutlass_include()
    monkeypatch.setattr(torch.version, "cuda", None)
    _ext.cuda_home.cache_clear()
    try:
        with pytest.raises(_ext.ExtensionError, match="CPU-only build"):
            _ext.cuda_home()
    finally:
        _ext.cuda_home.cache_clear()


def test_extension_builds_loads_and_has_the_triton_schemas(ext):
    from fastvit.kernels import mlp as _triton  # noqa: F401  (registers the Triton ops)

    assert ext.exists() and _ext.is_loaded() and _ext.is_built()
    for fn, stages in (("layer_norm", ("fwd", "infer", "bwd")), ("layernorm_mlp", ("fwd", "infer", "bwd"))):
        for stage in stages:
            cuda_schema = get_op(fn, "cuda", stage)._schema
            triton_schema = get_op(fn, "triton", stage)._schema
            assert [(a.name, str(a.type)) for a in cuda_schema.arguments] == [
                (a.name, str(a.type)) for a in triton_schema.arguments
            ], (fn, stage)
            assert [str(r.type) for r in cuda_schema.returns] == [str(r.type) for r in triton_schema.returns]


def test_cpu_tensors_are_a_clear_error(ext, monkeypatch):
    kw = mlp_inputs((2, 7), 64, 256, device="cpu")
    impl = backend._impls["layernorm_mlp"]["cuda"]
    assert "needs CUDA tensors, got one on cpu" in impl.reason(*kw.values(), 0.0)
    # As on a GPU machine where the extension is loaded: naming "cuda" for CPU tensors raises.
    monkeypatch.setitem(backend._availability, "cuda", lambda: None)
    backend._availability_cache.pop(("cuda", False), None)
    try:
        with fastvit.use_backend(CUDA):
            with pytest.raises(BackendUnavailableError, match="x: the CUDA backend needs CUDA tensors, got one on cpu"):
                ops.layernorm_mlp(**kw)
            with pytest.raises(BackendUnavailableError, match="the CUDA backend needs CUDA tensors"):
                ops.layer_norm(torch.randn(3, 8), None, None)
    finally:
        backend._availability_cache.pop(("cuda", False), None)
    # The raw op has no CPU kernel.
    with pytest.raises(NotImplementedError, match="CPU"):
        get_op("layer_norm", "cuda", "infer")(torch.randn(3, 8), None, None, 1e-5, torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_naming_cuda_says_so():
    with pytest.raises(BackendUnavailableError, match="'cuda' is not available for 'mlp': no CUDA GPU is visible"):
        fastvit.use_backend(CUDA)


def test_unaligned_widths_are_named():
    from fastvit.ops import mlp as mlp_ops

    assert mlp_ops._cuda_gemm_reason(147, 441, 147, torch.bfloat16, 7) == (
        "the CUDA MLP's GEMMs need C, hidden and C_out to be positive multiples of 8 for torch.bfloat16, got 147, 441, 147")
    assert "multiples of 4 for torch.float32" in mlp_ops._cuda_gemm_reason(66, 264, 66, torch.float32, 7)
    assert mlp_ops._cuda_gemm_reason(768, 3072, 768, torch.bfloat16, 50432) is None
    assert mlp_ops._cuda_gemm_reason(68, 272, 68, torch.float32, 7) is None
    assert "2^31 rows" in mlp_ops._cuda_gemm_reason(64, 256, 64, torch.float16, 2**31)


def test_cuda_ops_fake_tensors_and_make_fx(ext):
    """Fakes and autograd wiring of the CUDA ops, traced on fake CUDA tensors (no kernel runs)."""
    out = run_without_interpreter(
        """
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.proxy_tensor import make_fx
        from fastvit import _ext
        _ext.load(build_if_missing=False)
        from fastvit.csrc import mlp as K

        def make(dev):
            x = torch.empty(2, 7, 32, device=dev, requires_grad=True)
            ps = [torch.empty(32, device=dev, requires_grad=True), torch.empty(32, device=dev, requires_grad=True),
                  torch.empty(96, 32, dtype=torch.bfloat16, device=dev, requires_grad=True),
                  torch.empty(96, dtype=torch.bfloat16, device=dev, requires_grad=True),
                  torch.empty(24, 96, dtype=torch.bfloat16, device=dev, requires_grad=True), None]
            return x, ps, torch.empty(2, 7, 24, device=dev, requires_grad=True)

        with FakeTensorMode():  # fake CUDA tensors: outputs keep the device, shapes and dtypes
            x, ps, r = make("cuda")
            y = K.layernorm_mlp(x, *ps, 1e-6, r)
            assert y.shape == (2, 7, 24) and y.dtype == torch.float32 and y.device.type == "cuda"
            assert K.layernorm_mlp(x, *ps, 1e-6, None).dtype == torch.bfloat16
            assert K.layer_norm(x, ps[0], None, 1e-5, torch.bfloat16).dtype == torch.bfloat16

        # The autograd engine needs a real CUDA context for CUDA tensors, so the backward wiring is
        # traced on meta tensors (the fakes serve the Meta dispatch key as well).
        x, ps, r = make("meta")
        y = K.layernorm_mlp(x, *ps, 1e-6, r)
        wrt = (x, *ps[:5], r)
        grads = torch.autograd.grad(y.sum(), wrt)
        assert [(g.shape, g.dtype) for g in grads] == [(t.shape, t.dtype) for t in wrt]
        yl = K.layer_norm(x, ps[0], None, 1e-5, torch.bfloat16)
        gx, gw = torch.autograd.grad(yl.float().sum(), (x, ps[0]))
        assert yl.dtype == torch.bfloat16 and gx.shape == x.shape and gw.shape == (32,)

        def ops_in(gm):
            return sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "fastvit" in str(n.target)})

        train = make_fx(lambda x, *p: torch.autograd.grad(K.layernorm_mlp(x, *p[:5], None, 1e-6, p[5]).sum(), (x, *p)))(
            x, *ps[:5], r)
        print(ops_in(train))
        with torch.no_grad():
            print(ops_in(make_fx(lambda x, *p: K.layernorm_mlp(x, *p, 1e-6, None))(x, *ps)))
        """
    )
    lines = out.strip().splitlines()
    assert lines[-2] == "['fastvit.layernorm_mlp_cuda_bwd.default', 'fastvit.layernorm_mlp_cuda_fwd.default']"
    assert lines[-1] == "['fastvit.layernorm_mlp_cuda_infer.default']"


# ---------------------------------------------------------------------------------------------
# GPU: parity, autocast, layouts, opcheck, compile, determinism, compute-sanitizer
# ---------------------------------------------------------------------------------------------

# Odd row counts; C in {64, 384, 768} (+1024); hidden 3C or 4C; all three dtypes.
MLP_CASES = [
    ((1, 7), 64, 256, 64, torch.float32, True),
    ((1, 197), 64, 192, 32, torch.float16, False),
    ((2, 197), 384, 1536, 384, torch.bfloat16, True),
    ((3, 197), 384, 1152, 384, torch.float32, False),
    ((4, 197), 768, 3072, 768, torch.bfloat16, True),
    ((2, 577), 768, 3072, 768, torch.float16, True),
    ((1, 1), 768, 2304, 768, torch.bfloat16, False),
    ((2, 197), 1024, 4096, 1024, torch.bfloat16, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("lead, C, hidden, C_out, dtype, residual", MLP_CASES)
def test_gpu_cuda_layernorm_mlp(ext, lead, C, hidden, C_out, dtype, residual):
    inputs = mlp_inputs(lead, C, hidden, C_out, dtype=dtype, residual=residual, offset=2.0, outliers=3)
    check(on_cuda(ops.layernorm_mlp), reference.layernorm_mlp, inputs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu_tanh", "quick_gelu"])
@pytest.mark.parametrize("lead, C, hidden, dtype, residual", [
    ((1, 7), 64, 256, torch.float32, True), ((2, 197), 384, 1536, torch.bfloat16, True),
    ((1, 197), 1152, 4304, torch.float16, False),  # SigLIP-so400m's widths
])
def test_gpu_cuda_layernorm_mlp_activations(ext, activation, lead, C, hidden, dtype, residual):
    """SigLIP's tanh GELU and CLIP's QuickGELU in the fc1 epilogue and their derivatives in the dgrad one."""
    inputs = {**mlp_inputs(lead, C, hidden, dtype=dtype, residual=residual, offset=2.0, outliers=3),
              "activation": activation}
    check(on_cuda(ops.layernorm_mlp), reference.layernorm_mlp, inputs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_cuda_split_k_weight_gradients(ext, dtype):
    """32 x 197 rows, C 384, hidden 1536: the dW GEMMs take CUTLASS's serial split-K (the rule of
    csrc/mlp_split_k.h, the same as kernels/mlp.py's, gives > 1 slice here) and pass the numerics rule."""
    from fastvit.kernels import mlp as mlp_kernels

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for M, N in ((1536, 384), (384, 1536)):
        assert mlp_kernels.wave_split_k(-(-M // 128) * -(-N // 128), 32 * 197, sms) > 1
    check(on_cuda(ops.layernorm_mlp), reference.layernorm_mlp, mlp_inputs((32, 197), 384, 1536, dtype=dtype), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape, dtype", [((4, 197, 768), torch.bfloat16), ((7, 147), torch.float32),
                                          ((2, 577, 1024), torch.float16), ((3, 785, 147), torch.bfloat16),
                                          ((1, 1, 8192), torch.float32)])
def test_gpu_cuda_layer_norm(ext, shape, dtype):
    check(on_cuda(ops.layer_norm), reference.layer_norm, ln_inputs(shape, dtype, offset=100.0, outliers=4), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True])
def test_gpu_cuda_autocast_bf16(ext, residual):
    """fp32 activations and parameters under autocast: bf16 GEMMs, output in the residual's fp32."""
    inputs = mlp_inputs((4, 197), 768, 3072, dtype=torch.float32, residual=residual)
    check(on_cuda(ops.layernorm_mlp, torch.bfloat16), autocast_ref(reference.layernorm_mlp, torch.bfloat16),
          inputs, torch.bfloat16, autocast_dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cuda_noncontiguous_expanded_grad_no_biases(ext, dtype):
    inputs = mlp_inputs((3, 197), 384, 1536, dtype=dtype, biases=False, ln_affine=False)
    inputs["x"] = noncontiguous(inputs["x"].detach()).requires_grad_()
    check(on_cuda(ops.layernorm_mlp), reference.layernorm_mlp, inputs, dtype, grad_out=expanded((3, 197, 384), dtype))
    ln = ln_inputs((5, 96), dtype)
    ln["x"] = noncontiguous(ln["x"].detach()).requires_grad_()
    check(on_cuda(ops.layer_norm), reference.layer_norm, ln, dtype, grad_out=expanded((5, 96), dtype))


@pytest.mark.gpu
def test_gpu_cuda_unaligned_widths_raise_and_auto_falls_back(ext, monkeypatch):
    kw = mlp_inputs((1, 7), 147, 441, dtype=torch.bfloat16)
    with fastvit.use_backend(CUDA), pytest.raises(BackendUnavailableError, match="multiples of 8 for torch.bfloat16"):
        ops.layernorm_mlp(**kw)
    arch = torch.cuda.get_device_capability()[0]  # as if a measured order put CUDA first here
    monkeypatch.setitem(backend.AUTO_ORDER_MEASURED, ("mlp", arch), (("cuda", "triton"), "benchmarks/results/x.md"))
    assert backend.select("layernorm_mlp", *kw.values(), 0.0).backend == "triton"
    aligned = mlp_inputs((1, 7), 64, 256, dtype=torch.bfloat16)
    assert backend.select("layernorm_mlp", *aligned.values(), 0.0).backend == "cuda"


@pytest.mark.gpu
def test_gpu_cuda_no_grad_uses_infer_and_empty_rows(ext):
    kw = mlp_inputs((2, 7), 64, 256, dtype=torch.bfloat16)
    with fastvit.use_backend(CUDA), torch.no_grad():
        torch.testing.assert_close(ops.layernorm_mlp(**kw), reference.layernorm_mlp(**kw), atol=3e-2, rtol=3e-2)
    empty = mlp_inputs((0, 7), 64, 256, dtype=torch.bfloat16)
    with fastvit.use_backend(CUDA):
        y = ops.layernorm_mlp(**empty)
        grads = torch.autograd.grad(y.sum(), [empty["x"], empty["fc1_weight"], empty["fc1_bias"]])
    assert y.shape == (0, 7, 64) and all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.gpu
def test_gpu_cuda_opcheck(ext):
    kw = mlp_inputs((2, 7), 64, 256, dtype=torch.bfloat16)
    args = tuple(kw.values())
    det = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(get_op("layernorm_mlp", "cuda", "fwd"), args)
    torch.library.opcheck(get_op("layernorm_mlp", "cuda", "infer"), det)
    out, h, pre, act, mean, rstd = get_op("layernorm_mlp", "cuda", "fwd")(*det)
    x, lw, lb, w1, b1, w2, b2, eps, res = det
    torch.library.opcheck(get_op("layernorm_mlp", "cuda", "bwd"),
                          (torch.randn_like(out), x, lw, lb, w1, b1, w2, b2, h, pre, act, mean, rstd))
    ln = ln_inputs((2, 7, 96), torch.float32)
    torch.library.opcheck(get_op("layer_norm", "cuda", "fwd"), (ln["x"], ln["weight"], ln["bias"], 1e-5, torch.bfloat16))
    torch.library.opcheck(get_op("layer_norm", "cuda", "infer"), (ln["x"].detach(), None, None, 1e-5, torch.float32))
    y, m, r = get_op("layer_norm", "cuda", "fwd")(ln["x"].detach(), ln["weight"].detach(), None, 1e-5, torch.float32)
    torch.library.opcheck(get_op("layer_norm", "cuda", "bwd"),
                          (torch.randn_like(y), ln["x"].detach(), ln["weight"].detach(), None, m, r))


@pytest.mark.gpu
def test_gpu_cuda_compile_block_fullgraph(ext):
    check_compile_block_fullgraph(CUDA)


@pytest.mark.gpu
def test_gpu_cuda_deterministic(ext):
    check_deterministic(CUDA)


SANITIZED = """
import torch, fastvit
from fastvit import ops
torch.manual_seed(0)
with fastvit.use_backend({"mlp": "cuda"}):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows, C, H in ((7, 64, 256), (197, 384, 1536), (1, 768, 3072)):
            x = torch.randn(rows, C, device="cuda", dtype=dtype, requires_grad=True)
            p = [torch.randn(*s, device="cuda", dtype=dtype, requires_grad=True) * 0.1 for s in ((C,), (C,), (H, C), (H,), (C, H), (C,))]
            p = [t.detach().requires_grad_() for t in p]
            y = ops.layernorm_mlp(x, *p, residual=x)
            torch.autograd.grad(y.float().sum(), [x, *p])
            yl = ops.layer_norm(x[:, : C - 1], p[0][: C - 1], p[1][: C - 1])
            torch.autograd.grad(yl.float().sum(), [x])
torch.cuda.synchronize()
print("sanitized run ok")
"""


@pytest.mark.gpu
def test_gpu_cuda_compute_sanitizer_memcheck(ext):
    tool = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)
    if tool is None:
        pytest.fail("compute-sanitizer is not installed on this GPU machine (it ships with the CUDA toolkit)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "1", sys.executable, "-c",
                           textwrap.dedent(SANITIZED)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "ERROR SUMMARY: 0 errors" in proc.stdout + proc.stderr, proc.stdout[-4000:] + proc.stderr[-4000:]
