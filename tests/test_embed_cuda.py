"""The CUDA backend of the embed family (csrc/embed*.{h,cu,cpp}, fastvit/csrc/embed.py).

CPU, in CI: the extension builds and loads; the ops have the Triton ops' schemas, fakes and autograd; the
front's and the C++ checks' errors; "auto" falls back. The kernels' own code (csrc/embed_kernel.h) runs on
CPU through the warp emulator (csrc/emulate.h: every CUDA thread a coroutine, mma.sync by the PTX fragment
layouts), judged by DESIGN.md's numerics rule through the ops' autograd, in float32, float16 and bfloat16,
on the layouts, norms and split paths the GPU takes. GPU (``gpu`` marker): the issue's model shapes on the
device, plus opcheck, torch.compile, determinism; compute-sanitizer runs in ``fastvit-gpu-check``.
"""

import importlib

import pytest
import torch
from numerics import check_against_reference, expanded_grad, noncontiguous, randn, run_without_interpreter
from test_embed import PE_CASES, T2T_SPLITS, pe_inputs

import fastvit
from fastvit import backend, nn, ops, reference
from fastvit._library import get_op
from fastvit.backend import BackendUnavailableError

CUDA = {"embed": "cuda"}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FNS = ("patch_embed", "soft_split", "soft_split_layer_norm")


@pytest.fixture(scope="module")
def emu(emulator):
    """The CUDA embed ops' CPU kernels: the kernel bodies under the warp emulator."""
    from fastvit.csrc import embed as cuda

    return cuda


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def pe_fn(cuda):
    """The CUDA entry with the reference's arguments (an int patch size)."""
    return lambda **kw: cuda.patch_embed(**{**kw, "patch_size": _pair(kw["patch_size"])})


def split_fn(cuda):
    return lambda x, kernel_size, stride, padding: cuda.soft_split(x, _pair(kernel_size), _pair(stride), _pair(padding))


def ssln_fn(cuda):
    return lambda x, kernel_size, stride, padding, weight=None, bias=None, eps=1e-5: cuda.soft_split_layer_norm(
        x, _pair(kernel_size), _pair(stride), _pair(padding), weight, bias, eps)


def ssln_inputs(B, C, H, W, k, s, p, dtype, affine=True, offset=3.0, device="cpu"):
    F_ = C * k * k
    return {
        "x": randn(B, C, H, W, dtype=dtype, offset=offset).to(device).requires_grad_(), "kernel_size": k, "stride": s,
        "padding": p,
        "weight": randn(F_, dtype=dtype, offset=1.0, scale=0.2).to(device).requires_grad_() if affine else None,
        "bias": randn(F_, dtype=dtype).to(device).requires_grad_() if affine else None,
    }


# ---------------------------------------------------------------------------------------------
# CPU: build, schemas, fakes, errors, fallbacks
# ---------------------------------------------------------------------------------------------


def test_extension_has_the_triton_schemas(ext):
    from fastvit.kernels import embed as _triton  # noqa: F401  (registers the Triton ops)

    for fn in FNS:
        for stage in ("fwd", "infer", "bwd"):
            c, t = get_op(fn, "cuda", stage)._schema, get_op(fn, "triton", stage)._schema
            assert [(a.name, str(a.type)) for a in c.arguments] == [(a.name, str(a.type)) for a in t.arguments], (fn, stage)
            assert [str(r.type) for r in c.returns] == [str(r.type) for r in t.returns], (fn, stage)


