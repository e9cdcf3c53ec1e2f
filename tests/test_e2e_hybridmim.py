"""End to end through the real console scripts, on tiny real data, on the CPU:
plan -> HybridMIM pretraining -> finetune with -pretrained_weights -> predict -> evaluate; --c after a kill;
ResEnc plans; unlabeled import; clear errors on bad input."""
from __future__ import annotations

import json
import math
import os
import signal
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from helpers import TINY_CONFIG, TINY_DATASET, TINY_ID, TRAIN_BUDGET, fold_folder



@pytest.fixture(scope="module")
def pretrained(tiny_workspace):
    ws = tiny_workspace
    ws.run("nnUNetv2_train", str(TINY_ID), TINY_CONFIG, "all", "-tr", "HybridMIMPretrainer", "-device", "cpu",
           **TRAIN_BUDGET)
    return fold_folder(ws, "HybridMIMPretrainer", TINY_CONFIG) / "checkpoint_final.pth"


def test_pretraining_outputs(tiny_workspace, pretrained):
    fold = pretrained.parent
    assert pretrained.is_file() and (fold / "progress.png").is_file()
    assert sorted(p.name for p in (fold / "previews").iterdir()) == ["epoch_0000.png", "epoch_0001.png"]
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "2x2x2 patches" in log and "contrastive on" in log and "no segmentation validation" in log
    ck = torch.load(pretrained, map_location="cpu", weights_only=False)
    assert ck["trainer_name"] == "HybridMIMPretrainer"
    assert any(k.startswith("mim_heads.") for k in ck["network_weights"])
    logged = ck["logging"]
    for name in ("reconstruction", "count", "location", "consistency", "contrastive"):
        assert len(logged[f"train_{name}"]) == 2 and np.isfinite(logged[f"train_{name}"]).all()
    assert np.isnan(logged["val_contrastive"]).all()  # no dropout views in eval mode: not computed
    # on an instance-normalised U-Net the globally averaged bottleneck is nearly the same vector for every image: the
    # contrastive term sits at its chance level ln(2N - 1) and the trainer says so, once
    assert np.allclose(logged["train_contrastive"], math.log(3), rtol=0.01), logged["train_contrastive"]
    assert log.count("WARNING: the contrastive term is at its chance level") == 1


def test_class_identity_through_ext_trainer(tiny_workspace):
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f;"
            "import nnunet_mim.trainers.hybridmim as h;"
            "assert f('HybridMIMPretrainer') is h.HybridMIMPretrainer;"
            "assert f('nnUNetTrainerMIMFinetune').__module__ == 'nnunet_mim.trainers.finetune'; print('same')")
    assert "same" in tiny_workspace.run("python", "-c", code).stdout


def test_stock_nnunet_loader_accepts_the_checkpoint(tiny_workspace, pretrained):
    """nnU-Net's own load_pretrained_weights (what plain `nnUNetTrainer -pretrained_weights` runs)."""
    code = f"""
import torch
from nnunet_mim.nnunet.networks import build_network_for
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
net = build_network_for('{TINY_ID}', '{TINY_CONFIG}')
load_pretrained_weights(net, '{pretrained}')
src = torch.load('{pretrained}', weights_only=False)['network_weights']
same = [torch.equal(v, src[k]) for k, v in net.state_dict().items() if '.seg_layers.' not in k]
assert all(same) and len(same) > 50, len(same)
print('loaded', len(same))
"""
    assert "loaded" in tiny_workspace.run("python", "-c", code).stdout


