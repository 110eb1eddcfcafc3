"""Attention benchmark: fastvit's flash attention (Triton, CUDA) vs SDPA's backends, eager and torch.compile.

Two parts, bf16, CUDA events (``common.cuda_time``: median, p20/p80); fastvit on every backend that
implements the op here:

1. ``attention`` on (B, H, N, D) tensors, forward and forward+backward, at ViT-S/B/L (batch 256,
   N = 197, D = 64, heads 6/12/16), ViT-B at 384 (N = 577) and N = 3136 (56 x 56 tokens), against
   ``F.scaled_dot_product_attention`` under each ``torch.nn.attention.sdpa_kernel`` backend (flash,
   cuDNN, memory-efficient), eager ``softmax(q k^T * scale) v`` and ``torch.compile`` of that eager code.
   At N <= 256 also fastvit with the two-pass backward forced (``FUSED_BWD_MAX_KEYS = 0``), to check on
   the GPU the one-pass threshold that the sm_90 spill report set (one pass up to 256 keys at D = 64).
2. The packed path end to end, qkv projection output (B, N, 3C) -> output projection input (B, N, C):
   ``fastvit.ops.attention_qkvpacked`` vs timm's ``Attention`` core (reshape, permute, unbind, SDPA,
   transpose, reshape), and the whole modules (``fastvit.nn.Attention`` vs ``timm.layers.Attention``,
   same weights), forward and forward+backward.

Roofline for the ViT-B/16 shape (B = 256, H = 12, N = 197, D = 64, bf16), H100 SXM at 989 TFLOP/s
dense bf16 and 3.35 TB/s:

- forward: 4 B H N^2 D = 30.5 GFLOP -> 0.031 ms; bytes q, k, v in + o out = 4 x 77.5 MB = 310 MB
  (+ 2.4 MB lse) -> 0.093 ms. Memory-bound: floor 0.093 ms.
- forward + backward: 3.5 x 30.5 = 107 GFLOP -> 0.108 ms; bytes 310 MB (forward) + q, k, v, dO in
  (310 MB) + dq, dk, dv out (232 MB) + lse = 857 MB -> 0.256 ms. Memory-bound: floor 0.256 ms, which
  the one-pass backward (Nk in one tile, the default up to 256 keys at D = 64) approaches; the two-pass
  backward (longer sequences) also reads o and reads q, k, v, dO twice: ~1.24 GB -> 0.37 ms.
- eager writes and re-reads S and P (B H N^2 bf16 = 238 MB each): ~1.3 GB forward, > 0.4 ms.
Expected: forward ~0.12-0.15 ms (60-75 % of the memory floor, on par with the best SDPA backend);
forward+backward ~0.35-0.45 ms (one-pass backward: one program per (batch, head) with 8 warps, 1 per SM
at ~115-130 KB of shared memory; occupancy, not bytes, may bound it: the two-pass row measures the
alternative); the packed path wins end to end at N = 197 because it skips the permute
copies that timm pays around SDPA (q, k, v out of the (B, N, 3, H, D) projection and the output back).
The ``pct_roofline`` column is floor / measured for each row's shape.

The CUDA rows (``fastvit[cuda]``, csrc/attention.cu) on the H200 (989 TFLOP/s dense bf16, 4.8 TB/s), same
shape: floor forward max(30.5 GFLOP / 989, 310 MB / 4.8 TB/s) = max(0.031, 0.065) = 0.065 ms; forward +
backward max(107 GFLOP -> 0.108 ms, 857 MB -> 0.18 ms) = 0.18 ms. The kernels are FlashAttention-2's
schedule on mma.sync m16n8k16 (64 x 64 tiles, 4 warps; the forward reads the next K, V tiles into
registers while the current ones' MMAs run; the backward: one CTA per (batch, head) walking its key
blocks, five MMAs per tile pair, dQ accumulated in fp32 in shared memory here, so its bytes are the
floor's plus Q and dO re-read per key block, from L2). mma.sync peaks near two thirds of wgmma's rate
on Hopper, the tiles reach shared memory by plain loads (no TMA, no cp.async; fragments by ldmatrix)
and 160-255 registers per thread leave 2-3 CTAs of 4 warps per SM, so expect load latency rather than
either floor to bind: forward ~0.15-0.25 ms, forward + backward ~0.5-0.8 ms at ViT-B/16 (below Triton's
wgmma kernels and SDPA's flash backend), to be replaced by measurement.

On sm_90 the CUDA kernels are the TMA / wgmma ones (csrc/attention_sm90.cu; the mma.sync pair stays as
the ``fastvit[cuda] mma.sync`` row). Forward: 128 x 128 tiles, one producer warp issuing TMA loads into a
two-stage K / V ring, two consumer warpgroups of 64 query rows each, S and O on wgmma at the full Hopper
rate. At ViT-B/16 that is 2 x 12 x 256 = 6144 CTAs, one per SM (168 registers x 384 threads), about 46
waves of a CTA that loads 80 KB (Q once, two K / V tiles) and runs two QK^T -> softmax -> PV steps,
the second tile's softmax starting while the first tile's PV runs (FlashAttention-3's intra-warpgroup
overlap, of which ptxas keeps the scaling, masking and row max, not the exponentials; not its ping-pong
between warpgroups); expect the forward at 0.10-0.16 ms (40-65 % of the 0.065 ms
floor), the prologue (barrier set-up, Q load) of each short CTA being the main cost at N = 197. Backward: one CTA per
(batch, head) = 3072 CTAs, each walking 2 key blocks of 128 x 4 query blocks of 64 (K, V loaded once per
key block, Q and dO once per key block: 2 x the floor's Q, dO bytes, mostly from L2), five wgmma products
per step and dQ in an fp32 workspace between the two key blocks (written, then read back by the same
CTA, 310 MB that the 50 MB L2 should mostly hold); within a step P^T is computed while dP^T's wgmma
runs and dS^T while dV's does, but steps do not overlap each other. Expect forward + backward at 0.35-0.5 ms
(35-50 % of the 0.18 ms floor), near SDPA's flash backend; measured, not yet.

``python -m benchmarks.bench_attention`` is ``python -m benchmarks --families attention``: without a GPU
it says so and runs the family's CPU smoke checks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from benchmarks.common import Case, Variant, fused_backends, make_step
from benchmarks.smoke import SmokeCheck, draw

FAMILY = "attention"
# name, batch, heads, N, head dim
SHAPES = [
    ("ViT-S/16", 256, 6, 197, 64),
    ("ViT-B/16", 256, 12, 197, 64),
    ("ViT-L/16", 256, 16, 197, 64),
    ("ViT-B/16@384", 64, 12, 577, 64),
    ("N=3136", 16, 12, 3136, 64),
]


def flops(B, H, N, D, backward: bool) -> float:
    """QK^T and PV: 4 B H N^2 D forward; backward 2.5x that (dV, dP, dQ, dK and the recomputed S)."""
    fwd = 4.0 * B * H * N * N * D
    return fwd * (3.5 if backward else 1.0)


def floor_bytes(B, H, N, D, backward: bool, elt: int = 2) -> float:
    """q, k, v in, o and lse out forward; q, k, v, dO and lse in, dq, dk, dv out backward."""
    tensor = B * H * N * D * elt
    lse = B * H * N * 4
    return 4 * tensor + lse + ((7 * tensor + lse) if backward else 0)


def eager_attention(q, k, v):
    return torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1) @ v


def _sdpa(backend) -> Callable:
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _two_pass(fn: Callable) -> Callable:
    """``fn`` with fastvit's two-pass backward forced (``FUSED_BWD_MAX_KEYS = 0``, read when the backward
    launches: ``fn`` must be the whole step, backward included)."""
    from fastvit.kernels import attention as kern

    def run(*args):
        before = kern.FUSED_BWD_MAX_KEYS
        kern.FUSED_BWD_MAX_KEYS = 0
        try:
            return fn(*args)
        finally:
            kern.FUSED_BWD_MAX_KEYS = before

    return run


def _mma_sync(fn: Callable) -> Callable:
    """``fn`` with the CUDA backend's mma.sync kernels forced (``FASTVIT_ATTENTION_SM90=0``), so that an
    sm_90 GPU measures them next to the TMA / wgmma ones (csrc/attention_sm90.cu)."""
    import os

    def run(*args):
        before = os.environ.get("FASTVIT_ATTENTION_SM90")
        os.environ["FASTVIT_ATTENTION_SM90"] = "0"
        try:
            return fn(*args)
        finally:
            if before is None:
                del os.environ["FASTVIT_ATTENTION_SM90"]
            else:
                os.environ["FASTVIT_ATTENTION_SM90"] = before

    return run


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _core_case(name: str, B: int, H: int, N: int, D: int, backward: bool) -> Case:
    from torch.nn.attention import SDPBackend

    def inputs():
        qkv = [torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward) for _ in range(3)]
        return SimpleNamespace(qkv=qkv, grad=torch.randn_like(qkv[0]) if backward else None)

    def variant(fn: Callable[[], Callable], wrap: Callable[[Callable], Callable] | None = None, **kw) -> Variant:
        """``wrap`` wraps the whole timed step, so that a setting holds for the backward too."""
        def make(i):
            f = fn()
            step = make_step(lambda: f(*i.qkv), backward, i.qkv, i.grad)
            return step if wrap is None else wrap(step)

        return Variant(make, **kw)

    def fused():
        from fastvit import ops

        return ops.attention

    variants = {}
    for b in fused_backends("attention"):
        variants[f"fastvit[{b}]"] = variant(fused, backends={FAMILY: b})
    if "cuda" in fused_backends("attention") and _hopper():
        variants["fastvit[cuda] mma.sync"] = variant(fused, wrap=_mma_sync, backends={FAMILY: "cuda"})
    if backward and N <= 256 and "triton" in fused_backends("attention"):
        variants["fastvit[triton] two-pass bwd"] = variant(fused, wrap=_two_pass, backends={FAMILY: "triton"})
    variants.update({
        "sdpa flash": variant(lambda: _sdpa(SDPBackend.FLASH_ATTENTION), baseline=True),
        "sdpa cudnn": variant(lambda: _sdpa(SDPBackend.CUDNN_ATTENTION), baseline=True),
        "sdpa mem-efficient": variant(lambda: _sdpa(SDPBackend.EFFICIENT_ATTENTION), baseline=True),
        "eager": variant(lambda: eager_attention, baseline=True),
        "torch.compile eager": variant(lambda: torch.compile(eager_attention), baseline=True),
    })
    return Case(FAMILY, f"attention {name}", {"B": B, "H": H, "N": N, "D": D}, "bf16", "fwd+bwd" if backward else "fwd",
                inputs, variants, flops=flops(B, H, N, D, backward), bytes=floor_bytes(B, H, N, D, backward))


def _packed_case(name: str, B: int, H: int, N: int, D: int, backward: bool) -> Case:
    """qkv projection output (B, N, 3C) -> output projection input (B, N, C)."""
    C = H * D

    def timm_core(qkv):  # timm Attention.forward between self.qkv and self.proj (fused_attn path)
        q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)

    def fastvit_core(qkv):
        from fastvit import ops

        return ops.attention_qkvpacked(qkv, H)

    def inputs():
        qkv = torch.randn(B, N, 3 * C, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
        grad = torch.randn(B, N, C, device="cuda", dtype=torch.bfloat16) if backward else None
        return SimpleNamespace(qkv=qkv, grad=grad)

    def variant(fn, **kw) -> Variant:
        return Variant(lambda i: make_step(lambda: fn(i.qkv), backward, [i.qkv], i.grad), **kw)

    variants = {f"fastvit[{b}]": variant(fastvit_core, backends={FAMILY: b}) for b in fused_backends("attention_qkvpacked")}
    variants["timm core (permute + sdpa + reshape)"] = variant(timm_core, baseline=True)
    return Case(FAMILY, f"attention_qkvpacked {name}", {"B": B, "H": H, "N": N, "D": D}, "bf16",
                "fwd+bwd" if backward else "fwd", inputs, variants,
                flops=flops(B, H, N, D, backward), bytes=floor_bytes(B, H, N, D, backward))


def _module_case(name: str, B: int, H: int, N: int, D: int, backward: bool) -> Case | None:
    """fastvit.nn.Attention against timm.layers.Attention, same weights (None without timm)."""
    try:
        from timm.layers import Attention as TimmAttention
    except ImportError:
        return None
    C = H * D

    def inputs():
        timm_mod = TimmAttention(C, num_heads=H, qkv_bias=True).to("cuda", torch.bfloat16)
        x = torch.randn(B, N, C, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
        return SimpleNamespace(timm=timm_mod, x=x, grad=torch.randn_like(x) if backward else None)

    def ours(i):
        import fastvit.nn as fnn

        mod = fnn.Attention(C, H, qkv_bias=True).to("cuda", torch.bfloat16)
        mod.load_state_dict(i.timm.state_dict())
        return mod

    def variant(module: Callable, **kw) -> Variant:
        def make(i):
            mod = module(i)
            return make_step(lambda: mod(i.x), backward, [i.x, *mod.parameters()], i.grad)

        return Variant(make, **kw)

    variants = {f"fastvit.nn.Attention[{b}]": variant(ours, backends={FAMILY: b})
                for b in fused_backends("attention_qkvpacked")}
    variants["timm Attention"] = variant(lambda i: i.timm, baseline=True)
    return Case(FAMILY, f"Attention module {name}", {"B": B, "H": H, "N": N, "D": D}, "bf16",
                "fwd+bwd" if backward else "fwd", inputs, variants)


def cases(quick: bool = False) -> Iterator[Case]:
    """The core op at every shape (ViT-B only when ``quick``); the packed op and the module at the ViT
    shapes (N <= 577), fwd and fwd+bwd."""
    shapes = [SHAPES[1]] if quick else SHAPES
    for shape in shapes:
        for backward in (False, True):
            yield _core_case(*shape, backward)
    for shape in shapes:
        if shape[3] > 577:
            continue
        for backward in (False, True):
            yield _packed_case(*shape, backward)
            case = _module_case(*shape, backward)
            if case is not None:
                yield case


def smoke_checks() -> Iterator[SmokeCheck]:
    """attention on (1, 2, 7, 32); attention_qkvpacked on (1, 7, 3 * 64), 2 heads."""
    from fastvit import ops

    def attention(dtype, device):
        q, k, v = (draw(1, 2, 7, 32, dtype=dtype, device=device) for _ in range(3))
        return (lambda: ops.attention(q, k, v)), [q, k, v]

    def packed(dtype, device):
        qkv = draw(1, 7, 3 * 64, dtype=dtype, device=device)
        return (lambda: ops.attention_qkvpacked(qkv, 2)), [qkv]

    yield SmokeCheck(FAMILY, "attention", {"B": 1, "H": 2, "N": 7, "D": 32}, attention)
    yield SmokeCheck(FAMILY, "attention_qkvpacked", {"B": 1, "H": 2, "N": 7, "D": 32}, packed)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks --families attention [options]``."""
    from benchmarks.runner import main as run

    return run(["--families", FAMILY, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
