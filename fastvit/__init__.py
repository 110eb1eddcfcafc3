"""fastvit: fused Triton and CUDA kernels for Vision Transformers."""

from fastvit import backend as _backend
from fastvit import nn, ops, reference
from fastvit.backend import BackendUnavailableError, get_backend, use_backend
from fastvit.models import SimpleViT, T2TViT, ViT, VisionTransformer, create_model
from fastvit.swap import load_checkpoint, optimize, restore

__version__ = "0.1.0"
__all__ = [
    "BackendUnavailableError", "SimpleViT", "T2TViT", "ViT", "VisionTransformer", "create_model", "get_backend",
    "load_checkpoint", "nn", "ops", "optimize", "reference", "restore", "use_backend",
]

_backend._init_from_env()
