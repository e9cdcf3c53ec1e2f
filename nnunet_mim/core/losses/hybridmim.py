"""Patch-masking perception losses of HybridMIM (Xing et al., Sec. III-C, eqs. 3-5).

All heads work per sub-volume: logits have shape [B, N_sub, K].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nnunet_mim.core.masking import COUNT_CLASSES


def count_loss(count_logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """9-way cross-entropy on the number of masked patches per sub-volume (eq. 3)."""
    return F.cross_entropy(count_logits.reshape(-1, COUNT_CLASSES), counts.reshape(-1))


def location_loss(location_logits: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
    """8-way binary cross-entropy on which patches of a sub-volume are masked (eq. 4)."""
    return F.binary_cross_entropy_with_logits(location_logits, locations)


def consistency_loss(count_logits: torch.Tensor, location_logits: torch.Tensor) -> torch.Tensor:
    """Agreement between the count head and the location head (eq. 5), in a form that trains both heads.

    ``0.5 * (CE(count_logits, n_loc) + MSE(E_count, S_loc))`` where ``n_loc`` is the hard count implied by
    the location head (sigmoid > 0.5, detached, as in the official code), ``E_count`` is the expected count
    under softmax(count_logits) and ``S_loc`` the sum of location probabilities. The official code's second
    term, ``MSE(n_loc, argmax(count_logits))``, is built from a threshold and an argmax and has no gradient;
    our soft version gives gradients to both heads (documentation/deviations.md).
    """
    location_prob = torch.sigmoid(location_logits)
    hard_count = (location_prob > 0.5).sum(-1).detach()
    ce = F.cross_entropy(count_logits.reshape(-1, COUNT_CLASSES), hard_count.reshape(-1))
    classes = torch.arange(COUNT_CLASSES, device=count_logits.device, dtype=count_logits.dtype)
    expected_count = (count_logits.softmax(-1) * classes).sum(-1)
    mse = F.mse_loss(expected_count, location_prob.sum(-1))
    return 0.5 * (ce + mse)
