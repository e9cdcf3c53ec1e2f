"""Reconstruction preview PNGs: input, masked input, reconstruction, target; a middle slice per axis."""
from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def save_reconstruction_preview(path: str, image: torch.Tensor, voxel_mask: torch.Tensor,
                                reconstruction: torch.Tensor, region: Sequence[slice] | None = None,
                                mask_value: float = 0.0, title: str = "") -> str:
    """Write a 3 x 4 panel PNG for the first sample of a batch and return its path.

    ``image`` [B, C, D, H, W] is the unmasked input, ``voxel_mask`` [B, 1, D, H, W] the bool mask,
    ``reconstruction`` the network output on ``region`` (slices into the patch; ``None`` = whole patch).
    Columns: input | masked input | reconstruction pasted into the region (grey outside) | target
    (the voxels the loss sees: masked voxels inside the region; grey elsewhere). Channel 0 is shown.
    """
    region = tuple(region) if region is not None else (slice(None),) * 3
    img = image[0, 0].detach().float().cpu().numpy()
    mask = voxel_mask[0, 0].detach().cpu().numpy().astype(bool)
    masked = np.where(mask, mask_value, img)
    recon = np.full_like(img, np.nan)
    recon[region] = reconstruction[0, 0].detach().float().cpu().numpy()
    in_region = np.zeros_like(mask)
    in_region[region] = True
    target = np.where(mask & in_region, img, np.nan)
    # centre the slices on the region so the reconstruction is visible on every axis
    centre = [((s.start or 0) + (s.stop if s.stop is not None else n)) // 2 for s, n in zip(region, img.shape)]
    lo, hi = np.percentile(img, [0.5, 99.5])
    columns = (("input", img), ("masked input", masked), ("reconstruction", recon), ("target (loss voxels)", target))
    fig, axes = plt.subplots(3, 4, figsize=(16, 12))
    cmap = plt.get_cmap("gray").copy()
    cmap.set_bad("#6b8fb3")
    for col, (name, vol) in enumerate(columns):
        views = [vol[centre[0]], vol[:, centre[1]], vol[:, :, centre[2]]]
        for row, view in enumerate(views):
            ax = axes[row, col]
            ax.imshow(np.ma.masked_invalid(view), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name)
        axes[0, 0].set_ylabel("axis 0")
        axes[1, 0].set_ylabel("axis 1")
        axes[2, 0].set_ylabel("axis 2")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
