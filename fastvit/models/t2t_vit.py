"""T2T-ViT (Yuan et al., ICCV 2021) with the official repository's ``state_dict`` keys, on fastvit.nn.

Follows yitu-opensource/T2T-ViT ``models/t2t_vit.py`` (performer variant): soft splits k7s4p2,
k3s2p1, k3s2p1 (``nn.Unfold``, no parameters); ``attention1/2`` = ``Token_performer`` (token_dim 64,
kernel_ratio 0.5, dropout 0.1); ``project`` = Linear(token_dim * 9, embed_dim); a cls token; the 1-D
sinusoid table ``pos_embed`` as a parameter with requires_grad=False (in the state_dict); timm-style
pre-norm blocks (qkv without bias by default, LayerNorm eps 1e-5 = ``nn.LayerNorm``'s default).
"""

from __future__ import annotations

import torch
from torch import nn

from fastvit.models.features import IntermediatesMixin, non_causal
from fastvit.models._image import check_image
from fastvit.models._pos_embed import get_sinusoid_encoding
from fastvit.nn import Block, LayerNorm, SoftSplit, TokenPerformer
from fastvit.ops._checks import pair

T2T_STRIDE = 16


class T2TModule(nn.Module):
    """Tokens-to-Token module. x: (B, in_chans, H, W) -> (B, H/16 * W/16, embed_dim).

    soft_split0 -> attention1 -> fold to (H/4, W/4) -> soft_split1 -> attention2 -> fold to (H/8, W/8)
    -> soft_split2 -> project: 3136, 784 and 196 tokens at 224x224.
    """

    def __init__(
        self, img_size=224, tokens_type: str = "performer", in_chans: int = 3, embed_dim: int = 768,
        token_dim: int = 64, kernel_ratio: float = 0.5, drop_rate: float = 0.1,
    ):
        super().__init__()
        if tokens_type != "performer":
            raise ValueError(f"tokens_type={tokens_type!r} is not supported by fastvit (only 'performer')")
        self.img_size = pair("img_size", img_size, minimum=1)
        if self.img_size[0] % T2T_STRIDE or self.img_size[1] % T2T_STRIDE:
            raise ValueError(f"img_size {self.img_size} must be a multiple of {T2T_STRIDE} (T2T-ViT's total stride 4 * 2 * 2)")
        self.soft_split0 = SoftSplit(7, 4, 2)
        self.soft_split1 = SoftSplit(3, 2, 1)
        self.soft_split2 = SoftSplit(3, 2, 1)
        self.attention1 = TokenPerformer(in_chans * 7 * 7, token_dim, kernel_ratio=kernel_ratio, dp1=drop_rate, dp2=drop_rate)
        self.attention2 = TokenPerformer(token_dim * 3 * 3, token_dim, kernel_ratio=kernel_ratio, dp1=drop_rate, dp2=drop_rate)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)
        self.grid_size = (self.img_size[0] // T2T_STRIDE, self.img_size[1] // T2T_STRIDE)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = check_image(x, "x", (1, 1))
        B = x.shape[0]
        h, w = self.soft_split0.output_size(x.shape[-2], x.shape[-1])
        x = self.attention1(x, split=self.soft_split0)  # soft split + norm1 fused
        x = x.transpose(1, 2).reshape(B, x.shape[-1], h, w)
        h, w = self.soft_split1.output_size(h, w)
        x = self.attention2(x, split=self.soft_split1)
        x = x.transpose(1, 2).reshape(B, x.shape[-1], h, w)
        return self.project(self.soft_split2(x))


class T2TViT(IntermediatesMixin, nn.Module):
    """T2T-ViT. x: (B, in_chans, img_size, img_size) -> logits (B, num_classes), or (B, embed_dim) with
    ``num_classes=0``.

    Official keys: ``tokens_to_token.{attention1,attention2}.{kqv,proj,norm1,norm2,mlp.0,mlp.2,w}``,
    ``tokens_to_token.project``, ``cls_token`` (1, 1, D), ``pos_embed`` (1, N + 1, D), ``blocks.N.{norm1,
    attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``head``. ``qk_scale`` overrides head_dim ** -0.5
    (the official pretrained weights use embed_dim ** -0.5). ``drop_rate`` is the official one
    (position, projection and MLP dropout); ``t2t_drop_rate`` the Token_performer's (0.1 officially).
    Unlike the official code, ``forward_features`` returns all tokens; ``forward_head`` pools
    (``global_pool='token'``: the cls token, as official; ``'avg'``: mean of the patch tokens). The feature
    API is timm's, as on :class:`~fastvit.models.VisionTransformer` (``forward_intermediates``, ...).
    """

    def __init__(
        self,
        img_size=224,
        tokens_type: str = "performer",
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        token_dim: int = 64,
        kernel_ratio: float = 0.5,
        t2t_drop_rate: float = 0.1,
        global_pool: str = "token",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or '' for T2TViT, got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.tokens_to_token = T2TModule(img_size, tokens_type, in_chans, embed_dim, token_dim, kernel_ratio, t2t_drop_rate)
        num_patches = self.tokens_to_token.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(get_sinusoid_encoding(num_patches + 1, embed_dim), requires_grad=False)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist() if depth else []
        self.blocks = nn.ModuleList([
            Block(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[i], eps=norm_eps, qk_scale=qk_scale,
            )
            for i in range(depth)
        ])
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=T2T_STRIDE) for i in range(depth)]
        self.norm = LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official init: truncated normal (std 0.02) Linear weights and cls token, zero biases,
        LayerNorm ones / zeros; the Performers' random features ``w`` stay orthogonal."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter grouping (layer-wise LR decay): the T2T module and tokens, then one group per block."""
        return dict(stem=r"^cls_token|^pos_embed|^tokens_to_token", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New head of ``num_classes`` outputs (0: identity); optionally another ``global_pool``."""
        if global_pool is not None:
            if global_pool not in ("token", "avg", ""):
                raise ValueError(f"global_pool must be 'token', 'avg' or '' for T2TViT, got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        kw = {"device": self.cls_token.device, "dtype": self.cls_token.dtype}
        self.head = nn.Linear(self.embed_dim, num_classes, **kw) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) -> the tokens entering the first block (B, 1 + H/16 * W/16, D), and the grid."""
        x = check_image(x, "x", (1, 1), self.tokens_to_token.img_size,
                        ": build the model with that img_size (a checkpoint's pos_embed is resampled on load)")
        x = self.tokens_to_token(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x), x), dim=1)
        return self.pos_drop(x + self.pos_embed), self.tokens_to_token.grid_size

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        """(B, C, H, W) -> tokens (B, 1 + H/16 * W/16, embed_dim) after the blocks and ``norm``."""
        non_causal(is_causal)
        return self.norm(self._run_blocks(self._tokens(x)[0], attn_mask))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, N, D) -> logits (B, num_classes), or pooled features (B, D) with ``pre_logits``
        (``global_pool=''``: no pooling, the tokens)."""
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
