"""vit-pytorch's ``ViT`` and ``SimpleViT``: same arguments, architecture and ``state_dict`` keys, on fastvit.ops.

The module tree carries vit-pytorch's names (``to_patch_embedding.1/.2/.3``, ``transformer.layers.N.0``
= Attention with ``norm``, ``to_qkv``, ``to_out``; ``transformer.layers.N.1.net`` = FeedForward), so
checkpoints load both ways with ``strict=True``; forward runs fastvit's fused ops (layer_norm,
attention_qkvpacked, layernorm_mlp with the residual fused). LayerNorms use eps 1e-5, qkv has no bias.
"""

from __future__ import annotations

import torch
from torch import nn

from fastvit import ops
from fastvit.models._image import check_image, leading_tokens, promote
from fastvit.models._pos_embed import posemb_sincos_2d
from fastvit.nn import LayerNorm
from fastvit.ops._checks import pair


class ToPatches(nn.Module):
    """(B, C, H, W) -> (B, H/p1 * W/p2, p1 * p2 * C): einops ``b c (h p1) (w p2) -> b (h w) (p1 p2 c)``."""

    def __init__(self, patch_height: int, patch_width: int):
        super().__init__()
        self.patch_size = (patch_height, patch_width)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.dim() != 4:
            raise ValueError(f"img must be an image batch (B, C, H, W), got shape {tuple(img.shape)}")
        B, C, H, W = img.shape
        p1, p2 = self.patch_size
        if H % p1 or W % p2:
            raise ValueError(f"img's size {(H, W)} must be a multiple of patch_size {self.patch_size}")
        x = img.reshape(B, C, H // p1, p1, W // p2, p2).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, (H // p1) * (W // p2), p1 * p2 * C)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}"


class Attention(nn.Module):
    """vit-pytorch's pre-norm Attention: ``to_out(attention(to_qkv(norm(x))))``. x: (B, N, dim) -> (B, N, dim).

    ``dropout`` drops attention probabilities; None (SimpleViT) has no dropout module.
    """

    _fv_attention_layer = True  # a softmax self-attention layer calling fastvit's attention op (fastvit.viz)

    def __init__(self, dim: int, heads: int, dim_head: int, to_out: nn.Module, dropout: float | None = 0.0):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.scale = dim_head**-0.5
        self.norm = LayerNorm(dim)
        self.dropout = None if dropout is None else nn.Dropout(dropout)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = to_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout.p if self.dropout is not None and self.training else 0.0
        o = ops.attention_qkvpacked(self.to_qkv(self.norm(x)), self.heads, scale=self.scale, dropout_p=p)
        return self.to_out(o)


class FeedForward(nn.Module):
    """vit-pytorch's FeedForward (``net``: LayerNorm, Linear, GELU, [Dropout], Linear, [Dropout]) as one
    :func:`fastvit.ops.layernorm_mlp`. x: (B, N, dim) -> (B, N, dim), plus ``residual``."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float | None = 0.0):
        super().__init__()
        layers = [LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU()]
        if dropout is None:
            layers.append(nn.Linear(hidden_dim, dim))
        else:
            layers += [nn.Dropout(dropout), nn.Linear(hidden_dim, dim), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers)
        self._fc2 = 3 if dropout is None else 4

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        norm, fc1, fc2 = self.net[0], self.net[1], self.net[self._fc2]
        p = self.net[3].p if self._fc2 == 4 and self.training else 0.0
        return ops.layernorm_mlp(
            x, norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, eps=norm.eps, residual=residual, dropout_p=p
        )


class Transformer(nn.Module):
    """``depth`` pre-norm (Attention, FeedForward) pairs with residuals, then ``norm``."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float | None = 0.0):
        super().__init__()
        self.norm = LayerNorm(dim)
        inner = heads * dim_head
        layers = []
        for _ in range(depth):
            if dropout is None:
                to_out = nn.Linear(inner, dim, bias=False)
            elif heads == 1 and dim_head == dim:
                to_out = nn.Identity()
            else:
                to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
            attn = Attention(dim, heads, dim_head, to_out, dropout)
            layers.append(nn.ModuleList([attn, FeedForward(dim, mlp_dim, dropout)]))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x, residual=x)
        return self.norm(x)


class PatchEmbedding(nn.Sequential):
    """vit-pytorch's ``to_patch_embedding`` (patches, LayerNorm, Linear, LayerNorm; keys ``.1/.2/.3``) as
    one :func:`fastvit.ops.patch_embed` call (``patch_order="hwc"`` with both norms), which also puts
    the cls token in front and adds the position embedding. img: (B, C, H, W) -> (B, N (+1), dim).
    """

    def __init__(self, patch_size: tuple[int, int], channels: int, dim: int):
        patch_dim = channels * patch_size[0] * patch_size[1]
        super().__init__(ToPatches(*patch_size), LayerNorm(patch_dim), nn.Linear(patch_dim, dim), LayerNorm(dim))
        self.patch_size = patch_size

    def forward(self, img, pos_embed=None, cls_token=None):
        img = check_image(img, "img", self.patch_size)
        _, pre, proj, post = self
        x = ops.patch_embed(
            img, proj.weight, proj.bias, self.patch_size, pos_embed, cls_token, patch_order="hwc",
            pre_norm=True, pre_norm_weight=pre.weight, pre_norm_bias=pre.bias,
            post_norm=True, post_norm_weight=post.weight, post_norm_bias=post.bias, norm_eps=pre.eps,
        )
        # vit-pytorch's LayerNorm and fp32 table keep the tokens fp32 under autocast: so do we.
        return promote(x, img)


