"""SwinUNETR wrapper (architectures/swin_unetr.py), its plans configuration and the Swin trainers' networks.

Small CPU cases: feature_size 12, window 4, patches of 32 x 32..96 x 64..96.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from nnunet_mim.architectures.swin_unetr import (
    SWIN_STRIDES,
    LegacyPatchMerging,
    SwinUNETR,
    build_monai_swin_unetr,
    check_swin_patch_size,
)
from nnunet_mim.nnunet.swin_weights import load_third_party_swin_weights
from nnunet_mim.architectures.hybridmim import HybridMIMModel, add_feature_dropout, check_encoder_decoder_network
from nnunet_mim.nnunet.plans import SWIN_NETWORK_CLASS, swin_configuration
from nnunet_mim.core.regions import crop_skips, level_scales, region_box
from nnunet_mim.nnunet.weights import compare_state_dicts

SMALL = dict(feature_size=12, window_size=4)
STRIDES = [list(s) for s in SWIN_STRIDES]


def small_swin(input_channels=1, num_classes=3, deep_supervision=False, **kw) -> SwinUNETR:
    torch.manual_seed(0)
    return SwinUNETR(input_channels, num_classes, deep_supervision, strides=STRIDES, **{**SMALL, **kw})


def test_forward_backward_with_deep_supervision():
    net = small_swin(deep_supervision=True)
    x = torch.randn(1, 1, 32, 32, 64)
    outputs = net(x)
    assert [tuple(o.shape) for o in outputs] == [(1, 3, 32, 32, 64), (1, 3, 16, 16, 32), (1, 3, 8, 8, 16),
                                                (1, 3, 4, 4, 8), (1, 3, 2, 2, 4)]
    sum(o.float().square().mean() for o in outputs).backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled(False) does
    with torch.no_grad():
        assert net.eval()(x).shape == (1, 3, 32, 32, 64)


def test_encoder_decoder_convention():
    net = small_swin()
    check_encoder_decoder_network(net)  # only `encoder` and `decoder` children, strides and channels exposed
    skips = net.encoder(torch.randn(1, 1, 32, 64, 96))
    assert [tuple(s.shape[1:]) for s in skips] == [(1, 32, 64, 96), (12, 16, 32, 48), (24, 8, 16, 24),
                                                  (48, 4, 8, 12), (96, 2, 4, 6), (192, 1, 2, 3)]
    assert net.encoder.strides == STRIDES and net.encoder.output_channels == [1, 12, 24, 48, 96, 192]
    assert all(".seg_layers." not in k for k in net.state_dict() if not k.startswith("decoder.seg_layers"))
    assert sorted({k.split(".")[0] for k in net.state_dict()}) == ["decoder", "encoder"]
    # nnU-Net's deep-supervision scales from the `strides` arch_kwarg match the decoder's outputs
    import numpy as np
    scales = list(1 / np.cumprod(np.vstack(STRIDES), axis=0))[:-1]
    assert [s[0] for s in scales] == [1, 0.5, 0.25, 0.125, 0.0625]


def test_wrapper_reproduces_monai_swinunetr():
    """Same weights -> same logits as MONAI's own SwinUNETR.forward (the split changes nothing)."""
    torch.manual_seed(1)
    monai_net = build_monai_swin_unetr(1, 3, "merging", feature_size=12, window_size=4).eval()
    ours = small_swin(downsample="merging").eval()
    mapped = {("encoder." if k.startswith("swinViT.") else "decoder.") + k: v
              for k, v in monai_net.state_dict().items() if not k.startswith("out.")}
    mapped.update({"decoder.seg_layers.4.weight": monai_net.out.conv.conv.weight,
                   "decoder.seg_layers.4.bias": monai_net.out.conv.conv.bias})
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    assert not unexpected and all(k.startswith("decoder.seg_layers.") for k in missing)
    x = torch.randn(1, 1, 32, 32, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), monai_net(x), atol=1e-5)


