"""SwinUNETR end to end through the real console scripts, on tiny real data, on the CPU:
add-config swin -> HybridMIM pretraining on Swin (+ --c) -> finetune with -pretrained_weights -> predict;
clear errors for an unusable patch and for a checkpoint of another architecture.

Tiny Swin: feature_size 12, window 4, patch 32 x 32 x 96 (three bottleneck tokens, so that the partial
reconstruction box spans two), one epoch of two iterations per run.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from helpers import TINY_CONFIG, TINY_DATASET, TINY_ID, TRAIN_BUDGET, fold_folder

SWIN = "3d_swin_tiny"
ONE_EPOCH = {**TRAIN_BUDGET, "nnUNet_mim_epochs": "1"}


@pytest.fixture(scope="module")
def swin_config(tiny_workspace):
    proc = tiny_workspace.run("nnunet_mim", "add-config", "swin", "-d", str(TINY_ID), "-n", SWIN, "--feature-size",
                              "12", "--window-size", "4", "--patch", "30", "30", "90")
    assert "rounded to [32, 32, 96]" in proc.stdout
    return SWIN


@pytest.fixture(scope="module")
def pretrained(tiny_workspace, swin_config):
    """One epoch, then ``--c`` to a second one (resuming costs no segmentation validation here)."""
    ws = tiny_workspace
    trainer = "HybridMIMPretrainerSwin"
    proc = ws.run("nnUNetv2_train", str(TINY_ID), swin_config, "all", "-tr", trainer, "-device", "cpu", **ONE_EPOCH)
    resumed = ws.run("nnUNetv2_train", str(TINY_ID), swin_config, "all", "-tr", trainer, "-device", "cpu", "--c",
                     **TRAIN_BUDGET)
    return proc, resumed, fold_folder(ws, trainer, SWIN, "all") / "checkpoint_final.pth"


def test_config_inherits_3d_fullres(tiny_workspace, swin_config):
    plans = json.loads((tiny_workspace.preprocessed / TINY_DATASET / "nnUNetPlans.json").read_text())
    config = plans["configurations"][swin_config]
    assert config["inherits_from"] == "3d_fullres" and config["patch_size"] == [32, 32, 96]
    assert config["architecture"]["network_class_name"] == "nnunet_mim.architectures.swin_unetr.SwinUNETR"


def test_hybridmim_pretraining_on_swin_and_resume(pretrained):
    proc, resumed, checkpoint = pretrained
    assert "HybridMIM on SwinUNETR" in proc.stdout
    assert "(1, 1, 3) sub-volumes of (32, 32, 32) voxels split into 2x2x2 patches of (16, 16, 16)" in proc.stdout
    assert "(partial, 67% of the patch)" in proc.stdout and "MONAI dropout (drop_rate=0.1)" in proc.stdout
    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert ck["trainer_name"] == "HybridMIMPretrainerSwin"
    assert any(k.startswith("mim_heads.") for k in ck["network_weights"])
    assert any(k.startswith("encoder.swinViT.") for k in ck["network_weights"])
    for name in ("reconstruction", "count", "location", "consistency", "contrastive"):
        assert len(ck["logging"][f"train_{name}"]) == 2 and np.isfinite(ck["logging"][f"train_{name}"]).all()
    assert "Epoch 1" in resumed.stdout and "Epoch 0\n" not in resumed.stdout and ck["current_epoch"] == 2
    group = ck["optimizer_state"]["param_groups"][0]
    assert "amsgrad" in group and group["weight_decay"] == 1e-5  # AdamW, HybridMIM paper's Swin recipe


def test_finetune_predict(tiny_workspace, pretrained):
    ws = tiny_workspace
    checkpoint = pretrained[-1]
    trainer = "nnUNetTrainerSwinUNETR"
    proc = ws.run("nnUNetv2_train", str(TINY_ID), SWIN, "0", "-tr", trainer, "-pretrained_weights", str(checkpoint),
                  "-device", "cpu", **ONE_EPOCH)
    assert "Pre-flight check" in proc.stdout and "0 missing, 0 with another shape" in proc.stdout
    fold = fold_folder(ws, trainer, SWIN, 0)
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    group = final["optimizer_state"]["param_groups"][0]
    assert "amsgrad" in group and group["weight_decay"] == 1e-5  # AdamW, not nnU-Net's SGD
    assert (fold / "validation" / "summary.json").is_file()  # nnU-Net's own final validation ran

    out = ws.root / "predictions_swin"
    ws.run("nnUNetv2_predict", "-i", str(ws.raw / TINY_DATASET / "imagesTs"), "-o", str(out), "-d", str(TINY_ID), "-c",
           SWIN, "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta")
    predicted = sorted(out.glob("*.nii.gz"))
    assert len(predicted) == 2
    ref = sitk.ReadImage(str(ws.raw / TINY_DATASET / "labelsTs" / predicted[0].name))
    assert sitk.ReadImage(str(predicted[0])).GetSize() == ref.GetSize()


def test_clear_errors(tiny_workspace, pretrained):
    ws = tiny_workspace
    checkpoint = pretrained[-1]
    # a patch Swin cannot take (plans edited by hand); a U-Net configuration: tests/test_swin.py
    plans_file = ws.preprocessed / TINY_DATASET / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_swin_badpatch"] = {**plans["configurations"][SWIN], "patch_size": [40, 32, 96]}
    plans_file.write_text(json.dumps(plans, indent=2))
    run = ws.run("nnUNetv2_train", str(TINY_ID), "3d_swin_badpatch", "0", "-tr", "nnUNetTrainerSwinUNETR", "-device",
                 "cpu", check=False, **ONE_EPOCH)
    assert run.returncode != 0 and "multiple of 32" in run.stderr and "[32, 32, 96] or [64, 32, 96]" in run.stderr
    # add-config refuses a patch with a single bottleneck token
    run = ws.run("nnunet_mim", "add-config", "swin", "-d", str(TINY_ID), "-n", "3d_swin_x", "--patch", "32", "32",
                 "32", check=False)
    assert run.returncode != 0 and "single bottleneck token" in run.stderr
    # third-party weights: an NVIDIA-layout encoder file (module.*, mlp.fc1/fc2) converted for the configuration
    ours = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    nvidia = {"module." + k[len("encoder.swinViT."):].replace(".mlp.linear", ".mlp.fc"): v
              for k, v in ours.items() if k.startswith("encoder.swinViT.")}
    torch.save({"state_dict": nvidia}, ws.root / "model_swinvit.pt")
    converted = ws.root / "swin_converted.pth"
    run = ws.run("nnunet_mim", "convert-swin", str(ws.root / "model_swinvit.pt"), str(converted), "-d", str(TINY_ID),
                 "-c", SWIN)
    assert f"{len(nvidia)} tensors loaded" in run.stdout and "merging_legacy" in run.stdout  # mergingv2 config
    weights = torch.load(converted, map_location="cpu", weights_only=True)["network_weights"]
    assert all(torch.equal(weights[k], v) for k, v in ours.items() if k.startswith("encoder."))
    # a Swin pretraining checkpoint into the U-Net configuration: pre-flight report with the fix
    bad = ws.run("nnunet_mim", "check-weights", str(checkpoint), "-d", str(TINY_ID), "-c", TINY_CONFIG, check=False)
    assert bad.returncode == 1 and "NOT compatible" in bad.stdout and "How to fix" in bad.stdout
