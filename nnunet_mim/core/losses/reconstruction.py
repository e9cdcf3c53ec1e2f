"""Pixel reconstruction losses restricted to masked voxels / patches."""
from __future__ import annotations

import torch


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked voxels (HybridMIM eq. 2; official code: sum over masked / #masked).

    ``mask`` is a bool tensor broadcastable to ``prediction`` ([B, 1, ...] for all channels). The mean runs
    over masked voxels and channels. With no masked voxel the loss is 0 and still has a gradient path.
    """
    mask = mask.expand_as(prediction)
    squared = (prediction - target) ** 2
    return (squared * mask).sum() / mask.sum().clamp_min(1)


def masked_l1(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over masked elements (MIM-Med3D: L1 on masked patches)."""
    mask = mask.expand_as(prediction)
    return ((prediction - target).abs() * mask).sum() / mask.sum().clamp_min(1)
