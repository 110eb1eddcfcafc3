"""torch.compile and fastvit's Triton launches: what Inductor does with each user kernel, checked on CPU
(the compile itself is a GPU test: tests/test_mlp.py, test_attention.py, ...)."""

import json

import pytest

from numerics import run_without_interpreter


def test_inductor_mutation_analysis_reads_every_triton_launch():
    """torch.compile's Inductor analyses each user Triton kernel for the tensors it writes; where that
    analysis raises (pytorch#170049: integer arguments divisible by 16), Inductor assumes every tensor
    argument is written and clones all of them on each call. Every launch fastvit-gpu-check makes
    (ViT-B/16 and T2T-ViT-14, bf16, forward and backward; the analysis targets sm_90 through a
    stand-in driver) must be analysed without an exception, and leave its inputs unwritten."""
    out = run_without_interpreter("""
        import os
        import torch
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
        from triton.runtime.autotuner import Autotuner
        from torch._higher_order_ops import triton_kernel_wrap as W

        class StandInDriver:
            def get_current_device(self): return 0
            def get_current_stream(self, device=None): return 0
            def get_current_target(self): return GPUTarget("cuda", 90, 32)

        driver.set_active(StandInDriver())
        from benchmarks import compile_ahead as CA
        os.environ.pop("TRITON_INTERPRET", None)
        CA.patch_launchers()
        launches = []

        class Keep:  # wrap_triton(kernel)[grid](...) keeps the kernel and its named arguments
            def __init__(self, kernel):
                self.kernel = kernel.kernel if isinstance(kernel, CA.RecordInsteadOfLaunch) else kernel
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    fn = self.kernel.fn if isinstance(self.kernel, Autotuner) else self.kernel
                    named = {**dict(zip(fn.arg_names, args)), **kwargs}
                    launches.append((self.kernel, {k: v for k, v in named.items() if k not in ("num_warps", "num_stages")}))
                return launch

        torch.library.wrap_triton = Keep
        import fastvit.kernels.performer as P
        P._keep_mask_kernel = Keep(P._keep_mask_kernel)
        CA._record_mlp(32, 197, 768, 3072, torch.bfloat16, torch.bfloat16)
        CA._record_mlp(32, 197, 768, 3072, torch.float32, torch.bfloat16)
        CA._record_attention(32, 197, 12, 64, torch.bfloat16, masks=True)
        CA._record_patch_embed(32, torch.bfloat16, torch.bfloat16)
        CA._record_t2t(32, torch.bfloat16, torch.bfloat16)

        seen, failed, all_written = set(), [], []
        for kernel, kw in launches:
            fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
            scalars = tuple(sorted((k, v) for k, v in kw.items() if not isinstance(v, torch.Tensor)))
            if (fn.fn.__name__, scalars) in seen:
                continue
            seen.add((fn.fn.__name__, scalars))
            try:
                W.generate_ttir(kernel, dict(kw), {})  # where Inductor's analysis gives up
                if hasattr(W, "identify_mutated_tensors"):  # torch <= 2.13
                    written = W.identify_mutated_tensors(kernel, dict(kw), {})
                else:
                    acc = W.identify_accessed_tensors(kernel, dict(kw), {})
                    written = [d.name for d in acc.read_writes.writes]
            except Exception as e:
                failed.append(f"{fn.fn.__name__}: {type(e).__name__}: {e}"[:300])
                continue
            tensors = {k for k, v in kw.items() if isinstance(v, torch.Tensor)}
            if tensors <= set(written):
                all_written.append(fn.fn.__name__)
        import json
        print(json.dumps({"launches": len(seen), "failed": failed, "all_written": all_written}))
    """, timeout=600)
    got = json.loads(out.strip().splitlines()[-1])
    assert got["launches"] >= 40 and got["failed"] == [] and got["all_written"] == [], got


@pytest.mark.gpu
@pytest.mark.parametrize("train", [False, True])
def test_gpu_compiled_block_clones_no_inputs(train):
    """A Block under torch.compile(fullgraph=True): the generated code calls fastvit's kernels without
    cloning their inputs first (what Inductor does when its mutation analysis gives up)."""
    import torch
    from torch._inductor.utils import run_and_get_code

    from fastvit import nn as fnn

    block = fnn.Block(dim=384, num_heads=6, mlp_ratio=4.0, qkv_bias=True).cuda().to(torch.bfloat16).train(train)
    x = torch.randn(8, 197, 384, device="cuda", dtype=torch.bfloat16, requires_grad=train)
    compiled = torch.compile(block, fullgraph=True)

    def run():
        y = compiled(x)
        if train:
            y.float().sum().backward()
        return y

    _, codes = run_and_get_code(run)
    code = "\n".join(codes)
    assert "fastvit" in code or "triton" in code, code[:2000]
    clones = [ln.strip() for ln in code.splitlines() if "clone" in ln and not ln.strip().startswith("#")]
    assert not clones, "\n".join(clones[:20])
