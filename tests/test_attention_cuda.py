"""The CUDA backend of the attention family (csrc/attention*.{h,cu,cpp}, fastvit/csrc/attention.py).

CPU, in CI: the extension builds and loads; the ops have the Triton ops' schemas, fakes and autograd; the
front's and the C++ checks' errors; "auto" falls back. The kernels' own code (csrc/attention_kernel.h)
runs on CPU through the warp emulator (csrc/attention_emulate.cpp: every CUDA thread a coroutine,
mma.sync by the PTX fragment layouts), judged by DESIGN.md's numerics rule through the ops' autograd, on
the shapes, masks, layouts and backward plans the GPU takes. GPU (``gpu`` marker): the same on the
device, plus opcheck, torch.compile, determinism; compute-sanitizer runs in ``fastvit-gpu-check``.
"""

import contextlib
import importlib
import pathlib
import subprocess

import pytest
import torch
from numerics import check_against_reference, expanded_grad, noncontiguous, randn, run_without_interpreter
from test_attention import mask_in, masks

import fastvit
from fastvit import _ext, backend, ops, reference
from fastvit._library import get_op
from fastvit.backend import BackendUnavailableError

CUDA = {"attention": "cuda"}
F16, BF16 = torch.float16, torch.bfloat16


@pytest.fixture(scope="module")
def emu(emulator):
    """The CUDA attention ops' CPU kernels: the kernel bodies under the warp emulator."""
    from fastvit.csrc import attention as cuda

    return cuda


@contextlib.contextmanager
def sms(n: int):
    """The SM count the backward's split plan sees (132 = H200 by default in the emulator)."""
    old = torch.ops.fastvit_emulate.set_num_sms(n)
    try:
        yield
    finally:
        torch.ops.fastvit_emulate.set_num_sms(old)


def inputs(B, H, Nq, Nk, D, dtype, mask=None, scale=None, device="cpu"):
    q, k, v = (randn(B, H, n, D, dtype=dtype).to(device).requires_grad_() for n in (Nq, Nk, Nk))
    return {"q": q, "k": k, "v": v, "mask": mask, "scale": scale}


# ---------------------------------------------------------------------------------------------
# CPU: build, schemas, fakes, errors, fallbacks
# ---------------------------------------------------------------------------------------------


def test_extension_has_the_triton_schemas(ext):
    from fastvit.kernels import attention as _triton  # noqa: F401  (registers the Triton ops)

    for fn in ("attention", "attention_qkvpacked"):
        for stage in ("fwd", "infer", "bwd"):
            c, t = get_op(fn, "cuda", stage)._schema, get_op(fn, "triton", stage)._schema
            assert [(a.name, str(a.type)) for a in c.arguments] == [(a.name, str(a.type)) for a in t.arguments], (fn, stage)
            assert [str(r.type) for r in c.returns] == [str(r.type) for r in t.returns], (fn, stage)


def test_kernel_names_its_argument_without_cuda_tensors(ext):
    from fastvit.csrc import attention as cuda

    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastvit::attention_cuda_kernel", "CUDA")
    q = torch.randn(1, 1, 4, 8, dtype=F16)
    with pytest.raises(ValueError, match="kernel: q must be a CUDA tensor"):
        cuda.kernel(q, q, q)