def test_cuda_ops_fake_tensors_and_make_fx(ext):
    """Fakes and autograd wiring, traced on fake CUDA and meta tensors (no kernel runs)."""
    out = run_without_interpreter(
        """
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.proxy_tensor import make_fx
        from fastvit import _ext
        _ext.load(build_if_missing=False)
        from fastvit.csrc import embed as K

        with FakeTensorMode():
            x = torch.empty(2, 3, 32, 40, dtype=torch.bfloat16, device="cuda")
            w = torch.empty(48, 3, 8, 8, dtype=torch.bfloat16, device="cuda")
            y = K.patch_embed(x, w, None, (8, 8), None, torch.empty(48, dtype=torch.bfloat16, device="cuda"))
            assert y.shape == (2, 21, 48) and y.dtype == torch.bfloat16 and y.device.type == "cuda"
            t = K.soft_split_layer_norm(x.float(), (7, 7), (4, 4), (2, 2), out_dtype=torch.float16)
            assert t.shape == (2, 80, 147) and t.stride() == (80 * 160, 160, 1) and t.dtype == torch.float16

        def step(x, w, b, pos, cls, w2, pre_w, post_w, img, ln_w):
            y = K.patch_embed(x, w, b, (8, 8), pos, cls)
            z = K.patch_embed(x, w2, None, (8, 8), pos, cls, patch_order="hwc", pre_norm=True,
                              pre_norm_weight=pre_w, post_norm=True, post_norm_weight=post_w)
            s = K.soft_split(img, (3, 3), (2, 2), (1, 1))
            t = K.soft_split_layer_norm(img, (7, 7), (4, 4), (2, 2), ln_w, None, 1e-5)
            return torch.autograd.grad((y.sum(), z.sum(), s.sum(), t.sum()), (x, w, b, pos, cls, w2, pre_w, post_w, img, ln_w))

        def inputs():
            r = lambda *s: torch.empty(*s, device="meta", requires_grad=True)
            return (r(2, 3, 32, 40), r(48, 3, 8, 8), r(48), r(1, 21, 48), r(48), r(48, 192), r(192), r(48),
                    r(2, 16, 24, 20), r(16 * 49))

        gm = make_fx(step, tracing_mode="fake")(*inputs())
        targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        for fn in ("patch_embed", "soft_split", "soft_split_layer_norm"):
            for stage in ("fwd", "bwd"):
                assert f"fastvit.{fn}_cuda_{stage}.default" in targets, (fn, stage, sorted(targets))
        print("ok")
        """
    )
    assert "ok" in out


