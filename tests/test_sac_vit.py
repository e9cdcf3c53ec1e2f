"""SAC-ViT encoder / segmentation network (tiny configs, CPU, seconds)."""
import pytest
import torch
from timm.models.eva import Eva

from nnunet_mim.architectures.sac_vit import (
    SACViT,
    SACViTSeg,
    default_out_indices,
    sac_vit_arch_kwargs,
    sac_vit_b,
    sac_vit_l,
    sac_vit_s,
)
from nnunet_mim.nnunet.eva02_weights import convert_eva02_2d_state_dict, load_eva02_2d_weights

from helpers import TINY_VIT

TINY = dict(TINY_VIT, out_indices=[0, 1, 2, 3])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _encoder(**kw) -> SACViT:
    return SACViT(1, **{**dict(embed_dim=48, depth=2, num_heads=3), **kw}).eval()


@pytest.mark.parametrize("patch, da", [((32, 32, 32), 0), ((8, 32, 32), 2), ((2, 32, 64), 3)])
def test_forward_backward_deep_supervision(patch, da):
    net = SACViTSeg(1, 3, patch, da=da, deep_supervision=True, **TINY)
    x = torch.randn(2, 1, *patch)
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == 5
    assert outs[0].shape == (2, 3, *patch)
    for out, scale in zip(outs, net.deep_supervision_scales):  # nnU-Net target shapes
        assert out.shape[2:] == tuple(round(p * s) for p, s in zip(patch, scale))
    sum(o.float().mean() for o in outs).backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None]
    assert no_grad == []  # every parameter is used (DDP without find_unused_parameters)


def test_deep_supervision_switch_and_spacing():
    net = SACViTSeg(2, 4, (8, 32, 32), spacing=(3.0, 0.75, 0.75), **TINY)
    assert net.da == 2 and net.decoder.deep_supervision is False
    x = torch.randn(1, 2, 8, 32, 32)
    assert net(x).shape == (1, 4, 8, 32, 32)
    net.decoder.deep_supervision = True  # what nnU-Net's set_deep_supervision_enabled does
    assert len(net(x)) == 5
    assert net.pool_op_kernel_sizes == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    with pytest.raises(ValueError):
        SACViTSeg(1, 2, (8, 32, 32), da=0, spacing=(3.0, 0.75, 0.75), **TINY)


def test_bad_patch_size_message():
    with pytest.raises(ValueError) as e:
        SACViTSeg(1, 2, (10, 40, 32), da=2, **TINY)
    msg = str(e.value)
    assert "(4, 16, 16)" in msg and "(8, 32, 32)" in msg and "(12, 48, 32)" in msg
    net = SACViTSeg(1, 2, (32, 32, 32), da=0, **TINY)
    with pytest.raises(ValueError):
        net(torch.randn(1, 1, 24, 32, 32))
    with pytest.raises(ValueError, match="single token"):
        SACViTSeg(1, 2, (16, 16, 16), da=0, **TINY)


def test_seg_layer_keys():
    net = SACViTSeg(1, 5, (16, 32, 32), da=0, **TINY)
    seg = [k for k in net.state_dict() if "seg_layers" in k]
    assert seg and all(".seg_layers." in k for k in seg)
    assert "decoder.seg_layers.4.weight" in seg  # full-resolution head is the last one
    assert all(net.state_dict()[k].shape[0] == 5 for k in seg)
    enc_keys = {k[len("encoder."):] for k in net.state_dict() if k.startswith("encoder.")}
    assert enc_keys == set(SACViT(1, 48, 4, 3, use_mask_token=False).state_dict())


