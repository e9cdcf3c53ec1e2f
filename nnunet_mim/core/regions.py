"""Partial region prediction (HybridMIM Sec. III-B): the decoder runs only on a grid-aligned box.

The box is chosen on the bottleneck grid, so that cropping every skip connection at its own resolution
yields exactly the feature maps the decoder would have computed for that sub-region of the full patch
(up to the receptive field at the crop border, which is the point of the method: HybridMIM's UNet crops
the same way). The grid is exact: the box's slices at every level cover the same input voxels. The
receptive field is not confined to the box: with nnU-Net's strided 3x3x3 convolutions, a bottleneck
cell's receptive field is centred on the first voxel of its cell, not on the cell's centre, and reaches
far beyond it (documentation/hybridmim.md).

Placement. The paper sets the target region "around the image center"; the official code uses the far
corner [32:96]^3 of a 96^3 patch. ``"center"`` (default) centres the box on the grid and, where the
leftover is odd, puts the extra cell before the box, so on a 3-cell grid it *is* the official box
[32:96]^3 (2 of 3 cells cannot be centred exactly on the grid). ``"corner"`` always takes the far
corner (the official [32:96]^3 of HybridMIM's 12-cell UNet bottleneck) (documentation/deviations.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class RegionBox:
    """A box on the bottleneck grid: ``start`` and ``size`` in bottleneck cells per axis."""

    start: tuple[int, ...]
    size: tuple[int, ...]

    def slices_at(self, scale: Sequence[int]) -> tuple[slice, ...]:
        """Spatial slices of this box on a map whose cells are ``scale`` times finer than the bottleneck."""
        return tuple(slice(st * f, (st + sz) * f) for st, sz, f in zip(self.start, self.size, scale))

    def fraction(self, bottleneck_shape: Sequence[int]) -> float:
        """Fraction of the patch volume covered by the box."""
        return float(np.prod(self.size) / np.prod(bottleneck_shape))


def region_box(bottleneck_shape: Sequence[int], fraction: float = 2 / 3, placement: str = "center") -> RegionBox:
    """Box covering ``fraction`` of each axis of the bottleneck grid (HybridMIM: 64 of 96 voxels).

    The size is ``round(n * fraction)`` whole cells per axis (at least 1, at most n): 2 of 3 cells (64 of 96
    voxels at stride 32), 3 of 4 cells (96 of 128 voxels, the region size the paper uses on BraTS2020),
    8 of 12.

    ``placement`` is ``"center"`` (default) or ``"corner"``. ``"center"`` starts the box at
    ``ceil((n - size) / 2)``: exactly centred when the leftover ``n - size`` is even, one cell towards the
    far end when it is odd (3 cells: [1:3] = voxels [32:96]; 4 cells: [1:4] = voxels [32:128]).
    ``"corner"`` starts it at ``n - size``, the official code's far corner ([4:12] of 12 cells = voxels
    [32:96] at stride 8).
    """
    if placement not in ("center", "corner"):
        raise ValueError(f"placement must be 'center' or 'corner', got {placement!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    size = tuple(min(n, max(1, int(round(n * fraction)))) for n in bottleneck_shape)
    start = tuple(n - s - (n - s) // 2 if placement == "center" else n - s for n, s in zip(bottleneck_shape, size))
    return RegionBox(start, size)


def level_scales(strides: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """For each encoder level, how many times finer its cells are than the bottleneck's, per axis.

    ``strides`` are the per-stage strides of the encoder (nnU-Net plans ``strides``; first entry usually 1).
    """
    cumulative = np.cumprod(np.asarray(strides, dtype=int), axis=0)
    total = cumulative[-1]
    return [tuple(int(t // c) for t, c in zip(total, cum)) for cum in cumulative]


def crop_skips(skips: Sequence, box: RegionBox, scales: Sequence[Sequence[int]]) -> list:
    """Crop every skip map [B, C, *spatial] to ``box`` at its own resolution."""
    return [s[(Ellipsis, *box.slices_at(f))] for s, f in zip(skips, scales)]
