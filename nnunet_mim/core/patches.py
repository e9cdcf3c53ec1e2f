"""Patchify / unpatchify 3D images on a token grid, MAE's shuffle indices, and block masks.

Token order is raster ``(d, h, w)`` with ``w`` fastest -- the order of SAC-ViT's patch embedding
(``conv(x).flatten(2)``) -- and each patch vector is ``(pd, ph, pw, C)`` flattened with ``C`` fastest.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from nnunet_mim.core.masking import random_token_mask


def grid_of(spatial_shape: Sequence[int], patch: Sequence[int]) -> tuple[int, int, int]:
    if any(s % p for s, p in zip(spatial_shape, patch)):
        raise ValueError(f"shape {tuple(spatial_shape)} is not divisible by the patch {tuple(patch)}")
    return tuple(s // p for s, p in zip(spatial_shape, patch))  # type: ignore[return-value]


def patchify(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """``[B, C, D, H, W]`` -> ``[B, N, pd * ph * pw * C]``."""
    b, c = x.shape[:2]
    gd, gh, gw = grid_of(x.shape[2:], patch)
    pd, ph, pw = (int(p) for p in patch)
    x = x.reshape(b, c, gd, pd, gh, ph, gw, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, gd * gh * gw, pd * ph * pw * c)


def unpatchify(patches: torch.Tensor, grid: Sequence[int], patch: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, N, pd * ph * pw * C]`` -> ``[B, C, D, H, W]``."""
    b = patches.shape[0]
    gd, gh, gw = (int(g) for g in grid)
    pd, ph, pw = (int(p) for p in patch)
    if patches.shape[1:] != (gd * gh * gw, pd * ph * pw * channels):
        raise ValueError(f"patches {tuple(patches.shape)} do not fit grid {tuple(grid)}, patch {tuple(patch)}, "
                         f"{channels} channel(s)")
    x = patches.reshape(b, gd, gh, gw, pd, ph, pw, channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, gd * pd, gh * ph, gw * pw)


def token_mask_to_voxels(mask: torch.Tensor, grid: Sequence[int], patch: Sequence[int]) -> torch.Tensor:
    """Token mask (or any per-token values) ``[B, N]`` -> voxel mask ``[B, 1, D, H, W]`` (nearest)."""
    m = mask.reshape(mask.shape[0], 1, *grid)
    for axis, p in enumerate(patch):
        m = m.repeat_interleave(int(p), axis + 2)
    return m


def mae_indices(token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE bookkeeping from a token mask ``[B, N]`` with the same number of masked tokens per sample.

    ``ids_shuffle`` lists the visible tokens (raster order) then the masked ones; ``ids_keep = ids_shuffle[:, :K]``
    selects the encoder's visible tokens; ``ids_restore = argsort(ids_shuffle)`` "unshuffles": for a sequence laid
    out in shuffle order (encoded visible tokens, then mask tokens), ``gather(seq, ids_restore)`` is in raster order.
    """
    counts = token_mask.sum(1)
    if not (counts == counts[0]).all():
        raise ValueError("MAE needs the same number of masked tokens in every sample")
    ids_shuffle = torch.argsort(token_mask.to(torch.int8), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    k = token_mask.shape[1] - int(counts[0])
    return ids_shuffle[:, :k], ids_restore, ids_shuffle


def block_token_mask(batch_size: int, grid: Sequence[int], mask_ratio: float, block: Sequence[int] = (1, 1, 1),
                     device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random mask over blocks of ``block`` tokens (SimMIM's "masked patch size" larger than the ViT patch):
    exactly ``int(ratio * n_blocks)`` blocks per sample, expanded to the token grid, ``[B, N]`` raster order."""
    grid = tuple(int(g) for g in grid)
    block = tuple(int(b) for b in block)
    if block == (1, 1, 1):
        return random_token_mask(batch_size, math.prod(grid), mask_ratio, device, generator)
    coarse = grid_of(grid, block)
    m = random_token_mask(batch_size, math.prod(coarse), mask_ratio, device, generator).view(batch_size, *coarse)
    for axis, b in enumerate(block):
        m = m.repeat_interleave(b, axis + 1)
    return m.reshape(batch_size, -1)
