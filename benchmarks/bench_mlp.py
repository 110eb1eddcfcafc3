"""MLP benchmark: fastvit's LayerNorm-MLP (and LayerNorm), Triton and CUDA, vs eager PyTorch and torch.compile.

The ViT block's second half, ``x + fc2(gelu(fc1(layer_norm(x))))``, at ViT-S/B/L (batch 256, N = 197:
rows = 50432; C = 384 / 768 / 1024, hidden 4C), forward and forward+backward, bf16 in two modes:
``pure`` (activations and parameters bf16) and ``autocast`` (fp32 activations and parameters under
``torch.autocast(bfloat16)``, as timm trains; the residual stream and output stay fp32). Baselines,
same weights: eager ``nn.LayerNorm`` + ``nn.Linear`` + ``nn.GELU`` + ``nn.Linear`` + residual add, and
``torch.compile`` of that module. Also ``layer_norm`` alone (fastvit vs ``F.layer_norm`` / compiled).
"fwd" is inference (``no_grad``: fastvit's ``_infer`` op, nothing saved); "fwd+bwd" is a training step's
forward and backward. CUDA events (``common.cuda_time``: median, p20/p80), after untimed calls
that compile and autotune. fastvit runs on every backend that implements the op here ("triton",
"cuda" once the extension is built: ``python -m fastvit.build``).

Roofline for ViT-B/16 (M = 50432 rows, C = 768, H = 3072, pure bf16), H100 SXM at 989 TFLOP/s dense
bf16 and 3.35 TB/s:

- forward: 2 GEMMs, 4 M C H = 476 GFLOP -> 0.48 ms. Bytes of the fused chain (training: LN reads x,
  writes h; fc1 reads h, writes pre and act; fc2 reads act and the residual, writes out):
  6 x 77.5 MB + 3 x 310 MB = 1.40 GB -> 0.42 ms (inference, no pre: 1.09 GB, 0.33 ms). The GEMMs are
  compute-bound, so the floor is 0.48 ms.
- forward + backward: 12 M C H = 1.43 TFLOP -> 1.44 ms; backward bytes (dGELU GEMM reads dY, pre, writes
  dA; dW2 reads dY, act; dW1 reads dA, h; dh GEMM reads dA, writes dh; LN backward reads x, dh, writes
  dx) 8 x 77.5 MB + 5 x 310 MB = 2.17 GB -> 0.65 ms, 3.57 GB in all (1.07 ms). Floor 1.44 ms.
- eager moves ~1.8 GB forward (fc1's output, GELU's read and write, a separate residual add) and
  ~3.4 GB backward (GELU backward's three M x H passes, bias-gradient reductions, the residual-grad add):
  ~5.2 GB, about 0.5 ms more traffic than the fused chain, on top of the same GEMMs.
Expected: the Triton GEMMs reach roughly 550-700 TFLOP/s at these shapes (pointer loads, no TMA),
against cuBLAS's ~700; fused forward+backward ~2.3-2.6 ms at ViT-B vs eager ~2.9-3.2 ms (issue
target >= 1.2x eager, >= 1.05x torch.compile, which fuses the elementwise work but keeps cuBLAS
GEMMs and their separate bias/GELU passes). ``pct_roofline`` is the floor (measured peaks) over the measured time.
The "cuda" rows: CUTLASS 2.x tensor-core GEMMs (Sm80 mma.sync + cp.async, 128x128x32 tiles, 4
stages; no wgmma/TMA) reach at best ~60-65 % of the H100's bf16 peak, ~600 TFLOP/s: forward+backward
>= 2.4 ms at ViT-B, plus two small passes the Triton chain fuses and the CUDA one does not (fc2's bias
gradient as column sums of dY, 77 MB; the dY cast to bf16 under autocast; fc1's is fused into the
dGELU GEMM's epilogue). Expected: close to
Triton, ahead of eager only by the fused epilogues; a Hopper-native (CUTLASS 3.x, wgmma + TMA) mainloop
is the next step for this backend.

``python -m benchmarks.bench_mlp`` is ``python -m benchmarks --families mlp``: without a GPU it says so
and runs the family's CPU smoke checks.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import SimpleNamespace

import torch
from torch import nn

from benchmarks.common import Case, Variant, fused_backends, make_step
from benchmarks.smoke import SmokeCheck, draw

FAMILY = "mlp"
# name, rows (batch 256 x 197 tokens), C, hidden
SHAPES = [
    ("ViT-S/16", 256 * 197, 384, 1536),
    ("ViT-B/16", 256 * 197, 768, 3072),
    ("ViT-L/16", 256 * 197, 1024, 4096),
]


class EagerMLP(nn.Module):
    """The block's MLP half in plain PyTorch: x + fc2(gelu(fc1(norm(x))))."""

    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(C, eps=1e-6)
        self.fc1 = nn.Linear(C, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, C)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class FastvitMLP(nn.Module):
    """The same parameters through fastvit.ops.layernorm_mlp with the residual fused."""

    def __init__(self, eager: EagerMLP):
        super().__init__()
        self.e = eager

    def forward(self, x):
        from fastvit import ops

        e = self.e
        return ops.layernorm_mlp(x, e.norm.weight, e.norm.bias, e.fc1.weight, e.fc1.bias, e.fc2.weight, e.fc2.bias,
                                 eps=e.norm.eps, residual=x)


