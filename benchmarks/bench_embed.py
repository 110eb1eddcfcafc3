"""Embed family benchmark: fused patch embedding and T2T soft split against their PyTorch formulations.

Run: ``python -m benchmarks.bench_embed [--batch 256] [--no-compile] [--no-save]`` (bf16, CUDA events,
median of ``triton.testing.do_bench`` with p20/p80). Without a GPU it prints one line and exits 0.

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
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import gpu_available, markdown_table, save, time_ms

DEVICE = "cuda"  # (a smoke run of the script's logic may point it elsewhere)
H100_BF16_FLOPS = 989e12
H100_BYTES_PER_S = 3.35e12


def _grad_step(fn, params, grad):
    def step():
        out = fn()
        return torch.autograd.grad(out, params, grad)

    return step


def _measure(rows, case, variant, fn, flops, nbytes, baseline=False):
    t = time_ms(fn)
    sec = t["median_ms"] * 1e-3
    floor = max(flops / H100_BF16_FLOPS, nbytes / H100_BYTES_PER_S)
    rows.append({
        "case": case, "variant": variant, "baseline": baseline, **t,
        "TFLOP/s": flops / sec / 1e12 if flops else 0.0, "GB/s": nbytes / sec / 1e9,
        "% of roofline": 100.0 * floor / sec,
    })


def _ratios(rows):
    """Each fastvit row gets its speed-up over the best baseline of its case."""
    for case in {r["case"] for r in rows}:
        best = min((r["median_ms"] for r in rows if r["case"] == case and r["baseline"]), default=None)
        for r in rows:
            if r["case"] == case:
                r["x best baseline"] = best / r["median_ms"] if best else float("nan")


def bench_patch_embed(rows, B, compile_):
    from fastvit import ops, use_backend

    dev, dt = DEVICE, torch.bfloat16
    C, S, p, D = 3, 224, 16, 768
    n = (S // p) ** 2
    x = torch.randn(B, C, S, S, device=dev, dtype=dt)
    w = (torch.randn(D, C, p, p, device=dev, dtype=dt) * 0.02).requires_grad_()
    b = torch.zeros(D, device=dev, dtype=dt).requires_grad_()
    cls = torch.randn(1, 1, D, device=dev, dtype=dt).requires_grad_()
    pos = torch.randn(1, n + 1, D, device=dev, dtype=dt).requires_grad_()
    params = (w, b, cls, pos)
    grad = torch.randn(B, n + 1, D, device=dev, dtype=dt)
    flops = 2 * B * n * D * C * p * p
    io = x.numel() * 2 + grad.numel() * 2 + w.numel() * 2 + pos.numel() * 2

    def timm_style():
        y = F.conv2d(x, w, b, stride=p).flatten(2).transpose(1, 2)
        return torch.cat([cls.expand(B, -1, -1), y], dim=1) + pos

    def linear_style():
        patches = x.reshape(B, C, S // p, p, S // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, n, C * p * p)
        y = F.linear(patches, w.reshape(D, -1), b)
        return torch.cat([cls.expand(B, -1, -1), y], dim=1) + pos

    def fused():
        with use_backend({"embed": "triton"}):
            return ops.patch_embed(x, w, b, p, pos, cls)

    variants = [("timm Conv2d+flatten+cat+add", timm_style, True), ("Linear on reshaped patches+cat+add", linear_style, True)]
    if compile_:
        variants += [("torch.compile(timm)", torch.compile(timm_style), True),
                     ("torch.compile(linear)", torch.compile(linear_style), True)]
    variants.append(("fastvit triton", fused, False))
    case = f"patch_embed ViT-B/16 B={B} fwd"
    for name, fn, base in variants:
        with torch.no_grad():
            _measure(rows, case, name, fn, flops, io, base)
    case = f"patch_embed ViT-B/16 B={B} fwd+bwd"
    for name, fn, base in variants:
        _measure(rows, case, name, _grad_step(fn, params, grad), 2 * flops, 2 * io, base)


def bench_vit_pytorch_form(rows, B, compile_):
    from fastvit import ops, use_backend

    dev, dt = DEVICE, torch.bfloat16
    C, S, p, D = 3, 224, 16, 768
    n, K = (S // p) ** 2, C * p * p
    x = torch.randn(B, C, S, S, device=dev, dtype=dt)
    w = (torch.randn(D, K, device=dev, dtype=dt) * 0.02).requires_grad_()
    b = torch.zeros(D, device=dev, dtype=dt).requires_grad_()
    g1, b1 = torch.ones(K, device=dev, dtype=dt).requires_grad_(), torch.zeros(K, device=dev, dtype=dt).requires_grad_()
    g2, b2 = torch.ones(D, device=dev, dtype=dt).requires_grad_(), torch.zeros(D, device=dev, dtype=dt).requires_grad_()
    cls = torch.randn(1, D, device=dev, dtype=dt).requires_grad_()
    pos = torch.randn(n + 1, D, device=dev, dtype=dt).requires_grad_()
    params = (w, b, g1, b1, g2, b2, cls, pos)
    grad = torch.randn(B, n + 1, D, device=dev, dtype=dt)
    flops = 2 * B * n * D * K
    io = x.numel() * 2 + grad.numel() * 2 + w.numel() * 2 + pos.numel() * 2

    def eager():
        patches = x.reshape(B, C, S // p, p, S // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, n, K)
        y = F.layer_norm(F.linear(F.layer_norm(patches, (K,), g1, b1), w, b), (D,), g2, b2)
        return torch.cat([cls.expand(B, 1, D), y], dim=1) + pos

    def fused():
        with use_backend({"embed": "triton"}):
            return ops.patch_embed(x, w, b, p, pos, cls, patch_order="hwc", pre_norm=True, pre_norm_weight=g1,
                                   pre_norm_bias=b1, post_norm=True, post_norm_weight=g2, post_norm_bias=b2)

    variants = [("einops+LN+Linear+LN+cat+add", eager, True)]
    if compile_:
        variants.append(("torch.compile(eager)", torch.compile(eager), True))
    variants.append(("fastvit triton", fused, False))
    for name, fn, base in variants:
        with torch.no_grad():
            _measure(rows, f"vit-pytorch patch embed B={B} fwd", name, fn, flops, io, base)
    for name, fn, base in variants:
        _measure(rows, f"vit-pytorch patch embed B={B} fwd+bwd", name, _grad_step(fn, params, grad), 2 * flops, 2 * io, base)


def bench_soft_split(rows, B, compile_):
    from fastvit import ops, use_backend
    from fastvit.ops.embed import soft_split_layer_norm

    dev, dt = DEVICE, torch.bfloat16
    for C, S, k, s, p, x_grad in ((3, 224, 7, 4, 2, False), (64, 56, 3, 2, 1, True), (64, 28, 3, 2, 1, True)):
        if C == 3:
            x = torch.randn(B, C, S, S, device=dev, dtype=dt)
        else:  # as T2T-ViT builds it: a (B, HW, C) token tensor viewed as a map (channels_last strides)
            x = torch.randn(B, S * S, C, device=dev, dtype=dt).transpose(1, 2).reshape(B, C, S, S)
        x.requires_grad_(x_grad)
        L, Fdim = ((S + 2 * p - k) // s + 1) ** 2, C * k * k
        wln = torch.ones(Fdim, device=dev, dtype=dt).requires_grad_()
        bln = torch.zeros(Fdim, device=dev, dtype=dt).requires_grad_()
        grad = torch.randn(B, L, Fdim, device=dev, dtype=dt)
        io = x.numel() * 2 + grad.numel() * 2
        unfold = torch.nn.Unfold(k, stride=s, padding=p)

        def split_eager(x=x, unfold=unfold):
            return unfold(x).transpose(1, 2)

        def split_ln_eager(x=x, unfold=unfold, wln=wln, bln=bln, Fdim=Fdim):
            return F.layer_norm(unfold(x).transpose(1, 2), (Fdim,), wln, bln)

        def split_fused(x=x, k=k, s=s, p=p):
            with use_backend({"embed": "triton"}):
                return ops.soft_split(x, k, s, p)

        def split_ln_fused(x=x, k=k, s=s, p=p, wln=wln, bln=bln):
            with use_backend({"embed": "triton"}):
                return soft_split_layer_norm(x, k, s, p, wln, bln)

        tag = f"k{k}s{s}p{p} ({B}, {C}, {S}, {S})"
        for label, eager, fused, params in (
            (f"soft_split {tag}", split_eager, split_fused, (x,) if x_grad else ()),
            (f"soft_split+LayerNorm {tag}", split_ln_eager, split_ln_fused, ((x,) if x_grad else ()) + (wln, bln)),
        ):
            variants = [("nn.Unfold+transpose" + ("+F.layer_norm" if "Layer" in label else ""), eager, True)]
            if compile_:
                variants.append(("torch.compile(eager)", torch.compile(eager), True))
            variants.append(("fastvit triton", fused, False))
            for name, fn, base in variants:
                with torch.no_grad():
                    _measure(rows, f"{label} fwd", name, fn, 0, io, base)
            if params:
                for name, fn, base in variants:
                    _measure(rows, f"{label} fwd+bwd", name, _grad_step(fn, params, grad), 0, 2 * io, base)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--no-save", action="store_true", help="print only, write nothing under benchmarks/results")
    ap.add_argument("--only", choices=("patch", "vit-pytorch", "soft-split"), default=None)
    args = ap.parse_args(argv)
    if not gpu_available("bench_embed"):
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    rows: list[dict] = []
    if args.only in (None, "patch"):
        bench_patch_embed(rows, args.batch, not args.no_compile)
    if args.only in (None, "vit-pytorch"):
        bench_vit_pytorch_form(rows, args.batch, not args.no_compile)
    if args.only in (None, "soft-split"):
        bench_soft_split(rows, args.batch, not args.no_compile)
    _ratios(rows)
    columns = ["case", "variant", "median_ms", "p20_ms", "p80_ms", "TFLOP/s", "GB/s", "% of roofline", "x best baseline"]
    print(markdown_table(rows, columns))
    if not args.no_save:
        print(f"saved {save('embed', rows, columns)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