def test_sm90_fragment_layouts_hold(ext, tmp_path):
    """The Hopper kernels' register-layout assumptions (which S / O register is in which row, the quad
    reductions, P reused as the RS wgmma's A operand), checked on the host with CuTe's own layouts for
    every instantiation and consumer thread: tests/cuda/attention_sm90_fragments.cu (the CPU emulator
    cannot run TMA or wgmma)."""
    home, _ = _ext.cuda_home()
    src = pathlib.Path(__file__).parent / "cuda" / "attention_sm90_fragments.cu"
    obj, exe = tmp_path / "fragments.o", tmp_path / "fragments"
    flags = ["-O1", "-std=c++17", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a"]
    includes = [f"-I{_ext.csrc_dir()}", f"-I{_ext.cutlass_include()}"]
    built = subprocess.run([str(home / "bin" / "nvcc"), "-c", *flags, *includes, str(src), "-o", str(obj)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-4000:]
    linked = subprocess.run(["c++", str(obj), *_ext._link_flags(home, tmp_path), "-lcudart", "-o", str(exe)],
                            capture_output=True, text=True)
    assert linked.returncode == 0, linked.stderr[-4000:]
    ran = subprocess.run([str(exe)], capture_output=True, text=True)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stdout + ran.stderr


def test_cuda_ops_fake_tensors_and_make_fx(ext):
    """Fakes and autograd wiring, traced on fake CUDA and meta tensors (no kernel runs)."""
    out = run_without_interpreter(
        """
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.proxy_tensor import make_fx
        from fastvit import _ext
        _ext.load(build_if_missing=False)
        from fastvit.csrc import attention as K

        with FakeTensorMode():
            q = torch.empty(2, 3, 197, 64, dtype=torch.bfloat16, device="cuda")
            o = K.attention(q, q, q)
            assert o.shape == q.shape and o.dtype == torch.bfloat16 and o.device.type == "cuda"
            qkv = torch.empty(2, 197, 3 * 3 * 72, dtype=torch.float16, device="cuda")
            assert K.attention_qkvpacked(qkv, 3).shape == (2, 197, 3 * 72)

        def step(q, k, v, qkv, mask):
            o = K.attention(q, k, v, mask)
            p = K.attention_qkvpacked(qkv, 2, mask)
            return torch.autograd.grad(o.sum() + p.float().sum(), (q, k, v, qkv))

        def make():
            q, k, v = (torch.empty(2, 2, n, 48, dtype=torch.float16, device="meta", requires_grad=True)
                       for n in (9, 13, 13))
            qkv = torch.empty(2, 13, 3 * 2 * 48, dtype=torch.float16, device="meta", requires_grad=True)
            return q, k, v, qkv, torch.empty(2, 1, 1, 13, dtype=torch.bool, device="meta")

        q, k, v, qkv, mask = make()
        gm = make_fx(step, tracing_mode="fake")(q, k, v, qkv[:, :9].contiguous().requires_grad_(), mask[..., :9])
        names = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        for want in ("fastvit.attention_cuda_fwd.default", "fastvit.attention_cuda_bwd.default",
                     "fastvit.attention_qkvpacked_cuda_fwd.default", "fastvit.attention_qkvpacked_cuda_bwd.default"):
            assert want in names, (want, sorted(names))
        print("ok")
        """
    )
    assert "ok" in out


def test_front_reasons_and_auto_fallback(ext, monkeypatch):
    att = importlib.import_module("fastvit.ops.attention")  # the module (fastvit.ops.attention is the function)

    q = torch.randn(1, 2, 7, 64)
    impl = backend._impls["attention"]["cuda"]
    assert "q: the CUDA backend needs CUDA tensors, got one on cpu" in impl.reason(q, q, q, None, None, 0.0)
    packed = backend._impls["attention_qkvpacked"]["cuda"]
    assert "qkv: the CUDA backend needs CUDA tensors" in packed.reason(torch.randn(1, 7, 3 * 64), 1, None, None, 0.0)

    class FakeCuda:  # the checks read device, dtype and shape only
        def __init__(self, shape, dtype):
            self.shape, self.dtype, self.device = shape, dtype, torch.device("cuda", 0)

    assert "takes float16 or bfloat16, got torch.float32" in att._cuda_why_not({"q": FakeCuda((1, 2, 7, 64), torch.float32)}, 64, 1, 2)
    assert "head dims up to 128, got 160" in att._cuda_why_not({"q": FakeCuda((1, 2, 7, 160), F16)}, 160, 1, 2)
    assert "65535" in att._cuda_why_not({"q": FakeCuda((70000, 1, 7, 64), F16)}, 64, 70000, 1)
    assert att._cuda_why_not({"q": FakeCuda((1, 2, 7, 72), BF16)}, 72, 1, 2) is None
    # As on a GPU machine where the extension is loaded: an explicit "cuda" names the reason, auto runs eager.
    monkeypatch.setitem(backend._availability, "cuda", lambda: None)
    backend._availability_cache.pop(("cuda", False), None)
    try:
        with fastvit.use_backend(CUDA):
            with pytest.raises(BackendUnavailableError, match="q: the CUDA backend needs CUDA tensors, got one on cpu"):
                ops.attention(q, q, q)
    finally:
        backend._availability_cache.pop(("cuda", False), None)
    with fastvit.use_backend("auto"):
        torch.testing.assert_close(ops.attention(q, q, q), reference.attention(q, q, q))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_naming_cuda_says_so():
    with pytest.raises(BackendUnavailableError, match="'cuda' is not available for 'attention': no CUDA GPU is visible"):
        fastvit.use_backend(CUDA)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(1, 2, 7, 64), torch.randn(1, 2, 7, 64), torch.randn(1, 2, 7, 64)),
         r"q must be float16 or bfloat16 \(float32 runs on the triton or eager backend\), got Float"),
        (lambda: tuple(torch.randn(1, 2, 7, 136, dtype=F16) for _ in range(3)), "the head dim must be 1 to 128, got 136"),
        (lambda: (torch.randn(1, 2, 7, 64, dtype=F16), torch.randn(1, 2, 9, 64, dtype=F16), torch.randn(1, 2, 8, 64, dtype=F16)),
         r"k and v must be \(B, H, Nk, D\) with q's B, H and D"),
        (lambda: (torch.randn(1, 2, 7, 64, dtype=F16), torch.randn(1, 2, 7, 64, dtype=BF16), torch.randn(1, 2, 7, 64, dtype=F16)),
         "q, k and v must have one dtype"),
        (lambda: (torch.randn(2, 7, 64, dtype=F16),) * 3, r"q must be a 4-D \(B, H, N, D\) tensor"),
    ],
)
def test_cpp_checks_name_the_argument(emu, make, match):
    q, k, v = make()
    with pytest.raises(RuntimeError, match=match):
        get_op("attention", "cuda", "infer")(q, k, v, None, 0.125)


