"""Modules built on fastvit.ops, for people assembling their own models."""

from fastvit.nn.attention import Attention, AttentionPoolLatent
from fastvit.nn.block import Block, DropPath, LayerScale
from fastvit.nn.embed import PatchEmbed, SoftSplit
from fastvit.nn.mlp import LayerNorm, LayerNormMLP, Mlp
from fastvit.nn.performer import TokenPerformer

__all__ = [
    "Attention", "AttentionPoolLatent", "Block", "DropPath", "LayerNorm", "LayerNormMLP", "LayerScale", "Mlp", "PatchEmbed",
    "SoftSplit", "TokenPerformer",
]
