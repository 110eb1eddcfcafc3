"""Token embedding modules: PatchEmbed (ViT) and SoftSplit (T2T-ViT)."""

from __future__ import annotations

import torch
from torch import nn

from fastvit import ops
from fastvit.ops._checks import pair
from fastvit._torchscript import not_scriptable


class PatchEmbed(nn.Module):
    """Image to patch tokens, timm's layout (``proj`` is a conv-layout parameter holder).

    x: (B, C, H, W) -> (B, H/p * W/p (+1), embed_dim). ``forward`` optionally puts a cls token in
    front and adds a position embedding in the same op. H and W may differ from ``img_size`` as long
    as they are multiples of the patch size (the position embedding must then match). An ``img_size``
    that is not a multiple gives the floor grid, as timm (the models crop the remainder).
    """

    __prepare_scriptable__ = not_scriptable  # TorchScript: one clear error (fastvit/_torchscript.py)

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768, bias: bool = True):
        super().__init__()
        self.img_size = pair("img_size", img_size, minimum=1)
        self.patch_size = pair("patch_size", patch_size, minimum=1)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def forward(
        self, x: torch.Tensor, pos_embed: torch.Tensor | None = None, cls_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        return ops.patch_embed(x, self.proj.weight, self.proj.bias, self.patch_size, pos_embed, cls_token)


class SoftSplit(nn.Module):
    """T2T-ViT's overlapping unfold. x: (B, C, H, W) -> (B, L, C * k * k)."""

    __prepare_scriptable__ = not_scriptable  # TorchScript: one clear error (fastvit/_torchscript.py)

    def __init__(self, kernel_size, stride, padding=0):
        super().__init__()
        self.kernel_size = pair("kernel_size", kernel_size, minimum=1)
        self.stride = pair("stride", stride, minimum=1)
        self.padding = pair("padding", padding, minimum=0)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (rows, cols) for an input of this height and width."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.soft_split(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
