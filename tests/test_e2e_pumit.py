"""PUMIT end to end through the real console scripts on tiny CPU data: SAC-ViT configuration -> stage 1 visual
tokenizer (with --c: discriminator and both optimiser states restored) -> stage 2 token MIM (finds the tokenizer by
convention) -> finetune with -pretrained_weights -> predict."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import TINY_DATASET as DATASET, TINY_ID, TINY_SAC_CONFIG, TRAIN_BUDGET, fold_folder

CONFIG = TINY_SAC_CONFIG


@pytest.fixture(scope="module")
def ws(sac_vit_workspace):
    return sac_vit_workspace


@pytest.fixture(scope="module")
def tokenizer(ws):
    """Stage 1, 1 epoch, then resumed with --c to 2 epochs."""
    trainer = "VisualTokenizerTrainer"
    first = {**TRAIN_BUDGET, "nnUNet_mim_epochs": "1"}
    ws.run("nnUNetv2_train", str(TINY_ID), CONFIG, "all", "-tr", trainer, "-device", "cpu", **first)
    resumed = ws.run("nnUNetv2_train", str(TINY_ID), CONFIG, "all", "-tr", trainer, "-device", "cpu", "--c",
                     **TRAIN_BUDGET)
    assert "Epoch 1" in resumed.stdout and "Epoch 0\n" not in resumed.stdout
    return fold_folder(ws, trainer, CONFIG) / "checkpoint_final.pth"


def test_stage2_without_tokenizer_names_the_command(ws):
    if (fold_folder(ws, "VisualTokenizerTrainer", CONFIG) / "checkpoint_final.pth").is_file():
        pytest.skip("stage 1 already ran in this session")
    env = {**TRAIN_BUDGET, "nnUNet_mim_tokenizer": ""}
    proc = ws.run("nnUNetv2_train", str(TINY_ID), CONFIG, "all", "-tr", "TokenMIMPretrainer", "-device", "cpu",
                  check=False, **env)
    assert proc.returncode != 0
    assert f"nnUNetv2_train {DATASET} {CONFIG} all -tr VisualTokenizerTrainer" in proc.stderr


def test_stage1_outputs_and_resume(ws, tokenizer):
    fold = tokenizer.parent
    for name in ("progress.png", "codebook_usage.png", "previews/epoch_0000.png", "previews/epoch_0001.png"):
        assert (fold / name).is_file(), name
    log = "\n".join(p.read_text() for p in sorted(fold.glob("training_log_*.txt")))
    assert "perceptual loss OFF" in log and "codebook 1024 x 512 (soft tokens)" in log
    assert "codes used as argmax" in log and "mean token entropy" in log
    ck = torch.load(tokenizer, map_location="cpu", weights_only=False)
    assert ck["current_epoch"] == 2
    weights = ck["network_weights"]
    assert any(k.startswith("mim_discriminator.") for k in weights) and math.isfinite(weights["mim_gan_ema"].item())
    opt = ck["optimizer_state"]
    players = {g["player"] for g in opt["param_groups"]}
    assert players == {"tokenizer", "discriminator"}
    d_scale = {g["lr_scale"] for g in opt["param_groups"] if g["player"] == "discriminator"}
    assert d_scale == {10.0}
    n_params = sum(len(g["params"]) for g in opt["param_groups"])
    assert len(opt["state"]) == n_params  # moments of both players
    assert {int(s["step"]) for s in opt["state"].values()} == {4}  # 2 epochs x 2 steps: --c restored the states
    logged = ck["logging"]
    for name in ("l1", "prior_kl", "token_entropy", "gan_g", "disc", "gan_on"):
        assert len(logged[f"train_{name}"]) == 2 and np.isfinite(logged[f"train_{name}"]).all(), name
    assert np.isnan(logged["train_perceptual"]).all()  # off, reported as off, not faked


def test_stage2_finetune_predict(ws, tokenizer):
    trainer = "TokenMIMPretrainer"
    env = {**TRAIN_BUDGET, "nnUNet_mim_tokenizer": ""}
    ws.run("nnUNetv2_train", str(TINY_ID), CONFIG, "all", "-tr", trainer, "-device", "cpu",
           **{**env, "nnUNet_mim_epochs": "1"})
    resumed = ws.run("nnUNetv2_train", str(TINY_ID), CONFIG, "all", "-tr", trainer, "-device", "cpu", "--c", **env)
    assert "Epoch 1" in resumed.stdout and "Epoch 0\n" not in resumed.stdout
    fold = fold_folder(ws, trainer, CONFIG)
    log = "\n".join(p.read_text() for p in sorted(fold.glob("training_log_*.txt")))
    assert f"tokenizer {tokenizer}" in log and "mask ratio 0.55 (4 of 8 tokens)" in log
    assert "tokenizer (eval, no grad):" in log and "(= the tokenizer's)" in log
    assert (fold / "previews" / "epoch_0001.png").is_file() and (fold / "progress.png").is_file()
    ck = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    keys = ck["network_weights"]
    assert not any(k.startswith("tokenizer.") for k in keys)  # the frozen tokenizer is not part of the model
    assert keys["mim_head.2.weight"].shape[0] == 1024
    assert ck["current_epoch"] == 2 and np.isfinite(ck["logging"]["train_token_ce"]).all()
    assert {int(v["step"]) for v in ck["optimizer_state"]["state"].values()} == {4}  # --c restored AdamW

    finetune = "nnUNetTrainerSACViTFinetune"
    proc = ws.run("nnUNetv2_train", str(TINY_ID), CONFIG, "0", "-tr", finetune, "-device", "cpu",
                  "-pretrained_weights", str(fold / "checkpoint_final.pth"),
                  **{**TRAIN_BUDGET, "nnUNet_mim_epochs": "1"})
    assert "0 missing, 0 with another shape" in proc.stdout and "5 pretraining-only" in proc.stdout
    out = ws.root / "pred_pumit"
    ws.run("nnUNetv2_predict", "-i", str(ws.raw / DATASET / "imagesTs"), "-o", str(out), "-d", str(TINY_ID),
           "-c", CONFIG, "-f", "0", "-tr", finetune, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta")
    assert len(list(out.glob("*.nii.gz"))) == 2
