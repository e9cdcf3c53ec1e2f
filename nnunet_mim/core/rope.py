"""Additive 3D rotary position embedding (PUMIT, section "Transformer Architecture" and appendix "Additive 3D RoPE").

For a head dimension ``D`` (divisible by 4) there are ``D / 2`` rotation pairs, split in two halves of
``Q = D / 4`` pairs. With bases ``(b_d, b_h, b_w)`` (paper/official: ``(2333, 10000, 10000)``) and ``k = 0..Q-1``::

    omega_h[k] = b_h ** (-2k / (D/2))        omega_w[k] = b_w ** (-2k / (D/2))
    omega_d[k] = b_d ** (-(2k+1) / (D/2))

    theta[k]     = h * omega_h[k] + d * omega_d[k]      (pairs 0..Q-1)
    theta[Q + k] = w * omega_w[k] + d * omega_d[k]      (pairs Q..2Q-1)

i.e. EVA-02's 2D RoPE angles (first half from ``h``, second half from ``w``; appendix eq. 9) plus an additive depth
angle (eq. 13-14). For ``D = 64`` this is exactly the official ``SpatialRotaryEmbedding(merge_hw=True)``.
Pairs are interleaved (``(x0, x1), (x2, x3), ...``; EVA-02 ``rotate_half`` / timm ``rot``). Positions are in token
units (no rescaling to a reference grid).

Embedding layout: ``cat([sin, cos], -1)`` with each of ``sin`` / ``cos`` repeated per pair element, shape
``[..., 2 * D]`` -- exactly what timm's ``RotaryEmbeddingCat.get_embed`` returns and what
``timm.layers.apply_rot_embed_cat`` / ``EvaAttention(rope=...)`` / ``EvaBlock.forward(x, rope=...)`` consume. Prefix
(cls) tokens are skipped by ``EvaAttention`` itself (``num_prefix_tokens``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import apply_rot_embed_cat
from torch import nn

__all__ = [
    "PUMIT_ROPE_BASES",
    "rope_frequencies",
    "grid_positions",
    "rope_angles",
    "rope_embed_from_angles",
    "apply_rope",
    "AdditiveRoPE3d",
]

#: ``(base_d, base_h, base_w)`` of the paper / official code.
PUMIT_ROPE_BASES: tuple[float, float, float] = (2333.0, 10000.0, 10000.0)


def rope_frequencies(
    head_dim: int,
    bases: Sequence[float] = PUMIT_ROPE_BASES,
    dtype: torch.dtype = torch.float64,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(omega_d, omega_h, omega_w)``, each of length ``head_dim // 4`` (see module docstring)."""
    if head_dim % 4:
        raise ValueError(f"additive 3D RoPE needs head_dim divisible by 4, got {head_dim}")
    b_d, b_h, b_w = (float(b) for b in bases)
    n = head_dim // 2  # number of rotation pairs
    k = torch.arange(head_dim // 4, dtype=dtype, device=device)
    omega_h = b_h ** (-2 * k / n)
    omega_w = b_w ** (-2 * k / n)
    omega_d = b_d ** (-(2 * k + 1) / n)
    return omega_d, omega_h, omega_w


def grid_positions(grid: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    """Integer ``(d, h, w)`` positions of a token grid in raster order (w fastest), shape ``[d*h*w, 3]``."""
    axes = [torch.arange(int(s), device=device) for s in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def rope_angles(positions: torch.Tensor, omegas: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotation angles ``[..., head_dim // 2]`` for ``(d, h, w)`` positions ``[..., 3]`` (float64 math)."""
    omega_d, omega_h, omega_w = (o.to(device=positions.device, dtype=torch.float64) for o in omegas)
    p = positions.to(torch.float64)
    d, h, w = p[..., 0:1], p[..., 1:2], p[..., 2:3]
    theta_d = d * omega_d
    return torch.cat([h * omega_h + theta_d, w * omega_w + theta_d], -1)


def rope_embed_from_angles(theta: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., n_pairs]`` angles -> timm ``cat([sin, cos])`` layout with interleaved pairs, ``[..., 4 * n_pairs]``."""
    sin = theta.sin().repeat_interleave(2, -1)
    cos = theta.cos().repeat_interleave(2, -1)
    return torch.cat([sin, cos], -1).to(dtype)


def apply_rope(x: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., N, head_dim]`` with an embedding from :class:`AdditiveRoPE3d` (timm ``apply_rot_embed_cat``)."""
    return apply_rot_embed_cat(x, embed)


class AdditiveRoPE3d(nn.Module):
    """Additive 3D RoPE producing timm-compatible ``rope`` tensors for ``EvaBlock`` / ``EvaAttention``.

    ``forward(grid)`` -> ``[N, 2 * head_dim]`` for the full raster-ordered grid; with ``keep_idx [B, K]`` (indices
    into the N grid tokens, MAE-style visible subset) -> ``[B, 1, K, 2 * head_dim]`` (the singleton broadcasts over
    heads). Angles are computed in float64 on the target device then cast; the module holds no buffers (nothing
    in the state dict, nothing for ``model.to(dtype)`` to degrade).
    """

    def __init__(self, head_dim: int, bases: Sequence[float] = PUMIT_ROPE_BASES):
        super().__init__()
        self.head_dim = int(head_dim)
        self.bases = tuple(float(b) for b in bases)
        rope_frequencies(self.head_dim, self.bases)  # validate head_dim early

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """Angles ``[..., head_dim // 2]`` for arbitrary ``(d, h, w)`` positions ``[..., 3]``."""
        return rope_angles(positions, rope_frequencies(self.head_dim, self.bases, device=positions.device))

    def embed_positions(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """timm-layout embedding ``[..., 2 * head_dim]`` for arbitrary positions."""
        return rope_embed_from_angles(self.angles(positions), dtype)

    def forward(
        self,
        grid: Sequence[int],
        keep_idx: torch.Tensor | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        if keep_idx is not None:
            device = keep_idx.device
        embed = self.embed_positions(grid_positions(grid, device=device), dtype)
        if keep_idx is None:
            return embed
        return embed[keep_idx].unsqueeze(1)  # [B, K, 2D] -> [B, 1, K, 2D]

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, bases={self.bases}"
