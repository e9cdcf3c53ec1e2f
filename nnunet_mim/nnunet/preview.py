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
    columns = [("input", img, "gray"), ("masked input", masked, "gray"), ("reconstruction", recon, "gray"),
               ("target (loss voxels)", target, "gray")]
    return save_volume_panels(path, columns, title, centre=centre, gray_range=tuple(np.percentile(img, [0.5, 99.5])))


def save_volume_panels(path: str, columns: Sequence[tuple[str, np.ndarray, str]], title: str = "",
                       centre: Sequence[int] | None = None, gray_range: tuple[float, float] | None = None) -> str:
    """3 rows (a slice through ``centre`` along each axis, default the middle) x one column per
    ``(name, volume [D, H, W], colormap)``; NaN is drawn grey-blue. ``gray`` columns share ``gray_range`` when given
    (else their own 0.5-99.5 percentiles); ``tab20`` columns show integer codes modulo 20 (codebook indices)."""
    with plt.style.context("default"):  # nnU-Net's progress plot sets a large seaborn font scale globally
        fig, axes = plt.subplots(3, len(columns), figsize=(4 * len(columns), 12), squeeze=False)
        for col, (name, vol, cmap_name) in enumerate(columns):
            cmap = plt.get_cmap(cmap_name).copy()
            cmap.set_bad("#6b8fb3")
            finite = vol[np.isfinite(vol)]
            if cmap_name == "tab20":
                vol = np.where(np.isfinite(vol), np.mod(vol, 20), np.nan)
                lo, hi = 0, 19
            elif cmap_name == "gray":
                lo, hi = gray_range or (np.percentile(finite, [0.5, 99.5]) if finite.size else (0, 1))
            else:
                lo, hi = (finite.min(), finite.max()) if finite.size else (0, 1)
            c = list(centre) if centre is not None else [n // 2 for n in vol.shape]
            for row, view in enumerate((vol[c[0]], vol[:, c[1]], vol[:, :, c[2]])):
                ax = axes[row, col]
                ax.imshow(np.ma.masked_invalid(view), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(name)
        for row in range(3):
            axes[row, 0].set_ylabel(f"axis {row}")
        return _save_figure(fig, path, title)


def save_codebook_usage(path: str, counts: np.ndarray, mean_probs: np.ndarray, title: str = "") -> str:
    """Codebook utilisation (Zhang et al. 2023 / PUMIT Fig. 3): per code, % of tokens whose argmax it is, and its
    mean probability, both sorted, log scale."""
    k = len(counts)
    usage = 100.0 * counts / max(counts.sum(), 1)
    with plt.style.context("default"):
        fig, axes = plt.subplots(1, 2, figsize=(14, 5))
        axes[0].bar(np.arange(k), np.sort(usage)[::-1], width=1.0)
        axes[0].set_yscale("log")
        axes[0].set_xlabel(f"code (sorted), {int((counts > 0).sum())}/{k} used")
        axes[0].set_ylabel("argmax usage (% of tokens)")
        axes[1].bar(np.arange(k), np.sort(100.0 * mean_probs)[::-1], width=1.0, color="tab:orange")
        axes[1].set_yscale("log")
        axes[1].axhline(100.0 / k, color="k", ls="--", lw=1, label="uniform")
        axes[1].set_xlabel("code (sorted)")
        axes[1].set_ylabel("mean probability (%)")
        axes[1].legend()
        return _save_figure(fig, path, title)


def _save_figure(fig, path: str, title: str) -> str:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
