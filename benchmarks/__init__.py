"""fastvit's benchmark suite: ``python -m benchmarks`` (or ``fastvit-bench``).

``bench_<family>.py`` (one per op family) and ``bench_models.py`` describe the cases; ``runner.py``
times them on a GPU and writes ``results/<gpu>/<date>-<commit>.{json,md}`` and plots (``report.py``);
``smoke.py`` is the CPU smoke mode (correctness only). ``test_bench.py`` runs the same cases under
pytest-benchmark.

Without a CUDA GPU, Triton kernels run through its interpreter, which reads ``TRITON_INTERPRET``
when a kernel is defined: it is set here, before anything (fastvit, timm) imports triton.
"""

import os

# The interpreter's tl.dot is a numpy matmul on tiny tiles: one BLAS thread avoids spin-waiting
# threads (tests/conftest.py does the same). Set before torch imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