def _patch_embedding(image_size, patch_size, channels: int, dim: int):
    (ih, iw), (ph, pw) = pair("image_size", image_size, minimum=1), pair("patch_size", patch_size, minimum=1)
    if ih % ph or iw % pw:
        raise ValueError(f"image_size {(ih, iw)} must be divisible by patch_size {(ph, pw)}")
    return PatchEmbedding((ph, pw), channels, dim), (ph, pw), (ih // ph, iw // pw)


class ViT(nn.Module):
    """vit-pytorch's ``ViT``. img: (B, channels, H, W) -> logits (B, num_classes); with ``num_classes=0``
    the tokens (B, N (+1), dim) after the final norm, as vit-pytorch.

    Keys: ``to_patch_embedding.1/.2/.3``, ``cls_token`` (1, dim) with pool='cls', (0, dim) with 'mean',
    ``pos_embedding`` (N (+1), dim), ``transformer.norm``, ``transformer.layers.N.0.{norm,to_qkv,to_out.0}``
    (``to_out`` is an identity when heads == 1 and dim_head == dim), ``transformer.layers.N.1.net.{0,1,4}``,
    ``mlp_head``. ``dropout`` applies to attention probabilities, projections and the MLP; ``emb_dropout``
    after the position embedding.
    """

    def __init__(
        self, *, image_size, patch_size, num_classes: int, dim: int, depth: int, heads: int, mlp_dim: int,
        pool: str = "cls", channels: int = 3, dim_head: int = 64, dropout: float = 0.0, emb_dropout: float = 0.0,
    ):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' (cls token) or 'mean' (mean pooling), got {pool!r}")
        self.to_patch_embedding, self.patch_size, self.grid_size = _patch_embedding(image_size, patch_size, channels, dim)
        num_cls = 1 if pool == "cls" else 0
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.randn(num_cls, dim))
        self.pos_embedding = nn.Parameter(torch.randn(num_patches + num_cls, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)
        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Linear(dim, num_classes) if num_classes > 0 else None

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter grouping (layer-wise LR decay): the embedding, then one group per layer."""
        return dict(stem=r"^to_patch_embedding|^cls_token|^pos_embedding",
                    blocks=[(r"^transformer\.layers\.(\d+)", None), (r"^transformer\.norm", (99999,))])

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """img -> tokens (B, N (+1), dim) after ``transformer.norm``."""
        pos = leading_tokens(img, "img", self.patch_size, int(self.pool == "cls"), self.pos_embedding, exact=False,
                             hint=": the image is larger than image_size")
        cls = self.cls_token if self.pool == "cls" else None
        return self.transformer(self.dropout(self.to_patch_embedding(img, pos, cls)))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(img)
        if self.mlp_head is None:
            return x
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(self.to_latent(x))


class SimpleViT(nn.Module):
    """vit-pytorch's ``SimpleViT`` (Beyer et al. 2022): fixed 2-D sin-cos positions (a buffer, not in the
    state_dict), no cls token, mean pooling, no dropout. img: (B, channels, H, W) -> (B, num_classes).

    Keys: ``to_patch_embedding.1/.2/.3``, ``transformer.norm``, ``transformer.layers.N.0.{norm,to_qkv,to_out}``
    (``to_out`` without bias), ``transformer.layers.N.1.net.{0,1,3}``, ``linear_head``.
    """

    def __init__(
        self, *, image_size, patch_size, num_classes: int, dim: int, depth: int, heads: int, mlp_dim: int,
        channels: int = 3, dim_head: int = 64,
    ):
        super().__init__()
        self.to_patch_embedding, self.patch_size, self.grid_size = _patch_embedding(image_size, patch_size, channels, dim)
        self.register_buffer("pos_embedding", posemb_sincos_2d(*self.grid_size, dim), persistent=False)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout=None)
        self.pool = "mean"
        self.to_latent = nn.Identity()
        self.linear_head = nn.Linear(dim, num_classes)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter grouping (layer-wise LR decay): the embedding, then one group per layer."""
        return dict(stem=r"^to_patch_embedding|^cls_token|^pos_embedding",
                    blocks=[(r"^transformer\.layers\.(\d+)", None), (r"^transformer\.norm", (99999,))])

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """img -> tokens (B, N, dim) after ``transformer.norm``."""
        pos = leading_tokens(img, "img", self.patch_size, 0, self.pos_embedding, exact=True,
                             hint=": the model was built for another image_size")
        return self.transformer(self.to_patch_embedding(img, pos))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.linear_head(self.to_latent(self.forward_features(img).mean(dim=1)))
