"""Partial region prediction (HybridMIM Sec. III-B): the decoder runs only on a grid-aligned box.

The box is chosen on the bottleneck grid, so that cropping every skip connection at its own resolution
yields exactly the feature maps the decoder would have computed for that sub-region of the full patch
(up to the receptive field at the crop border, which is the point of the method: HybridMIM's UNet crops
the same way). The official code uses the [32:96]^3 corner of a 96^3 patch; we centre the box by
default and offer the corner for reproduction (documentation/deviations.md).
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

    ``placement`` is ``"center"`` (default; rounded down where the leftover is odd) or ``"corner"`` (the
    official code's far corner, [32:96]^3).
    """
    if placement not in ("center", "corner"):
        raise ValueError(f"placement must be 'center' or 'corner', got {placement!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    size = tuple(min(n, max(1, int(round(n * fraction)))) for n in bottleneck_shape)
    start = tuple((n - s) // 2 if placement == "center" else n - s for n, s in zip(bottleneck_shape, size))
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
