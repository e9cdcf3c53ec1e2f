"""MAE / SimMIM / SimCLR on toy tensors: exact mask counts, MAE's unshuffle, losses on masked patches only,
patchify/unpatchify (and SimMIM's projection) matching SAC-ViT's token order, encoder-on-visible-tokens."""
from __future__ import annotations

import math

import pytest
import torch

from nnunet_mim.architectures.mae_decoder import MAEDecoder, MAENet, SimMIMNet
from nnunet_mim.architectures.sac_vit import SACViTSeg
from nnunet_mim.core.patches import block_token_mask, mae_indices, patchify, token_mask_to_voxels, unpatchify
from nnunet_mim.core.sac import sac_token_size
from nnunet_mim.trainers.mae import masked_patch_loss, normalized_patch_targets
from nnunet_mim.trainers.simclr import SimCLRNet, simclr_view

from helpers import TINY_VIT



@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("grid, ratio, block", [((2, 2, 2), 0.75, (1, 1, 1)), ((2, 4, 4), 0.75, (1, 1, 1)),
                                                ((3, 5, 7), 0.6, (1, 1, 1)), ((2, 4, 4), 0.75, (2, 2, 2)),
                                                ((4, 4, 4), 0.5, (2, 2, 1))])
def test_masking_keeps_the_exact_count(grid, ratio, block):
    mask = block_token_mask(6, grid, ratio, block)
    n_units = math.prod(grid) // math.prod(block)
    assert mask.shape == (6, math.prod(grid))
    assert (mask.sum(1) == int(ratio * n_units) * math.prod(block)).all()
    if block != (1, 1, 1):  # whole blocks are masked
        m = mask.view(6, *grid)
        for axis, b in enumerate(block):
            chunks = m.unflatten(axis + 1, (grid[axis] // b, b))
            first = chunks.select(axis + 2, 0).unsqueeze(axis + 2)
            assert torch.equal(chunks, first.expand_as(chunks))


def test_mae_unshuffle_restores_order():
    mask = block_token_mask(3, (2, 3, 4), 0.75)
    ids_keep, ids_restore, ids_shuffle = mae_indices(mask)
    n = mask.shape[1]
    k = n - int(0.75 * n)
    assert ids_keep.shape == (3, k)
    assert not mask.gather(1, ids_keep).any()  # kept = visible
    assert mask.gather(1, ids_shuffle[:, k:]).all()  # the rest = masked
    positions = torch.arange(n).expand(3, n)
    shuffled = positions.gather(1, ids_shuffle)  # the layout the decoder builds: visible, then mask tokens
    assert torch.equal(shuffled.gather(1, ids_restore), positions)
    # the decoder's own unshuffle: visible features land at their positions, mask tokens everywhere else
    dec = MAEDecoder(encoder_dim=4, out_dim=1, dim=4, depth=0, num_heads=1)
    with torch.no_grad():
        dec.embed.weight.copy_(torch.eye(4))
        dec.embed.bias.zero_()
        dec.mask_token.fill_(-1.0)
        dec.pos_embed.zero_()
    captured = {}
    dec.norm.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    visible = ids_keep.float().unsqueeze(-1).expand(-1, -1, 4)  # feature = own raster position
    dec(visible, ids_restore, (2, 3, 4))
    x = captured["x"][..., 0]
    assert torch.equal(x[~mask], ids_keep.float().flatten())  # each visible token back at its own position
    assert (x[mask] == -1).all()


def test_loss_only_on_masked_patches():
    target = torch.randn(2, 8, 10)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, :6] = True
    pred = torch.randn(2, 8, 10, requires_grad=True)
    loss = masked_patch_loss(pred, target, mask, "l1")
    assert loss.item() == pytest.approx((pred - target).abs()[:, :6].mean().item(), rel=1e-6)
    changed = pred.detach().clone()
    changed[:, 6:] += 100  # unmasked predictions do not count
    assert masked_patch_loss(changed, target, mask, "l1").item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert (pred.grad[:, 6:] == 0).all() and (pred.grad[:, :6] != 0).all()
    mse = masked_patch_loss(pred.detach(), target, mask, "mse")
    assert mse.item() == pytest.approx(((pred.detach() - target) ** 2)[:, :6].mean().item(), rel=1e-6)
    normed, mean, std = normalized_patch_targets(target)
    assert torch.allclose(normed.mean(-1), torch.zeros(2, 8), atol=1e-5)
    assert torch.allclose(normed * std + mean, target, atol=1e-5)


@pytest.mark.parametrize("da, shape, channels", [(0, (32, 48, 32), 1), (2, (8, 32, 48), 2), (4, (2, 32, 32), 3)])
def test_patchify_round_trip_and_token_order(da, shape, channels):
    token = sac_token_size(da)
    x = torch.randn(2, channels, *shape)
    p = patchify(x, token)
    grid = tuple(s // t for s, t in zip(shape, token))
    assert p.shape == (2, math.prod(grid), math.prod(token) * channels)
    assert torch.equal(unpatchify(p, grid, token, channels), x)
    # token n of patchify is token n of SAC-ViT's patch embedding: a volume whose blocks hold their raster index
    idx = torch.arange(math.prod(grid), dtype=torch.float32).view(1, 1, *grid)
    for axis, t in enumerate(token):
        idx = idx.repeat_interleave(t, axis + 2)
    assert torch.equal(patchify(idx, token)[0].mean(-1), torch.arange(math.prod(grid), dtype=torch.float32))
    seg = SACViTSeg(1, 2, shape, da=da, **TINY_VIT)
    with torch.no_grad():
        seg.encoder.patch_embed.proj.weight.fill_(1.0 / 4096)  # mean over the token (the depth sum-pool keeps it)
        seg.encoder.patch_embed.proj.bias.zero_()
        emb = seg.encoder.patch_embed(idx, da).flatten(2).transpose(1, 2)[0, :, 0]
    assert torch.allclose(emb, torch.arange(math.prod(grid), dtype=torch.float32), atol=1e-4)
    vox = token_mask_to_voxels(torch.arange(math.prod(grid))[None] % 2 == 1, grid, token)
    assert torch.equal(patchify(vox.float(), token)[0].mean(-1), (torch.arange(math.prod(grid)) % 2).float())


def test_simmim_projection_reshapes_to_the_patch_voxels():
    seg = SACViTSeg(1, 2, (16, 32, 32), da=1, **TINY_VIT)
    net = SimMIMNet(seg, 1)
    x = torch.randn(2, 1, 16, 32, 32)
    mask = block_token_mask(2, net.token_grid(), 0.75)
    pred = net(x, mask)
    assert pred.shape == (2, 8, 8 * 16 * 16)  # DA 1: token (8, 16, 16)
    recon = unpatchify(pred, net.token_grid(), net.token_size, 1)
    assert recon.shape == x.shape and torch.equal(patchify(recon, net.token_size), pred)
    masked_patch_loss(pred, patchify(x, net.token_size), mask).backward()
    assert net.mim_mask_token.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in net.decoder.parameters())


def test_mae_encoder_sees_visible_tokens_only():
    seg = SACViTSeg(1, 2, (32, 64, 64), da=0, **TINY_VIT)  # 2 x 4 x 4 = 32 tokens
    net = MAENet(seg, 1, decoder_dim=24, decoder_depth=1, decoder_heads=2)
    lengths = []
    net.encoder.blocks[0].register_forward_hook(lambda m, i, o: lengths.append(o.shape[1]))
    mask = block_token_mask(2, net.token_grid(), 0.75)
    ids_keep, ids_restore, _ = mae_indices(mask)
    pred = net(torch.randn(2, 1, 32, 64, 64), ids_keep, ids_restore)
    assert lengths == [1 + 8]  # cls + 25 % of 32
    assert pred.shape == (2, 32, 4096)
    seg_keys = set(SACViTSeg(1, 2, (32, 64, 64), da=0, **TINY_VIT).state_dict())
    keys = set(net.state_dict())
    assert seg_keys <= keys and all(k.startswith("mim_") for k in keys - seg_keys)


def test_simclr_views_and_network():
    x = torch.randn(3, 1, 16, 32, 32)
    v1, v2 = simclr_view(x), simclr_view(x)
    assert v1.shape == x.shape and not torch.allclose(v1, v2)
    net = SimCLRNet(SACViTSeg(1, 2, (16, 32, 32), da=0, **TINY_VIT), projection_dim=16)
    z = net(torch.cat([v1, v2]))
    assert z.shape == (6, 16)
    from nnunet_mim.core.losses.contrastive import nt_xent

    nt_xent(z[:3], z[3:], 0.5).backward()
    assert all(p.grad is not None for p in net.mim_projector.parameters())