def test_cpp_checks_masks_lse_and_packed_widths(emu):
    q = torch.randn(1, 2, 7, 64, dtype=F16)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        get_op("attention", "cuda", "infer")(q, q, q, torch.ones(7, 7, dtype=torch.int32), 0.125)
    with pytest.raises(RuntimeError, match=r"mask must broadcast to \(B, H, Nq, Nk\)"):
        get_op("attention", "cuda", "infer")(q, q, q, torch.ones(1, 1, 1, 1, 7, dtype=torch.bool), 0.125)
    o, lse = get_op("attention", "cuda", "fwd")(q, q, q, None, 0.125)
    with pytest.raises(RuntimeError, match=r"lse must be contiguous float32 \(B, H, Nq\)"):
        get_op("attention", "cuda", "bwd")(o, q, q, q, o, lse.double(), None, 0.125)
    with pytest.raises(RuntimeError, match=r"qkv's last dim \(100\) must be 3 \* num_heads \* head_dim"):
        get_op("attention_qkvpacked", "cuda", "infer")(torch.randn(1, 7, 100, dtype=F16), 2, None, 0.125)


# ---------------------------------------------------------------------------------------------
# CPU: the kernels under the warp emulator, by the numerics rule
# ---------------------------------------------------------------------------------------------


# N covers one partial tile, whole tiles, a tile plus one, ViT's 197 and 577; D each padding (to 64 and
# to 128) and the exact sizes; fp16 and bf16. B * H = 2 on 132 SMs: the backward splits the key blocks.
@pytest.mark.parametrize(
    "N, D, dtype",
    [(1, 64, F16), (7, 32, BF16), (64, 64, BF16), (65, 48, F16), (128, 128, F16), (197, 64, BF16), (197, 80, F16),
     (197, 72, BF16), (130, 96, BF16), (577, 64, F16), (40, 8, F16), (33, 3, BF16)],
)
def test_emulated_matches_reference(emu, N, D, dtype):
    B, H = (2, 1) if N < 577 else (1, 1)
    check_against_reference(emu.attention, reference.attention, inputs(B, H, N, N, D, dtype), dtype)


