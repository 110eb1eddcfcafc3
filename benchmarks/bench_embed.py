"""Embed family benchmark: fused patch embedding and T2T soft split against their PyTorch formulations.

Run: ``python -m benchmarks.bench_embed [options]``, which is ``python -m benchmarks --families embed``
(bf16, CUDA events: ``common.cuda_time``, median with p20/p80; fastvit on every backend that implements
the op here). Without a GPU it says so and runs the family's CPU smoke checks.

Compared, in one run on one GPU:
- patch_embed, ViT-B/16 at 224 (B=256, C=3, p=16, D=768, cls (1, 1, D), pos (1, 197, D)), forward and
  forward+backward (weight, bias, cls, pos; images need no gradient):
  fastvit (triton) vs timm's PatchEmbed (Conv2d, flatten, transpose) + cls ``torch.cat`` + pos add, vs
  ``F.linear`` on reshaped patches + cat + add, and vs ``torch.compile`` of both.
- vit-pytorch's form (``(p1 p2 c)`` patches, LayerNorm, Linear, LayerNorm, then cls and pos) at the same
  shape: fastvit ``patch_embed(patch_order="hwc", pre_norm=True, post_norm=True)`` vs eager and compiled.
- soft_split at T2T-ViT-14's three splits (k7s4p2 on (B, 3, 224, 224) -> (B, 3136, 147); k3s2p1 on
  (B, 64, 56, 56) -> (B, 784, 576); k3s2p1 on (B, 64, 28, 28) -> (B, 196, 576)), alone and with the
  following LayerNorm (``soft_split_layer_norm``), vs ``nn.Unfold`` + transpose (+ ``F.layer_norm``),
  eager and compiled. Forward+backward differentiates x for the token maps (splits 1, 2) and the
  LayerNorm's parameters (the image of split 0 needs no gradient).

Roofline floors (H100 SXM: dense bf16 ~989 TFLOP/s, HBM ~3.35 TB/s), ViT-B/16, B=256:
- patch_embed forward: 2 * 50176 * 768 * 768 = 59.2 GFLOP -> 60 us; bytes: image 77.1 MB + tokens 77.5 MB
  + weight 1.2 MB + pos 0.3 MB = 156 MB -> 47 us. Floor 60 us (compute). Expected ~100 us (a K = 768
  GEMM whose A tile is a strided gather reaches ~60 % of peak); the eager chain pays cuDNN's conv plus
  three extra passes over the 77 MB token tensor (flatten/transpose copy, cat, add), ~250 us.
- patch_embed backward (no dx): dW GEMM 59.2 GFLOP (60 us) re-reading the image and dy (155 MB, 46 us),
  plus the batch reduction of dy for d pos / d cls / d bias (77 MB, 23 us): floor ~85 us; expected ~150 us.
- vit-pytorch form: the same GEMM plus two LayerNorms done in registers; forward floor as above (60 us),
  eager adds a patch copy (77 MB x 2), two LayerNorm passes (77 MB x 2 each), cat and add.
- soft_split k7s4p2, B=256: writes 236 MB (3136 x 147 bf16 per image), reads 77 MB -> 93 us floor.
  With the LayerNorm fused: same bytes (the unfused chain writes and re-reads the 236 MB once more:
  +472 MB, +141 us). Splits 1 and 2: 231 + 103 MB -> 100 us, 58 + 26 MB -> 25 us.

H200 (the device fastvit-gpu-check runs on: dense bf16 ~989 TFLOP/s, HBM3e ~4.8 TB/s), same shapes:
patch_embed forward floor 60 us (compute; bytes 156 MB -> 33 us), backward without dx ~60 us (dW GEMM;
bytes 232 MB -> 48 us); soft_split k7s4p2 65 us, splits 1 and 2 70 us and 18 us (bytes).

The CUDA rows (csrc/embed*.cu, "cuda" in fused_backends) appear by themselves. Expected, not measured
(no GPU run yet): the implicit GEMM runs mma.sync (m16n8k16) on 64 x 64 x 32 tiles with the next slice
read into registers, without a cp.async / TMA pipeline, at ~170-210 registers (2 blocks per SM), so a
fraction of the mma.sync rate (itself about two thirds of wgmma's on Hopper): ~0.2-0.3 ms forward, likely
slower than Triton (wgmma) and cuDNN's conv, short of the 1.3x-eager target until it is pipelined. The
soft split, fold and LayerNorm kernels are gathers with the same bytes as the Triton ones: expected
within ~1.5x of the byte floors above.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from benchmarks.common import Case, Variant, fused_backends, make_step
from benchmarks.smoke import SmokeCheck, draw

FAMILY = "embed"
BATCH = 256
C, S, P, D = 3, 224, 16, 768  # ViT-B/16 at 224
N = (S // P) ** 2
K = C * P * P


def _variants(eager: dict[str, Callable], fused: Callable, fn: str, backward: bool, params: Callable) -> dict[str, Variant]:
    """The eager formulations and their ``torch.compile`` (baselines), and ``fused`` on each backend of
    public function ``fn``; each is ``f(inputs) -> output``, differentiated w.r.t. ``params(inputs)``."""

    def variant(f: Callable, compile_: bool = False, **kw) -> Variant:
        def make(i):
            g = torch.compile(f) if compile_ else f
            return make_step(lambda: g(i), backward, params(i), i.grad)

        return Variant(make, **kw)

    out = {}
    for name, f in eager.items():
        out[name] = variant(f, baseline=True)
        out[f"torch.compile({name})"] = variant(f, compile_=True, baseline=True)
    for b in fused_backends(fn):
        out[f"fastvit[{b}]"] = variant(fused, backends={FAMILY: b})
    return out


def _patch_embed_case(B: int, backward: bool) -> Case:
    """timm's form: conv-layout weight (D, C, p, p), cls (1, 1, D), pos (1, N + 1, D)."""

    def inputs():
        dev, dt = "cuda", torch.bfloat16
        return SimpleNamespace(
            x=torch.randn(B, C, S, S, device=dev, dtype=dt),
            w=(torch.randn(D, C, P, P, device=dev, dtype=dt) * 0.02).requires_grad_(),
            b=torch.zeros(D, device=dev, dtype=dt).requires_grad_(),
            cls=torch.randn(1, 1, D, device=dev, dtype=dt).requires_grad_(),
            pos=torch.randn(1, N + 1, D, device=dev, dtype=dt).requires_grad_(),
            grad=torch.randn(B, N + 1, D, device=dev, dtype=dt) if backward else None,
        )

    def timm_style(i):
        y = F.conv2d(i.x, i.w, i.b, stride=P).flatten(2).transpose(1, 2)
        return torch.cat([i.cls.expand(B, -1, -1), y], dim=1) + i.pos

    def linear_style(i):
        patches = i.x.reshape(B, C, S // P, P, S // P, P).permute(0, 2, 4, 1, 3, 5).reshape(B, N, K)
        y = F.linear(patches, i.w.reshape(D, -1), i.b)
        return torch.cat([i.cls.expand(B, -1, -1), y], dim=1) + i.pos

    def fused(i):
        from fastvit import ops

        return ops.patch_embed(i.x, i.w, i.b, P, i.pos, i.cls)

    flops = 2.0 * B * N * D * K
    io = 2.0 * (B * C * S * S + B * (N + 1) * D + D * K + (N + 1) * D)
    variants = _variants({"timm Conv2d+flatten+cat+add": timm_style, "Linear on patches+cat+add": linear_style},
                         fused, "patch_embed", backward, lambda i: [i.w, i.b, i.cls, i.pos])
    return Case(FAMILY, "patch_embed ViT-B/16", {"B": B, "C": C, "img": S, "patch": P, "D": D}, "bf16",
                "fwd+bwd" if backward else "fwd", inputs, variants,
                flops=flops * (2 if backward else 1), bytes=io * (2 if backward else 1))


def _vit_pytorch_case(B: int, backward: bool) -> Case:
    """vit-pytorch's form: (p1 p2 c) patches, LayerNorm, Linear, LayerNorm, then cls (1, D) and pos (N + 1, D)."""

    def inputs():
        dev, dt = "cuda", torch.bfloat16

        def p(t):
            return t.to(dev, dt).requires_grad_()

        return SimpleNamespace(
            x=torch.randn(B, C, S, S, device=dev, dtype=dt), w=p(torch.randn(D, K) * 0.02), b=p(torch.zeros(D)),
            g1=p(torch.ones(K)), b1=p(torch.zeros(K)), g2=p(torch.ones(D)), b2=p(torch.zeros(D)),
            cls=p(torch.randn(1, D)), pos=p(torch.randn(N + 1, D)),
            grad=torch.randn(B, N + 1, D, device=dev, dtype=dt) if backward else None,
        )

    def eager(i):
        patches = i.x.reshape(B, C, S // P, P, S // P, P).permute(0, 2, 4, 3, 5, 1).reshape(B, N, K)
        y = F.layer_norm(F.linear(F.layer_norm(patches, (K,), i.g1, i.b1), i.w, i.b), (D,), i.g2, i.b2)
        return torch.cat([i.cls.expand(B, 1, D), y], dim=1) + i.pos

    def fused(i):
        from fastvit import ops

        return ops.patch_embed(i.x, i.w, i.b, P, i.pos, i.cls, patch_order="hwc", pre_norm=True, pre_norm_weight=i.g1,
                               pre_norm_bias=i.b1, post_norm=True, post_norm_weight=i.g2, post_norm_bias=i.b2)

    flops = 2.0 * B * N * D * K
    io = 2.0 * (B * C * S * S + B * (N + 1) * D + D * K + (N + 1) * D)
    variants = _variants({"einops+LN+Linear+LN+cat+add": eager}, fused, "patch_embed", backward,
                         lambda i: [i.w, i.b, i.g1, i.b1, i.g2, i.b2, i.cls, i.pos])
    return Case(FAMILY, "vit-pytorch patch embed ViT-B/16", {"B": B, "C": C, "img": S, "patch": P, "D": D}, "bf16",
                "fwd+bwd" if backward else "fwd", inputs, variants,
                flops=flops * (2 if backward else 1), bytes=io * (2 if backward else 1))


# T2T-ViT-14's three soft splits: channels, map size, kernel, stride, padding; the image needs no gradient
SPLITS = [(3, 224, 7, 4, 2), (64, 56, 3, 2, 1), (64, 28, 3, 2, 1)]


def _soft_split_case(B: int, Cs: int, Ss: int, k: int, s: int, p: int, with_ln: bool, backward: bool) -> Case:
    L, Fdim = ((Ss + 2 * p - k) // s + 1) ** 2, Cs * k * k
    x_grad = Cs != 3

    def inputs():
        dev, dt = "cuda", torch.bfloat16
        if x_grad:  # as T2T-ViT builds it: a (B, HW, C) token tensor viewed as a map (channels_last strides)
            x = torch.randn(B, Ss * Ss, Cs, device=dev, dtype=dt).transpose(1, 2).reshape(B, Cs, Ss, Ss)
        else:
            x = torch.randn(B, Cs, Ss, Ss, device=dev, dtype=dt)
        return SimpleNamespace(
            x=x.requires_grad_(x_grad and backward),
            w=torch.ones(Fdim, device=dev, dtype=dt).requires_grad_(),
            b=torch.zeros(Fdim, device=dev, dtype=dt).requires_grad_(),
            grad=torch.randn(B, L, Fdim, device=dev, dtype=dt) if backward else None,
        )

    def unfold(i):
        y = F.unfold(i.x, k, stride=s, padding=p).transpose(1, 2)
        return F.layer_norm(y, (Fdim,), i.w, i.b) if with_ln else y

    def fused(i):
        from fastvit import ops
        from fastvit.ops.embed import soft_split_layer_norm

        return soft_split_layer_norm(i.x, k, s, p, i.w, i.b) if with_ln else ops.soft_split(i.x, k, s, p)

    fn = "soft_split_layer_norm" if with_ln else "soft_split"
    eager_name = "nn.Unfold+transpose" + ("+F.layer_norm" if with_ln else "")
    variants = _variants({eager_name: unfold}, fused, fn, backward, lambda i: [i.x] + ([i.w, i.b] if with_ln else []))
    io = 2.0 * (B * Cs * Ss * Ss + B * L * Fdim)
    return Case(FAMILY, f"{'soft_split+LayerNorm' if with_ln else 'soft_split'} k{k}s{s}p{p}",
                {"B": B, "C": Cs, "H": Ss, "W": Ss, "L": L, "F": Fdim}, "bf16", "fwd+bwd" if backward else "fwd",
                inputs, variants, bytes=io * (2 if backward else 1))


def cases(quick: bool = False) -> Iterator[Case]:
    """patch_embed (timm's and vit-pytorch's forms) at ViT-B/16, batch 256; T2T-ViT-14's soft splits
    (the first only when ``quick``), alone and with the LayerNorm; fwd, and fwd+bwd where something
    needs a gradient."""
    for backward in (False, True):
        yield _patch_embed_case(BATCH, backward)
        yield _vit_pytorch_case(BATCH, backward)
    for split in SPLITS[:1] if quick else SPLITS:
        for with_ln in (False, True):
            for backward in (False, True):
                if backward and split[0] == 3 and not with_ln:
                    continue  # nothing to differentiate
                yield _soft_split_case(BATCH, *split, with_ln, backward)


def smoke_checks() -> Iterator[SmokeCheck]:
    """patch_embed of (2, 3, 32, 32) images, patch 8, D 64, cls and pos; soft_split k7s4p2 of the same."""
    from fastvit import ops

    def patch_embed(dtype, device):
        x = draw(2, 3, 32, 32, dtype=dtype, device=device, grad=False)
        w, b = draw(64, 3, 8, 8, dtype=dtype, device=device, scale=0.1), draw(64, dtype=dtype, device=device)
        cls, pos = draw(1, 1, 64, dtype=dtype, device=device), draw(1, 17, 64, dtype=dtype, device=device)
        return (lambda: ops.patch_embed(x, w, b, 8, pos, cls)), [w, b, cls, pos]

    def soft_split(dtype, device):
        x = draw(2, 3, 32, 32, dtype=dtype, device=device)
        return (lambda: ops.soft_split(x, 7, 4, 2)), [x]

    yield SmokeCheck(FAMILY, "patch_embed", {"B": 2, "C": 3, "img": 32, "patch": 8, "D": 64}, patch_embed)
    yield SmokeCheck(FAMILY, "soft_split k7s4p2", {"B": 2, "C": 3, "H": 32, "W": 32}, soft_split)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks --families embed [options]``."""
    from benchmarks.runner import main as run

    return run(["--families", FAMILY, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
