"""NT-Xent contrastive loss (SimCLR, Chen et al. 2020) with negatives gathered across DDP ranks.

Used by HybridMIM's dropout (SimCSE-style) contrastive term and by the SimCLR baseline.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` [B, D] across ranks; the local slice keeps its gradient, remote slices are constants.

    Outside an initialised process group this is the identity.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, x.detach().contiguous())
    gathered[dist.get_rank()] = x
    return torch.cat(gathered, 0)


def global_batch_size(local_batch_size: int) -> int:
    """Number of samples that take part in the loss across all ranks."""
    if dist.is_available() and dist.is_initialized():
        return local_batch_size * dist.get_world_size()
    return local_batch_size


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent over the 2N views of N samples: for each anchor the other view is the positive and the
    remaining 2N - 2 views are negatives; cosine similarity, temperature ``t`` (HybridMIM: 0.5).

    ``loss = mean_i -log( exp(s_i,pos / t) / sum_{j != i} exp(s_ij / t) )``.
    Under DDP the views of all ranks are gathered first and every rank evaluates the whole global loss;
    gradients flow into the local views only, from every row they appear in (as anchor, positive or
    negative). DDP then *averages* the ranks' gradients, so the gradient is scaled by the world size
    (the value is not): the result equals single-process training on the global batch.
    Raises ``ValueError`` with fewer than 2 samples, where the loss is identically zero.
    """
    local = z1.shape[0]
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
    world = n // local
    return loss if world == 1 else loss + (world - 1) * (loss - loss.detach())
