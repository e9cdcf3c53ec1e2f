"""Masks for masked image modelling.

HybridMIM (Xing et al., Sec. III-A) masks at two levels: the patch is tiled into *sub-volumes*, and each
sub-volume is split into 2x2x2 *patches*. Patches are masked uniformly at random over the whole patch
(the official code keeps int(0.6 * 216) = 129 of 216 patches and masks the other 87), so a sub-volume holds 0..8 masked patches:
the count label has 9 classes and the location label is an 8-bit vector.

Unlike the official code we keep the patch mask *grouped by sub-volume* (shape [B, n_d, n_h, n_w, 2, 2, 2]),
so that count/location labels are aligned with the bottleneck features of the same sub-volume. The
official code groups 8 consecutive raster indices, which are not the 8 patches of one sub-volume
(documentation/deviations.md).

Token masks for MAE / SimMIM / token MIM (uniform over a token grid) live here too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

LOCATIONS_PER_SUBVOLUME = 8  # 2 x 2 x 2 patches
COUNT_CLASSES = LOCATIONS_PER_SUBVOLUME + 1  # 0..8 masked patches


@dataclass(frozen=True)
class TwoLevelGrid:
    """Geometry of HybridMIM's two-level masking for one network input patch.

    ``subvolume`` is the sub-volume edge length in voxels per axis; ``pool`` is how many bottleneck cells
    per axis make one sub-volume (1 when a bottleneck cell *is* a sub-volume, as in SwinUNETR).
    """

    patch_size: tuple[int, ...]
    subvolume: tuple[int, ...]
    pool: tuple[int, ...]

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Number of sub-volumes per axis."""
        return tuple(p // s for p, s in zip(self.patch_size, self.subvolume))

    @property
    def mask_patch(self) -> tuple[int, ...]:
        """Edge length of one masking patch (half a sub-volume) per axis."""
        return tuple(s // 2 for s in self.subvolume)

    @property
    def num_subvolumes(self) -> int:
        n = 1
        for g in self.grid_shape:
            n *= g
        return n

    @property
    def num_patches(self) -> int:
        return self.num_subvolumes * LOCATIONS_PER_SUBVOLUME


PAPER_SUBVOLUME = 32  # voxels per axis: HybridMIM masks 32^3 sub-volumes split into 16^3 patches (96^3 crops)


def paper_subvolume_cells(patch_size: Sequence[int], bottleneck_stride: Sequence[int]) -> tuple[int, ...]:
    """Bottleneck cells per sub-volume giving the paper's 32-voxel sub-volume edge on every axis where the stride
    divides 32 and the patch is a multiple of 32; elsewhere the default (one cell, two where the stride is 1)."""
    return tuple(PAPER_SUBVOLUME // s if s <= PAPER_SUBVOLUME and PAPER_SUBVOLUME % s == 0 and p % PAPER_SUBVOLUME == 0
                 else (1 if s >= 2 else 2) for p, s in zip(patch_size, bottleneck_stride))


def derive_grid(patch_size: Sequence[int], bottleneck_stride: Sequence[int],
                pool: Sequence[int] | str | None = None) -> TwoLevelGrid:
    """Derive the two-level grid so that one sub-volume maps exactly onto ``pool`` bottleneck cells.

    ``bottleneck_stride`` is the network's total downsampling per axis (product of the plan's strides).
    By default ``pool`` is 1 on every axis where the stride is at least 2, and the smallest power of two
    that makes the sub-volume splittable in 2 where the stride is 1 (strongly anisotropic plans); ``"paper"``
    gives the paper's 32-voxel sub-volumes where the plan allows (:func:`paper_subvolume_cells`).
    Raises ``ValueError`` naming sizes that would work when the patch cannot be tiled.
    """
    patch_size = tuple(int(p) for p in patch_size)
    stride = tuple(int(s) for s in bottleneck_stride)
    if len(patch_size) != 3 or len(stride) != 3:
        raise ValueError(f"HybridMIM needs a 3D patch and 3D strides, got patch {patch_size}, stride {stride}.")
    if pool == "paper":
        pool = paper_subvolume_cells(patch_size, stride)
    elif pool is None:
        pool = tuple(1 if s >= 2 else 2 for s in stride)
    pool = tuple(int(p) for p in pool)
    subvolume = tuple(s * p for s, p in zip(stride, pool))
    problems = []
    for axis, (p, s, sv) in enumerate(zip(patch_size, stride, subvolume)):
        if sv % 2:
            problems.append(f"axis {axis}: sub-volume edge {sv} (stride {s} x pool {sv // s}) is odd and cannot be "
                            f"split into 2 patches; use an even pool on this axis")
        if p % sv:
            ok = max(sv, (p // sv) * sv)
            problems.append(f"axis {axis}: patch edge {p} is not a multiple of the sub-volume edge {sv}; "
                            f"use a patch edge of {ok} or {ok + sv}")
    if problems:
        raise ValueError("The HybridMIM masking grid cannot tile this patch:\n  " + "\n  ".join(problems) +
                         f"\n(patch {patch_size}, bottleneck stride {stride}, pool {pool}). Sub-volumes must map "
                         f"exactly onto bottleneck cells (edge = stride x pool) and split into 2x2x2 patches.")
    return TwoLevelGrid(patch_size, subvolume, pool)


def sample_two_level_mask(batch_size: int, grid: TwoLevelGrid, mask_ratio: float,
                          device: torch.device | str = "cpu", generator: torch.Generator | None = None
                          ) -> torch.Tensor:
    """Mask ``N - int((1 - mask_ratio) * N)`` of the N patches per sample, uniformly over all patches.

    The count follows the official code (``len_keep = int(N * (1 - ratio))``).

    Returns a bool tensor [B, n_d, n_h, n_w, 2, 2, 2] (True = masked), grouped by sub-volume.
    """
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1], got {mask_ratio}")
    n = grid.num_patches
    num_masked = n - int(n * (1.0 - mask_ratio))
    noise = torch.rand(batch_size, n, device=device, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    flat = ranks < num_masked
    return flat.view(batch_size, *grid.grid_shape, 2, 2, 2)


def patch_mask_to_voxels(patch_mask: torch.Tensor, grid: TwoLevelGrid) -> torch.Tensor:
    """Expand a grouped patch mask [B, n_d, n_h, n_w, 2, 2, 2] to a voxel mask [B, 1, D, H, W]."""
    b, nd, nh, nw = patch_mask.shape[:4]
    pd, ph, pw = grid.mask_patch
    # interleave (sub-volume index, patch index) per axis: d = (i_sub * 2 + i_patch) * pd + offset
    m = patch_mask.permute(0, 1, 4, 2, 5, 3, 6).reshape(b, 1, nd * 2, nh * 2, nw * 2)
    return m.repeat_interleave(pd, 2).repeat_interleave(ph, 3).repeat_interleave(pw, 4)


def count_and_location_labels(patch_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sub-volume labels from a grouped patch mask.

    Returns ``counts`` [B, N_sub] (long, 0..8) and ``locations`` [B, N_sub, 8] (float 0/1, patch order
    (d, h, w) raster inside the sub-volume). Sub-volumes are in (d, h, w) raster order, the same order as
    :func:`subvolume_features`.
    """
    b = patch_mask.shape[0]
    locations = patch_mask.reshape(b, -1, LOCATIONS_PER_SUBVOLUME).float()
    counts = locations.sum(-1).long()
    return counts, locations


def subvolume_features(bottleneck: torch.Tensor, pool: Sequence[int]) -> torch.Tensor:
    """Mean-pool bottleneck features [B, C, d, h, w] per sub-volume -> [B, N_sub, C] in raster order."""
    if any(p != 1 for p in pool):
        bottleneck = F.avg_pool3d(bottleneck, kernel_size=tuple(pool), stride=tuple(pool))
    return bottleneck.flatten(2).transpose(1, 2)


def apply_mask(x: torch.Tensor, voxel_mask: torch.Tensor, mask_value: float = 0.0) -> torch.Tensor:
    """Replace masked voxels (``voxel_mask`` True, broadcast over channels) by ``mask_value``."""
    return torch.where(voxel_mask, torch.as_tensor(mask_value, dtype=x.dtype, device=x.device), x)


def random_token_mask(batch_size: int, num_tokens: int, mask_ratio: float,
                      device: torch.device | str = "cpu", generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """Uniform random token mask [B, N] with exactly ``int(mask_ratio * N)`` True (masked) per sample.

    Rounding: the *masked* count is floored, as in MIM-Med3D's MAE / SimMIM (``int(ratio * N)`` masked).
    MAE's reference code and PUMIT's official code floor the *visible* count instead
    (``num_visible = int(N * (1 - ratio))``), which masks one token more whenever ``ratio * N`` is not an
    integer: PUMIT's 0.55 of 216 tokens gives 118 masked here, 119 there (documentation/deviations.md).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    num_masked = int(mask_ratio * num_tokens)
    noise = torch.rand(batch_size, num_tokens, device=device, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < num_masked