@pytest.mark.parametrize("splits_sms", [1, 132], ids=["one-cta-per-head", "split-key-blocks"])
@pytest.mark.parametrize("N", [64, 150, 300])
def test_emulated_backward_plans(emu, splits_sms, N):
    """The backward plans: all keys in one block (dQ written directly); one CTA walking the key blocks,
    dQ accumulated in fp32 in order in shared memory (N = 150: 150 rows fit) or in the workspace (N = 300);
    key blocks split over CTAs (partials reduced in order)."""
    with sms(splits_sms):
        check_against_reference(emu.attention, reference.attention, inputs(1, 2, N, N, 64, F16), F16)


@pytest.mark.parametrize("mask_kind, dtype", [("keypad", F16), ("bool", BF16), ("dead_row", F16), ("additive", BF16),
                                              ("additive_inf", F16)])
def test_emulated_masks(emu, mask_kind, dtype):
    B, H, N = 2, 2, 70
    mask = mask_in(masks(B, H, N, N)[mask_kind], dtype)
    check_against_reference(emu.attention, reference.attention, inputs(B, H, N, N, 64, dtype, mask), dtype)


@pytest.mark.parametrize("kind", ["2-D", "per-head-fp32", "query-broadcast"])
def test_emulated_broadcast_masks_and_cross_attention(emu, kind):
    B, H, Nq, Nk, D = 2, 2, 9, 77, 32
    if kind == "2-D":
        mask = torch.rand(Nq, Nk) > 0.4
        mask[:, 0] = True
    elif kind == "per-head-fp32":
        mask = torch.randn(1, H, Nq, Nk)  # float32 with fp16 inputs: read in its own dtype
    else:
        mask = torch.rand(B, 1, 1, Nk) > 0.5
        mask[..., 0] = True
        mask = mask.expand(B, H, Nq, Nk)  # stride 0 over heads and queries
    check_against_reference(emu.attention, reference.attention,
                            inputs(B, H, Nq, Nk, D, F16, mask, scale=0.3), F16)


def test_emulated_fully_masked_rows_give_zero_output_gradient_and_inf_lse(emu):
    B, H, N, D = 1, 2, 70, 64
    mask = torch.ones(B, H, N, N, dtype=torch.bool)
    mask[0, 1, 5] = False
    mask[0, 0, 69] = False
    kw = inputs(B, H, N, N, D, F16, mask)
    o, lse = get_op("attention", "cuda", "fwd")(kw["q"].detach(), kw["k"].detach(), kw["v"].detach(), mask, D**-0.5)
    assert (o[0, 1, 5] == 0).all() and (o[0, 0, 69] == 0).all()
    assert lse[0, 1, 5] == float("-inf") and torch.isfinite(lse[0, 0, :69]).all()
    out = emu.attention(**kw)
    out.backward(torch.randn_like(out))
    assert (kw["q"].grad[0, 1, 5] == 0).all() and torch.isfinite(kw["k"].grad).all()
    check_against_reference(emu.attention, reference.attention, inputs(B, H, N, N, D, F16, mask), F16)
    # no key at all
    q = torch.randn(1, 2, 5, 64, dtype=F16)
    k = torch.randn(1, 2, 0, 64, dtype=F16)
    o, lse = get_op("attention", "cuda", "fwd")(q, k, k, None, 0.125)
    assert (o == 0).all() and (lse == float("-inf")).all()


@pytest.mark.parametrize("N, D, H, mask_kind, dtype", [(197, 64, 3, "keypad", BF16), (50, 80, 2, "none", F16),
                                                       (7, 40, 2, "dead_row", F16)])
def test_emulated_qkvpacked(emu, N, D, H, mask_kind, dtype):
    B = 1 if N == 197 else 2
    mask = mask_in(masks(B, H, N, N)[mask_kind], dtype)
    qkv = randn(B, N, 3 * H * D, dtype=dtype).requires_grad_()
    check_against_reference(emu.attention_qkvpacked, reference.attention_qkvpacked,
                            {"qkv": qkv, "num_heads": H, "mask": mask}, dtype)


