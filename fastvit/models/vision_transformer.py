"""timm's VisionTransformer built from fastvit.nn: same constructor arguments, same ``state_dict`` keys."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastvit import reference
from fastvit.models._image import check_image, layer_norm_keep_dtype, pad_to_patches, pos_for_image, promote
from fastvit.models._pos_embed import posemb_sincos_table
from fastvit.models.features import IntermediatesMixin, non_causal
from fastvit.nn import AttentionPoolLatent, Block, LayerNorm, PatchEmbed

GLOBAL_POOLS = ("", "token", "avg", "avgmax", "max", "map")
POS_EMBEDS = ("learn", "sincos", "none", "")


def activation_name(act_layer) -> str:
    """timm's ``act_layer`` (None, "gelu", "gelu_tanh", "quick_gelu" or ``nn.GELU``) as the fused MLP's activation."""
    if act_layer is None or act_layer is nn.GELU:
        return "gelu"
    if isinstance(act_layer, str) and act_layer in reference.ACTIVATIONS:
        return act_layer
    raise _unsupported("act_layer", act_layer, (None, nn.GELU) + reference.ACTIVATIONS)


def _unsupported(name: str, value, allowed) -> ValueError:
    return ValueError(f"{name}={value!r} is not supported by fastvit's VisionTransformer (supported: {allowed!r})")


def _check_pool(global_pool: str, has_class_token: bool) -> None:
    if global_pool == "prr":
        raise _unsupported("global_pool", global_pool, GLOBAL_POOLS)
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
    if global_pool == "token" and not has_class_token:
        raise ValueError("global_pool='token' needs the class token: use class_token=True or another global_pool")


class VisionTransformer(IntermediatesMixin, nn.Module):
    """Vision Transformer (Dosovitskiy et al.) with timm's options and ``state_dict`` keys.

    x: (B, in_chans, H, W) -> logits (B, num_classes), or pooled features (B, embed_dim) when
    ``num_classes=0``. Keys: ``patch_embed.proj``, ``cls_token`` (1, 1, D), ``reg_token`` (1, R, D),
    ``pos_embed`` (1, L, D), ``norm_pre``, ``blocks.N.*``, ``norm``, ``fc_norm``, ``head``.

    ``pos_embed``: ``'learn'`` (a parameter), ``'sincos'`` (fixed 2-D sin-cos table, a buffer outside
    the state_dict; prefix tokens get zeros), ``'none'``. ``norm_eps`` is every LayerNorm's eps (timm:
    1e-6; CLIP: 1e-5); ``act_layer`` the MLPs' activation (``'gelu'``, ``'gelu_tanh'``, ``'quick_gelu'``);
    ``global_pool='map'`` is SigLIP's attention-pool head (``attn_pool.*``); ``dynamic_img_pad`` pads the
    image at the bottom / right to a multiple of the patch size. timm options fastvit lacks (``'prr'``
    pooling, patch dropout, jax/moco init, custom layer classes) raise ValueError. Under autocast the
    residual stream stays float32 as in timm; LayerNorm outputs follow fastvit's rule (the autocast dtype).

    The feature API is timm's: :meth:`forward_intermediates`, :meth:`prune_intermediate_layers`,
    ``feature_info`` (one entry per block), :meth:`set_grad_checkpointing`.
    """

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_bias: bool = True,
        init_values: float | None = None,
        class_token: bool = True,
        pos_embed: str = "learn",
        no_embed_class: bool = False,
        reg_tokens: int = 0,
        pre_norm: bool = False,
        final_norm: bool = True,
        fc_norm: bool | None = None,
        pool_include_prefix: bool = False,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        patch_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        weight_init: str = "",
        fix_init: bool = False,
        norm_eps: float = 1e-6,
        act_layer=None,
    ):
        super().__init__()
        activation = activation_name(act_layer)
        if patch_drop_rate:
            raise _unsupported("patch_drop_rate", patch_drop_rate, 0.0)
        if weight_init not in ("", "skip"):
            raise _unsupported("weight_init", weight_init, ("", "skip"))
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
        if reg_tokens < 0:
            raise ValueError(f"reg_tokens must be >= 0, got {reg_tokens}")
        _check_pool(global_pool, class_token)
        use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.has_class_token = class_token
        self.no_embed_class = no_embed_class
        self.pool_include_prefix = pool_include_prefix
        self.dynamic_img_size = dynamic_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.pos_embed_type = "none" if pos_embed in ("", "none") else pos_embed

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=not pre_norm)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = self.patch_embed.num_patches + (0 if no_embed_class else self.num_prefix_tokens)
        if self.pos_embed_type == "learn":
            self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim))
        elif self.pos_embed_type == "sincos":
            n_prefix = 0 if no_embed_class else self.num_prefix_tokens
            self.register_buffer("pos_embed", posemb_sincos_table(*grid, embed_dim, n_prefix), persistent=False)
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.norm_pre = LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()

        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist() if depth else []
        self.blocks = nn.Sequential(*[
            Block(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, init_values=init_values, drop_path=dpr[i], eps=norm_eps, qk_norm=qk_norm,
                proj_bias=proj_bias, activation=activation,
            )
            for i in range(depth)
        ])
        reduction = max(self.patch_embed.patch_size)
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm = LayerNorm(embed_dim, eps=norm_eps) if final_norm and not use_fc_norm else nn.Identity()
        self.attn_pool = None
        if global_pool == "map":
            self.attn_pool = AttentionPoolLatent(embed_dim, num_heads, mlp_ratio, eps=norm_eps, activation=activation)
        self.fc_norm = LayerNorm(embed_dim, eps=norm_eps) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        if weight_init != "skip":
            self.init_weights()
        if fix_init:
            self.fix_init_weight()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's default init: truncated normal (std 0.02) Linear weights and learned position
        table, zero biases, cls / register tokens N(0, 1e-6)."""
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for t in (self.cls_token, self.reg_token):
            if t is not None:
                nn.init.normal_(t, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.no_grad()
    def fix_init_weight(self) -> None:
        """Scale each block's output projections by 1 / sqrt(2 * (layer + 1)) (timm's ``fix_init``)."""
        for i, blk in enumerate(self.blocks):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter grouping (layer-wise LR decay): the embedding, then one group per block."""
        return dict(stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New head of ``num_classes`` outputs (0: identity); optionally another ``global_pool``
        (``'map'`` only where the model was built with it; another pool drops ``attn_pool``)."""
        if global_pool is not None:
            _check_pool(global_pool, self.has_class_token)
            if global_pool == "map" and self.attn_pool is None:
                raise ValueError("global_pool='map' needs the attention-pool head: build the model with global_pool='map'")
            if global_pool != "map":
                self.attn_pool = None
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = next(self.parameters(), None)
        kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        self.head = nn.Linear(self.embed_dim, num_classes, **kw) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def _prefix_params(self) -> list[torch.Tensor]:
        """The learned tokens in front of the patches, in order."""
        return [t for t in (self.cls_token, self.reg_token) if t is not None]

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        pe = self.patch_embed
        n_prefix = self.num_prefix_tokens
        if self.dynamic_img_size:
            if self.dynamic_img_pad:
                x = pad_to_patches(x, "x", pe.patch_size)
            x = check_image(x, "x", pe.patch_size)
            pos = pos_for_image(x, self.pos_embed, pe.patch_size, pe.grid_size, 0 if self.no_embed_class else n_prefix,
                                self.pos_embed_type == "sincos")
        else:
            x = check_image(x, "x", pe.patch_size, pe.img_size,
                            ": build the model with that img_size or dynamic_img_size=True")
            pos = self.pos_embed  # (dynamic_img_pad has nothing to pad at the model's own size)
        params = prefix = self._prefix_params()
        if len(prefix) == 1 and self.cls_token is not None and (pos is None or not self.no_embed_class):
            x = pe(x, pos, self.cls_token)
            prefix = []
        elif pos is not None and not self.no_embed_class and n_prefix:
            x = pe(x, pos[:, n_prefix:])
            prefix = [torch.cat(prefix, dim=1) + pos[:, :n_prefix]]
        else:
            x = pe(x, pos)
        if prefix:
            x = torch.cat([t.to(x.dtype).expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1)
        # Under autocast timm's cat / add with the fp32 tokens and table promote the residual stream to fp32: keep that.
        return self.pos_drop(promote(x, *params, pos))

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) -> the tokens entering the first block, and the patch grid (gh, gw)."""
        ph, pw = self.patch_embed.patch_size
        H, W = x.shape[-2:]
        padded = self.dynamic_img_size and self.dynamic_img_pad
        grid = (-(-H // ph), -(-W // pw)) if padded else (H // ph, W // pw)
        return self._norm_pre(self._embed(x)), grid

    def _norm_pre(self, x: torch.Tensor) -> torch.Tensor:
        # its output is the residual stream: in the stream's dtype (fp32 under autocast, as timm's)
        n = self.norm_pre
        return x if isinstance(n, nn.Identity) else layer_norm_keep_dtype(x, n.weight, n.bias, n.eps)

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        """(B, C, H, W) -> tokens (B, prefix + H/p * W/p, embed_dim) after the blocks and ``norm``
        (``attn_mask``: each block's attention mask, broadcast to (B, heads, N, N), True = attend)."""
        non_causal(is_causal)
        return self.norm(self._run_blocks(self._tokens(x)[0], attn_mask))

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """(B, N, D) -> (B, D) by ``global_pool`` (or ``pool_type``); ``''`` returns x unchanged."""
        if self.attn_pool is not None:
            return self.attn_pool(x if self.pool_include_prefix else x[:, self.num_prefix_tokens:])
        pool_type = self.global_pool if pool_type is None else pool_type
        if not pool_type:
            return x
        if pool_type == "token":
            return x[:, 0]
        x = x if self.pool_include_prefix else x[:, self.num_prefix_tokens:]
        if pool_type == "avg":
            return x.mean(dim=1)
        if pool_type == "avgmax":
            return 0.5 * (x.amax(dim=1) + x.mean(dim=1))
        if pool_type == "max":
            return x.amax(dim=1)
        raise ValueError(f"pool_type must be one of {GLOBAL_POOLS}, got {pool_type!r}")

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, N, D) -> logits (B, num_classes), or pooled features (B, D) with ``pre_logits``."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class VisionTransformerDistilled(VisionTransformer):
    """DeiT with a distillation token (Touvron et al.), timm's ``VisionTransformerDistilled``: the tokens
    ``cls_token``, ``dist_token`` lead, the position table covers both, and ``head`` / ``head_dist`` read
    them. x: (B, C, H, W) -> the mean of both heads' logits (B, num_classes); in training after
    ``set_distilled_training(True)``, both as a tuple (for the distillation loss)."""

    def __init__(self, *args, **kwargs):
        weight_init = kwargs.pop("weight_init", "")
        fix_init = kwargs.pop("fix_init", False)
        super().__init__(*args, **kwargs, weight_init="skip")
        if self.global_pool != "token" or not self.has_class_token or self.num_reg_tokens:
            raise ValueError("the distilled DeiT needs global_pool='token', class_token=True and no reg_tokens: "
                             "its heads read the class and distillation tokens")
        self.num_prefix_tokens = 2
        self.dist_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        if self.pos_embed_type != "learn":
            raise _unsupported("pos_embed", self.pos_embed_type, "learn")
        embed_len = self.patch_embed.num_patches + (0 if self.no_embed_class else 2)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, self.embed_dim))
        self.head_dist = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.distilled_training = False
        if weight_init != "skip":
            self.init_weights()
        if fix_init:
            self.fix_init_weight()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's init, and the distillation token truncated normal (std 0.02)."""
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        super().init_weights()

    def _prefix_params(self) -> list[torch.Tensor]:
        return [self.cls_token, self.dist_token]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(super().group_matcher(coarse), stem=r"^cls_token|pos_embed|patch_embed|dist_token")

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """In training, return (class-head logits, distillation-head logits) instead of their mean."""
        self.distilled_training = enable

    def get_classifier(self) -> tuple[nn.Module, nn.Module]:
        return self.head, self.head_dist

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New ``head`` and ``head_dist`` of ``num_classes`` outputs (0: identity)."""
        if global_pool not in (None, "", "token"):
            raise ValueError(f"the distilled DeiT reads the class and distillation tokens: global_pool must be "
                             f"'token', got {global_pool!r}")
        super().reset_classifier(num_classes)
        ref = next(self.parameters(), None)
        kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        self.head_dist = nn.Linear(self.embed_dim, num_classes, **kw) if num_classes > 0 else nn.Identity()
        self.head_dist.train(self.training)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """Tokens (B, N, D) -> the heads' mean logits (B, num_classes) (a tuple in distilled training),
        or the mean of both tokens (B, D) with ``pre_logits``."""
        x, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (x + x_dist) / 2
        x, x_dist = self.head(x), self.head_dist(x_dist)
        if self.distilled_training and self.training:
            return x, x_dist
        return (x + x_dist) / 2
