"""Compile fastvit's Triton kernels ahead of their first launch, on every core, without a GPU in the loop.

The real launchers run on CPU tensors at real shapes with every launch *recorded* instead of run
(:func:`patch_launchers`); each distinct variant (kernel, signature, constexprs, 16-divisibility,
warps, stages) is then compiled by ``triton.compile`` in a pool of processes (:func:`compile_all`).
The compiled kernels land in Triton's cache (``TRITON_CACHE_DIR``), so on a GPU the first launches
find them there instead of compiling one by one. On a machine without a GPU the same machinery
checks that every variant compiles for sm_90 (tests/sm90.py).

``python -m benchmarks.compile_ahead [--batch 32 256] [--jobs N] [--list]`` records the launches of
``fastvit-gpu-check``'s workload (:func:`record_gpu_check`: ViT-B/16 and T2T-ViT-14 shapes, bf16, fp16
and bf16 autocast; the autotuned kernels' configs as ``FASTVIT_AUTOTUNE`` selects them) and compiles them
for sm_90 (``--arch``). Run it in a process that has not initialised CUDA (the pool forks).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types

import torch

SM90_MAX_SHARED = 232448  # bytes of shared memory one program may use on an H100 / H200 (227 KB)
H100_SMS = 132  # multiprocessors of an H100 SXM and of an H200

_variants: dict[tuple, tuple] = {}  # key -> (kernel, signature, constexprs, attrs, options)
EVERY_CONFIG = False  # autotuned kernels: record every config (True) or the first only
ARCH = 90  # the compute capability launches are specialised and compiled for


def _jit_binder(fn, arch: int):
    """The JIT's own argument binder for ``fn`` and a CUDA backend of ``sm_<arch>`` (cached per kernel)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    key = (id(fn), arch)
    if key not in _binders:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        _binders[key] = (backend, create_function_from_signature(fn.signature, fn.params, backend))
    return _binders[key]


_binders: dict = {}


def record(fn, args, kwargs) -> None:
    """Specialise a launch's arguments exactly as ``JITFunction.run`` does (the JIT's own binder and
    ``_pack_args``: constexprs, 16-divisibility attributes, options) and record the variant to compile;
    the same inputs give the same cache key as the JIT's, so its first launch finds the compiled kernel."""
    from triton import knobs

    backend, binder = _jit_binder(fn, ARCH)
    kwargs = dict(kwargs)  # the launch's keyword arguments, options (num_warps, ...) included
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*args, **kwargs)
    options, sig, consts, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    opts = dict(options.__dict__)
    key = (fn.fn.__name__, repr(sorted(consts.items())), repr(sig), repr(sorted(attrs.items())), repr(sorted(opts.items())))
    _variants.setdefault(key, (fn, sig, consts, attrs, opts))


class RecordInsteadOfLaunch:
    """Stands in for ``torch.library.wrap_triton(kernel)``: ``[grid](*args, **kwargs)`` records the launch
    (an autotuned kernel: its first config, or each of its configs when ``EVERY_CONFIG``)."""

    def __init__(self, kernel):
        self.kernel = kernel.kernel if isinstance(kernel, RecordInsteadOfLaunch) else kernel

    def __getitem__(self, grid):
        from triton.runtime.autotuner import Autotuner

        def launch(*args, **kwargs):
            if isinstance(self.kernel, Autotuner):
                configs = self.kernel.configs
                if self.kernel.early_config_prune:  # what the autotuner will try for these arguments
                    configs = self.kernel.early_config_prune(configs, dict(zip(self.kernel.fn.arg_names, args)), **kwargs)
                for cfg in configs if EVERY_CONFIG else configs[:1]:
                    record(self.kernel.fn, args, {**kwargs, **cfg.all_kwargs()})
            else:
                record(self.kernel, args, kwargs)

        return launch