def test_front_reasons_and_auto_fallback(ext, monkeypatch):
    emb = importlib.import_module("fastvit.ops.embed")
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 4, 4)
    impl = backend._impls["patch_embed"]["cuda"]
    assert "x: the CUDA backend needs CUDA tensors, got one on cpu" in impl.reason(x, w, None, (4, 4), None, None)
    assert "x: the CUDA backend needs CUDA tensors" in backend._impls["soft_split"]["cuda"].reason(x, (3, 3), (2, 2), (1, 1))

    class FakeCuda:  # the checks read device, dtype and shape only
        def __init__(self, shape, dtype):
            self.shape, self.dtype, self.device = shape, dtype, torch.device("cuda", 0)

    xf, wf = FakeCuda((1, 3, 8, 8), F32), FakeCuda((4, 3, 4, 4), BF16)
    assert "reads x in the weight's dtype" in emb._patch_embed_cuda_why_not(xf, wf, None, (4, 4), pre_norm=True)
    assert emb._patch_embed_cuda_why_not(FakeCuda((1, 3, 8, 8), BF16), wf, None, (4, 4)) is None
    assert "float64" in emb._soft_split_cuda_why_not(FakeCuda((1, 3, 8, 8), torch.float64), 3, 2, 1)
    with monkeypatch.context() as m:  # as under CUDA autocast to bfloat16: the autocast dtype decides the output
        m.setattr(emb, "autocast_dtype", lambda x: BF16)
        assert "not torch.float16 -> torch.bfloat16" in emb._ssln_cuda_why_not(FakeCuda((1, 3, 8, 8), F16), 3, 2, 1)
        assert emb._ssln_cuda_why_not(FakeCuda((1, 3, 8, 8), F32), 3, 2, 1) is None
    # As on a GPU machine where the extension is loaded: an explicit "cuda" names the reason, auto runs eager.
    monkeypatch.setitem(backend._availability, "cuda", lambda: None)
    backend._availability_cache.pop(("cuda", False), None)
    try:
        with fastvit.use_backend(CUDA):
            with pytest.raises(BackendUnavailableError, match="x: the CUDA backend needs CUDA tensors, got one on cpu"):
                ops.patch_embed(x, w, None, 4)
    finally:
        backend._availability_cache.pop(("cuda", False), None)
    with fastvit.use_backend("auto"):
        torch.testing.assert_close(ops.soft_split(x, 3, 2, 1), reference.soft_split(x, 3, 2, 1))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: get_op("patch_embed", "cuda", "infer")(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 4, 4, dtype=F16),
                                                        None, None, None, None, None, None, None, 4, 4, "chw", False,
                                                        False, 1e-5),
         "x must have weight's dtype"),
        (lambda: get_op("patch_embed", "cuda", "infer")(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 4, 4), None, None,
                                                        None, None, None, None, None, 4, 4, "cwh", False, False, 1e-5),
         "patch_order must be 'chw' or 'hwc'"),
        (lambda: get_op("patch_embed", "cuda", "infer")(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 2, 4), None, None,
                                                        None, None, None, None, None, 4, 4, "chw", False, False, 1e-5),
         r"weight must be a conv weight \(D, C, p, p\)"),
        (lambda: get_op("patch_embed", "cuda", "infer")(torch.randn(1, 3, 9, 8), torch.randn(4, 3, 4, 4), None, None,
                                                        None, None, None, None, None, 4, 4, "chw", False, False, 1e-5),
         r"image size \(9, 8\) must be a multiple of the patch size"),
        (lambda: get_op("patch_embed", "cuda", "infer")(torch.randn(1, 3, 8, 8, dtype=torch.float64),
                                                        torch.randn(4, 3, 4, 4, dtype=torch.float64), None, None, None,
                                                        None, None, None, None, 4, 4, "chw", False, False, 1e-5),
         "weight must be float32, float16 or bfloat16"),
        (lambda: get_op("soft_split", "cuda", "infer")(torch.randn(1, 3, 4, 4), 7, 7, 1, 1, 1, 1),
         r"kernel_size \(7, 7\) is larger than x's padded size \(6, 6\)"),
        (lambda: get_op("soft_split_layer_norm", "cuda", "infer")(torch.randn(1, 3, 8, 8, dtype=F16), None, None, 3, 3,
                                                                  2, 2, 1, 1, 1e-5, BF16),
         "the output dtype must be x's or, for a float32 x, float16 or bfloat16"),
        (lambda: get_op("soft_split_layer_norm", "cuda", "infer")(torch.randn(1, 3, 8, 8), torch.randn(5), None, 3, 3,
                                                                  2, 2, 1, 1, 1e-5, F32),
         r"weight must be \(27,\)"),
    ],
)
def test_cpp_checks_name_the_argument(emu, call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# CPU: the kernels under the warp emulator, by the numerics rule
# ---------------------------------------------------------------------------------------------

DTYPES = [F32, F16, BF16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, H, W, p, C, D, cls, pos, layout", PE_CASES[:5])
def test_emulated_patch_embed(emu, B, H, W, p, C, D, cls, pos, layout, dtype):
    inputs = pe_inputs(B, C, H, W, p, D, dtype, cls=cls, pos=pos, layout=layout)
    check_against_reference(pe_fn(emu), reference.patch_embed, inputs, dtype)


@pytest.mark.parametrize(
    "H, W, p, C, D, norms, hwc, x_grad, offset, dtype",
    [
        (32, 32, 4, 3, 48, "pre+post", True, False, 0.0, BF16),  # vit-pytorch: images need no gradient
        (48, 40, 8, 3, 64, "pre+post", True, True, 100.0, F32),  # offset patches: one-pass variance would fail
        (32, 32, 16, 1, 32, "pre-noaffine", False, True, 0.0, F16),
        (32, 32, 8, 4, 96, "post", True, True, 0.0, BF16),
        (48, 40, 4, 3, 24, "post-noaffine", False, False, 0.0, F16),
        (32, 32, 4, 1, 16, "pre+post-noaffine", True, True, 0.0, F32),
    ],
)
def test_emulated_patch_embed_vit_pytorch_form(emu, H, W, p, C, D, norms, hwc, x_grad, offset, dtype):
    inputs = pe_inputs(2, C, H, W, p, D, dtype, cls="1D", pos="LD", x_grad=x_grad, offset=offset, hwc=hwc, norms=norms)
    check_against_reference(pe_fn(emu), reference.patch_embed, inputs, dtype)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_emulated_patch_embed_split_paths_odd_shapes_and_views(emu, dtype):
    """dW split over tokens (M = 2 x 16 x 14 = 448 > 256 rows: two fp32 partials summed in order), column
    sums split, image 56 x 49 with patch 7 (no dim a multiple of 64 or 32), C = 4 as a channels_last view."""
    inputs = pe_inputs(2, 4, 112, 98, 7, 40, dtype, cls="11D", pos="1LD", layout="view", hwc=True, norms="pre+post")
    check_against_reference(pe_fn(emu), reference.patch_embed, inputs, dtype)
    inputs = pe_inputs(2, 1, 64, 56, 4, 24, dtype, layout="channels_last")
    check_against_reference(pe_fn(emu), reference.patch_embed, inputs, dtype)


def test_emulated_patch_embed_noncontiguous_expanded_grad_and_parameter_only_grads(emu):
    dtype = F16
    inputs = pe_inputs(2, 3, 32, 24, 8, 40, dtype, cls="11D", pos="1LD", hwc=True, norms="pre+post")
    inputs["x"] = noncontiguous(inputs["x"].detach()).requires_grad_()
    inputs["weight"] = noncontiguous(inputs["weight"].detach()).requires_grad_()
    check_against_reference(pe_fn(emu), reference.patch_embed, inputs, dtype,
                            grad_out=expanded_grad((2, 13, 40), dtype))
    only_w = pe_inputs(2, 3, 32, 24, 8, 40, F32, cls="D", pos="LD", x_grad=False)
    for k in ("bias", "pos_embed", "cls_token"):
        only_w[k] = only_w[k].detach()
    check_against_reference(pe_fn(emu), reference.patch_embed, only_w, F32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, C, H, W, k, s, p", T2T_SPLITS[:4])
def test_emulated_soft_split(emu, B, C, H, W, k, s, p, dtype):
    x = randn(B, C, H, W, dtype=dtype).requires_grad_()
    check_against_reference(split_fn(emu), reference.soft_split, {"x": x, "kernel_size": k, "stride": s, "padding": p},
                            dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, C, H, W, k, s, p", T2T_SPLITS)
def test_emulated_soft_split_layer_norm(emu, B, C, H, W, k, s, p, dtype):
    check_against_reference(ssln_fn(emu), reference.soft_split_layer_norm, ssln_inputs(B, C, H, W, k, s, p, dtype), dtype)


def test_emulated_soft_split_layouts_odd_maps_and_expanded_grad(emu):
    B, C, H, W = 2, 16, 14, 10
    L = 7 * 5
    x = randn(B, H * W, C).requires_grad_().transpose(1, 2).reshape(B, C, H, W)  # T2T's fold back: channels_last strides
    split = {"kernel_size": 3, "stride": 2, "padding": 1}
    check_against_reference(split_fn(emu), reference.soft_split, {"x": x, **split}, F32,
                            grad_out=expanded_grad((B, L, C * 9), F32))
    check_against_reference(ssln_fn(emu), reference.soft_split_layer_norm,
                            {"x": x, **split, "weight": None, "bias": None}, F32, grad_out=expanded_grad((B, L, C * 9), F32))
    odd = ssln_inputs(1, 1, 37, 53, 7, 4, 2, BF16)  # the odd image, C = 1
    check_against_reference(ssln_fn(emu), reference.soft_split_layer_norm, odd, BF16)
    xc = randn(B, C, H, W).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(B, L, C * 9)
    dx, = torch.autograd.grad(emu.soft_split(xc, (3, 3), (2, 2), (1, 1)), (xc,), g)
    assert dx.is_contiguous(memory_format=torch.channels_last)  # dx comes back in x's memory format
    torch.testing.assert_close(dx, torch.autograd.grad(reference.soft_split(xc, 3, 2, 1), (xc,), g)[0])


def test_emulated_soft_split_layer_norm_autocast_output_dtypes_and_alignment(emu):
    """float32 x written as bfloat16 / float16 (autocast), rows 16-element aligned; LayerNorm parameters only
    (T2T's first split: the image needs no gradient). The numerics harness runs its eager twin in one dtype,
    so this compares with the float64 reference directly: the output to its rounding (a half ulp of the
    output dtype, |y| < 8), the fp32 parameter gradients (sums over 128 tokens of the same upstream
    gradient) to ~1e-5 of their size."""
    x = randn(2, 3, 32, 32, offset=3.0)
    w, b = randn(147, offset=1.0, scale=0.2).requires_grad_(), randn(147).requires_grad_()
    for dt in (BF16, F16):
        got = emu.soft_split_layer_norm(x, (7, 7), (4, 4), (2, 2), w, b, out_dtype=dt)
        assert got.dtype == dt and got.shape == (2, 64, 147) and got.stride() == (64 * 160, 160, 1)
        ref = reference.soft_split_layer_norm(x.double(), 7, 4, 2, w.double(), b.double())
        torch.testing.assert_close(got.double(), ref, atol=2 * torch.finfo(dt).eps * 4, rtol=torch.finfo(dt).eps)
        g = torch.randn(2, 64, 147).to(dt)
        gw, gb = torch.autograd.grad(got, (w, b), g)
        rw, rb = torch.autograd.grad(reference.soft_split_layer_norm(x.double(), 7, 4, 2, w.double(), b.double()),
                                     (w, b), g.double())
        torch.testing.assert_close(gw, rw, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(gb, rb, atol=1e-4, rtol=1e-5)


def test_emulated_infer_op_and_deterministic_backward(emu):
    inputs = pe_inputs(2, 3, 32, 32, 8, 24, F32, cls="1D", pos="LD", hwc=True, norms="pre+post")
    fn = pe_fn(emu)
    with torch.no_grad():
        a = fn(**inputs)  # the _infer op: the post-norm normalises the output rows in place
    b = fn(**inputs)
    assert torch.equal(a, b) and b.requires_grad and not a.requires_grad
    wrt = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    g = torch.randn_like(b)
    first = torch.autograd.grad(b, wrt, g)
    second = torch.autograd.grad(fn(**inputs), wrt, g)
    assert all(torch.equal(u, v) for u, v in zip(first, second))


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


def on_cuda(fn):
    def run(**kw):
        with fastvit.use_backend(CUDA):
            return fn(**kw)

    return run


def gpu_check(fn, ref, inputs, dtype, grad_out=None, name=""):
    """check_against_reference on CUDA tensors, with an upstream gradient drawn on the GPU."""
    if grad_out is None:
        args = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        grad_out = torch.randn(ref(**args).shape, device="cuda", dtype=dtype)
    check_against_reference(on_cuda(fn), ref, inputs, dtype, grad_out=grad_out, name=name)


def gpu_pe_inputs(*args, **kwargs):
    return {k: (v.detach().cuda().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
            for k, v in pe_inputs(*args, **kwargs).items()}


# B, C, H, W, p, D: ViT-B/16 at 224 and 384 px, ViT-L/14, odd images (patch 7, C = 1 and 4)
GPU_PE = [(16, 3, 224, 224, 16, 768), (8, 3, 384, 384, 16, 768), (8, 3, 224, 224, 14, 1024),
          (8, 1, 35, 49, 7, 40), (8, 4, 56, 35, 7, 96)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, C, H, W, p, D", GPU_PE)
def test_gpu_patch_embed_model_shapes(ext, B, C, H, W, p, D, dtype):
    gpu_check(ops.patch_embed, reference.patch_embed, gpu_pe_inputs(B, C, H, W, p, D, dtype, cls="11D", pos="1LD"), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norms, layout, x_grad", [("pre+post", "nchw", False), ("post", "channels_last", True),
                                                   ("pre-noaffine", "view", True)])
def test_gpu_patch_embed_vit_pytorch_form(ext, dtype, norms, layout, x_grad):
    inputs = gpu_pe_inputs(8, 3, 224, 224, 16, 768, dtype, cls="1D", pos="LD", hwc=True, norms=norms, layout=layout,
                           x_grad=x_grad)
    gpu_check(ops.patch_embed, reference.patch_embed, inputs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_gpu_patch_embed_noncontiguous_and_expanded_grad(ext, dtype):
    inputs = pe_inputs(8, 3, 224, 224, 16, 768, dtype, cls="11D", pos="1LD")
    inputs["x"] = noncontiguous(inputs["x"].detach()).cuda().requires_grad_()
    inputs = {k: (v.detach().cuda().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
              for k, v in inputs.items()}
    gpu_check(ops.patch_embed, reference.patch_embed, inputs, dtype, grad_out=expanded_grad((8, 197, 768), dtype, "cuda"))


# B, C, H, W, k, s, p: T2T-ViT-14 / -24's three soft splits (both share the T2T module: token_dim 64),
# an odd image (37 x 53, C = 1) and an odd map (C = 4)
GPU_SPLITS = [(8, 3, 224, 224, 7, 4, 2), (8, 64, 56, 56, 3, 2, 1), (8, 64, 28, 28, 3, 2, 1),
              (4, 1, 37, 53, 7, 4, 2), (4, 4, 37, 53, 3, 2, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, C, H, W, k, s, p", GPU_SPLITS)
def test_gpu_soft_split_and_layer_norm(ext, B, C, H, W, k, s, p, dtype):
    tokens = randn(B, H * W, C, dtype=dtype).cuda()
    x = tokens.transpose(1, 2).reshape(B, C, H, W).requires_grad_()  # as T2T-ViT folds tokens back
    split = {"kernel_size": k, "stride": s, "padding": p}
    gpu_check(ops.soft_split, reference.soft_split, {"x": x, **split}, dtype)
    gpu_check(ops.embed.soft_split_layer_norm, reference.soft_split_layer_norm,
              ssln_inputs(B, C, H, W, k, s, p, dtype, device="cuda"), dtype)
    L = reference.soft_split(x.detach(), k, s, p).shape[1]
    gpu_check(ops.embed.soft_split_layer_norm, reference.soft_split_layer_norm,
              {"x": x, **split, "weight": None, "bias": None}, dtype,
              grad_out=expanded_grad((B, L, C * k * k), dtype, "cuda"))


@pytest.mark.gpu
def test_gpu_soft_split_layer_norm_under_autocast(ext):
    x = torch.randn(8, 3, 224, 224, device="cuda", requires_grad=True)
    w = torch.randn(147, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=BF16):
        with fastvit.use_backend(CUDA):
            got = ops.embed.soft_split_layer_norm(x, 7, 4, 2, w)
        ref = reference.soft_split_layer_norm(x, 7, 4, 2, w)
    assert got.dtype == ref.dtype == BF16 and got.stride(1) == 160
    torch.testing.assert_close(got, ref, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
def test_gpu_opcheck(ext):
    from torch.library import opcheck

    x = torch.randn(2, 3, 32, 24, device="cuda", requires_grad=True)
    w = torch.randn(16, 3, 8, 8, device="cuda", requires_grad=True)
    w2 = torch.randn(16, 192, device="cuda", requires_grad=True)
    b, g2 = torch.randn(16, device="cuda", requires_grad=True), torch.randn(16, device="cuda", requires_grad=True)
    pos, cls = torch.randn(13, 16, device="cuda", requires_grad=True), torch.randn(1, 1, 16, device="cuda", requires_grad=True)
    g1 = torch.randn(192, device="cuda", requires_grad=True)
    for args in ((x, w, b, pos, cls, None, None, None, None, 8, 8, "chw", False, False, 1e-5),
                 (x, w2, b, pos, cls, g1, None, g2, b, 8, 8, "hwc", True, True, 1e-5)):
        opcheck(get_op("patch_embed", "cuda", "fwd"), args)
        opcheck(get_op("patch_embed", "cuda", "infer"), tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    img = torch.randn(2, 16, 13, 9, device="cuda", requires_grad=True)
    opcheck(get_op("soft_split", "cuda", "fwd"), (img, 3, 3, 2, 2, 1, 1))
    ln_w = torch.randn(144, device="cuda", requires_grad=True)
    opcheck(get_op("soft_split_layer_norm", "cuda", "fwd"), (img, ln_w, None, 3, 3, 2, 2, 1, 1, 1e-5, torch.float32))


@pytest.mark.gpu
def test_gpu_compile_fullgraph_of_a_patch_embedding_module(ext):
    """(The T2T module, soft splits and Performers on "cuda", is compiled in test_performer_cuda.py.)"""
    embed = nn.PatchEmbed(224, 16, 3, 768).cuda()
    pos, cls = torch.randn(1, 197, 768, device="cuda"), torch.randn(1, 1, 768, device="cuda")
    x = torch.randn(4, 3, 224, 224, device="cuda", requires_grad=True)
    with fastvit.use_backend(CUDA), torch.autocast("cuda", dtype=BF16):
        y_eager = embed(x, pos, cls)
        y_comp = torch.compile(embed, fullgraph=True)(x, pos, cls)
    torch.testing.assert_close(y_comp, y_eager)
    y_comp.float().sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.gpu
def test_gpu_backward_is_bitwise_deterministic(ext):
    inputs = gpu_pe_inputs(16, 3, 224, 224, 16, 768, BF16, cls="11D", pos="1LD", hwc=True, norms="pre+post")
    x = torch.randn(8, 64, 56, 56, device="cuda", dtype=BF16, requires_grad=True)
    wrt = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    runs = []
    for _ in range(3):
        with fastvit.use_backend(CUDA):
            y = ops.patch_embed(**inputs)
            s = ops.embed.soft_split_layer_norm(x, 3, 2, 1)
        runs.append(torch.autograd.grad((y.float().sum(), s.float().square().sum()), [*wrt, x]))
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
