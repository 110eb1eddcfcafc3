"""Attention benchmark: fastvit's Triton flash attention vs SDPA's backends, eager and torch.compile.

Two parts, bf16, CUDA events (``triton.testing.do_bench`` median, p20/p80):

1. ``attention`` on (B, H, N, D) tensors, forward and forward+backward, at ViT-S/B/L (batch 256,
   N = 197, D = 64, heads 6/12/16), ViT-B at 384 (N = 577) and N = 3136 (56 x 56 tokens), against
   ``F.scaled_dot_product_attention`` under each ``torch.nn.attention.sdpa_kernel`` backend (flash,
   cuDNN, memory-efficient), eager ``softmax(q k^T * scale) v`` and ``torch.compile`` of that eager code.
   At N <= 256 also fastvit with the one-pass backward forced (``FUSED_BWD_MAX_TILE = 256 * D``), to
   decide that threshold on the GPU.
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
  the one-pass backward (Nk in one tile) approaches; the two-pass backward used by default at N = 197
  (D = 64) also reads o and reads q, k, v, dO twice: ~1.24 GB -> 0.37 ms.
- eager writes and re-reads S and P (B H N^2 bf16 = 238 MB each): ~1.3 GB forward, > 0.4 ms.
Expected: forward ~0.12-0.15 ms (60-75 % of the memory floor, on par with the best SDPA backend);
forward+backward ~0.45-0.5 ms (two-pass backward); the packed path wins end to end at N = 197 because it skips the permute
copies that timm pays around SDPA (q, k, v out of the (B, N, 3, H, D) projection and the output back).
The ``pct_roofline`` column is floor / measured for each row's shape.

``python -m benchmarks.bench_attention`` prints one line and exits 0 on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from benchmarks.common import gpu_available, markdown_table, save, time_ms

PEAK_TFLOPS = 989.0
PEAK_TBPS = 3.35

# name, batch, heads, N, head dim
SHAPES = [
    ("ViT-S/16", 256, 6, 197, 64),
    ("ViT-B/16", 256, 12, 197, 64),
    ("ViT-L/16", 256, 16, 197, 64),
    ("ViT-B/16@384", 64, 12, 577, 64),
    ("N=3136", 16, 12, 3136, 64),
]


def flops(B, H, N, D, backward: bool) -> float:
    fwd = 4.0 * B * H * N * N * D
    return fwd * (3.5 if backward else 1.0)


def floor_ms(B, H, N, D, backward: bool, elt: int = 2) -> float:
    """max(compute, memory) lower bound: q, k, v in, o and lse out forward; q, k, v, dO and lse in,
    dq, dk, dv out backward."""
    tensor = B * H * N * D * elt
    lse = B * H * N * 4
    nbytes = 4 * tensor + lse + ((7 * tensor + lse) if backward else 0)
    return max(flops(B, H, N, D, backward) / (PEAK_TFLOPS * 1e12), nbytes / (PEAK_TBPS * 1e12)) * 1e3


def eager_attention(q, k, v):
    return torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1) @ v


def _timed(fn, inputs, backward: bool, params=()):
    """Median/p20/p80 ms of fn(*inputs) (forward) or of forward + backward w.r.t. the inputs (and params)."""
    if backward:
        out = fn(*inputs)
        grad = torch.randn_like(out)
        wrt = [*inputs, *params]

        def step():
            torch.autograd.grad(fn(*inputs), wrt, grad)
    else:

        def step():
            with torch.no_grad():
                fn(*inputs)

    step()
    torch.cuda.synchronize()
    return time_ms(step)


def _try(fn, inputs, backward, params=()):
    try:
        return _timed(fn, inputs, backward, params)
    except Exception as e:  # noqa: BLE001 -- a backend that does not serve the shape, OOM, out of resources
        torch.cuda.empty_cache()
        return {"error": str(e).splitlines()[0][:80]}


def bench_core(rows: list[dict]) -> None:
    import fastvit
    from fastvit import ops
    from fastvit.kernels import attention as kern
    from torch.nn.attention import SDPBackend, sdpa_kernel

    compiled_eager = torch.compile(eager_attention)

    def fastvit_attention(q, k, v):
        return ops.attention(q, k, v)

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        return run

    for name, B, H, N, D in SHAPES:
        inputs = [torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        for backward in (False, True):
            with fastvit.use_backend({"attention": "triton"}):
                candidates = {"fastvit": _try(fastvit_attention, inputs, backward)}
                if N <= 256:
                    before = kern.FUSED_BWD_MAX_TILE
                    kern.FUSED_BWD_MAX_TILE = 256 * D
                    try:
                        candidates["fastvit one-pass bwd"] = _try(fastvit_attention, inputs, backward)
                    finally:
                        kern.FUSED_BWD_MAX_TILE = before
            baselines = {
                "sdpa flash": _try(sdpa(SDPBackend.FLASH_ATTENTION), inputs, backward),
                "sdpa cudnn": _try(sdpa(SDPBackend.CUDNN_ATTENTION), inputs, backward),
                "sdpa mem-efficient": _try(sdpa(SDPBackend.EFFICIENT_ATTENTION), inputs, backward),
                "eager": _try(eager_attention, inputs, backward),
                "torch.compile eager": _try(compiled_eager, inputs, backward),
            }
            ok = [v["median_ms"] for v in baselines.values() if "median_ms" in v]
            best = min(ok) if ok else math.nan
            floor = floor_ms(B, H, N, D, backward)
            for label, t in {**candidates, **baselines}.items():
                row = {"part": "core", "shape": name, "B": B, "H": H, "N": N, "D": D,
                       "pass": "fwd+bwd" if backward else "fwd", "impl": label}
                if "median_ms" in t:
                    row.update(t)
                    row["tflops"] = flops(B, H, N, D, backward) / (t["median_ms"] * 1e-3) / 1e12
                    row["pct_roofline"] = 100.0 * floor / t["median_ms"]
                    row["x vs best baseline"] = best / t["median_ms"]
                    for b, bt in baselines.items():
                        if "median_ms" in bt and label in candidates:
                            row[f"x vs {b}"] = bt["median_ms"] / t["median_ms"]
                else:
                    row["error"] = t["error"]
                rows.append(row)
        del inputs
        torch.cuda.empty_cache()


def bench_packed(rows: list[dict]) -> None:
    import fastvit
    import fastvit.nn as fnn
    from fastvit import ops

    try:
        from timm.layers import Attention as TimmAttention
    except ImportError:
        TimmAttention = None

    for name, B, H, N, D in SHAPES[:4]:
        C = H * D

        def timm_core(qkv):  # timm Attention.forward between self.qkv and self.proj (fused_attn path)
            q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)

        def fastvit_core(qkv):
            return ops.attention_qkvpacked(qkv, H)

        qkv = torch.randn(B, N, 3 * C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        x = torch.randn(B, N, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        mods = {}
        if TimmAttention is not None:
            timm_mod = TimmAttention(C, num_heads=H, qkv_bias=True).cuda().bfloat16()
            ours = fnn.Attention(C, H, qkv_bias=True).cuda().bfloat16()
            ours.load_state_dict(timm_mod.state_dict())
            mods = {"module fastvit.nn.Attention": (ours, "fastvit"), "module timm Attention": (timm_mod, "baseline")}
        for backward in (False, True):
            results = {}
            with fastvit.use_backend({"attention": "triton"}):
                results["core fastvit attention_qkvpacked"] = (_try(fastvit_core, [qkv], backward), "fastvit")
                for label, (mod, kind) in mods.items():
                    if kind == "fastvit":
                        results[label] = (_try(mod, [x], backward, list(mod.parameters())), kind)
            results["core timm (permute + sdpa + reshape)"] = (_try(timm_core, [qkv], backward), "baseline")
            for label, (mod, kind) in mods.items():
                if kind == "baseline":
                    results[label] = (_try(mod, [x], backward, list(mod.parameters())), kind)
            for label, (t, kind) in results.items():
                row = {"part": "packed", "shape": name, "B": B, "H": H, "N": N, "D": D,
                       "pass": "fwd+bwd" if backward else "fwd", "impl": label}
                if "median_ms" in t:
                    row.update(t)
                    if label.startswith("core"):
                        row["pct_roofline"] = 100.0 * floor_ms(B, H, N, D, backward) / t["median_ms"]
                    twin = {"core fastvit attention_qkvpacked": "core timm (permute + sdpa + reshape)",
                            "module fastvit.nn.Attention": "module timm Attention"}.get(label)
                    if twin and "median_ms" in results[twin][0]:
                        row["x vs timm"] = results[twin][0]["median_ms"] / t["median_ms"]
                else:
                    row["error"] = t["error"]
                rows.append(row)
        del qkv, x
        torch.cuda.empty_cache()


def main() -> None:
    if not gpu_available("bench_attention"):
        return
    rows: list[dict] = []
    with contextlib.suppress(KeyboardInterrupt):
        bench_core(rows)
        bench_packed(rows)
    columns = ["part", "shape", "pass", "impl", "median_ms", "p20_ms", "p80_ms", "tflops", "pct_roofline",
               "x vs best baseline", "x vs sdpa flash", "x vs sdpa cudnn", "x vs sdpa mem-efficient",
               "x vs eager", "x vs torch.compile eager", "x vs timm", "error"]
    print(markdown_table(rows, columns))
    print(f"saved {save('attention', rows, columns)}")


if __name__ == "__main__":
    main()