def patch_launchers(sms: int = H100_SMS) -> None:
    """Launches through ``kernels._common.wrap_triton`` are recorded, and the launchers take their GPU
    paths on CPU tensors: autotuned tiles, and ``sms`` multiprocessors wherever they size a grid."""
    from fastvit.kernels import embed, mlp, performer

    torch.library.wrap_triton = RecordInsteadOfLaunch
    torch.cuda.get_device_properties = lambda *_: types.SimpleNamespace(multi_processor_count=sms)
    mlp._sms = lambda t: sms
    embed._sms = lambda device: sms
    performer._fixed = lambda device: False
    performer._keep_mask_kernel = RecordInsteadOfLaunch(performer._keep_mask_kernel)  # launched directly


def variants() -> int:
    """How many distinct variants are recorded."""
    return len(_variants)


def _compile(job: tuple) -> str:
    """Compile one recorded variant -> its log line: "ok ..." or "FAILED ...: why"."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    key, arch = job
    fn, sig, consts, attrs, options = _variants[key]
    names = [p.name for p in fn.params]
    flags = {names[i[0]]: v for i, v in consts.items() if names[i[0]].isupper() and v is not None}
    what = f"{fn.fn.__name__} {flags} warps {options['num_warps']} stages {options['num_stages']}"
    start = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # noqa: BLE001 - every failure is reported, the run goes on
        return f"FAILED {what}: {type(e).__name__}: {' | '.join(str(e).strip().splitlines())[-800:]}"
    if k.metadata.shared > SM90_MAX_SHARED:
        return f"FAILED {what}: shared memory {k.metadata.shared} > {SM90_MAX_SHARED}"
    usage = resource_usage(k.asm.get("cubin", b""))
    regs = f" regs {usage['REG']} stack {usage['STACK']}" if usage else ""
    return f"ok {what} smem {k.metadata.shared}{regs} {time.perf_counter() - start:.1f}s"


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers per thread (``REG``) and stack-frame bytes per thread (``STACK``: where a kernel at the
    255-register limit spills) of a compiled kernel, read by the ``cuobjdump`` Triton ships; {} without it."""
    import re
    import subprocess
    import tempfile

    import triton

    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not cubin or not os.path.exists(exe):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([exe, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups()))) if m else {}


def compile_all(arch: int = 90, jobs: int | None = None, out=sys.stdout) -> tuple[int, int]:
    """Compile every recorded variant for ``sm_<arch>`` (one process per core, or ``jobs``), print a line
    each, then ``compiled N failed F``; return (compiled, failed)."""
    import multiprocessing

    failed = done = 0
    with multiprocessing.get_context("fork").Pool(jobs or os.cpu_count() or 1) as pool:
        for line in pool.imap_unordered(_compile, [(key, arch) for key in _variants]):
            print(line, file=out, flush=True)
            done += 1
            failed += line.startswith("FAILED")
    print("compiled", done - failed, "failed", failed, file=out, flush=True)
    return done - failed, failed


# ------------------------------------------------------------------------------------------------
# fastvit-gpu-check's workload, launch by launch
# ------------------------------------------------------------------------------------------------

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# (activation dtype, GEMM operand / parameter dtype): pure bf16, pure fp16, bf16 autocast (fp32 residual stream)
PRECISIONS = ((BF16, BF16), (FP16, FP16), (FP32, BF16))
VIT_B = {"N": 197, "C": 768, "heads": 12, "hidden": 3072, "img": 224, "patch": 16}
T2T_14 = {"N": 197, "C": 384, "heads": 6, "hidden": 1152}


def _empty(*shape, dtype=FP32):
    return torch.empty(*shape, dtype=dtype)


