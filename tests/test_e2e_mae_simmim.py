"""MAE / SimMIM / SimCLR end to end through the real console scripts on tiny CPU data: pretrain (previews, loss
curves), --c resume, finetune into the supervised SAC-ViT configuration with -pretrained_weights, predict."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import TINY_DATASET as DATASET, TINY_ID, TINY_SAC_CONFIG, TRAIN_BUDGET, fold_folder

CONFIG = TINY_SAC_CONFIG


@pytest.fixture(scope="module")
def ws(sac_vit_workspace):
    return sac_vit_workspace


def _fits_supervised_config(ws, checkpoint) -> None:
    out = ws.run("nnunet_mim", "check-weights", str(checkpoint), "-d", str(TINY_ID), "-c", CONFIG, "-tr",
                 "nnUNetTrainerSACViT").stdout
    assert "OK: the checkpoint fits." in out and "0 missing, 0 with another shape" in out


def test_mae_pretrain_finetune_predict(ws):
    trainer = "MAEPretrainer"
    ws.run("nnUNetv2_train", str(TINY_ID), CONFIG, "all", "-tr", trainer, "-device", "cpu", **TRAIN_BUDGET)
    fold = fold_folder(ws, trainer, CONFIG)
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "6 of 8 masked (ratio 0.75)" in log and "the encoder sees the visible tokens only" in log
    assert "decoder 2 x 384" in log
    assert sorted(p.name for p in (fold / "previews").iterdir()) == ["epoch_0000.png", "epoch_0001.png"]
    assert (fold / "progress.png").is_file()
    ck = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert any(k.startswith("mim_decoder.blocks.1.") for k in ck["network_weights"])
    assert np.isfinite(ck["logging"]["train_reconstruction"]).all()

    finetune = "nnUNetTrainerSACViTFinetune"
    proc = ws.run("nnUNetv2_train", str(TINY_ID), CONFIG, "2", "-tr", finetune, "-device", "cpu",
                  "-pretrained_weights", str(fold / "checkpoint_final.pth"),
                  **{**TRAIN_BUDGET, "nnUNet_mim_epochs": "1"})
    assert "0 missing, 0 with another shape" in proc.stdout
    out = ws.root / "pred_mae"
    ws.run("nnUNetv2_predict", "-i", str(ws.raw / DATASET / "imagesTs"), "-o", str(out), "-d", str(TINY_ID),
           "-c", CONFIG, "-f", "2", "-tr", finetune, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta")
    assert len(list(out.glob("*.nii.gz"))) == 2


def test_simmim_resume_and_transfer(ws):
    trainer = "SimMIMPretrainer"
    ws.run("nnUNetv2_train", str(TINY_ID), CONFIG, "all", "-tr", trainer, "-device", "cpu",
           **{**TRAIN_BUDGET, "nnUNet_mim_epochs": "1"})
    resumed = ws.run("nnUNetv2_train", str(TINY_ID), CONFIG, "all", "-tr", trainer, "-device", "cpu", "--c",
                     **TRAIN_BUDGET)
    assert "Epoch 1" in resumed.stdout and "Epoch 0\n" not in resumed.stdout
    fold = fold_folder(ws, trainer, CONFIG)
    ck = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["current_epoch"] == 2 and len(ck["logging"]["train_reconstruction"]) == 2
    steps = {int(s["step"]) for s in ck["optimizer_state"]["state"].values()}
    assert steps == {4}  # AdamW moments restored by --c (the frozen U-Net decoder has none)
    assert "mim_mask_token" in ck["network_weights"] and "mim_head.weight" in ck["network_weights"]
    log = "\n".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "mask tokens in the encoder, linear head to voxels" in log
    _fits_supervised_config(ws, fold / "checkpoint_final.pth")


def test_simclr_pretrain_and_transfer(ws):
    trainer = "SimCLRPretrainer"
    ws.run("nnUNetv2_train", str(TINY_ID), CONFIG, "all", "-tr", trainer, "-device", "cpu",
           **{**TRAIN_BUDGET, "nnUNet_mim_epochs": "1"})
    fold = fold_folder(ws, trainer, CONFIG)
    ck = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert np.isfinite(ck["logging"]["train_nt_xent"]).all() and (fold / "previews" / "epoch_0000.png").is_file()
    _fits_supervised_config(ws, fold / "checkpoint_final.pth")
