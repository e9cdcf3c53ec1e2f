"""Token MIM (PUMIT stage 2) on toy tensors: masked soft-target cross-entropy on a hand-made case, the mask, the
network (keys, frozen decoder, mask token), and a full compute_losses pass with a frozen tokenizer."""
from __future__ import annotations

import math

import pytest
import torch

from nnunet_mim.architectures.sac_vit import SACViTSeg
from nnunet_mim.architectures.tokenizer import TokenizerConfig, VisualTokenizer
from nnunet_mim.core.losses.tokens import masked_soft_cross_entropy, soft_cross_entropy
from nnunet_mim.core.masking import random_token_mask
from nnunet_mim.trainers.token_mim import TokenMIMNet

TINY = dict(embed_dim=48, depth=4, num_heads=3, decoder_channels=(4, 8, 8, 16, 16, 16))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_masked_soft_cross_entropy_hand_case():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])  # softmax: [.5,.5], [.75,.25], ...
    target = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]])
    mask = torch.tensor([[True, True, False]])
    expected = (-math.log(0.5) + -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))) / 2
    assert masked_soft_cross_entropy(logits, target, mask).item() == pytest.approx(expected, rel=1e-6)
    changed = logits.clone()
    changed[0, 2] = torch.tensor([-7.0, 9.0])  # an unmasked position does not count
    assert masked_soft_cross_entropy(changed, target, mask).item() == pytest.approx(expected, rel=1e-6)
    # with one-hot targets it is the ordinary cross-entropy
    hard = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    lg = torch.randn(2, 2)
    assert soft_cross_entropy(lg, hard).item() == pytest.approx(
        torch.nn.functional.cross_entropy(lg, torch.tensor([0, 1])).item(), rel=1e-6)
    # minimised (= entropy of the target) when the prediction equals the target
    q = torch.tensor([[0.2, 0.3, 0.5]])
    ent = -(q * q.log()).sum().item()
    assert soft_cross_entropy(q.log(), q).item() == pytest.approx(ent, rel=1e-6)


@pytest.mark.parametrize("n, ratio", [(8, 0.55), (32, 0.55), (18, 0.55), (100, 0.75)])
def test_mask_count_is_exact(n, ratio):
    mask = random_token_mask(5, n, ratio)
    assert (mask.sum(1) == int(ratio * n)).all()


def test_token_mim_network():
    seg = SACViTSeg(1, 3, (16, 32, 32), da=1, **TINY)
    seg_keys = list(seg.state_dict())
    net = TokenMIMNet(seg, num_embeddings=64)
    keys = list(net.state_dict())
    assert [k for k in keys if not k.startswith("mim_")] == seg_keys  # the segmentation network's keys + mim_*
    assert len(keys) > len(seg_keys)
    x = torch.randn(2, 1, 16, 32, 32)
    n = math.prod(net.token_grid())  # DA 1: tokens (8, 16, 16) -> grid (2, 2, 2)
    mask = random_token_mask(2, n, 0.55)
    logits = net(x, mask)
    assert logits.shape == (2, int(0.55 * n), 64)
    logits.logsumexp(-1).mean().backward()
    assert net.mim_mask_token.grad is not None and net.mim_mask_token.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in net.decoder.parameters())  # frozen, untouched
    assert all(p.grad is not None for n_, p in net.named_parameters() if p.requires_grad)  # DDP-safe
    # masked positions see the mask token: changing the image under a masked token changes nothing there
    net.eval()
    with torch.no_grad():
        ref = net.encoder.forward_features(x, token_mask=mask, mask_token=net.mim_mask_token, da=net.da)
        first = mask[0].nonzero()[0].item()
        d, h, w = net.token_grid()
        iz, rem = divmod(first, h * w)
        iy, ix = divmod(rem, w)
        x2 = x.clone()
        x2[0, :, iz * 8:(iz + 1) * 8, iy * 16:(iy + 1) * 16, ix * 16:(ix + 1) * 16] += 10
        emb1, _ = net.encoder.embed(x, net.da, mask, net.mim_mask_token)
        emb2, _ = net.encoder.embed(x2, net.da, mask, net.mim_mask_token)
    assert torch.allclose(emb1, emb2)
    assert ref.shape == (2, 1 + n, 48)


def test_compute_losses_with_frozen_tokenizer():
    """The stage-2 step on toy tensors: tokenizer targets at the masked positions, CE = H(q) + KL(q || p)."""
    from nnunet_mim.trainers.token_mim import TokenMIMPretrainer

    tok = VisualTokenizer(TokenizerConfig(1, (8, 16, 32), 32, 8), da=0).eval().requires_grad_(False)
    seg = SACViTSeg(1, 2, (32, 32, 32), da=0, **TINY)
    trainer = TokenMIMPretrainer.__new__(TokenMIMPretrainer)  # only what compute_losses touches
    trainer.tokenizer = tok
    trainer.network = TokenMIMNet(seg, tok.num_embeddings)
    trainer.mask_ratio = 0.55
    trainer._preview_batch = None
    trainer.step_timings = {}
    trainer.device = torch.device("cpu")
    from collections import defaultdict
    trainer.step_timings = defaultdict(list)
    x = torch.randn(2, 1, 32, 32, 32)
    losses = trainer.compute_losses(x, training=True)
    assert set(losses) == {"token_ce", "token_kl", "loss"}
    assert losses["token_kl"].item() >= -1e-6 and losses["token_ce"].item() >= losses["token_kl"].item()
    losses["loss"].backward()
    assert all(p.grad is None for p in tok.parameters())
    assert len(trainer.step_timings["tokenizer"]) == 1
    trainer.compute_losses(x, training=False)
    image, mask, target, predicted, grid = trainer._preview_batch
    assert mask.sum().item() == int(0.55 * 8) and predicted.shape == (1, int(0.55 * 8)) and grid == (2, 2, 2)