def test_nnunet_load_pretrained_weights_across_plans(tmp_path):
    """State-dict shapes do not depend on DA / patch size / num_classes: nnU-Net's loader transfers everything
    except '.seg_layers.'."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    src = SACViTSeg(1, 2, (32, 32, 32), da=0, **TINY)
    torch.save({"network_weights": src.state_dict()}, tmp_path / "ckpt.pth")
    dst = SACViTSeg(1, 7, (8, 64, 32), da=2, **TINY)
    load_pretrained_weights(dst, str(tmp_path / "ckpt.pth"))
    sd_src, sd_dst = src.state_dict(), dst.state_dict()
    assert all(torch.equal(sd_src[k], v) for k, v in sd_dst.items() if ".seg_layers." not in k)


def test_nnunet_plans_integration():
    """Build through nnU-Net's get_network_from_plans; its deep-supervision scales (from arch_kwargs['strides'])
    match the outputs."""
    import numpy as np
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    kwargs = sac_vit_arch_kwargs((8, 32, 64), (2.5, 0.7, 0.7), size="S", **TINY)
    assert kwargs["strides"] == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]  # DA 1
    net = get_network_from_plans(
        "nnunet_mim.architectures.sac_vit.SACViTSeg", kwargs, [], 1, 3, deep_supervision=True,
    )
    scales = 1 / np.cumprod(np.vstack(kwargs["strides"]), axis=0)[:-1]  # nnUNetTrainer._get_deep_supervision_scales
    outs = net(torch.randn(1, 1, 8, 32, 64))
    assert [tuple(o.shape[2:]) for o in outs] == [tuple(int(round(p * f)) for p, f in zip((8, 32, 64), s))
                                                  for s in scales]
    with pytest.raises(ValueError, match="strides"):
        SACViTSeg(1, 3, (8, 32, 64), da=0, strides=kwargs["strides"], **TINY)


def test_attention_uses_sdpa(monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    enc = _encoder(depth=3)
    enc.forward_features(torch.randn(1, 1, 16, 32, 32))
    assert len(calls) == 3


def test_token_mask():
    enc = _encoder()
    x = torch.randn(2, 1, 32, 32, 32)  # grid 2x2x2
    with torch.no_grad():
        ref = enc.forward_features(x)
        none_masked = enc.forward_features(x, token_mask=torch.zeros(2, 8, dtype=torch.bool))
        assert torch.equal(ref, none_masked)
        mask = torch.zeros(2, 8, dtype=torch.bool)
        mask[:, 3] = True  # token (0, 1, 1) = voxels [0:16, 16:32, 16:32]
        a = enc.forward_features(x, token_mask=mask)
        x2 = x.clone()
        x2[:, :, 0:16, 16:32, 16:32] = torch.randn(2, 1, 16, 16, 16)  # change only the masked patch
        b = enc.forward_features(x2, token_mask=mask)
    assert not torch.allclose(a, ref)
    assert torch.allclose(a, b)  # the masked patch's content is invisible
    with pytest.raises(ValueError):
        _encoder(use_mask_token=False).forward_features(x, token_mask=mask)


@pytest.mark.parametrize("da", [0, 2])
def test_mask_token_position_embedding_option(da):
    """mask_token_pos_embed=False (official PUMIT MIM): a masked position's encoder input is the bare mask token and
    does not depend on the absolute position embedding; True (default, BEiT order): it moves with it."""
    x = torch.randn(2, 1, 2 * (16 >> da), 32, 32)  # grid 2 x 2 x 2
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, [1, 6]] = True
    mask[1, [0, 3, 7]] = True
    rope_only = _encoder(da=da, mask_token_pos_embed=False)
    beit = _encoder(da=da)
    beit.load_state_dict(rope_only.state_dict())  # the option is not part of the state dict
    assert beit.mask_token_pos_embed and not rope_only.mask_token_pos_embed
    inputs = {}
    with torch.no_grad():
        for step in ("before", "after"):
            for name, enc in (("rope_only", rope_only), ("beit", beit)):
                inputs[name, step] = enc.embed(x, da, mask)[0]
                enc.pos_embed.add_(torch.randn_like(enc.pos_embed))  # a different position embedding next round
    a, b = inputs["rope_only", "before"], inputs["rope_only", "after"]
    assert torch.equal(a[mask], b[mask])  # masked inputs ignore the position embedding ...
    assert torch.equal(a[mask][0], a[mask][-1])  # ... so every masked position gets the same vector
    assert not torch.allclose(a[~mask], b[~mask])  # visible tokens still carry it
    a2, b2 = inputs["beit", "before"], inputs["beit", "after"]
    assert not torch.allclose(a2[mask], b2[mask])  # BEiT order: the masked inputs move with the position embedding
    assert torch.equal(a[~mask], a2[~mask])  # visible tokens are the same in both modes
    with torch.no_grad():  # the masked positions' content stays invisible in both modes
        x2 = x.clone()
        x2[1, :, : 16 >> da, :16, :16] += 5.0  # token 0 of sample 1 (masked)
        for enc in (rope_only, beit):
            assert torch.allclose(enc.forward_features(x, token_mask=mask), enc.forward_features(x2, token_mask=mask))


@pytest.mark.parametrize("da", [1, 2, 3, 4])
def test_encoder_output_is_invariant_to_anisotropy(da):
    """A volume with 2**DA times fewer slices, run at DA, gives the encoder output (all tokens, cls included) of the
    same volume stretched along depth (each slice repeated 2**DA times) and run as isotropic (DA 0): SAC patch
    embedding, position embedding and RoPE all see the same token grid."""
    enc = _encoder(depth=2, pos_embed_grid=(2, 3, 3)).double()
    low = torch.randn(2, 1, 2 * (16 >> da), 32, 48, dtype=torch.float64)  # grid 2 x 2 x 3
    stretched = low.repeat_interleave(1 << da, dim=2)  # 32 x 32 x 48 voxels
    with torch.no_grad():
        out_low = enc.forward_features(low, da=da)
        out_iso = enc.forward_features(stretched, da=0)
        mask = torch.zeros(2, 12, dtype=torch.bool)
        mask[:, [2, 7]] = True
        masked_low = enc.forward_features(low, token_mask=mask, da=da)
        masked_iso = enc.forward_features(stretched, token_mask=mask, da=0)
        other = enc.forward_features(torch.randn_like(low), da=da)
    assert out_low.shape == out_iso.shape == (2, 1 + 12, 48)
    assert torch.allclose(out_low, out_iso, atol=1e-9, rtol=0), (out_low - out_iso).abs().max()
    assert torch.allclose(masked_low, masked_iso, atol=1e-9, rtol=0)
    assert (other - out_low).abs().max() > 1e-2  # the input matters (the comparison is not vacuous)


def test_visible_subset_path():
    enc = _encoder()
    x = torch.randn(2, 1, 16, 32, 48)  # grid 1x2x3
    with torch.no_grad():
        full = enc.forward_features(x)
        all_idx = torch.arange(6).expand(2, -1)
        assert torch.allclose(enc.forward_features(x, visible_idx=all_idx), full, atol=1e-5)
        perm = torch.stack([torch.randperm(6), torch.randperm(6)])
        permuted = enc.forward_features(x, visible_idx=perm)
        for b in range(2):  # RoPE / pos-embed follow the tokens: permutation-equivariant
            assert torch.allclose(permuted[b, 1:], full[b, 1:][perm[b]], atol=1e-5)
            assert torch.allclose(permuted[b, 0], full[b, 0], atol=1e-5)
        sub = enc.forward_features(x, visible_idx=perm[:, :2])
    assert sub.shape == (2, 3, 48)


def test_grad_checkpointing_matches():
    enc = _encoder()
    enc_ckpt = _encoder(grad_checkpointing=True)
    enc_ckpt.load_state_dict(enc.state_dict())
    enc.train()
    enc_ckpt.train()
    x = torch.randn(1, 1, 16, 32, 32)
    enc.forward_features(x).sum().backward()
    enc_ckpt.forward_features(x).sum().backward()
    for (n, p), q in zip(enc.named_parameters(), enc_ckpt.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-5), n


def test_pos_embed_resampled_to_any_grid():
    enc = _encoder(pos_embed_grid=(2, 3, 3))
    assert enc.token_grid((48, 64, 32)) == (3, 4, 2)
    assert enc.forward_features(torch.randn(1, 1, 48, 64, 32)).shape == (1, 1 + 24, 48)
    assert enc.forward_features(torch.randn(1, 1, 16, 16, 16)).shape == (1, 1 + 1, 48)


def test_presets_param_counts():
    counts = {}
    for name, factory in [("S", sac_vit_s), ("B", sac_vit_b), ("L", sac_vit_l)]:
        with torch.device("meta"):
            net = factory(input_channels=1, num_classes=2, patch_size=(64, 128, 128), da=0)
        counts[name] = (sum(p.numel() for p in net.encoder.parameters()), sum(p.numel() for p in net.parameters()))
    assert counts == {  # documented in documentation/pumit.md
        "S": (23_090_688, 56_852_330),
        "B": (88_648_704, 126_847_178),
        "L": (307_122_112, 349_753_034),
    }
    assert default_out_indices(12) == [3, 5, 7, 11] and default_out_indices(24) == [7, 11, 15, 23]


# ----------------------------------------------------------------------------------------------------------------
# EVA-02 2D weights
# ----------------------------------------------------------------------------------------------------------------
def _tiny_eva(patch: int = 16, img: int = 48) -> Eva:
    """A tiny EVA-02-style timm model (no pretrained weights) standing in for an EVA-02 checkpoint."""
    eva = Eva(
        img_size=img, patch_size=patch, in_chans=3, num_classes=0, embed_dim=48, depth=2, num_heads=3,
        qkv_fused=False, mlp_ratio=8 / 3, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True, global_pool="token",
    ).eval()
    with torch.no_grad():
        for name in ("cls_token", "pos_embed"):
            getattr(eva, name).normal_()
        for p in eva.blocks.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return eva


@pytest.mark.parametrize("da, depth", [(0, 16), (2, 4)])
def test_eva02_2d_weights_reproduce_2d_model(tmp_path, da, depth):
    """EVA-02 2D (RGB) -> SAC-ViT (1 channel): a grey 2D image stacked along depth gives EVA-02's tokens."""
    eva = _tiny_eva()
    torch.save(eva.state_dict(), tmp_path / "eva.pt")
    enc = _encoder(da=da, pos_embed_grid=(1, 3, 3))
    report = load_eva02_2d_weights(enc, tmp_path / "eva.pt")
    assert report.missing_keys == ["mask_token"] and report.unexpected_keys == []
    g = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        ref = eva.forward_features(g.expand(-1, 3, -1, -1))
        ours = enc.forward_features(g[:, :, None].expand(-1, -1, depth, -1, -1))
    assert torch.allclose(ours, ref, atol=1e-4)


