"""The downstream probe: frozen parameters stay frozen; the command runs both arms through nnU-Net."""
from __future__ import annotations

import json

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from helpers import TINY_CONFIG, TINY_ID, TRAIN_BUDGET, fold_folder
from nnunet_mim.nnunet.weights import freeze_all_but
from nnunet_mim.trainers.probe import probe_trainer_for


def _unet():
    return PlainConvUNet(1, 3, (4, 8, 16), torch.nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 3, (1, 1),
                         conv_bias=True, norm_op=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU,
                         deep_supervision=False)


@pytest.mark.parametrize("part", ["heads", "decoder"])
def test_frozen_parameters_do_not_move_under_adamw_with_weight_decay(part):
    torch.manual_seed(0)
    net = _unet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trained, total = freeze_all_but(net, part)
    assert 0 < trained < total
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(2, 1, 8, 16, 16)).square().mean().backward()
        opt.step()
    after = net.state_dict()
    trainable = {k for k in before if (".seg_layers." in k if part == "heads" else k.startswith("decoder."))}
    assert all(torch.equal(before[k], after[k]) for k in before if k not in trainable)
    assert any(not torch.equal(before[k], after[k]) for k in trainable)


def test_probe_trainer_per_network_family():
    assert probe_trainer_for("dynamic_network_architectures.architectures.unet.PlainConvUNet") == "nnUNetTrainerProbe"
    assert probe_trainer_for("nnunet_mim.architectures.swin_unetr.SwinUNETR", "decoder") == \
        "nnUNetTrainerSwinUNETRProbeDecoder"
    assert probe_trainer_for("nnunet_mim.architectures.sac_vit.SACViTSeg") == "nnUNetTrainerSACViTProbe"


def test_probe_command_end_to_end(tiny_workspace, tmp_path):
    ws = tiny_workspace
    ws.run("nnUNetv2_train", str(TINY_ID), TINY_CONFIG, "all", "-tr", "HybridMIMPretrainer", "-device", "cpu",
           **TRAIN_BUDGET)
    checkpoint = fold_folder(ws, "HybridMIMPretrainer", TINY_CONFIG) / "checkpoint_final.pth"
    out = tmp_path / "probe"
    proc = ws.run("nnunet_mim", "probe", str(checkpoint), "-d", str(TINY_ID), "-c", TINY_CONFIG, "--cases", "2",
                  "--epochs", "1", "--iters", "2", "--processes", "1", "-o", str(out))
    result = json.loads((out / "probe.json").read_text())
    assert result["trainer"] == "nnUNetTrainerProbe" and len(result["train_cases"]) == 2
    assert 0 <= result["pretrained"]["dice"] <= 1 and 0 <= result["random"]["dice"] <= 1
    assert result["difference"] == pytest.approx(result["pretrained"]["dice"] - result["random"]["dice"])
    assert "difference" in proc.stdout
    # through nnU-Net's real training loop, the frozen body still holds the pretrained weights
    pre = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    final = next((out / "pretrained").rglob("checkpoint_final.pth"))
    probed = torch.load(final, map_location="cpu", weights_only=False)["network_weights"]
    body = [k for k in probed if ".seg_layers." not in k]
    assert body and all(torch.equal(probed[k], pre[k]) for k in body)
    assert any(not torch.equal(probed[k], pre[k]) for k in probed if ".seg_layers." in k and k in pre)