def test_emulated_strided_views_noncontiguous_and_expanded_grad(emu):
    B, H, N, D = 2, 2, 70, 64
    q, k, v = (noncontiguous(randn(B, H, N, D, dtype=F16)).requires_grad_() for _ in range(3))
    assert not q.is_contiguous()
    grad = expanded_grad((B, H, N, D), F16)
    check_against_reference(emu.attention, reference.attention, {"q": q, "k": k, "v": v}, F16,
                            grad_out=grad)
    # views of a packed projection, read in place (token stride 3 * H * D), and a packed input that is itself
    # a non-contiguous slice
    qkv = randn(B, N, 3 * H * D, dtype=BF16).requires_grad_()

    def on_views(attention):
        return lambda qkv: attention(*qkv.unflatten(-1, (3, H, D)).permute(2, 0, 3, 1, 4).unbind(0))

    check_against_reference(on_views(emu.attention), on_views(reference.attention), {"qkv": qkv}, BF16)
    wide = randn(B, N, 2 * 3 * H * D, dtype=F16)[..., ::2].requires_grad_()
    check_against_reference(emu.attention_qkvpacked, reference.attention_qkvpacked,
                            {"qkv": wide, "num_heads": H}, F16, grad_out=expanded_grad((B, N, H * D), F16))


def test_emulated_infer_op_and_dropout_fallback(emu):
    kw = inputs(1, 2, 30, 30, 64, F16)
    with torch.no_grad():
        a = emu.attention(kw["q"], kw["k"], kw["v"])  # the _infer op
    b = emu.attention(kw["q"], kw["k"], kw["v"])
    assert torch.equal(a, b.detach())
    torch.manual_seed(3)
    d1 = emu.attention(kw["q"], kw["k"], kw["v"], dropout_p=0.5)
    torch.manual_seed(3)
    d2 = reference.attention(kw["q"], kw["k"], kw["v"], None, None, 0.5)
    assert torch.equal(d1, d2)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

GPU_N = (1, 7, 64, 128, 197, 256, 577, 785, 1025, 3136)
GPU_D = (32, 48, 64, 72, 80, 96, 128)


def on_cuda(fn):
    def run(**kw):
        with fastvit.use_backend(CUDA):
            return fn(**kw)

    return run


def _gpu_inputs(B, H, Nq, Nk, D, dtype, mask=None):
    return inputs(B, H, Nq, Nk, D, dtype, mask, device="cuda")


@pytest.fixture(params=["sm90_tma_wgmma", "sm80_mma_sync"])
def kernels(request, monkeypatch):
    """Runs a GPU test once per kernel pair: the Hopper forward and backward (sm_90 GPUs) and the mma.sync
    ones, which FASTVIT_ATTENTION_SM90=0 selects on any GPU."""
    if request.param == "sm90_tma_wgmma":
        if torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("the TMA / wgmma kernels run on sm_90 GPUs only")
        monkeypatch.delenv("FASTVIT_ATTENTION_SM90", raising=False)
    else:
        monkeypatch.setenv("FASTVIT_ATTENTION_SM90", "0")
    return request.param


def _served_by(name, q, k, v):
    """Both passes of (q, k, v) with a contiguous upstream gradient run on kernel ``name``."""
    from fastvit.csrc import attention as cuda

    dout = torch.empty_like(q, memory_format=torch.contiguous_format)
    assert cuda.kernel(q, k, v) == name and cuda.kernel(q, k, v, dout) == name, "the test would not run its kernel"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("N", GPU_N)