def test_eva02_patch_resize_and_original_names(tmp_path):
    eva = _tiny_eva(patch=14, img=28)
    sd = eva.state_dict()
    net = SACViTSeg(1, 2, (32, 32, 32), da=0, **{**TINY, "depth": 2, "out_indices": [0, 0, 1, 1]})
    report = load_eva02_2d_weights(net, _save(sd, tmp_path / "timm.pt"))
    assert report.unexpected_keys == [] and report.missing_keys == []
    w = net.encoder.patch_embed.proj.weight
    assert w.shape == (48, 1, 16, 16, 16)
    ref = torch.nn.functional.interpolate(sd["patch_embed.proj.weight"], size=(16, 16), mode="bicubic")
    assert torch.allclose(w.sum(2), ref.sum(1, keepdim=True), atol=1e-5)  # depth-sum == resized 2D, RGB summed
    assert torch.allclose(w[:, :, 0], w[:, :, 15])  # repeated along depth
    # original EVA-02 checkpoint naming, wrapped in {'module': ...}
    renames = [("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2."), ("mlp.fc2.", "mlp.w3."),
               ("mlp.norm.", "mlp.ffn_ln."), ("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias")]
    orig = {}
    for k, v in sd.items():
        for a, b in renames:
            k = k.replace(a, b)
        orig[k] = v
    orig["rope.freqs_cos"] = torch.zeros(3)
    orig["lm_head.weight"] = torch.zeros(3)
    a = convert_eva02_2d_state_dict(sd, net.encoder)
    b = convert_eva02_2d_state_dict({"module": orig}, net.encoder)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _save(sd, path):
    torch.save(sd, path)
    return path