def test_finetune_predict_evaluate(tiny_workspace, pretrained):
    ws = tiny_workspace
    proc = ws.run("nnUNetv2_train", str(TINY_ID), TINY_CONFIG, "0", "-tr", "nnUNetTrainerMIMFinetune",
                  "-pretrained_weights", str(pretrained), "-device", "cpu", **TRAIN_BUDGET)
    assert "Pre-flight check" in proc.stdout and "0 missing, 0 with another shape" in proc.stdout
    assert (fold_folder(ws, "nnUNetTrainerMIMFinetune", TINY_CONFIG, 0) / "checkpoint_final.pth").is_file()
    out = ws.root / "predictions"
    ws.run("nnUNetv2_predict", "-i", str(ws.raw / TINY_DATASET / "imagesTs"), "-o", str(out), "-d", str(TINY_ID),
           "-c", TINY_CONFIG, "-f", "0", "-tr", "nnUNetTrainerMIMFinetune", "-device", "cpu", "-npp", "1",
           "-nps", "1")
    predicted = sorted(out.glob("*.nii.gz"))
    assert len(predicted) == 2
    ref = sitk.ReadImage(str(ws.raw / TINY_DATASET / "labelsTs" / predicted[0].name))
    pred = sitk.ReadImage(str(predicted[0]))
    assert pred.GetSize() == ref.GetSize() and np.allclose(pred.GetSpacing(), ref.GetSpacing())
    summary = ws.root / "evaluation.json"
    ws.run("nnunet_mim", "evaluate", "-pred", str(out), "-ref", str(ws.raw / TINY_DATASET / "labelsTs"),
           "-o", str(summary))
    assert summary.is_file() and "Dice" in summary.read_text()