def mlp_flops(rows: int, C: int, hidden: int, backward: bool) -> float:
    """The two GEMMs: 4 rows C hidden forward, 3x that forward + backward."""
    return 4.0 * rows * C * hidden * (3.0 if backward else 1.0)


def mlp_bytes(rows: int, C: int, hidden: int, backward: bool) -> float:
    """The fused chain's bf16 traffic (docstring): inference 6 MC + 2 MH; training forward 6 MC + 3 MH
    plus backward 8 MC + 5 MH."""
    mc, mh = 2.0 * rows * C, 2.0 * rows * hidden
    return 14 * mc + 8 * mh if backward else 6 * mc + 2 * mh


def _mlp_case(name: str, rows: int, C: int, hidden: int, dtype: str, backward: bool) -> Case:
    autocast = dtype == "bf16 autocast"
    pdt = torch.float32 if autocast else torch.bfloat16

    def inputs():
        model = EagerMLP(C, hidden).to("cuda", pdt)
        x = torch.randn(rows // 197, 197, C, device="cuda", dtype=pdt, requires_grad=backward)
        return SimpleNamespace(model=model, x=x, grad=torch.randn_like(x) if backward else None)

    def step(i, module):
        return make_step(lambda: module(i.x), backward, [i.x, *i.model.parameters()], i.grad, autocast)

    variants = {
        "eager": Variant(lambda i: step(i, i.model), baseline=True),
        "torch.compile": Variant(lambda i: step(i, torch.compile(i.model)), baseline=True),
    }
    for b in fused_backends("layernorm_mlp"):
        variants[f"fastvit[{b}]"] = Variant(lambda i: step(i, FastvitMLP(i.model)), backends={FAMILY: b})
    return Case(FAMILY, f"layernorm_mlp {name}", {"rows": rows, "C": C, "hidden": hidden}, dtype,
                "fwd+bwd" if backward else "fwd", inputs, variants,
                flops=mlp_flops(rows, C, hidden, backward), bytes=mlp_bytes(rows, C, hidden, backward))


def _layer_norm_case(name: str, rows: int, C: int, backward: bool) -> Case:
    import torch.nn.functional as F

    def eager(x, w, b):
        return F.layer_norm(x, (C,), w, b, 1e-6)

    def inputs():
        w, b = (torch.randn(C, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        x = torch.randn(rows, C, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
        return SimpleNamespace(x=x, w=w, b=b, grad=torch.randn_like(x) if backward else None)

    def step(i, fn):
        return make_step(lambda: fn(i.x, i.w, i.b), backward, [i.x, i.w, i.b], i.grad)

    def fused(x, w, b):
        from fastvit import ops

        return ops.layer_norm(x, w, b, 1e-6)

    variants = {
        "eager": Variant(lambda i: step(i, eager), baseline=True),
        "torch.compile": Variant(lambda i: step(i, torch.compile(eager)), baseline=True),
    }
    for b in fused_backends("layer_norm"):
        variants[f"fastvit[{b}]"] = Variant(lambda i: step(i, fused), backends={FAMILY: b})
    # bytes: x in, y out (+ dy in, dx out backward), bf16
    return Case(FAMILY, f"layer_norm {name}", {"rows": rows, "C": C}, "bf16", "fwd+bwd" if backward else "fwd",
                inputs, variants, bytes=rows * C * 2.0 * (4 if backward else 2))


def cases(quick: bool = False) -> Iterator[Case]:
    """LayerNorm-MLP at ViT-S/B/L (ViT-B only when ``quick``), pure bf16 and autocast, fwd and fwd+bwd;
    LayerNorm alone, pure bf16."""
    for name, rows, C, hidden in SHAPES[1:2] if quick else SHAPES:
        for dtype in ("bf16", "bf16 autocast"):
            for backward in (False, True):
                yield _mlp_case(name, rows, C, hidden, dtype, backward)
        for backward in (False, True):
            yield _layer_norm_case(name, rows, C, backward)


def smoke_checks() -> Iterator[SmokeCheck]:
    """layer_norm on (7, 64); layernorm_mlp on (7, 64), hidden 256, residual fused."""
    from fastvit import ops

    def layer_norm(dtype, device):
        x = draw(7, 64, dtype=dtype, device=device)
        w, b = draw(64, dtype=dtype, device=device), draw(64, dtype=dtype, device=device)
        return (lambda: ops.layer_norm(x, w, b, 1e-6)), [x, w, b]

    def layernorm_mlp(dtype, device):
        C, H = 64, 256
        x = draw(7, C, dtype=dtype, device=device)
        ln_w, ln_b = draw(C, dtype=dtype, device=device), draw(C, dtype=dtype, device=device)
        w1, b1 = draw(H, C, dtype=dtype, device=device, scale=C**-0.5), draw(H, dtype=dtype, device=device)
        w2, b2 = draw(C, H, dtype=dtype, device=device, scale=H**-0.5), draw(C, dtype=dtype, device=device)
        leaves = [x, ln_w, ln_b, w1, b1, w2, b2]
        return (lambda: ops.layernorm_mlp(x, ln_w, ln_b, w1, b1, w2, b2, eps=1e-6, residual=x)), leaves

    yield SmokeCheck(FAMILY, "layer_norm", {"rows": 7, "C": 64}, layer_norm)
    yield SmokeCheck(FAMILY, "layernorm_mlp", {"rows": 7, "C": 64, "hidden": 256}, layernorm_mlp)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks --families mlp [options]``."""
    from benchmarks.runner import main as run

    return run(["--families", FAMILY, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
