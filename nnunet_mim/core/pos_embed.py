"""Resampling a learnable absolute position embedding to another 3D token grid.

Layout (dynamic-network-architectures' ``Primus``, key ``eva.pos_embed``, ``Primus.key_to_lpe``): a tensor of shape
``(1, num_prefix_tokens + gd * gh * gw, C)``. The ``num_prefix_tokens`` rows (Primus: its register tokens, Eva's
``num_prefix_tokens``; 0 for the published Primus-S/B/M/L) come first and carry no position; the grid rows follow
in raster order with the last axis fastest (Primus flattens ``b c w h d -> b (w h d) c``, i.e. the patch grid of
nnU-Net's axes 0, 1, 2 in C order). The grid is ``patch_size // patch_embed_size``.

Resampling is trilinear with ``align_corners=False`` (timm's ``resample_abs_pos_embed`` is 2D only, MONAI has none):
token centres are matched, so an embedding that is an affine function of the token position stays affine, with the
positions beyond the old grid's outermost centres clamped to them. Computed in float32, returned in the input dtype.

SAC-ViT (``architectures/sac_vit.py``) stores its learnable absolute embedding as a ``(1, C, 8, 8, 8)`` grid and
resamples it to every input's token grid at run time (:func:`nnunet_mim.core.sac.resample_grid`); its state dicts do
not depend on the plan, so this function is not needed for it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: token grids are 3D (Primus supports 3D only)
GRID_DIMS = 3


def _grid(grid: Sequence[int], name: str) -> tuple[int, int, int]:
    out = tuple(int(g) for g in grid)
    if len(out) != GRID_DIMS or min(out) < 1:
        raise ValueError(f"{name} must be {GRID_DIMS} positive token counts (patch_size // patch_embed_size per "
                         f"axis), got {tuple(grid)}")
    return out  # type: ignore[return-value]


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int],
                     num_prefix_tokens: int = 0) -> torch.Tensor:
    """``pos_embed`` of shape ``(1, num_prefix_tokens + prod(old_grid), C)`` resampled to ``new_grid``: shape
    ``(1, num_prefix_tokens + prod(new_grid), C)``, prefix rows unchanged. The same tensor when the grids agree."""
    old, new = _grid(old_grid, "old_grid"), _grid(new_grid, "new_grid")
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    expected = num_prefix_tokens + math.prod(old)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[1] != expected:
        raise ValueError(
            f"pos_embed has shape {tuple(pos_embed.shape)}, but a grid of {old} tokens with {num_prefix_tokens} "
            f"prefix token(s) needs (1, {expected}, C). Pass the grid the embedding was trained on (pretraining patch "
            f"size // patch embedding size) and the number of register / cls tokens of that network.")
    if old == new:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    channels = grid.shape[-1]
    grid = grid.float().reshape(1, *old, channels).permute(0, 4, 1, 2, 3)
    grid = F.interpolate(grid, size=new, mode="trilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 4, 1).reshape(1, math.prod(new), channels).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
