"""NT-Xent contrastive loss (SimCLR, Chen et al. 2020) with negatives gathered across DDP ranks.

Used by HybridMIM's dropout (SimCSE-style) contrastive term and by the SimCLR baseline.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nnunet_mim.core.distributed import ddp_gradient_scale, gather_with_local_grad, global_count


def global_batch_size(local_batch_size: int) -> int:
    """Number of samples that take part in the loss across all ranks (per-rank sizes may differ)."""
    return global_count(local_batch_size)


def nt_xent_chance(n_samples: int) -> float:
    """NT-Xent's value when the views carry no information: all 2N similarities equal, so each anchor spreads its
    probability evenly over its 2N - 1 candidates and the loss is ``ln(2N - 1)`` (ln 3 for a batch of 2)."""
    return math.log(2 * n_samples - 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent over the 2N views of N samples: for each anchor the other view is the positive and the
    remaining 2N - 2 views are negatives; cosine similarity, temperature ``t`` (HybridMIM: 0.5).

    ``loss = mean_i -log( exp(s_i,pos / t) / sum_{j != i} exp(s_ij / t) )``.
    Under DDP the views of all ranks are gathered first (ranks may hold different numbers of samples) and every
    rank evaluates the whole global loss; gradients flow into the local views only, from every row they appear in
    (as anchor, positive or negative), and are scaled for DDP's mean (:mod:`nnunet_mim.core.distributed`): the
    result equals single-process training on the global batch.
    Raises ``ValueError`` with fewer than 2 samples, where the loss is identically zero.
    """
    z1 = gather_with_local_grad(F.normalize(z1, dim=-1))
    z2 = gather_with_local_grad(F.normalize(z2, dim=-1))
    n = z1.shape[0]
    if n < 2:
        raise ValueError("NT-Xent needs at least 2 samples in the (global) batch: with 1 sample the only "
                         "candidate is the positive and the loss is identically 0.")
    z = torch.cat([z1, z2], 0)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    loss = F.cross_entropy(sim, positives)
    return ddp_gradient_scale(loss)
