"""PUMIT visual tokenizer on toy tensors: soft-token expectation, prior regularisation (hand-computed, and across
2 gloo ranks), hinge GAN losses and the discriminator gate, the single-backward two-player split, grid alignment with
SAC-ViT, the perceptual loss's local-weights-only policy, and finding the stage-1 checkpoint."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunet_mim.architectures.sac_vit import SACViT, SACViTSeg
from nnunet_mim.architectures.tokenizer import (
    SACPatchDiscriminator,
    SoftQuantizer,
    TokenizerConfig,
    VisualTokenizer,
    VisualTokenizerNet,
)
from nnunet_mim.core.losses.gan import (
    IMAGENET_MEAN,
    build_perceptual_loss,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    sample_slices,
    update_gan_gate,
    vgg16_features,
)
from nnunet_mim.core.losses.tokens import entropy, kl_to_uniform, prior_regularization
from nnunet_mim.trainers.token_mim import (
    TOKENIZER_ENV,
    check_token_grids,
    find_tokenizer_checkpoint,
    load_tokenizer,
    tokenizer_config_from_state,
)

SMALL = TokenizerConfig(1, (8, 16, 32), 16, 8)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_soft_token_is_the_expectation_of_the_embeddings():
    q = SoftQuantizer(dim=4, num_embeddings=3, embedding_dim=2)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 4.0]]))
    p = torch.tensor([[0.5, 0.25, 0.25]])
    expected = 0.5 * torch.tensor([1.0, 0.0]) + 0.25 * torch.tensor([0.0, 2.0]) + 0.25 * torch.tensor([-1.0, 4.0])
    assert torch.allclose(q.embed(p), expected[None])
    z = torch.randn(2, 4, 1, 2, 3)  # [B, C, d, h, w]
    zq, logits, probs = q(z)
    assert zq.shape == (2, 2, 1, 2, 3) and probs.shape == (2, 6, 3)
    assert torch.allclose(probs, logits.softmax(-1)) and torch.allclose(probs.sum(-1), torch.ones(2, 6))
    tokens = z.flatten(2).transpose(1, 2)  # raster order
    loop = torch.stack([sum(probs[b, n, k] * q.embedding.weight[k] for k in range(3)) for b in range(2)
                        for n in range(6)]).view(2, 6, 2)
    assert torch.allclose(zq.flatten(2).transpose(1, 2), loop, atol=1e-6)
    assert torch.allclose(logits, q.proj(tokens))


def test_prior_regularization_hand_computed():
    p = torch.tensor([[[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]], [[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]])
    out = prior_regularization(p, prior_weight=0.3, sharpness_weight=2.0)
    mean = p.reshape(-1, 4).mean(0)  # [0.5125, 0.2625, 0.1125, 0.1125]
    kl_mean = sum(m * math.log(m * 4) for m in mean.tolist())
    h = [-(sum(x * math.log(x) for x in row if x > 0)) for row in p.reshape(-1, 4).tolist()]
    mean_kl = sum(math.log(4) - v for v in h) / 4
    assert out["prior_kl"].item() == pytest.approx(kl_mean, rel=1e-6)
    assert out["token_entropy"].item() == pytest.approx(sum(h) / 4, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.3 * kl_mean - 2.0 * mean_kl, rel=1e-6)
    # official form: lambda1 * (-H(E[p])) + lambda2 * mean H(p), equal up to the constant (lambda1 - lambda2) log K
    official = 0.3 * -entropy(mean) + 2.0 * torch.tensor(h).mean()
    assert out["loss"].item() == pytest.approx(official.item() + (0.3 - 2.0) * math.log(4), rel=1e-6)
    assert kl_to_uniform(torch.full((5,), 0.2)).item() == pytest.approx(0.0, abs=1e-7)


def test_prior_regularization_gradients_push_the_right_way():
    logits = torch.randn(1, 6, 5, requires_grad=True)
    prior_regularization(logits.softmax(-1), 1.0, 0.0)["loss"].backward()
    mean_only = logits.grad.clone()
    logits.grad = None
    prior_regularization(logits.softmax(-1), 0.0, 1.0)["loss"].backward()
    sharpen = logits.grad.clone()
    with torch.no_grad():  # a small step along -grad: mean closer to uniform / tokens sharper
        p0 = logits.softmax(-1)
        a = (logits - 0.1 * mean_only).softmax(-1)
        b = (logits - 0.1 * sharpen).softmax(-1)
    assert kl_to_uniform(a.reshape(-1, 5).mean(0)) < kl_to_uniform(p0.reshape(-1, 5).mean(0))
    assert entropy(b).mean() < entropy(p0).mean()


def _prior_worker(rank, world, port, logits, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    local = logits[rank:rank + 1].clone().requires_grad_(True)
    out = prior_regularization(local.softmax(-1), 0.7, 0.2)
    out["loss"].backward()
    queue.put((rank, out["prior_kl"].item(), local.grad.tolist()))
    dist.destroy_process_group()


def test_prior_regularization_global_mean_across_ranks():
    """2 ranks x 1 sample == 1 process x 2 samples: same batch-mean KL; DDP's gradient average gives the
    single-process gradient."""
    logits = torch.randn(2, 3, 6)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_prior_worker, args=(r, 2, port, logits, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r: (kl, g) for r, kl, g in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(60)
    ref_logits = logits.clone().requires_grad_(True)
    ref = prior_regularization(ref_logits.softmax(-1), 0.7, 0.2)
    ref["loss"].backward()
    for r in range(2):
        assert results[r][0] == pytest.approx(ref["prior_kl"].item(), rel=1e-5)
        # the entropy term is a local mean (DDP's average of local means = the global mean); the KL term's local
        # gradient is scaled by the world size so that DDP's average restores the single-process gradient
        assert torch.allclose(torch.tensor(results[r][1][0]) / 2, ref_logits.grad[r], atol=1e-6)


def test_hinge_losses_and_gate():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5) / 2 + (0 + 1) / 2))
    assert generator_adversarial_loss(fake).item() == pytest.approx(1.5)
    ema, is_open = update_gan_gate(float("nan"), 0.5, 0.9, 0.025)
    assert ema == 0.5 and not is_open  # first update: EMA = current
    ema, is_open = update_gan_gate(0.02, 0.01, 0.9, 0.025)
    assert ema == pytest.approx(0.019) and is_open
    ema, is_open = update_gan_gate(0.2, 0.01, 0.9, 0.025)  # current low, EMA still high: closed
    assert ema == pytest.approx(0.181) and not is_open
    ema, is_open = update_gan_gate(0.01, 0.3, 0.9, 0.025)  # EMA low, current high: closed (max of both)
    assert not is_open


def test_one_backward_trains_each_player_on_its_own_loss():
    net = VisualTokenizerNet(VisualTokenizer(SMALL, 0), SACPatchDiscriminator(1, (8, 16)))
    x = torch.randn(2, 1, 16, 32, 32)
    out, real, fake, fake_for_g = net(x)
    assert out.reconstruction.shape == x.shape
    assert torch.allclose(fake, fake_for_g)  # same scores, different graphs
    generator_adversarial_loss(fake_for_g).backward(retain_graph=True)
    assert all(p.grad is None for p in net.mim_discriminator.parameters())  # G's GAN term never trains D
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.tokenizer.decoder.parameters())
    net.zero_grad(set_to_none=True)
    hinge_discriminator_loss(real, fake).backward()
    assert all(p.grad is None for p in net.tokenizer.parameters())  # D's loss never trains the tokenizer
    assert all(p.grad is not None for p in net.mim_discriminator.parameters())
    assert torch.isnan(net.mim_gan_ema) and "mim_gan_ema" in net.state_dict()  # gate EMA saved with the weights


@pytest.mark.parametrize("da, patch", [(0, (32, 32, 48)), (1, (16, 32, 32)), (2, (8, 48, 32)), (3, (4, 32, 32)),
                                       (5, (3, 32, 32))])
def test_tokenizer_grid_equals_sac_vit_grid(da, patch):
    tok = VisualTokenizer(SMALL, da)
    x = torch.randn(1, 1, *patch)
    out = tok(x)
    assert out.reconstruction.shape == x.shape
    vit = SACViT(1, embed_dim=16, depth=1, num_heads=1, da=da)
    vit_grid = vit.token_grid(patch)
    assert out.grid == tok.token_grid(patch) == vit_grid
    assert out.probs.shape == (1, math.prod(vit_grid), SMALL.num_embeddings)
    tokens = vit.forward_features(x)[:, 1:]
    assert tokens.shape[1] == out.probs.shape[1]  # one target per ViT token, same raster order
    seg = SACViTSeg(1, 2, patch, da=da, embed_dim=16, depth=4, num_heads=1, decoder_channels=(4, 4, 4, 8, 8, 8))
    from nnunet_mim.architectures.sac_vit import SACViTPretrainNet

    check_token_grids(tok, SACViTPretrainNet(seg), patch)


@pytest.mark.parametrize("da", [1, 2, 3, 4])
def test_tokenizer_encoder_is_invariant_to_anisotropy(da):
    """The tokenizer's encoder (and so the MIM targets) gives the same feature map and token logits for a volume with
    2**DA times fewer slices run at DA as for the same volume stretched along depth (each slice repeated 2**DA times)
    and run as isotropic (DA 0). (Its decoder is not invariant: documentation/pumit.md, section 9.)"""
    tok = VisualTokenizer(SMALL, 0).eval().double()
    low = torch.randn(2, 1, 2 * (16 >> da), 32, 48, dtype=torch.float64)
    stretched = low.repeat_interleave(1 << da, dim=2)
    with torch.no_grad():
        z_low, z_iso = tok.encoder(low, da), tok.encoder(stretched, 0)
        (logits_low, grid_low), (logits_iso, grid_iso) = tok.encode(low, da), tok.encode(stretched, 0)
        other = tok.encode(torch.randn_like(low), da)[0]
    assert z_low.shape == z_iso.shape == (2, SMALL.channels[2], 2, 2, 3) and grid_low == grid_iso == (2, 2, 3)
    assert torch.allclose(z_low, z_iso, atol=1e-9, rtol=0), (z_low - z_iso).abs().max()
    assert torch.allclose(logits_low, logits_iso, atol=1e-9, rtol=0)
    assert (other - logits_low).abs().max() > 1e-3  # the input matters (the comparison is not vacuous)


def test_token_grid_mismatch_is_a_clear_error():
    from nnunet_mim.architectures.sac_vit import SACViTPretrainNet

    seg = SACViTSeg(1, 2, (8, 32, 32), da=2, embed_dim=16, depth=4, num_heads=1, decoder_channels=(4,) * 6)
    with pytest.raises(ValueError, match="grids differ"):
        check_token_grids(VisualTokenizer(SMALL, 0), SACViTPretrainNet(seg), (8, 32, 32))
    with pytest.raises(ValueError, match="not divisible"):
        VisualTokenizer(SMALL, 0)(torch.randn(1, 1, 24, 32, 32))


def test_perceptual_loss_needs_local_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_mim_vgg16_weights", raising=False)
    module, status = build_perceptual_loss()
    assert module is None and "OFF" in status and "never downloaded" in status
    with pytest.raises(FileNotFoundError):
        build_perceptual_loss(str(tmp_path / "missing.pth"))
    vgg = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}  # random stand-in, right keys
    torch.save(vgg, tmp_path / "vgg16.pth")
    module, status = build_perceptual_loss(str(tmp_path / "vgg16.pth"))
    assert module is not None and "ON" in status and "uniform channel weights" in status
    # correct LPIPS shift 2 * mean - 1 (the official code has 1 - 2 * mean)
    assert torch.allclose(module.shift.flatten(), torch.tensor([2 * m - 1 for m in IMAGENET_MEAN]))
    x = torch.randn(2, 1, 32, 32)
    assert module(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert module(x, x + torch.randn_like(x)).item() > 0
    assert not any(p.requires_grad for p in module.parameters())
    a, b = sample_slices(torch.randn(2, 1, 30, 8, 8), torch.randn(2, 1, 30, 8, 8), 4)
    assert a.shape == b.shape == (8, 1, 8, 8)


def test_tokenizer_checkpoint_discovery_and_loading(tmp_path, monkeypatch):
    import nnunet_mim.trainers.token_mim as tm

    monkeypatch.delenv(TOKENIZER_ENV, raising=False)
    monkeypatch.setattr(tm, "nnUNet_results", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        find_tokenizer_checkpoint("Dataset601_Tiny", "nnUNetPlans", "3d_sac_vit")
    assert "nnUNetv2_train Dataset601_Tiny 3d_sac_vit all -tr VisualTokenizerTrainer" in str(e.value)
    fold = tmp_path / "Dataset601_Tiny" / "VisualTokenizerTrainer__nnUNetPlans__3d_sac_vit" / "fold_all"
    fold.mkdir(parents=True)
    net = VisualTokenizerNet(VisualTokenizer(SMALL, 0), SACPatchDiscriminator(1, (8, 16)))
    torch.save({"network_weights": net.state_dict(), "trainer_name": "VisualTokenizerTrainer"},
               fold / "checkpoint_latest.pth")
    with pytest.raises(FileNotFoundError, match="has not finished"):
        find_tokenizer_checkpoint("Dataset601_Tiny", "nnUNetPlans", "3d_sac_vit")
    (fold / "checkpoint_latest.pth").rename(fold / "checkpoint_final.pth")
    path = find_tokenizer_checkpoint("Dataset601_Tiny", "nnUNetPlans", "3d_sac_vit")
    assert path == str(fold / "checkpoint_final.pth")
    monkeypatch.setenv(TOKENIZER_ENV, str(fold))  # override: a fold folder or a file
    assert find_tokenizer_checkpoint("Other", "nnUNetPlans", "x") == path
    assert tokenizer_config_from_state(net.state_dict()) == SMALL
    tok, desc = load_tokenizer(path, da=2, num_input_channels=1)
    assert not tok.training and not any(p.requires_grad for p in tok.parameters()) and tok.da == 2
    assert all(torch.equal(v, net.tokenizer.state_dict()[k]) for k, v in tok.state_dict().items())
    with pytest.raises(ValueError, match="input channel"):
        load_tokenizer(path, da=0, num_input_channels=2)


def test_stage_two_reads_the_tokenizer_configuration_stored_in_the_checkpoint(tmp_path):
    from dataclasses import replace

    from nnunet_mim.trainers.token_mim import TOKENIZER_CONFIG_KEY

    net = VisualTokenizerNet(VisualTokenizer(SMALL, 0), SACPatchDiscriminator(1, (8, 16)))
    torch.save({"network_weights": net.state_dict(), "init_args": {TOKENIZER_CONFIG_KEY: SMALL.to_dict()}},
               tmp_path / "stored.pth")
    tok, _ = load_tokenizer(str(tmp_path / "stored.pth"), da=0, num_input_channels=1)
    assert tok.config == SMALL
    # the stored configuration is what counts: one that contradicts the weights fails loudly
    wrong = replace(SMALL, num_embeddings=SMALL.num_embeddings * 2)
    torch.save({"network_weights": net.state_dict(), "init_args": {TOKENIZER_CONFIG_KEY: wrong.to_dict()}},
               tmp_path / "wrong.pth")
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_tokenizer(str(tmp_path / "wrong.pth"), da=0, num_input_channels=1)


def test_unit_normalize_has_finite_gradients_at_all_zero_feature_columns():
    from nnunet_mim.core.losses.gan import unit_normalize

    x = torch.randn(2, 8, 4, 4)
    x[:, :, 1, 2] = 0.0  # a feature column that ReLU zeroed
    x.requires_grad_(True)
    y = unit_normalize(x)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    norms = y.detach().pow(2).sum(1).sqrt()
    assert torch.allclose(norms[:, 0, 0], torch.ones(2), atol=1e-5) and torch.all(norms[:, 1, 2] == 0)