def test_gpu_numerics_over_lengths(ext, kernels, N, dtype):
    B, H = (2, 3) if N <= 1025 else (1, 2)
    for D in (64, 80) if N > 577 else GPU_D:
        kw = _gpu_inputs(B, H, N, N, D, dtype)
        _served_by(kernels, kw["q"], kw["k"], kw["v"])
        check_against_reference(on_cuda(ops.attention), reference.attention, kw, dtype, name=f"N={N} D={D}")
        qkv = randn(B, N, 3 * H * D, dtype=dtype).cuda().requires_grad_()
        _served_by(kernels, *qkv.detach().view(B, N, 3, H, D).permute(2, 0, 3, 1, 4))
        check_against_reference(on_cuda(ops.attention_qkvpacked), reference.attention_qkvpacked,
                                {"qkv": qkv, "num_heads": H}, dtype, name=f"packed N={N} D={D}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("mask_kind", ["keypad", "bool", "dead_row", "additive", "additive_inf"])
@pytest.mark.parametrize("N", [7, 197, 577])
def test_gpu_masks(ext, kernels, N, mask_kind, dtype):
    B, H, D = 2, 3, 64
    mask = mask_in(masks(B, H, N, N)[mask_kind], dtype).cuda()
    kw = _gpu_inputs(B, H, N, N, D, dtype, mask)
    _served_by(kernels, kw["q"], kw["k"], kw["v"])
    check_against_reference(on_cuda(ops.attention), reference.attention, kw, dtype)
    qkv = randn(B, N, 3 * H * D, dtype=dtype).cuda().requires_grad_()
    check_against_reference(on_cuda(ops.attention_qkvpacked), reference.attention_qkvpacked,
                            {"qkv": qkv, "num_heads": H, "mask": mask}, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_gpu_noncontiguous_expanded_grad_and_dead_rows(ext, kernels, dtype):
    B, H, N, D = 2, 3, 197, 72
    q, k, v = (noncontiguous(randn(B, H, N, D, dtype=dtype).cuda()).requires_grad_() for _ in range(3))
    if kernels == "sm80_mma_sync":  # the views' feature stride is not 1: no TMA
        _served_by(kernels, q, k, v)
    check_against_reference(on_cuda(ops.attention), reference.attention, {"q": q, "k": k, "v": v}, dtype,
                            grad_out=expanded_grad((B, H, N, D), dtype, "cuda"))
    mask = torch.ones(B, H, N, N, dtype=torch.bool, device="cuda")
    mask[1, 2, 100] = False
    kw = _gpu_inputs(B, H, N, N, D, dtype, mask)
    _served_by(kernels, kw["q"], kw["k"], kw["v"])
    out = on_cuda(ops.attention)(**kw)
    out.backward(torch.randn_like(out))
    assert (out[1, 2, 100] == 0).all() and (kw["q"].grad[1, 2, 100] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["row-padded-nan", "bnhd-transposed", "single-batch-head", "head-broadcast-kv"])
def test_gpu_strided_views_read_in_place(ext, kernels, layout):
    """Views the forward reads through their strides (TMA descriptors on sm_90): rows padded with NaN
    past D (nothing past D may be read), (B, N, H, D) transposed, size-1 dims, and k, v broadcast over
    heads (stride 0, which TMA cannot take: the mma.sync forward serves it)."""
    B, H, N, D, dtype = 2, 3, 197, 72, BF16
    if layout == "single-batch-head":
        B = H = 1

    def make():
        if layout == "row-padded-nan":
            wide = torch.full((B, H, N, D + 8), float("nan"), dtype=dtype, device="cuda")
            wide[..., :D] = randn(B, H, N, D, dtype=dtype).cuda()
            return wide[..., :D]
        if layout == "bnhd-transposed":
            return randn(B, N, H, D, dtype=dtype).cuda().transpose(1, 2)
        return randn(B, H, N, D, dtype=dtype).cuda()

    q = make().requires_grad_()
    if layout == "head-broadcast-kv":
        k, v = (randn(B, 1, N, D, dtype=dtype).cuda().expand(B, H, N, D).requires_grad_() for _ in range(2))
        _served_by("sm80_mma_sync", q, k, v)
    else:
        k, v = make().requires_grad_(), make().requires_grad_()
        _served_by(kernels, q, k, v)
    check_against_reference(on_cuda(ops.attention), reference.attention, {"q": q, "k": k, "v": v}, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("B, H, N", [(24, 12, 577), (2, 6, 197), (1, 1, 1025)],
                         ids=["workspace-unsplit", "split-two-blocks", "split-many-blocks"])
def test_gpu_backward_plans(ext, kernels, B, H, N):
    """The backward's plans on the GPU: B * H CTAs fill it and each walks all key blocks, dQ summed in the
    fp32 workspace; and key blocks split over CTAs, their partials reduced in split order."""
    kw = _gpu_inputs(B, H, N, N, 64, BF16)
    _served_by(kernels, kw["q"], kw["k"], kw["v"])
    check_against_reference(on_cuda(ops.attention), reference.attention, kw, BF16, name=f"B={B} H={H} N={N}")


@pytest.mark.gpu
def test_gpu_kernel_choice(ext, monkeypatch):
    """kernel() names the Hopper kernels on sm_90 for TMA-readable inputs, else mma.sync; a stride-0
    upstream gradient (out.sum().backward()) sends the backward to mma.sync."""
    from fastvit.csrc import attention as cuda

    q = torch.randn(2, 3, 197, 64, device="cuda", dtype=F16)
    hopper = "sm90_tma_wgmma" if torch.cuda.get_device_capability() == (9, 0) else "sm80_mma_sync"
    assert cuda.kernel(q, q, q) == cuda.kernel(q, q, q, torch.randn_like(q)) == hopper
    assert cuda.kernel(q, q, q, expanded_grad(q.shape, F16, "cuda")) == "sm80_mma_sync"
    odd = torch.randn(2, 3, 197, 65, device="cuda", dtype=F16)[..., :60]  # row stride 65: not 16-byte aligned
    assert cuda.kernel(odd, odd, odd) == "sm80_mma_sync"
    monkeypatch.setenv("FASTVIT_ATTENTION_SM90", "0")
    assert cuda.kernel(q, q, q) == cuda.kernel(q, q, q, torch.randn_like(q)) == "sm80_mma_sync"


@pytest.mark.gpu
def test_gpu_opcheck(ext):
    from torch.library import opcheck

    from fastvit.csrc import attention as _cuda  # noqa: F401

    q, k, v = (torch.randn(2, 3, 197, 64, device="cuda", dtype=BF16, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 1, 197, device="cuda") > 0.3
    qkv = torch.randn(2, 197, 3 * 3 * 64, device="cuda", dtype=F16, requires_grad=True)
    opcheck(get_op("attention", "cuda", "fwd"), (q, k, v, mask, 0.125))
    opcheck(get_op("attention", "cuda", "infer"), (q.detach(), k.detach(), v.detach(), None, 0.125))
    opcheck(get_op("attention_qkvpacked", "cuda", "fwd"), (qkv, 3, None, 0.125))
    o, lse = get_op("attention", "cuda", "fwd")(q, k, v, mask, 0.125)
    opcheck(get_op("attention", "cuda", "bwd"), (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o.detach(),
                                                 lse, mask, 0.125))


@pytest.mark.gpu
def test_gpu_compile_fullgraph_of_a_block(ext):
    import fastvit.nn as fnn

    B, N, H, D = 2, 197, 6, 64
    block = fnn.Block(H * D, H).cuda()
    x = torch.randn(B, N, H * D, device="cuda", requires_grad=True)
    with fastvit.use_backend(CUDA), torch.autocast("cuda", dtype=torch.bfloat16):
        y_eager = block(x)
        y_comp = torch.compile(block, fullgraph=True)(x)
    torch.testing.assert_close(y_comp, y_eager)
    y_comp.float().sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("N", [197, 577, 3136])
def test_gpu_backward_is_bitwise_deterministic(ext, N):
    B, H, D = (2, 12, 64) if N < 3136 else (1, 2, 64)  # B * H = 2: the key blocks split over CTAs
    qkv = torch.randn(B, N, 3 * H * D, device="cuda", dtype=BF16, requires_grad=True)
    g = torch.randn(B, N, H * D, device="cuda", dtype=BF16)
    grads = []
    for _ in range(3):
        qkv.grad = None
        with fastvit.use_backend(CUDA):
            ops.attention_qkvpacked(qkv, H).backward(g)
        grads.append(qkv.grad.clone())
    assert all(torch.equal(grads[0], x) for x in grads[1:])
