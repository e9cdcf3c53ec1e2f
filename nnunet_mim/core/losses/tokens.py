"""Soft-token losses of PUMIT (Luo et al., arXiv 2312.07630): the extended prior-distribution regularisation of the
visual tokenizer (eq. 4) and the masked soft-token cross-entropy of token MIM (eq. 6).

Notation: ``p`` is a token's distribution over the K codebook entries, ``U`` the uniform distribution,
``KL(q || U) = log K - H(q)``.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def entropy(probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Shannon entropy (nats) over the last axis, ``-sum_k p_k log p_k``; ``0 log 0 = 0``."""
    return -(probs * probs.clamp_min(eps).log()).sum(-1)


def kl_to_uniform(probs: torch.Tensor) -> torch.Tensor:
    """``KL(p || U) = log K - H(p)`` over the last axis."""
    return math.log(probs.shape[-1]) - entropy(probs)


def global_mean_distribution(probs: torch.Tensor) -> torch.Tensor:
    """Mean token distribution ``E[p]`` ``[K]`` over all tokens of the batch *and of all DDP ranks*.

    The other ranks' means enter as constants; the local tokens keep their gradient (PUMIT: "global mean with local
    gradient"). DDP then averages parameter gradients over the W ranks, which would leave this term's gradient 1/W
    of single-process training on the global batch, so the gradient (not the value) is scaled by W -- the same
    correction as :func:`nnunet_mim.core.losses.contrastive.nt_xent`. Ranks are weighted equally (nnU-Net gives every
    rank the same batch and patch size).
    """
    local = probs.reshape(-1, probs.shape[-1]).mean(0)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    world = dist.get_world_size()
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local.detach().contiguous())
    gathered[dist.get_rank()] = local
    mean = torch.stack(gathered).mean(0)
    return mean + (world - 1) * (mean - mean.detach())


def prior_regularization(probs: torch.Tensor, prior_weight: float, sharpness_weight: float
                         ) -> dict[str, torch.Tensor]:
    """Extended prior-distribution regularisation (eq. 4):
    ``L = lambda1 * KL(E[p] || U) - lambda2 * mean_tokens KL(p || U)``.

    The first term pushes the batch-mean (DDP-global) distribution towards uniform (codebook usage), the second
    sharpens every token. Equal, up to the constant ``(lambda1 - lambda2) log K``, to the official
    ``lambda1 * (-H(E[p])) + lambda2 * mean H(p)`` (``quant_weight``, ``entropy_weight``).

    Returns ``loss`` (weighted), ``prior_kl`` = KL(E[p] || U) and ``token_entropy`` = mean H(p) (unweighted).
    """
    mean_p = global_mean_distribution(probs)
    prior_kl = kl_to_uniform(mean_p)
    token_kl = kl_to_uniform(probs).mean()
    log_k = math.log(probs.shape[-1])
    return {"loss": prior_weight * prior_kl - sharpness_weight * token_kl, "prior_kl": prior_kl,
            "token_entropy": log_k - token_kl}


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """``mean_i -sum_k q_ik log softmax(logits_i)_k`` over the leading axes (eq. 6 on the positions given)."""
    return -(target_probs * logits.log_softmax(-1)).sum(-1).mean()


def masked_soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 6: cross-entropy of the predicted distributions relative to the tokenizer's soft tokens, averaged over the
    masked positions only. ``logits`` / ``target_probs``: ``[B, N, K]``; ``mask``: bool ``[B, N]``."""
    return soft_cross_entropy(logits[mask], target_probs[mask])
