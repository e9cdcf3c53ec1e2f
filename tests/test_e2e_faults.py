"""Faults injected into real ``nnUNetv2_train`` runs on tiny data: a NaN loss at a given step, a preview folder that
cannot be written, and ``--c`` from a shell with another budget. Each checks what the user sees and what is kept."""
from __future__ import annotations

import os

import numpy as np
import torch

from helpers import TINY_CONFIG, TINY_ID, fold_folder

#: a test-only trainer, found through a second nnUNet_extTrainer folder: the loss turns NaN from a given step on
FAULTY_TRAINER = '''
import os

from nnunet_mim.trainers.hybridmim import HybridMIMPretrainer


class HybridMIMPretrainer_nanAt(HybridMIMPretrainer):
    def compute_losses(self, data, training):
        losses = super().compute_losses(data, training)
        at = int(os.environ.get("FAULT_NAN_AT_STEP", "-1"))
        step = self.current_epoch * self.num_iterations_per_epoch + self._iteration_in_epoch - 1
        if training and 0 <= at <= step:
            losses["loss"] = losses["loss"] * float("nan")
        return losses


class HybridMIMPretrainer_nanGradAt(HybridMIMPretrainer):
    def clip_gradients(self):
        at = int(os.environ.get("FAULT_NAN_GRAD_AT_STEP", "-1"))
        step = self.current_epoch * self.num_iterations_per_epoch + self._iteration_in_epoch - 1
        if 0 <= at <= step:
            first = next(p for p in self.network.parameters() if p.grad is not None)
            first.grad.fill_(float("nan"))
        return super().clip_gradients()
'''
BUDGET = {"nnUNet_n_proc_DA": "0", "nnUNet_mim_iters": "2", "nnUNet_mim_val_iters": "1", "nnUNet_mim_save_every": "1"}


def _faulty_env(ws, tmp_path) -> dict:
    ext = tmp_path / "ext"
    ext.mkdir()
    (ext / "faulty_trainer.py").write_text(FAULTY_TRAINER)
    return {**BUDGET, "nnUNet_extTrainer": ws.env["nnUNet_extTrainer"] + os.pathsep + str(ext),
            "nnUNet_results": str(tmp_path / "results")}


def test_nan_loss_keeps_the_last_good_checkpoint_and_resume_reports_a_changed_budget(tiny_workspace, tmp_path):
    ws = tiny_workspace
    env = _faulty_env(ws, tmp_path)
    trainer = "HybridMIMPretrainer_nanAt"
    fold = tmp_path / "results" / fold_folder(ws, trainer, TINY_CONFIG).relative_to(ws.results)
    fold.mkdir(parents=True)
    (fold / "previews").write_text("a file where the preview folder should be")  # previews cannot be written

    # epochs 0 and 1 train (checkpoint_latest after each); the loss turns NaN at the first step of epoch 2
    run = ws.run("nnUNetv2_train", str(TINY_ID), TINY_CONFIG, "all", "-tr", trainer, "-device", "cpu", check=False,
                 nnUNet_mim_epochs="4", FAULT_NAN_AT_STEP="4", **env)
    assert run.returncode != 0
    assert "non-finite pretraining loss" in run.stderr and "checkpoint_nonfinite.pth" in run.stderr
    assert "--c` resumes from the last good" in run.stderr
    latest = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 2  # the state after epoch 1: the last good one
    assert all(torch.isfinite(v).all() for v in latest["network_weights"].values() if v.is_floating_point())
    assert (fold / "checkpoint_nonfinite.pth").is_file()
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "could not write a preview" in log and "training goes on" in log

    # --c from a shell with a longer budget and without the fault: it warns, continues and finishes
    resumed = ws.run("nnUNetv2_train", str(TINY_ID), TINY_CONFIG, "all", "-tr", trainer, "-device", "cpu", "--c",
                     nnUNet_mim_epochs="5", **env)
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "resuming with nnUNet_mim_epochs='5'; the checkpoint was trained with '4'" in log, resumed.stdout[-2000:]
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 5 and len(final["logging"]["train_losses"]) == 5
    assert np.isfinite(final["logging"]["train_losses"]).all()


def test_non_finite_gradients_skip_steps_then_stop_with_the_weights_untouched(tiny_workspace, tmp_path):
    ws = tiny_workspace
    env = _faulty_env(ws, tmp_path)
    trainer = "HybridMIMPretrainer_nanGradAt"
    fold = tmp_path / "results" / fold_folder(ws, trainer, TINY_CONFIG).relative_to(ws.results)
    # 2 iterations per epoch: steps 4 and 5 (epoch 2) are skipped, step 6 (epoch 3) is the third in a row: stop
    run = ws.run("nnUNetv2_train", str(TINY_ID), TINY_CONFIG, "all", "-tr", trainer, "-device", "cpu", check=False,
                 nnUNet_mim_epochs="5", FAULT_NAN_GRAD_AT_STEP="4", **env)
    assert run.returncode != 0
    assert "3 optimiser steps in a row had non-finite gradients" in run.stderr, run.stderr[-2000:]
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert log.count("optimiser step skipped") == 3
    latest = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    stopped = torch.load(fold / "checkpoint_nonfinite.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 3  # epoch 2 ran (its steps skipped) and was saved
    for key, value in latest["network_weights"].items():  # no skipped step changed a weight, none is NaN
        if value.is_floating_point():
            assert torch.isfinite(value).all() and torch.equal(value, stopped["network_weights"][key]), key