def test_eva02_safetensors_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_eva02_2d_weights(_encoder(), tmp_path / "nope.pt")
    safetensors = pytest.importorskip("safetensors.torch")
    eva = _tiny_eva()
    safetensors.save_file({k: v.contiguous() for k, v in eva.state_dict().items()}, str(tmp_path / "eva.safetensors"))
    report = load_eva02_2d_weights(_encoder(pos_embed_grid=(1, 3, 3)), tmp_path / "eva.safetensors")
    assert report.unexpected_keys == []


def test_eva02_mask_token_loads_into_the_encoder_mask_token(tmp_path):
    """An EVA-02 MIM checkpoint's mask_token (original layout, {'module': ...}) goes to an encoder built with a mask
    token; a network without any mask token reports it as unused."""
    eva = _tiny_eva()
    token = torch.randn(1, 1, 48)
    path = _save({"module": {**eva.state_dict(), "mask_token": token}}, tmp_path / "eva02_pt.pt")
    enc = _encoder(pos_embed_grid=(1, 3, 3))
    report = load_eva02_2d_weights(enc, path)
    assert report.unexpected_keys == [] and report.missing_keys == []
    assert torch.equal(enc.mask_token, token)
    seg = SACViTSeg(1, 2, (32, 32, 32), da=0, **{**TINY, "depth": 2, "out_indices": [0, 0, 1, 1]})
    assert load_eva02_2d_weights(seg, path).unexpected_keys == ["mask_token"]


def test_eva02_wrong_size_raises(tmp_path):
    eva = _tiny_eva()
    with pytest.raises(ValueError, match="do not fit"):
        load_eva02_2d_weights(SACViT(1, 64, 2, 4), _save(eva.state_dict(), tmp_path / "eva.pt"))