def _record_mlp(B: int, N: int, C: int, hidden: int, act: torch.dtype, gemm: torch.dtype) -> None:
    from fastvit.kernels import mlp as K

    x = _empty(B, N, C, dtype=act)
    ln = [_empty(C, dtype=act), _empty(C, dtype=act)]
    ps = [*ln, _empty(hidden, C, dtype=gemm), _empty(hidden, dtype=gemm), _empty(C, hidden, dtype=gemm),
          _empty(C, dtype=gemm)]
    out = K._layernorm_mlp_fwd(x, *ps, 1e-6, x)
    K._layernorm_mlp_infer(x, *ps, 1e-6, x)
    K._layernorm_mlp_bwd(_empty(B, N, C, dtype=out[0].dtype), x, *ps, *out[1:])
    y, mean, rstd = K._layer_norm_fwd(x, *ln, 1e-6, gemm)
    K._layer_norm_infer(x, *ln, 1e-6, gemm)
    K._layer_norm_bwd(_empty(B, N, C, dtype=gemm), x, ln[0], None, mean, rstd)


def _record_attention(B: int, N: int, heads: int, D: int, dtype: torch.dtype, masks: bool) -> None:
    from fastvit.kernels import attention as K

    q, k, v = (_empty(B, heads, N, D, dtype=dtype) for _ in range(3))
    qkv = _empty(B, N, 3 * heads * D, dtype=dtype)
    for mask in (None, torch.ones(B, 1, 1, N, dtype=torch.bool)) if masks else (None,):
        o, lse = K._attention_fwd(q, k, v, mask, D**-0.5)
        K._attention_infer(q, k, v, mask, D**-0.5)
        K._attention_bwd(_empty(B, heads, N, D, dtype=dtype), q, k, v, o, lse, mask, D**-0.5)
        o, lse = K._qkvpacked_fwd(qkv, heads, mask, D**-0.5)
        K._qkvpacked_infer(qkv, heads, mask, D**-0.5)
        K._qkvpacked_bwd(_empty(B, N, heads * D, dtype=dtype), qkv, o, lse, mask, heads, D**-0.5)


