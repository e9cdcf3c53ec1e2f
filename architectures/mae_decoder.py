"""Pixel-regression MIM heads on SAC-ViT (Chen et al. 2022, "Masked Image Modeling Advances 3D Medical Image
Analysis"; MAE, He et al. 2022; SimMIM, Xie et al. 2022), as :class:`SACViTPretrainNet` subclasses whose state dict is
the segmentation network's plus ``mim_*`` entries.

* :class:`MAEDecoder` / :class:`MAENet` -- the encoder runs on the visible tokens only; a lightweight transformer
  decoder (EVA blocks + our 3D RoPE + a resampled learnable position embedding) gets the encoded visible tokens and a
  shared mask token at the masked positions (unshuffled to raster order), and a linear layer predicts each token's
  voxels.
* :class:`SimMIMNet` -- every token enters the encoder, masked ones replaced by a learnable mask token; a single
  linear layer projects each output token back to its voxels.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.layers import trunc_normal_
from timm.models.eva import EvaBlock
from torch import nn

from nnunet_mim.architectures.sac_vit import SACViTPretrainNet, SACViTSeg
from nnunet_mim.core.rope import PUMIT_ROPE_BASES, AdditiveRoPE3d
from nnunet_mim.core.sac import resample_grid

__all__ = ["MAEDecoder", "MAENet", "SimMIMNet"]


def _init_linear(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MAEDecoder(nn.Module):
    """MAE decoder: ``Linear(C_enc -> dim)``, mask token, unshuffle, position embedding, ``depth`` EVA blocks with 3D
    RoPE, LayerNorm, ``Linear(dim -> out_dim)`` per token."""

    def __init__(self, encoder_dim: int, out_dim: int, dim: int = 384, depth: int = 2, num_heads: int = 6,
                 mlp_ratio: float = 4.0, pos_embed_grid: Sequence[int] = (8, 8, 8),
                 rope_bases: Sequence[float] = PUMIT_ROPE_BASES):
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *(int(g) for g in pos_embed_grid)))
        self.rope = AdditiveRoPE3d(dim // num_heads, rope_bases)
        self.blocks = nn.ModuleList([
            EvaBlock(dim=dim, num_heads=num_heads, qkv_bias=True, qkv_fused=False, mlp_ratio=mlp_ratio,
                     swiglu_mlp=True, scale_mlp=True, num_prefix_tokens=0)
            for _ in range(depth)
        ])
        for blk in self.blocks:
            blk.attn.fused_attn = True
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_dim)
        _init_linear(self)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, visible: torch.Tensor, ids_restore: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """``visible`` ``[B, K, C_enc]`` (in ``ids_keep`` order), ``ids_restore`` ``[B, N]`` -> ``[B, N, out_dim]``
        in raster order."""
        x = self.embed(visible)
        b, k, d = x.shape
        n = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(b, n - k, d)], 1)
        x = x.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, d))  # unshuffle to raster order
        x = x + resample_grid(self.pos_embed, grid).flatten(2).transpose(1, 2).to(x.dtype)
        rope = self.rope(grid, device=x.device)
        for blk in self.blocks:
            x = blk(x, rope=rope)
        return self.head(self.norm(x))


class MAENet(SACViTPretrainNet):
    """SAC-ViT encoder on the visible tokens + :class:`MAEDecoder` (``mim_decoder``)."""

    def __init__(self, seg: SACViTSeg, in_channels: int, decoder_dim: int = 384, decoder_depth: int = 2,
                 decoder_heads: int = 6):
        super().__init__(seg)
        self.in_channels = in_channels
        self.mim_decoder = MAEDecoder(self.embed_dim, math.prod(self.token_size) * in_channels, decoder_dim,
                                      decoder_depth, decoder_heads)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predicted patches ``[B, N, prod(token) * C]`` (raster order; the loss uses the masked ones)."""
        latent = self.encoder.forward_features(x, visible_idx=ids_keep, da=self.da)
        return self.mim_decoder(self.patch_tokens(latent), ids_restore, self.token_grid(x.shape[2:]))


class SimMIMNet(SACViTPretrainNet):
    """SAC-ViT with a learnable mask token at masked positions + one linear projection to voxels (``mim_head``)."""

    def __init__(self, seg: SACViTSeg, in_channels: int):
        super().__init__(seg)
        self.in_channels = in_channels
        self.mim_mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mim_mask_token, std=0.02)
        self.mim_head = nn.Linear(self.embed_dim, math.prod(self.token_size) * in_channels)
        _init_linear(self.mim_head)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Predicted patches ``[B, N, prod(token) * C]`` for every token (raster order)."""
        tokens = self.encoder.forward_features(x, token_mask=token_mask, mask_token=self.mim_mask_token, da=self.da)
        return self.mim_head(self.patch_tokens(tokens))
