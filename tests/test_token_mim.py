"""Token MIM (PUMIT stage 2) on toy tensors: masked soft-target cross-entropy on a hand-made case, the mask, the
network (keys, frozen decoder, mask token, position embedding of the mask token), a full compute_losses pass with a
frozen tokenizer, targets and logits taken at the masked positions, and EVA-02's mask token reaching the network."""
from __future__ import annotations

import math

import pytest
import torch

from nnunet_mim.architectures.sac_vit import SACViTSeg
from nnunet_mim.architectures.tokenizer import TokenizerConfig, VisualTokenizer
from nnunet_mim.core.losses.tokens import masked_soft_cross_entropy, soft_cross_entropy
from nnunet_mim.core.masking import random_token_mask
from nnunet_mim.trainers.token_mim import TokenMIMNet

from helpers import TINY_VIT



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


@pytest.mark.parametrize("n, ratio, expected", [(8, 0.55, 4), (32, 0.55, 17), (18, 0.55, 9), (100, 0.75, 75)])
def test_mask_count_is_exact(n, ratio, expected):
    """floor(ratio * N) masked tokens, worked out by hand (4.4, 17.6, 9.9, 75; documentation/deviations.md)."""
    mask = random_token_mask(5, n, ratio)
    assert mask.sum(1).tolist() == [expected] * 5


def test_token_mim_network():
    seg = SACViTSeg(1, 3, (16, 32, 32), da=1, **TINY_VIT)
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


def _bare_trainer(cls, tokenizer, network):
    """A token-MIM trainer with only what compute_losses touches (no plans, no data loaders)."""
    from collections import defaultdict

    trainer = cls.__new__(cls)
    trainer.tokenizer = tokenizer
    trainer.network = network
    trainer._preview_batch = None
    trainer.device = torch.device("cpu")
    trainer.step_timings = defaultdict(list)
    return trainer