def _record_patch_embed(B: int, act: torch.dtype, dtype: torch.dtype) -> None:
    from fastvit.kernels import embed as K

    D, p, img = VIT_B["C"], VIT_B["patch"], VIT_B["img"]
    x = _empty(B, 3, img, img, dtype=act)
    cls, pos = _empty(1, 1, D, dtype=dtype), _empty(1, (img // p) ** 2 + 1, D, dtype=dtype)
    conv = (_empty(D, 3, p, p, dtype=dtype), _empty(D, dtype=dtype))
    lin = (_empty(D, 3 * p * p, dtype=dtype), _empty(D, dtype=dtype))
    norms = [_empty(3 * p * p), _empty(3 * p * p), _empty(D, dtype=dtype), _empty(D, dtype=dtype)]
    cases = [(x, *lin, pos, cls, norms, "hwc", True)]  # vit-pytorch's ViT: pre and post norms
    if act == dtype:  # autocast casts x unless a pre-norm takes it
        cases.append((x, *conv, pos, cls, [None] * 4, "chw", False))  # timm's conv
    for xx, w, b, pe, ct, ns, order, norm in cases:
        args = (xx, w, b, pe, ct, *ns, p, p, order, norm, norm, 1e-5)
        out, *saved = K._patch_embed_fwd_op(*args)
        K._patch_embed_infer_op(*args)
        needs = [False] + [t is not None for t in (w, b, pe, ct, *ns)]  # the image needs no gradient
        K._patch_embed_bwd_op(_empty(*out.shape, dtype=dtype), *args[:9], *saved, p, p, order, norm, norm, needs)


def _record_t2t(B: int, act: torch.dtype, dtype: torch.dtype) -> None:
    """T2T-ViT-14's module: three soft splits (the later two reading tokens as a channels-last map),
    soft_split_layer_norm, and its two Token_performer layers."""
    from fastvit.kernels import embed as E
    from fastvit.kernels import performer as P

    for shape, k, s, pad, need_x in (((B, 3, 224, 224), 7, 4, 2, False), ((B, 64, 56, 56), 3, 2, 1, True),
                                     ((B, 64, 28, 28), 3, 2, 1, True)):
        C, H, W = shape[1:]
        geo, F = (k, k, s, s, pad, pad), C * k * k
        xx = _empty(shape, dtype=act) if C == 3 else _empty(B, H * W, C, dtype=act).transpose(1, 2).reshape(shape)
        if act == dtype:
            out = E._soft_split_fwd_op(xx, *geo)
            E._soft_split_infer_op(xx, *geo)
            E._soft_split_bwd_op(_empty(*out.shape, dtype=dtype), xx, *geo)
        ln = (_empty(F), _empty(F)) if act == FP32 else (_empty(F, dtype=dtype), _empty(F, dtype=dtype))
        out, mean, rstd = E._ssln_fwd_op(xx, *ln, *geo, 1e-5, dtype)
        E._ssln_infer_op(xx, *ln, *geo, 1e-5, dtype)
        E._ssln_bwd_op(_empty(*out.shape, dtype=dtype), xx, *ln, mean, rstd, *geo, [need_x, True, True])
    emb, m = 64, 32
    for T, dim in ((3136, 147), (784, 576)):
        x = _empty(B, T, -(-dim // E.ROW_ALIGN) * E.ROW_ALIGN, dtype=dtype)[..., :dim]  # as soft_split_layer_norm writes it
        ps = (_empty(3 * emb, dim, dtype=dtype), _empty(3 * emb, dtype=dtype), _empty(m, emb),
              _empty(emb, emb, dtype=dtype), _empty(emb, dtype=dtype))
        for p, seed in ((0.0, None), (0.1, P.draw_seed(x.device))):
            args = (x, *ps, 1e-8, p, seed)
            out, ksum, kptv, kqv = P._fwd_op(*args)
            P._infer_op(*args)
            P._bwd_op(_empty(B, T, emb, dtype=dtype), *args, ksum, kptv, kqv, True, True, False)


def record_gpu_check(batches: tuple[int, ...] = (32, 256)) -> int:
    """Record every launch ``fastvit-gpu-check`` makes: parity at batch ``batches[0]``, timings at the
    others (ViT-B/16 and T2T-ViT-14 at 224 px; bf16, fp16, bf16 autocast). Returns the variant count."""
    for B in batches:
        for act, dtype in PRECISIONS:
            for shape in (VIT_B, T2T_14):
                _record_mlp(B, shape["N"], shape["C"], shape["hidden"], act, dtype)
                _record_attention(B, shape["N"], shape["heads"], shape["C"] // shape["heads"], dtype, masks=True)
            _record_patch_embed(B, act, dtype)
            _record_t2t(B, act, dtype)
    return variants()


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.compile_ahead``: record fastvit-gpu-check's launches and compile them."""
    global EVERY_CONFIG, ARCH
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_ahead", description=__doc__.splitlines()[0])
    p.add_argument("--batch", nargs="+", type=int, default=[32, 256], help="batch sizes to record (default 32 256)")
    p.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default 90)")
    p.add_argument("--sms", type=int, default=H100_SMS, help="multiprocessors the launchers size grids for")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per core)")
    p.add_argument("--list", action="store_true", help="record and count the variants, compile nothing")
    args = p.parse_args(argv)
    # benchmarks/__init__ turns the interpreter on without a GPU; compiling needs the real JIT. Nothing has
    # imported triton's kernels yet in this process (run as a script), so it is not too late to turn it off.
    os.environ.pop("TRITON_INTERPRET", None)
    ARCH = args.arch
    EVERY_CONFIG = True  # what the autotuner will try (FASTVIT_AUTOTUNE=quick: two configs)
    patch_launchers(args.sms)
    start = time.perf_counter()
    n = record_gpu_check(tuple(args.batch))
    print(f"recorded {n} variants in {time.perf_counter() - start:.1f} s "
          f"(FASTVIT_AUTOTUNE={os.environ.get('FASTVIT_AUTOTUNE', 'full')})", flush=True)
    if args.list or n == 0:
        return 0 if n else 1
    _, failed = compile_all(args.arch, args.jobs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
