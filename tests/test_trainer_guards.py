"""Trainer-level guards that need no data: the NaN guard and the budget variables."""
import math
from types import SimpleNamespace

import pytest
import torch

from nnunet_mim.trainers.base import BudgetFromEnvironment, MIMPretrainerBase


def test_non_finite_loss_saves_a_resumable_checkpoint_and_stops(tmp_path):
    saved = []
    fake = SimpleNamespace(output_folder=str(tmp_path), current_epoch=3, initial_lr=1e-4, _iteration_in_epoch=7)
    fake.save_checkpoint = lambda path: saved.append((path, fake.current_epoch))
    MIMPretrainerBase._check_finite(fake, {"loss": torch.tensor(1.0)})
    assert not saved
    with pytest.raises(FloatingPointError) as e:
        MIMPretrainerBase._check_finite(fake, {"loss": torch.tensor(math.nan), "reconstruction": torch.tensor(math.inf)})
    # saved with the epoch counter of the *previous* epoch, so that --c restarts the interrupted one
    assert saved == [(str(tmp_path / "checkpoint_latest.pth"), 2)] and fake.current_epoch == 3
    assert "reconstruction" in str(e.value) and "--c" in str(e.value) and "epoch 3, iteration 7" in str(e.value)


def test_budget_variables(monkeypatch):
    trainer = SimpleNamespace(num_epochs=1000, num_iterations_per_epoch=250, seed=None, local_rank=0,
                              print_to_log_file=lambda *a: None)
    monkeypatch.setenv("nnUNet_mim_epochs", "3")
    monkeypatch.setenv("nnUNet_mim_iters", "5")
    BudgetFromEnvironment.apply_budget_from_environment(trainer)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch) == (3, 5)
    monkeypatch.setenv("nnUNet_mim_iters", "0")
    with pytest.raises(ValueError, match="nnUNet_mim_iters='0'.*positive integer"):
        BudgetFromEnvironment.apply_budget_from_environment(trainer)