def test_patch_size_errors_say_what_to_do():
    net = small_swin()
    with pytest.raises(ValueError, match=r"multiple of 32.*\[32, 64, 64\] or \[64, 64, 64\].*add-config swin"):
        net(torch.randn(1, 1, 40, 64, 64))
    with pytest.raises(ValueError, match="single bottleneck token"):
        check_swin_patch_size([32, 32, 32], "3d_swin", require_two_tokens=True)
    with pytest.raises(ValueError, match="3D only"):
        check_swin_patch_size([64, 64], "2d")
    check_swin_patch_size([32, 64, 96], require_two_tokens=True)
    with pytest.raises(ValueError, match="single token"):  # training on a 1-token bottleneck
        net.train()(torch.randn(2, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="strides"):
        SwinUNETR(1, 2, strides=[[1, 1, 1]] + [[2, 2, 2]] * 4, **SMALL)
    with pytest.raises(ValueError, match="multiple of 12"):
        SwinUNETR(1, 2, feature_size=16)


def _pointwise_decoder(net: SwinUNETR) -> None:
    """Make every decoder op pointwise or non-overlapping: centre tap of each 3x3x3 conv, batch norm in eval."""
    with torch.no_grad():
        for m in net.decoder.modules():
            if isinstance(m, nn.Conv3d) and m.kernel_size == (3, 3, 3):
                centre = m.weight[..., 1, 1, 1].clone()
                m.weight.zero_()
                m.weight[..., 1, 1, 1] = centre


@pytest.mark.parametrize("placement", ["corner", "center"])
def test_partial_decoding_is_a_crop_of_full_decoding(placement):
    """With a pointwise decoder, decoding the cropped skips equals cropping the full decoding: the box is aligned
    at every level (image, strides 2..32). SwinUNETR's real 3x3x3 convs differ only near the crop border."""
    net = small_swin(norm_name="batch").eval()
    _pointwise_decoder(net)
    x = torch.randn(1, 1, 64, 64, 96)
    with torch.no_grad():
        skips = net.encoder(x)
        full = net.decoder(skips)
        box = region_box(tuple(skips[-1].shape[2:]), 2 / 3, placement)
        partial = net.decoder(crop_skips(skips, box, level_scales(net.encoder.strides)))
    expected = full[(Ellipsis, *box.slices_at((32, 32, 32)))]
    assert partial.shape == expected.shape == (1, 3, 32, 32, 64)
    assert torch.allclose(partial, expected, atol=1e-5)


def test_hybridmim_on_swin_grid_heads_and_partial_region():
    net = small_swin(num_classes=1, drop_rate=0.1)
    model = HybridMIMModel(net, (32, 32, 96), encoder_dropout=0.0)
    assert model.total_stride == (32, 32, 32)
    assert model.grid.subvolume == (32, 32, 32) and model.grid.pool == (1, 1, 1)  # one token = one sub-volume
    assert model.grid.grid_shape == (1, 1, 3) and model.grid.mask_patch == (16, 16, 16)
    assert model.region_slices() == (slice(0, 32), slice(0, 32), slice(32, 96))  # bottleneck box (1, 1, 2)
    out = model.train()(torch.randn(2, 1, 32, 32, 96))
    assert out.reconstruction.shape == (2, 1, 32, 32, 64)
    assert out.count_logits.shape == (2, 3, 9) and out.location_logits.shape == (2, 3, 8)
    assert out.projection.shape == out.projection_second_view.shape == (2, 384)
    assert not torch.equal(out.projection, out.projection_second_view)  # MONAI dropout makes the two views
    (out.reconstruction.square().mean() + out.count_logits.mean() + out.location_logits.mean()
     + out.projection.mean()).backward()
    assert model.mim_heads.count.weight.grad is not None
    assert net.encoder.swinViT.patch_embed.proj.weight.grad is not None


def test_generic_feature_dropout_hooks_work_on_the_swin_encoder():
    net = small_swin(num_classes=1)
    hooks = add_feature_dropout(net.encoder, 0.1)
    assert len(hooks) == 5  # patch embedding + 4 Swin stages
    assert not any(k.startswith("encoder.stages") for k in net.state_dict())


def test_pretraining_keys_load_into_the_finetuning_network(tmp_path):
    pretrain = HybridMIMModel(small_swin(num_classes=1, drop_rate=0.1), (32, 64, 96))
    finetune = small_swin(num_classes=4, deep_supervision=True)
    pre, ft = pretrain.state_dict(), finetune.state_dict()
    assert set(pre) - set(ft) == {k for k in pre if k.startswith("mim_heads.")}
    assert set(ft) <= set(pre)
    differing = [k for k in ft if pre[k].shape != ft[k].shape]
    assert differing and all(".seg_layers." in k for k in differing)
    report = compare_state_dicts(pre, finetune)
    assert report.ok and not report.unexpected and report.input_channels == (1, 1)
    assert sorted(report.pretraining_only) == sorted(k for k in pre if k.startswith("mim_heads."))
    assert compare_state_dicts(pre, small_swin(input_channels=2)).channel_mismatch

    # nnU-Net's stock loader (what plain -pretrained_weights runs) accepts it too
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    path = tmp_path / "checkpoint.pth"
    torch.save({"network_weights": pre}, path)
    load_pretrained_weights(finetune, str(path))
    after = finetune.state_dict()
    assert all(torch.equal(after[k], pre[k]) for k in after if ".seg_layers." not in k)


def test_swin_configuration_from_plans():
    config = swin_configuration({"patch_size": [80, 160, 150], "batch_size": 2})
    assert config["patch_size"] == [96, 160, 160] and config["batch_size"] == 2
    arch = config["architecture"]
    assert arch["network_class_name"] == SWIN_NETWORK_CLASS and arch["arch_kwargs"]["strides"] == STRIDES
    assert swin_configuration({"patch_size": [24, 40, 40], "batch_size": 2})["patch_size"] == [32, 64, 64]
    with pytest.raises(ValueError, match="single bottleneck token"):
        swin_configuration({"patch_size": [24, 40, 40], "batch_size": 2}, patch_size=[32, 30, 40])
    with pytest.raises(ValueError, match="multiple of 12"):
        swin_configuration({"patch_size": [96, 96, 96], "batch_size": 2}, feature_size=40)

    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    kwargs = {**swin_configuration({"patch_size": [64, 64, 64], "batch_size": 2}, feature_size=12)[
        "architecture"]["arch_kwargs"], "window_size": 4}
    net = get_network_from_plans(SWIN_NETWORK_CLASS, kwargs, [], 1, 3, allow_init=True, deep_supervision=True)
    assert isinstance(net, SwinUNETR) and net.decoder.deep_supervision


def _configuration_manager(class_name=SWIN_NETWORK_CLASS, patch=(32, 64, 96), **kwargs):
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    arch_kwargs = {**swin_configuration({"patch_size": list(patch), "batch_size": 2}, feature_size=12)[
        "architecture"]["arch_kwargs"], "window_size": 4, **kwargs}
    return ConfigurationManager({"patch_size": list(patch), "batch_size": 2, "architecture": {
        "network_class_name": class_name, "arch_kwargs": arch_kwargs, "_kw_requires_import": []}})


def test_swin_pretrainer_network_uses_monai_dropout_and_keeps_keys():
    from nnunet_mim.trainers.swin import HybridMIMPretrainerSwin

    model = HybridMIMPretrainerSwin.build_network_architecture(None, _configuration_manager(), 1, 4)
    assert model._dropout_hooks == []  # views come from MONAI's drop_rate, not from hooks
    vit = model.encoder.swinViT
    assert vit.pos_drop.p == 0.1 and vit.layers1[0].blocks[0].attn.proj_drop.p == 0.1  # official drop_rate
    plain = small_swin(num_classes=1)
    assert set(model.state_dict()) - set(plain.state_dict()) == {k for k in model.state_dict()
                                                                 if k.startswith("mim_heads.")}


def test_swin_trainers_refuse_other_configurations():
    from nnunet_mim.trainers.swin import require_swin_configuration

    unet = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    with pytest.raises(RuntimeError, match="add-config swin"):
        require_swin_configuration(_configuration_manager(unet), "3d_fullres", "nnUNetTrainerSwinUNETR")
    with pytest.raises(ValueError, match="multiple of 32"):
        require_swin_configuration(_configuration_manager(patch=(40, 64, 96)), "3d_swin", "nnUNetTrainerSwinUNETR")
    require_swin_configuration(_configuration_manager(), "3d_swin", "nnUNetTrainerSwinUNETR")


def test_no_deep_supervision_variant_freezes_unused_heads():
    from nnunet_mim.trainers.swin import nnUNetTrainerSwinUNETR_noDS

    net = nnUNetTrainerSwinUNETR_noDS.build_network_architecture(None, _configuration_manager(), 1, 3, False)
    heads = list(net.decoder.seg_layers)
    assert not any(p.requires_grad for h in heads[:-1] for p in h.parameters())  # DDP: no unused trainable params
    assert all(p.requires_grad for p in heads[-1].parameters())


def test_legacy_patch_merging_is_monai_1_4_merging():
    merge = LegacyPatchMerging(dim=1)
    merge.norm, merge.reduction = nn.Identity(), nn.Identity()
    x = torch.arange(8.0).view(1, 2, 2, 2, 1)  # value = 4 d + 2 h + w of each sub-voxel
    order = merge(x).flatten().tolist()
    assert order == [0, 4, 2, 1, 5, 2, 1, 7]  # 010 and 001 twice, 110 (6) and 011 (3) never
    net = small_swin(downsample="merging_legacy")
    assert isinstance(net.encoder.swinViT.layers1[0].downsample, LegacyPatchMerging)
    # the installed MONAI's "merging" (>= 1.5) uses every sub-voxel: that is why third-party weights need legacy
    from monai.networks.nets.swin_unetr import PatchMerging

    current = PatchMerging(dim=1)
    current.norm, current.reduction = nn.Identity(), nn.Identity()
    assert sorted(current(x).flatten().tolist()) == list(range(8))


def test_third_party_weights_load_from_local_files(tmp_path):
    torch.manual_seed(2)
    source = build_monai_swin_unetr(1, 14, "merging_legacy", feature_size=12, window_size=4)
    full = {f"module.{k}": v for k, v in source.state_dict().items()}
    full["module.contrast_learning_head.weight"] = torch.zeros(384, 192)  # a HybridMIM pretext head
    torch.save(full, tmp_path / "hybridmim.pt")
    net = small_swin(downsample="merging_legacy")
    report = load_third_party_swin_weights(net, str(tmp_path / "hybridmim.pt"), verbose=False)
    assert not report.fresh and report.dropped == ["contrast_learning_head.weight"]
    state = net.state_dict()
    assert torch.equal(state["decoder.encoder1.layer.conv1.conv.weight"], source.encoder1.layer.conv1.conv.weight)

    # NVIDIA Swin-UNETR SSL layout: encoder only, no `swinViT.` prefix, MLP as fc1/fc2
    vit = {f"module.{k[len('swinViT.'):]}".replace(".mlp.linear", ".mlp.fc"): v
           for k, v in source.state_dict().items() if k.startswith("swinViT.")}
    torch.save({"state_dict": vit, "epoch": 100}, tmp_path / "model_swinvit.pt")
    fresh_net = small_swin(downsample="merging_legacy")
    report = load_third_party_swin_weights(fresh_net, str(tmp_path / "model_swinvit.pt"), verbose=False)
    assert all(k.startswith("encoder.") for k in report.loaded) and len(report.loaded) == len(vit)
    assert report.fresh and all(k.startswith("decoder.") for k in report.fresh)
    w = "encoder.swinViT.layers2.0.blocks.1.mlp.linear1.weight"
    assert torch.equal(fresh_net.state_dict()[w], source.state_dict()[w[len("encoder."):]])

    with pytest.warns(UserWarning, match="merging_legacy"):
        load_third_party_swin_weights(small_swin(), str(tmp_path / "model_swinvit.pt"), verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="another shape.*--feature-size 48"):
            load_third_party_swin_weights(small_swin(feature_size=24), str(tmp_path / "model_swinvit.pt"),
                                          verbose=False)