def test_compute_losses_uses_the_masked_positions(monkeypatch):
    """The loss is the soft-target CE at the MASKED positions, for targets and logits alike: a hand-made case where
    the masked and the unmasked positions give very different losses (an inverted mask would be off by nats), checked
    against an independent per-position computation from the encoder's output."""
    from nnunet_mim.trainers import token_mim

    k = 16
    seg = SACViTSeg(1, 2, (32, 32, 32), da=0, **TINY_VIT)  # token grid 2 x 2 x 2
    net = TokenMIMNet(seg, k)
    with torch.no_grad():  # codes 0 .. k-1 from unlikely to likely, plus a position-dependent part
        net.mim_head[-1].weight.normal_(0.0, 0.3)
        net.mim_head[-1].bias.copy_(torch.linspace(-4.0, 4.0, k))
    mask = torch.tensor([[1, 0, 0, 1, 1, 0, 1, 0], [0, 1, 1, 0, 0, 1, 0, 1]], dtype=torch.bool)  # 4 = int(0.55 * 8)
    # soft targets: sharp on the unlikely code 0 at masked positions (high CE), broad around the likely code k-1 at
    # unmasked positions (low CE, higher entropy)
    targets = torch.full((2, 8, k), 0.02 / (k - 1))
    targets[..., 0][mask] = 0.98
    targets[~mask] = 0.5 / (k - 1)
    targets[..., k - 1][~mask] = 0.5
    calls = []

    def fixed_mask(b, n, ratio, device=None, generator=None):
        calls.append((b, n, ratio))
        return mask.clone()

    class _Tokenizer:
        def tokenize(self, data):
            return targets.clone()

    monkeypatch.setattr(token_mim, "random_token_mask", fixed_mask)
    trainer = _bare_trainer(token_mim.TokenMIMPretrainer, _Tokenizer(), net)
    x = torch.randn(2, 1, 32, 32, 32)
    losses = trainer.compute_losses(x, training=True)
    assert calls == [(2, 8, 0.55)]

    with torch.no_grad():  # independent: CE and entropy at every position, then the two position sets
        tokens = net.encoder.forward_features(x, token_mask=mask, mask_token=net.mim_mask_token, da=0)[:, 1:]
        log_p = net.mim_head(tokens).log_softmax(-1)
        ce = -(targets * log_p).sum(-1)  # [B, N]
        ent = -(targets * targets.log()).sum(-1)
    per_sample = [mask[b].nonzero()[:, 0] for b in range(2)]
    at_masked = torch.stack([ce[b, idx] for b, idx in enumerate(per_sample)]).mean()
    at_visible = torch.stack([ce[b, (~mask[b]).nonzero()[:, 0]] for b in range(2)]).mean()
    assert at_masked - at_visible > 3.0  # the case separates the two position sets by several nats
    assert losses["token_ce"].item() == pytest.approx(at_masked.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(at_masked.item(), rel=1e-5)
    kl = at_masked - torch.stack([ent[b, idx] for b, idx in enumerate(per_sample)]).mean()
    assert losses["token_kl"].item() == pytest.approx(kl.item(), rel=1e-4, abs=1e-5)


def test_rope_only_mask_token_variant(monkeypatch):
    """TokenMIMPretrainer_maskTokenRoPEOnly builds a network whose masked positions enter the encoder as the bare
    mask token (no absolute position embedding, official PUMIT code); the default keeps the BEiT order."""
    from nnunet_mim.trainers import token_mim

    monkeypatch.setattr(token_mim, "build_sac_vit_seg", lambda *a, **k: SACViTSeg(1, 2, (32, 32, 32), da=0, **TINY_VIT))
    tok = VisualTokenizer(TokenizerConfig(1, (8, 16, 32), 32, 8), da=0)
    nets = {}
    for cls in (token_mim.TokenMIMPretrainer, token_mim.TokenMIMPretrainer_maskTokenRoPEOnly):
        nets[cls.__name__] = _bare_trainer(cls, tok, None).build_network_architecture(None, None, 1, 2)
    rope_only = nets["TokenMIMPretrainer_maskTokenRoPEOnly"]
    default = nets["TokenMIMPretrainer"]
    assert rope_only.encoder.mask_token_pos_embed is False and default.encoder.mask_token_pos_embed is True
    assert list(rope_only.state_dict()) == list(default.state_dict())  # same checkpoint layout
    x = torch.randn(1, 1, 32, 32, 32)
    mask = torch.tensor([[0, 1, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        for net, moves in ((rope_only, False), (default, True)):
            before = net.encoder.embed(x, 0, mask, net.mim_mask_token)[0]
            net.encoder.pos_embed.add_(1.0)
            after = net.encoder.embed(x, 0, mask, net.mim_mask_token)[0]
            assert torch.equal(before[mask], after[mask]) is not moves
            assert torch.allclose(after[~mask], before[~mask] + 1.0, atol=1e-6)  # visible: + the shift


def test_eva02_mask_token_reaches_the_token_mim_network(tmp_path, monkeypatch):
    """An EVA-02 MIM checkpoint's mask_token ends up in TokenMIMNet.mim_mask_token (the mask token token MIM uses):
    through load_eva02_2d_weights on the whole network, and through the trainer's EVA-02 initialisation; a checkpoint
    without a mask token (timm's EVA-02 weights) leaves it alone."""
    from nnunet_mim.trainers import token_mim
    from nnunet_mim.trainers.sac_vit import EVA02_WEIGHTS_ENV, maybe_load_eva02
    from test_sac_vit import _tiny_eva

    from nnunet_mim.nnunet.eva02_weights import load_eva02_2d_weights

    eva = _tiny_eva()  # embed 48, depth 2, heads 3
    token = torch.randn(1, 1, 48)
    torch.save({"module": {**eva.state_dict(), "mask_token": token}}, tmp_path / "eva02_pt.pt")
    torch.save(eva.state_dict(), tmp_path / "timm.pt")

    def fresh():
        return TokenMIMNet(SACViTSeg(1, 2, (32, 32, 32), da=0, **{**TINY_VIT, "depth": 2}), 16)

    net = fresh()
    report = load_eva02_2d_weights(net, tmp_path / "eva02_pt.pt")
    assert "mask_token" not in report.unexpected_keys
    assert torch.equal(net.state_dict()["mim_mask_token"], token)
    assert torch.equal(net.encoder.blocks[1].attn.q_proj.weight, eva.blocks[1].attn.q_proj.weight)

    lines = []
    trainer = _bare_trainer(token_mim.TokenMIMPretrainer, None, fresh())
    trainer.print_to_log_file = lambda *a: lines.append(" ".join(map(str, a)))
    monkeypatch.setenv(EVA02_WEIGHTS_ENV, str(tmp_path / "eva02_pt.pt"))
    maybe_load_eva02(trainer, trainer.network)  # what SACViTPretrainerBase.initialize does: the encoder ...
    trainer._maybe_load_eva02_mask_token()  # ... then TokenMIMPretrainer.initialize: the mask token
    assert torch.equal(trainer.network.mim_mask_token, token) and "mim_mask_token initialised" in lines[-1]
    assert torch.equal(trainer.network.encoder.blocks[0].attn.v_proj.bias, eva.blocks[0].attn.v_proj.bias)

    trainer.network = fresh()
    before = trainer.network.mim_mask_token.detach().clone()
    monkeypatch.setenv(EVA02_WEIGHTS_ENV, str(tmp_path / "timm.pt"))
    trainer._maybe_load_eva02_mask_token()
    assert torch.equal(trainer.network.mim_mask_token, before) and "holds no mask_token" in lines[-1]
    monkeypatch.delenv(EVA02_WEIGHTS_ENV)
    n_lines = len(lines)
    trainer._maybe_load_eva02_mask_token()
    assert len(lines) == n_lines  # unset: nothing happens


def test_compute_losses_with_frozen_tokenizer():
    """The stage-2 step on toy tensors: tokenizer targets at the masked positions, CE = H(q) + KL(q || p)."""
    from nnunet_mim.trainers.token_mim import TokenMIMPretrainer

    tok = VisualTokenizer(TokenizerConfig(1, (8, 16, 32), 32, 8), da=0).eval().requires_grad_(False)
    seg = SACViTSeg(1, 2, (32, 32, 32), da=0, **TINY_VIT)
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
