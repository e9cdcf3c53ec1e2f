"""Spatially adaptive convolution (SAC), PUMIT (Luo et al., arXiv 2312.07630), section "Spatially Adaptive
Convolution".

Conventions (nnU-Net axis order): spatial axes are ``(depth, height, width)``; depth is the FIRST spatial axis and
the in-plane axes are the last two.

Bookkeeping. The official code carries the degree of anisotropy (DA) and the number of downsamplings applied so far
inside a ``torch.Tensor`` subclass, which breaks gradient checkpointing and complicates ``torch.compile``. Here the
bookkeeping is split into

* ``level`` -- number of in-plane x2 downsamplings already applied to a layer's INPUT. Inside a network this is a
  construction-time constant of each layer, so it is stored on the layer;
* ``da`` -- the DA of the network input, a plain ``int`` passed to ``forward``.

Every SAC layer therefore works on plain tensors; ``da`` is a Python int (``torch.compile`` specialises on it, at
most 6 values: 0..5).

Semantics (official code, generalised):

* ``pending = max(da - level, 0)`` in-plane-only downsamplings are still pending before the feature map is
  isotropic; a strided SAC conv uses depth stride ``max(stride >> pending, 1)``. With nothing pending the weight is
  used as is; otherwise the depth padding is 0 and the kernel's depth axis is SUM-pooled: to size 1 when the reduced
  depth stride is 1, else in consecutive groups so that its depth size equals the reduced depth stride.
* Transposed conv (kernel == stride): depth stride ``min(1 << max(level - da, 0), stride)``; the kernel's depth axis is
  sum-pooled to that size in the same way.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "MAX_ANISOTROPY_RATIO",
    "degree_of_anisotropy",
    "pending_inplane_downsamples",
    "remaining_depth_upsamples",
    "level_strides",
    "sac_token_size",
    "sum_pool_kernel_depth",
    "sac_conv_params",
    "sac_transposed_conv_params",
    "SACConv3d",
    "SACConvTranspose3d",
    "SACMaxPool3d",
    "resample_grid",
]

#: ``DA = floor(log2(clip(s_z / s_xy, 1, MAX_ANISOTROPY_RATIO)))`` (official: ``2 * 16``), so DA is in ``0..5``.
MAX_ANISOTROPY_RATIO = 32.0


def degree_of_anisotropy(spacing: Sequence[float], rel_tol: float = 1e-3) -> int:
    """Degree of anisotropy ``floor(log2(clip(s_z / s_xy, 1, 32)))`` (PUMIT, SAC section).

    ``spacing`` is in nnU-Net order ``(s_z, s_y, s_x)``; ``s_xy = min(s_y, s_x)``. ``rel_tol`` absorbs float noise in
    stored spacings (a ratio of 3.9999 counts as 4, i.e. DA 2); the official code has no tolerance.
    """
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 entries (z, y, x), got {tuple(spacing)}")
    s_z, s_xy = float(spacing[0]), float(min(spacing[1], spacing[2]))
    if s_z <= 0 or s_xy <= 0:
        raise ValueError(f"spacing must be positive, got {tuple(spacing)}")
    ratio = min(max(s_z / s_xy, 1.0), MAX_ANISOTROPY_RATIO) * (1.0 + rel_tol)
    return min(int(math.floor(math.log2(ratio))), int(math.log2(MAX_ANISOTROPY_RATIO)))


def pending_inplane_downsamples(da: int, level: int) -> int:
    """In-plane-only x2 downsamplings still needed at ``level`` before the feature map is isotropic."""
    return max(da - level, 0)


def remaining_depth_upsamples(da: int, level: int) -> int:
    """Depth x2 upsamplings still allowed at ``level`` (depth may not be upsampled beyond the input resolution)."""
    return max(level - da, 0)


def level_strides(da: int, num_levels: int) -> list[list[int]]:
    """Per-level pooling factors ``[[1, 1, 1], [sd, 2, 2], ...]`` (nnU-Net ``pool_op_kernel_sizes`` format).

    Entry ``n`` is the factor between level ``n - 1`` and level ``n``; depth is halved only once no in-plane-only
    downsampling is pending (``n > da``).
    """
    return [[1, 1, 1]] + [[2 if n > da else 1, 2, 2] for n in range(1, num_levels)]


def sac_token_size(da: int, patch: int = 16) -> tuple[int, int, int]:
    """Voxel extent of one SAC patch-embedding token: ``(max(patch >> da, 1), patch, patch)``."""
    return max(patch >> da, 1), patch, patch


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(v, int):
        return v, v, v
    v = tuple(int(i) for i in v)
    if len(v) != 3:
        raise ValueError(f"expected an int or 3 ints, got {v}")
    return v  # type: ignore[return-value]


def _isotropic_pow2_stride(stride: int | Sequence[int]) -> int:
    s = _triple(stride)
    if not (s[0] == s[1] == s[2]) or s[0] < 1 or s[0] & (s[0] - 1):
        raise ValueError(f"SAC layers need an isotropic power-of-2 stride, got {s}")
    return s[0]


def sum_pool_kernel_depth(weight: torch.Tensor, depth: int) -> torch.Tensor:
    """Sum-pool the depth axis (dim 2) of a conv / transposed-conv weight to ``depth`` in consecutive groups."""
    kd = weight.shape[2]
    if kd == depth:
        return weight
    if depth < 1 or kd % depth:
        raise ValueError(f"cannot sum-pool a kernel depth of {kd} to {depth}")
    return weight.unflatten(2, (depth, kd // depth)).sum(3)


def sac_conv_params(
    weight: torch.Tensor, stride: int, padding: tuple[int, int, int], pending: int,
) -> tuple[torch.Tensor, tuple[int, int, int], tuple[int, int, int]]:
    """Effective ``(weight, stride, padding)`` of a SAC conv (SAC "downsampling" and "3x3x3 convolution" variants).

    ``stride`` is the isotropic stride the layer was built with, ``pending`` = pending in-plane-only downsamplings.
    """
    if pending == 0:
        return weight, (stride, stride, stride), padding
    kd = weight.shape[2]
    sd = max(stride >> pending, 1)
    if sd == 1:
        weight = weight.sum(2, keepdim=True)
    else:
        if kd != stride:
            raise ValueError(
                f"SAC conv with kernel depth {kd} != stride {stride} cannot be reduced to depth stride {sd}"
            )
        weight = sum_pool_kernel_depth(weight, sd)
    return weight, (sd, stride, stride), (0, padding[1], padding[2])


def sac_transposed_conv_params(
    weight: torch.Tensor, stride: int, remaining: int,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Effective ``(weight, stride)`` of a SAC transposed conv (kernel == stride, SAC "upsampling" variant).

    ``remaining`` = depth upsamplings still allowed; depth stride ``min(1 << remaining, stride)``.
    """
    sd = min(1 << remaining, stride)
    return sum_pool_kernel_depth(weight, sd), (sd, stride, stride)


