"""SAC-ViT in nnU-Net: the derived configuration, the ViT optimiser groups, and supervised train / --c / predict
through the real console scripts on tiny CPU data."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from helpers import TINY_VIT, TINY_DATASET as DATASET, TINY_ID, TINY_SAC_ARCH, TINY_SAC_CONFIG, TRAIN_BUDGET, fold_folder
from nnunet_mim.architectures.sac_vit import SACViTSeg
from nnunet_mim.nnunet.sac_vit_plans import round_patch_to_tokens, sac_vit_configuration
from nnunet_mim.core.schedules import FunctionalLRSchedule
from nnunet_mim.trainers.sac_vit import sac_vit_param_groups, vit_layer_id

SAC_CONFIG = TINY_SAC_CONFIG


def test_round_patch_to_tokens():
    assert round_patch_to_tokens([24, 40, 40], 0) == [32, 48, 48]  # nearest multiple of 16, ties up
    assert round_patch_to_tokens([128, 128, 128], 0) == [128, 128, 128]
    assert round_patch_to_tokens([10, 40, 32], 2) == [12, 48, 32]  # depth token 4 at DA 2
    assert round_patch_to_tokens([23, 100, 90], 2) == [24, 96, 96]
    assert round_patch_to_tokens([1, 20, 20], 4) == [1, 16, 32]  # at least 2 tokens; depth token 1 at DA 4
    assert round_patch_to_tokens([8, 8, 8], 0) == [16, 16, 32]


@pytest.mark.parametrize("spacing, patch, da, expected", [
    ((3.9, 2.7, 2.7), (24, 40, 40), 0, [32, 48, 48]),
    ((3.0, 0.75, 0.75), (40, 190, 170), 2, [40, 192, 176]),
])
def test_configuration_from_parent(spacing, patch, da, expected):
    parent = {"spacing": list(spacing), "patch_size": list(patch), "batch_size": 2}
    cfg = sac_vit_configuration(parent, "S", **TINY_VIT)
    assert cfg["patch_size"] == expected and cfg["batch_size"] == 2
    arch = cfg["architecture"]
    assert arch["network_class_name"] == "nnunet_mim.architectures.sac_vit.SACViTSeg"
    assert arch["_kw_requires_import"] == [] and json.loads(json.dumps(arch)) == arch  # plans-file safe
    net = SACViTSeg(1, 3, **arch["arch_kwargs"], deep_supervision=True)
    assert net.da == da and net.pool_op_kernel_sizes == arch["arch_kwargs"]["strides"]
    outs = net(torch.randn(1, 1, *expected))
    assert outs[0].shape[2:] == tuple(expected)
    with pytest.raises(ValueError, match="size"):
        sac_vit_configuration(parent, "XL")


def test_layer_decay_groups():
    net = SACViTSeg(1, 2, (32, 32, 32), da=0, **TINY_VIT)
    depth = 4
    assert vit_layer_id("encoder.patch_embed.proj.weight", depth) == 0
    assert vit_layer_id("encoder.pos_embed", depth) == 0
    assert vit_layer_id("encoder.blocks.2.attn.q_proj.weight", depth) == 3
    assert vit_layer_id("encoder.norm.weight", depth) == depth + 1
    assert vit_layer_id("decoder.stages.0.up.weight", depth) == depth + 1
    groups = sac_vit_param_groups(net, weight_decay=0.05, layer_decay=0.5)
    assert groups[0]["lr_scale"] == 1.0  # nnU-Net logs group 0's lr
    by_name = {n: g for g in groups for n in g["names"]}
    assert len(by_name) == sum(1 for _ in net.parameters())
    assert by_name["encoder.blocks.3.mlp.fc2.weight"]["lr_scale"] == 0.5
    assert by_name["encoder.blocks.0.mlp.fc2.weight"]["lr_scale"] == 0.5 ** 4
    assert by_name["encoder.patch_embed.proj.weight"]["lr_scale"] == 0.5 ** 5
    assert by_name["decoder.seg_layers.4.weight"]["lr_scale"] == 1.0
    for name in ("encoder.pos_embed", "encoder.cls_token", "encoder.blocks.0.norm1.weight",
                 "encoder.blocks.0.attn.q_proj.bias"):
        assert by_name[name]["weight_decay"] == 0.0
    assert by_name["encoder.blocks.0.attn.q_proj.weight"]["weight_decay"] == 0.05
    opt = torch.optim.AdamW(groups, lr=1.0)
    FunctionalLRSchedule(opt, lambda step: 1e-3)
    assert {g["lr"] for g in opt.param_groups} == {1e-3 * 0.5 ** k for k in range(6)}
    net.decoder.requires_grad_(False)  # frozen parameters are left out
    assert not any(n.startswith("decoder.") for g in sac_vit_param_groups(net, 0.05) for n in g["names"])


# ------------------------------------------------------------------------------------------- console scripts
@pytest.fixture(scope="module")
def sac_config(sac_vit_workspace):
    return SAC_CONFIG


def test_add_config_rounds_the_plan_patch(tiny_workspace):
    ws = tiny_workspace
    out = ws.run("nnunet_mim", "add-config", "sac-vit", "-d", str(TINY_ID), "-n", "3d_sac_vit_rounded",
                 *TINY_SAC_ARCH).stdout
    assert "patch [32, 48, 48] (requested [24, 40, 40])" in out
    plans = json.loads((ws.preprocessed / DATASET / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"]["3d_sac_vit_rounded"]
    assert cfg["inherits_from"] == "3d_fullres" and cfg["patch_size"] == [32, 48, 48]
    assert cfg["architecture"]["arch_kwargs"]["strides"][1] == [2, 2, 2]  # DA 0


def test_supervised_train_resume_predict(tiny_workspace, sac_config):
    ws = tiny_workspace
    trainer = "nnUNetTrainerSACViT"
    ws.run("nnUNetv2_train", str(TINY_ID), sac_config, "0", "-tr", trainer, "-device", "cpu", **TRAIN_BUDGET)
    fold = fold_folder(ws, trainer, SAC_CONFIG, 0)
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "SAC-ViT: embed 48, depth 4" in log and "layer decay 1.0" in log
    assert "Mean Validation Dice" in log  # nnU-Net's sliding-window validation ran on the SAC-ViT
    ck = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["current_epoch"] == 2
    wd = {g["weight_decay"] for g in ck["optimizer_state"]["param_groups"]}
    assert wd == {0.0, 0.05}

    resumed = ws.run("nnUNetv2_train", str(TINY_ID), sac_config, "0", "-tr", trainer, "-device", "cpu", "--c",
                     **{**TRAIN_BUDGET, "nnUNet_mim_epochs": "3"})
    assert "Epoch 2" in resumed.stdout and "Epoch 0\n" not in resumed.stdout
    ck = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["current_epoch"] == 3

    out = ws.root / "pred_sac_vit"
    ws.run("nnUNetv2_predict", "-i", str(ws.raw / DATASET / "imagesTs"), "-o", str(out), "-d", str(TINY_ID),
           "-c", sac_config, "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1",
           "--disable_tta")
    predicted = sorted(out.glob("*.nii.gz"))
    assert len(predicted) == 2
    ref = sitk.ReadImage(str(ws.raw / DATASET / "labelsTs" / predicted[0].name))
    pred = sitk.ReadImage(str(predicted[0]))
    assert pred.GetSize() == ref.GetSize() and np.allclose(pred.GetSpacing(), ref.GetSpacing())


def test_finetune_layer_decay_defaults():
    """No layer-wise lr decay by default (PUMIT's paper and BTCV configuration use none); 0.75 is a variant."""
    from nnunet_mim.trainers.sac_vit import (
        nnUNetTrainerSACViTFinetune,
        nnUNetTrainerSACViTFinetune_layerDecay075,
        nnUNetTrainerSACViTFinetune_noLLRD,
    )

    assert nnUNetTrainerSACViTFinetune.layer_decay == 1.0
    assert nnUNetTrainerSACViTFinetune_noLLRD.layer_decay == 1.0
    assert nnUNetTrainerSACViTFinetune_layerDecay075.layer_decay == 0.75


def test_finetune_layer_decay_and_wrong_configuration(tiny_workspace, sac_config):
    ws = tiny_workspace
    source = fold_folder(ws, "nnUNetTrainerSACViT", SAC_CONFIG, 0) / "checkpoint_final.pth"
    if not source.is_file():
        pytest.skip("needs test_supervised_train_resume_predict")
    trainer = "nnUNetTrainerSACViTFinetune_layerDecay075"
    proc = ws.run("nnUNetv2_train", str(TINY_ID), sac_config, "1", "-tr", trainer, "-device", "cpu",
                  "-pretrained_weights", str(source), **{**TRAIN_BUDGET, "nnUNet_mim_epochs": "1"})
    assert "0 missing, 0 with another shape" in proc.stdout
    log = next(fold_folder(ws, trainer, SAC_CONFIG, 1).glob("training_log_*.txt")).read_text()
    assert "layer decay 0.75" in log and "{'encoder': 82, 'decoder': 82} tensors transferred" in log
    ck = torch.load(fold_folder(ws, trainer, SAC_CONFIG, 1) / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    scales = sorted({round(g["lr_scale"], 6) for g in ck["optimizer_state"]["param_groups"]})
    assert scales == sorted(round(0.75 ** k, 6) for k in range(6))

    bad = ws.run("nnUNetv2_train", str(TINY_ID), "3d_fullres", "0", "-tr", "nnUNetTrainerSACViT", "-device", "cpu",
                 check=False, **TRAIN_BUDGET)
    assert bad.returncode != 0 and "nnunet_mim add-config sac-vit -d" in bad.stderr


def test_optional_eva02_initialisation(tmp_path, monkeypatch):
    """$nnUNet_mim_eva02_weights: unset -> nothing; a local file -> inflated into the encoder (logged); missing -> error."""
    from test_sac_vit import _tiny_eva

    from nnunet_mim.trainers.sac_vit import EVA02_WEIGHTS_ENV, maybe_load_eva02

    class _Log:
        lines: list = []

        def print_to_log_file(self, *args):
            self.lines.append(" ".join(str(a) for a in args))

    net = SACViTSeg(1, 2, (32, 32, 32), da=0, **{**TINY_VIT, "depth": 2, "out_indices": [0, 0, 1, 1]})
    before = {k: v.clone() for k, v in net.state_dict().items()}
    log = _Log()
    monkeypatch.delenv(EVA02_WEIGHTS_ENV, raising=False)
    maybe_load_eva02(log, net)
    assert not log.lines and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    torch.save(_tiny_eva().state_dict(), tmp_path / "eva.pt")
    monkeypatch.setenv(EVA02_WEIGHTS_ENV, str(tmp_path / "eva.pt"))
    maybe_load_eva02(log, net)
    assert "EVA-02 2D weights" in log.lines[-1]
    assert not torch.equal(net.state_dict()["encoder.blocks.0.attn.q_proj.weight"],
                           before["encoder.blocks.0.attn.q_proj.weight"])
    assert torch.equal(net.state_dict()["decoder.seg_layers.4.weight"], before["decoder.seg_layers.4.weight"])
    monkeypatch.setenv(EVA02_WEIGHTS_ENV, str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        maybe_load_eva02(log, net)


def test_patch_and_spacing_written_twice_must_agree():
    from types import SimpleNamespace

    from nnunet_mim.nnunet.sac_vit_plans import check_patch_and_spacing_agree

    def cm(patch, spacing):
        return SimpleNamespace(patch_size=patch, spacing=spacing,
                               network_arch_init_kwargs={"patch_size": [32, 64, 64], "spacing": [2.0, 1.0, 1.0]})

    check_patch_and_spacing_agree(cm([32, 64, 64], [2.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"patch_size of configuration '3d_sac_vit' is \[32, 64, 96\].*--overwrite"):
        check_patch_and_spacing_agree(cm([32, 64, 96], [2.0, 1.0, 1.0]), "3d_sac_vit")
    with pytest.raises(ValueError, match="spacing"):
        check_patch_and_spacing_agree(cm([32, 64, 64], [3.0, 1.0, 1.0]))


def test_the_one_patch_rounding_rule():
    from nnunet_mim.nnunet.plans import round_patch

    assert round_patch([40, 47, 48], 16) == [48, 48, 48]  # nearest, halves up
    assert round_patch([5, 100, 90], [4, 32, 32]) == [4, 96, 96]  # one multiple per axis
    assert round_patch([1, 8, 15], 16) == [16, 16, 16]  # at least one multiple
    assert round_patch([33, 64, 65], 32, up=True) == [64, 64, 96]  # smallest patch >= the request
    for patch in ([37, 91, 160], [8, 8, 8]):
        for up in (False, True):
            out = round_patch(patch, [4, 8, 16], up=up)
            assert all(o % m == 0 for o, m in zip(out, [4, 8, 16]))
            assert not up or all(o >= p for o, p in zip(out, patch))
