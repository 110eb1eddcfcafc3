"""Performer attention (T2T-ViT's Token_performer.single_attn): fastvit's Triton kernels against the official
eager formulation (einsums, float32 features, under bf16 autocast) and torch.compile of it.

Shapes: T2T-ViT-14's two token-to-token layers at batch 128, emb 64, m 32:
(B=128, T=3136, dim=147) and (B=128, T=784, dim=576). Forward (no grad) and forward+backward (gradients
to x and every trainable parameter), dropout 0 and 0.1; median ms (p20/p80), ratio to each baseline, and
peak memory above the inputs (``step_mem_gib``); fastvit on every backend that implements the op here.

Roofline (H100 SXM: ~989 TFLOP/s dense bf16, ~3.35 TB/s HBM; bytes per kernels/performer.py's
docstring, X = x's bytes, O = one (B, T, 64) bf16 tensor):

- layer 1 (T3136, dim147, kqv recomputed): forward 2X + O = 287 MB -> 86 us (math ~40 GFLOP -> 40 us,
  so memory-bound; x + out alone = 169 MB -> 50 us); backward 4X + 9O = 935 MB -> 280 us.
- layer 2 (T784, dim576, kqv saved): forward X + 6O = 193 MB -> 58 us; backward 2X + 12O = 385 MB -> 115 us.

The eager chain moves 5-12x those bytes (3.5 + 8.1 GB and 1.0 + 2.2 GB) (``--bytes`` prints the model: every aten op of the reference
chain reading its inputs and writing its outputs, counted on meta tensors) in ~40 kernels and keeps
fp32 (B, T, m) and (B, T, emb) intermediates for the backward. Expected: within 1.5-2x of the floors,
>= 3x eager (the issue's target) and <= 0.5x its peak memory; torch.compile fuses the elementwise
chain but not the reductions into the GEMMs, so fastvit should still lead it by >= 1.5x.

H200 (the device fastvit-gpu-check runs on: HBM3e ~4.8 TB/s): the same bytes give layer 1 60 us forward,
195 us backward; layer 2 40 us and 80 us.

The CUDA rows (csrc/performer.cu, "cuda" in fused_backends) appear by themselves. That backend is built from
simpler passes: the kqv projection is written once (3O) and read by the feature kernels, y is written and
read back for the projection GEMM, and the backward writes dy (fp32) and dkqv and re-reads them in separate
GEMMs. Bytes: forward X + 10O (layer 1: 632 MB -> 132 us on an H200; layer 2: 244 MB -> 51 us), backward
2X + 26O (1.57 GB -> 327 us; 563 MB -> 117 us): about 2x the Triton kernels' traffic, still ~5x below the
eager chain's. Expected (not measured, no GPU run yet): slower than Triton by up to ~2x, >= 3x eager
forward + backward, with peak memory (kqv, y and the fp32 sums saved) well under half of eager's.

``python -m benchmarks.bench_performer`` is ``python -m benchmarks --families performer`` (without a GPU:
the family's CPU smoke checks); ``--bytes`` prints the byte model (no GPU needed).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator

import torch

from benchmarks.common import Case, Variant, fused_backends, make_step
from benchmarks.smoke import SmokeCheck, draw

FAMILY = "performer"
EMB, M = 64, 32
SHAPES = [(128, 3136, 147), (128, 784, 576)]


def official_single_attn(x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps=1e-8, dropout_p=0.0):
    """T2T-ViT's Token_performer.prm_exp + single_attn as published (einsums, ``.float()`` features)."""
    emb, m = proj_weight.shape[0], w.shape[0]
    k, q, v = torch.split(torch.nn.functional.linear(x, kqv_weight, kqv_bias), emb, dim=-1)

    def prm_exp(u):
        xd = ((u * u).sum(dim=-1, keepdim=True)).repeat(1, 1, m) / 2
        wtx = torch.einsum("bti,mi->btm", u.float(), w)
        return torch.exp(wtx - xd) / math.sqrt(m)

    kp, qp = prm_exp(k), prm_exp(q)
    D = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(dim=2)
    kptv = torch.einsum("bin,bim->bnm", v.float(), kp)
    y = torch.einsum("bti,bni->btn", qp, kptv) / (D.repeat(1, 1, emb) + eps)
    return v + torch.nn.functional.dropout(torch.nn.functional.linear(y, proj_weight, proj_bias), dropout_p)


def make_inputs(B, T, dim, device="cuda"):
    """fp32 activations and parameters, as a T2T-ViT under autocast holds them (w fixed, as officially)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    w = torch.nn.init.orthogonal_(torch.empty(M, EMB), generator=g) * math.sqrt(M)
    return {
        "x": r(B, T, dim),
        "kqv_weight": r(3 * EMB, dim, scale=(3 * dim) ** -0.5),
        "kqv_bias": r(3 * EMB, scale=0.02),
        "w": w.to(device),
        "proj_weight": r(EMB, EMB, scale=EMB**-0.5),
        "proj_bias": r(EMB, scale=0.02),
    }


# ------------------------------------------------------------------------------------------------
# Byte model of the eager chain (meta tensors, no GPU)
# ------------------------------------------------------------------------------------------------


def eager_bytes(B, T, dim, dtype=torch.bfloat16) -> tuple[int, int]:
    """(forward, backward) bytes of fastvit.reference.performer_attention in bf16 (the autocast rule applied:
    GEMM operands bf16, features fp32), each aten op reading its tensor inputs and writing its outputs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastvit import reference

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view and func not in (torch.ops.aten.detach.default, torch.ops.aten._unsafe_view.default):
                flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
                Count.total += sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))
            return out

    inp = {k: v.to("meta") for k, v in make_inputs(1, 1, dim, device="cpu").items()}
    inp["x"] = torch.empty(B, T, dim, device="meta")
    for k in ("x", "kqv_weight", "kqv_bias", "proj_weight", "proj_bias"):
        inp[k] = inp[k].to(dtype).requires_grad_()
    with Count():
        out = reference.performer_attention(**inp)
    fwd = Count.total
    with Count():
        torch.autograd.backward(out, torch.empty_like(out))
    return fwd, Count.total - fwd


