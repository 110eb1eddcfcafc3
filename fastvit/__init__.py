"""fastvit: fused Triton and CUDA kernels for Vision Transformers."""

from fastvit import backend as _backend
from fastvit import nn, ops, reference
from fastvit.backend import BackendUnavailableError, get_backend, use_backend

__version__ = "0.1.0"
__all__ = ["BackendUnavailableError", "get_backend", "nn", "ops", "reference", "use_backend"]

_backend._init_from_env()
