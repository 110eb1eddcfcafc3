"""Vision Transformers built from fastvit.nn: timm's VisionTransformer, vit-pytorch's ViT / SimpleViT, T2T-ViT."""

from fastvit.models.convert import (
    CheckpointError,
    convert_state_dict,
    load_checkpoint,
    resample_pos_embed,
    unwrap_state_dict,
)
from fastvit.models.registry import create_model, list_models, register_model
from fastvit.models.t2t_vit import T2TModule, T2TViT
from fastvit.models.vision_transformer import VisionTransformer
from fastvit.models.vit import SimpleViT, ViT

__all__ = [
    "CheckpointError", "SimpleViT", "T2TModule", "T2TViT", "ViT", "VisionTransformer", "convert_state_dict",
    "create_model", "list_models", "load_checkpoint", "register_model", "resample_pos_embed", "unwrap_state_dict",
]
