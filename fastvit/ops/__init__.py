"""fastvit's fused ops: check the inputs, apply the autocast rule, run on the selected backend."""

from fastvit.ops.attention import attention, attention_qkvpacked
from fastvit.ops.embed import patch_embed, soft_split, soft_split_layer_norm
from fastvit.ops.mlp import layer_norm, layernorm_mlp
from fastvit.ops.performer import performer_attention

__all__ = ["attention", "attention_qkvpacked", "layer_norm", "layernorm_mlp", "patch_embed", "performer_attention", "soft_split", "soft_split_layer_norm"]
