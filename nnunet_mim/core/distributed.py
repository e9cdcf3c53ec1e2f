"""Global-batch quantities under DDP: gather with local gradient, global counts, the gradient correction for DDP's mean.

Conventions:

- Outside an initialised process group (or with one rank) every function is the identity / the local value.
- Ranks may hold different numbers of samples: nnU-Net splits a global batch of 3 over 2 GPUs as 2 and 1. Gathers
  exchange the sizes first and pad to the largest, so uneven batches work and the result equals the global batch.
- Every rank evaluates the whole global loss, with gradients flowing into its local samples only. DDP *averages* the
  ranks' parameter gradients, which leaves 1/W of the single-process gradient on the global batch;
  :func:`ddp_gradient_scale` multiplies the gradient (not the value) by W to undo that, whatever the per-rank sizes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_count(local: int) -> int:
    """Sum of ``local`` over the ranks (e.g. the global batch size)."""
    if world_size() == 1:
        return local
    t = torch.tensor([local], dtype=torch.long, device=_device())
    dist.all_reduce(t)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is true on any rank: every rank gets the same answer (decisions such as stopping a run)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` ``[B_rank, ...]`` along dim 0 across ranks (sizes may differ); the local slice keeps its
    gradient, remote slices are constants. Rank order, so every rank gets the same tensor."""
    if world_size() == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x.detach()
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded.contiguous())
    parts = [g[:n] for g, n in zip(gathered, sizes)]
    parts[dist.get_rank()] = x
    return torch.cat(parts, 0)


def ddp_gradient_scale(value: torch.Tensor) -> torch.Tensor:
    """``value`` with its gradient multiplied by the world size (see the module docstring)."""
    w = world_size()
    return value if w == 1 else value + (w - 1) * (value - value.detach())


def _device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"