def fastvit_bytes(B, T, dim, training=True) -> tuple[int, int]:
    """(forward, backward) bytes of the fused passes (kernels/performer.py's docstring), bf16."""
    from fastvit.kernels.performer import _save_kqv

    X, O = B * T * dim * 2, B * T * EMB * 2
    if _save_kqv(dim, EMB, training):
        return X + 6 * O, 2 * X + 12 * O
    return 2 * X + O, 4 * X + 9 * O


def print_bytes() -> None:
    for B, T, dim in SHAPES:
        ef, eb = eager_bytes(B, T, dim)
        ff, fb = fastvit_bytes(B, T, dim)
        print(f"B{B} T{T} dim{dim}: forward fastvit {ff / 1e6:.0f} MB vs eager {ef / 1e6:.0f} MB ({ef / ff:.1f}x); "
              f"backward fastvit {fb / 1e6:.0f} MB vs eager {eb / 1e6:.0f} MB ({eb / fb:.1f}x); "
              f"floor at 3.35 TB/s: {ff / 3.35e6:.0f} + {fb / 3.35e6:.0f} us")


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


def _case(B: int, T: int, dim: int, train: bool, dropout_p: float) -> Case:
    """fp32 activations and parameters under bf16 autocast, as a T2T-ViT trains; gradients to x and
    every trainable parameter."""
    trainable = ("x", "kqv_weight", "kqv_bias", "proj_weight", "proj_bias")

    def inputs():
        inp = make_inputs(B, T, dim)
        if train:
            for k in trainable:
                inp[k].requires_grad_()
        return inp

    def official(inp):
        return official_single_attn(**inp, dropout_p=dropout_p)

    def fused(inp):
        import fastvit

        return fastvit.ops.performer_attention(**inp, dropout_p=dropout_p)

    def variant(f, compile_: bool = False, **kw) -> Variant:
        def make(inp):
            g = torch.compile(f) if compile_ else f
            grad = torch.ones(B, T, EMB, device="cuda") if train else None
            return make_step(lambda: g(inp), train, [inp[k] for k in trainable], grad, autocast=True)

        return Variant(make, **kw)

    variants = {
        "official eager": variant(official, baseline=True),
        "torch.compile(official)": variant(official, compile_=True, baseline=True),
    }
    for b in fused_backends("performer_attention"):
        variants[f"fastvit[{b}]"] = variant(fused, backends={FAMILY: b})
    ff, fb = fastvit_bytes(B, T, dim, training=True)
    nbytes = ff + fb if train else fastvit_bytes(B, T, dim, training=False)[0]
    name = f"performer_attention T{T} dim{dim}" + (f" dropout {dropout_p}" if dropout_p else "")
    return Case(FAMILY, name, {"B": B, "T": T, "dim": dim, "emb": EMB, "m": M},
                "bf16 autocast", "fwd+bwd" if train else "fwd", inputs, variants, bytes=nbytes, memory=True,
                notes={"dropout_p": dropout_p})


def cases(quick: bool = False) -> Iterator[Case]:
    """Both T2T-ViT-14 layers (the first only when ``quick``): forward, forward+backward at dropout 0
    and 0.1."""
    for B, T, dim in SHAPES[:1] if quick else SHAPES:
        for train, dropout_p in ((False, 0.0), (True, 0.0), (True, 0.1)):
            yield _case(B, T, dim, train, dropout_p)


def smoke_checks() -> Iterator[SmokeCheck]:
    """performer_attention on (2, 49, 147), emb 64, m 32 (T2T-ViT's first layer, 7 x 7 tokens)."""
    from fastvit import ops

    def performer(dtype, device):
        w = torch.nn.init.orthogonal_(torch.empty(M, EMB)) * math.sqrt(M)
        x = draw(2, 49, 147, dtype=dtype, device=device)
        kqv_w = draw(3 * EMB, 147, dtype=dtype, device=device, scale=147**-0.5)
        kqv_b = draw(3 * EMB, dtype=dtype, device=device, scale=0.02)
        proj_w = draw(EMB, EMB, dtype=dtype, device=device, scale=EMB**-0.5)
        proj_b = draw(EMB, dtype=dtype, device=device, scale=0.02)
        w = w.to(device=device, dtype=dtype)
        return (lambda: ops.performer_attention(x, kqv_w, kqv_b, w, proj_w, proj_b)), [x, kqv_w, kqv_b, proj_w, proj_b]

    yield SmokeCheck(FAMILY, "performer_attention", {"B": 2, "T": 49, "dim": 147, "emb": EMB, "m": M}, performer)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks --families performer [options]``; ``--bytes`` prints the byte model."""
    argv = sys.argv[1:] if argv is None else argv
    if "--bytes" in argv:
        print_bytes()
        return 0
    from benchmarks.runner import main as run

    return run(["--families", FAMILY, *argv])


if __name__ == "__main__":
    sys.exit(main())