class SACConv3d(nn.Conv3d):
    """SAC convolution: an isotropic ``Conv3d`` whose depth stride/kernel adapt to ``da`` (PUMIT SAC, variants 1-2).

    ``level`` is the number of in-plane x2 downsamplings applied to this layer's input. The stored weight is always
    the full isotropic kernel, so the state dict does not depend on DA.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int = 1,
        padding: int | Sequence[int] = 0,
        bias: bool = True,
        level: int = 0,
        groups: int = 1,
    ):
        s = _isotropic_pow2_stride(stride)
        super().__init__(in_channels, out_channels, kernel_size, stride=s, padding=padding, bias=bias, groups=groups)
        if isinstance(self.padding, str):
            raise ValueError("SACConv3d needs explicit integer padding")
        self.level = int(level)
        self.num_downsamples = s.bit_length() - 1

    def effective_params(self, da: int) -> tuple[torch.Tensor, tuple[int, int, int], tuple[int, int, int]]:
        """``(weight, stride, padding)`` actually used for an input of DA ``da``."""
        pending = pending_inplane_downsamples(da, self.level)
        return sac_conv_params(self.weight, self.stride[0], tuple(self.padding), pending)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, da: int = 0) -> torch.Tensor:  # type: ignore[override]
        weight, stride, padding = self.effective_params(da)
        return F.conv3d(x, weight, self.bias, stride, padding, self.dilation, self.groups)


class SACConvTranspose3d(nn.ConvTranspose3d):
    """SAC transposed convolution with ``kernel == stride`` (PUMIT SAC, upsampling variant).

    ``level`` is the number of in-plane x2 downsamplings of this layer's INPUT (the output is at
    ``level - log2(stride)``).
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, bias: bool = True, level: int = 0, groups: int = 1,
    ):
        s = _isotropic_pow2_stride(stride)
        super().__init__(in_channels, out_channels, kernel_size=s, stride=s, bias=bias, groups=groups)
        self.level = int(level)
        self.num_upsamples = s.bit_length() - 1

    def effective_params(self, da: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """``(weight, stride)`` actually used for an input of DA ``da``."""
        return sac_transposed_conv_params(self.weight, self.stride[0], remaining_depth_upsamples(da, self.level))

    def forward(self, x: torch.Tensor, da: int = 0) -> torch.Tensor:  # type: ignore[override]
        weight, stride = self.effective_params(da)
        return F.conv_transpose3d(x, weight, self.bias, stride, 0, 0, self.groups, self.dilation)


class SACMaxPool3d(nn.Module):
    """x2 max-pooling whose depth factor adapts like a SAC conv (1 while in-plane-only downsamplings are pending).

    ``ceil_mode=True`` by default so odd sizes keep their border (callers crop after upsampling).
    """

    def __init__(self, level: int = 0, ceil_mode: bool = True):
        super().__init__()
        self.level = int(level)
        self.ceil_mode = ceil_mode

    def forward(self, x: torch.Tensor, da: int = 0) -> torch.Tensor:
        sd = 1 if pending_inplane_downsamples(da, self.level) > 0 else 2
        k = (sd, 2, 2)
        return F.max_pool3d(x, k, k, ceil_mode=self.ceil_mode)


def resample_grid(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resize a ``[B, C, d, h, w]`` grid: area-downsample the axes that shrink, then trilinear-upsample.

    Used for learnable position embeddings stored at a reference grid (as PUMIT's ``resample``). Identity when the
    shape already matches.
    """
    shape = tuple(int(s) for s in shape)
    if tuple(x.shape[2:]) == shape:
        return x
    down = tuple(min(a, b) for a, b in zip(x.shape[2:], shape))
    if down != tuple(x.shape[2:]):
        x = F.interpolate(x, size=down, mode="area")
    if down != shape:
        x = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)
    return x