def test_resume_after_kill(tiny_workspace):
    """Kill a pretraining after its first periodic checkpoint; `--c` finishes it with optimiser and heads."""
    ws = tiny_workspace
    trainer = "HybridMIMPretrainer_fullRegion"
    budget = {**TRAIN_BUDGET, "nnUNet_mim_epochs": "4", "nnUNet_mim_save_every": "1"}
    fold = fold_folder(ws, trainer, TINY_CONFIG)
    proc = ws.popen("nnUNetv2_train", str(TINY_ID), TINY_CONFIG, "all", "-tr", trainer, "-device", "cpu", **budget)
    deadline = time.time() + 600
    while not (fold / "checkpoint_latest.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)  # let the first torch.save finish
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (fold / "checkpoint_final.pth").exists(), "the run finished before it could be killed"
    interrupted = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert interrupted["current_epoch"] < 4
    resumed = ws.run("nnUNetv2_train", str(TINY_ID), TINY_CONFIG, "all", "-tr", trainer, "-device", "cpu", "--c",
                     **budget)
    assert f"Epoch {interrupted['current_epoch']}" in resumed.stdout and "Epoch 0\n" not in resumed.stdout
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 4 and len(final["logging"]["train_reconstruction"]) == 4
    optimizer = final["optimizer_state"]
    n_params = len(optimizer["param_groups"][0]["params"])
    # AdamW moments for every trained parameter, heads included; the 2 unused deep-supervision seg layers are frozen
    assert len(optimizer["state"]) == n_params - 4
    assert optimizer["state"][n_params - 1]["step"].item() == 4 * 2  # the heads come last; 4 epochs x 2 steps


def test_resenc_plans(tiny_workspace):
    ws = tiny_workspace
    ws.run("nnUNetv2_plan_experiment", "-d", str(TINY_ID), "-pl", "nnUNetPlannerResEncM")
    ws.run("nnUNetv2_preprocess", "-d", str(TINY_ID), "-plans_name", "nnUNetResEncUNetMPlans", "-c", "3d_fullres",
           "-np", "1")
    ws.run("nnunet_mim", "add-config", "small", "-d", str(TINY_ID), "-p", "nnUNetResEncUNetMPlans", "-n",
           TINY_CONFIG, "--stages", "4", "--features", "8", "64", "--patch", "16", "32", "32")
    proc = ws.run("nnUNetv2_train", str(TINY_ID), TINY_CONFIG, "all", "-tr", "HybridMIMPretrainer", "-p",
                  "nnUNetResEncUNetMPlans", "-device", "cpu", **{**TRAIN_BUDGET, "nnUNet_mim_epochs": "1"})
    assert "HybridMIM on ResidualEncoderUNet" in proc.stdout
    ck = fold_folder(ws, "HybridMIMPretrainer", TINY_CONFIG, plans="nnUNetResEncUNetMPlans") / "checkpoint_final.pth"
    ok = ws.run("nnunet_mim", "check-weights", str(ck), "-d", str(TINY_ID), "-c", TINY_CONFIG, "-p",
                "nnUNetResEncUNetMPlans")
    assert "OK: the checkpoint fits." in ok.stdout


def test_unlabeled_import_and_pretraining(tiny_workspace):
    ws = tiny_workspace
    pool = ws.root / "pool"
    ws.run("nnunet_mim", "build-data", "pool", "-o", str(pool), "--num-cases", "3", "--size", "tiny")
    ws.run("nnunet_mim", "import-unlabeled", "-i", str(pool), "-t", str(TINY_ID), "-d", "611", "-c", "3d_fullres")
    folder = ws.preprocessed / "Dataset611_TinyUnlabeled"
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    target = json.loads((ws.preprocessed / TINY_DATASET / "nnUNetPlans.json").read_text())
    assert plans["configurations"] == target["configurations"]  # same spacing, normalisation, networks
    assert plans["foreground_intensity_properties_per_channel"] == \
        target["foreground_intensity_properties_per_channel"]
    assert len(list((folder / "nnUNetPlans_3d_fullres").glob("*.pkl"))) == 3
    ws.run("nnUNetv2_train", "611", TINY_CONFIG, "all", "-tr", "HybridMIMPretrainer", "-device", "cpu",
           **{**TRAIN_BUDGET, "nnUNet_mim_epochs": "1"})
    ck = ws.results / "Dataset611_TinyUnlabeled" / f"HybridMIMPretrainer__nnUNetPlans__{TINY_CONFIG}" / \
        "fold_all" / "checkpoint_final.pth"
    assert "OK" in ws.run("nnunet_mim", "check-weights", str(ck), "-d", str(TINY_ID), "-c", TINY_CONFIG).stdout
    # unlabeled data cannot be finetuned on: every segmentation trainer of the package gives a clear error instead
    # of training on empty labels
    for trainer in ("nnUNetTrainerMIMFinetune", "nnUNetTrainerMIMScratchAdamW", "nnUNetTrainerSwinUNETR",
                    "nnUNetTrainerSACViT", "nnUNetTrainerSACViTFinetune", "nnUNetTrainerProbe"):
        run = ws.run("nnUNetv2_train", "611", TINY_CONFIG, "0", "-tr", trainer, "-device", "cpu", check=False,
                     **TRAIN_BUDGET)
        assert run.returncode != 0 and "has no labels" in run.stderr, trainer


def test_mismatched_checkpoint_gets_a_clear_error(tiny_workspace, pretrained):
    ws = tiny_workspace
    bad = ws.run("nnunet_mim", "check-weights", str(pretrained), "-d", str(TINY_ID), "-c", "3d_fullres", check=False)
    assert bad.returncode == 1 and "Shape mismatch" in bad.stdout and "How to fix" in bad.stdout
    run = ws.run("nnUNetv2_train", str(TINY_ID), "3d_fullres", "0", "-tr", "nnUNetTrainerMIMFinetune",
                 "-pretrained_weights", str(pretrained), "-device", "cpu", check=False, **TRAIN_BUDGET)
    assert run.returncode != 0 and "Pre-flight check" in run.stderr and "How to fix" in run.stderr



def test_add_config_never_overwrites_silently(tiny_workspace):
    ws = tiny_workspace
    plans = ws.preprocessed / TINY_DATASET / "nnUNetPlans.json"
    before = plans.read_text()
    again = ws.run("nnunet_mim", "add-config", "small", "-d", str(TINY_ID), "-n", TINY_CONFIG, "--features", "4", "32",
                   check=False)
    assert again.returncode != 0 and "already exists" in again.stderr and "--overwrite" in again.stderr
    stock = ws.run("nnunet_mim", "add-config", "small", "-d", str(TINY_ID), "-n", "3d_fullres", "--overwrite",
                   check=False)
    assert stock.returncode != 0 and "never replaced" in stock.stderr
    assert plans.read_text() == before and "Traceback" not in again.stderr + stock.stderr
    ws.run("nnunet_mim", "add-config", "small", "-d", str(TINY_ID), "-n", "3d_tiny_copy", "--features", "8", "64",
           "--patch", "16", "32", "32")
    ws.run("nnunet_mim", "add-config", "small", "-d", str(TINY_ID), "-n", "3d_tiny_copy", "--features", "4", "32",
           "--patch", "16", "32", "32", "--overwrite")
    assert json.loads(plans.read_text())["configurations"][TINY_CONFIG] == json.loads(before)["configurations"][TINY_CONFIG]
    assert "3d_tiny_copy" in json.loads((plans.parent / "nnUNetPlans.json.bak").read_text())["configurations"]
