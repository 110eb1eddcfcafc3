"""See inside a ViT: attention maps that fused attention never writes, attention rollout, and the
position-embedding and patch-filter pictures of the ViT paper. ``fastvit-viz`` is the command line."""

from fastvit.viz.maps import AttentionMaps, attention_layers, attention_maps, attention_rollout, class_token_attention
from fastvit.viz.plots import (
    overlay,
    patch_filters,
    plot_attention,
    plot_patch_embed_filters,
    plot_pos_embed_similarity,
    position_table,
)

__all__ = [
    "AttentionMaps", "attention_layers", "attention_maps", "attention_rollout", "class_token_attention", "overlay",
    "patch_filters", "plot_attention", "plot_patch_embed_filters", "plot_pos_embed_similarity", "position_table",
]
