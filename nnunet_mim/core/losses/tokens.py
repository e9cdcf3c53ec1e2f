"""Soft-token losses of PUMIT (Luo et al., arXiv 2312.07630): the extended prior-distribution regularisation of the
visual tokenizer (eq. 4) and the masked soft-token cross-entropy of token MIM (eq. 6).

Notation: ``p`` is a token's distribution over the K codebook entries, ``U`` the uniform distribution,
``KL(q || U) = log K - H(q)``.
"""
from __future__ import annotations

import math

import torch

from nnunet_mim.core.distributed import ddp_gradient_scale, gather_with_local_grad, global_count, world_size


def entropy(probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Shannon entropy (nats) over the last axis, ``-sum_k p_k log p_k``; ``0 log 0 = 0``."""
    return -(probs * probs.clamp_min(eps).log()).sum(-1)


def kl_to_uniform(probs: torch.Tensor) -> torch.Tensor:
    """``KL(p || U) = log K - H(p)`` over the last axis."""
    return math.log(probs.shape[-1]) - entropy(probs)


def global_mean_distribution(probs: torch.Tensor) -> torch.Tensor:
    """Mean token distribution ``E[p]`` ``[K]`` over all tokens of the batch *and of all DDP ranks*, each token
    weighing the same (ranks with more samples weigh more).

    The other ranks' tokens enter as constants; the local tokens keep their gradient (PUMIT: "global mean with local
    gradient"), scaled for DDP's mean of the ranks' gradients (:mod:`nnunet_mim.core.distributed`).
    """
    flat = probs.reshape(-1, probs.shape[-1])
    if world_size() == 1:
        return flat.mean(0)
    sums = gather_with_local_grad(flat.sum(0, keepdim=True))  # [W, K], the local row with gradient
    count = global_count(flat.shape[0])
    return ddp_gradient_scale(sums.sum(0) / count)


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
