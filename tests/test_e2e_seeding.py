"""Seeded runs through ``nnUNetv2_train``: the same seed gives the same run, another seed another run.

Two data-augmentation workers (``nnUNet_n_proc_DA=2``), so the workers' own seeding and the order in which their
batches arrive are covered, not only the main process.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import TINY_CONFIG, TINY_ID

TRAINER = "nnUNetTrainerMIMScratchAdamW"
BUDGET = {"nnUNet_n_proc_DA": "2", "nnUNet_mim_epochs": "2", "nnUNet_mim_iters": "3", "nnUNet_mim_val_iters": "2"}


def _run(ws, tmp_path, name, seed):
    results = tmp_path / name
    ws.run("nnUNetv2_train", str(TINY_ID), TINY_CONFIG, "0", "-tr", TRAINER, "-device", "cpu",
           nnUNet_results=str(results), nnUNet_mim_seed=str(seed), **BUDGET)
    fold = next(results.rglob("fold_0"))
    ck = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert f"seed = {seed}" in log
    return ck


@pytest.fixture(scope="module")
def runs(tiny_workspace, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seeded")
    return [_run(tiny_workspace, tmp, name, seed) for name, seed in (("a", 7), ("b", 7), ("c", 8))]


def _curves(ck):
    log = ck["logging"]
    return np.array(log["train_losses"], dtype=float), np.array(log["val_losses"], dtype=float)


def test_same_seed_same_curves_and_weights(runs):
    a, b, _ = runs
    for x, y in zip(_curves(a), _curves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    for k, v in a["network_weights"].items():
        torch.testing.assert_close(v, b["network_weights"][k], rtol=1e-3, atol=1e-5)


def test_another_seed_another_run(runs):
    a, _, c = runs
    assert not np.allclose(_curves(a)[0], _curves(c)[0], rtol=1e-4, atol=1e-5)
    first = next(k for k in a["network_weights"] if k.endswith("weight"))
    assert not torch.allclose(a["network_weights"][first], c["network_weights"][first])
