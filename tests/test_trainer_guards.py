"""Trainer-level guards that need no data: the NaN guard and the budget variables."""
import math
from types import SimpleNamespace

import pytest
import torch

from nnunet_mim.trainers.base import BudgetFromEnvironment, MIMPretrainerBase


def _fake_pretrainer(tmp_path, latest: bool):
    saved = []
    fake = SimpleNamespace(output_folder=str(tmp_path), current_epoch=3, initial_lr=1e-4, _iteration_in_epoch=7,
                           _skipped_steps=0, max_skipped_steps=3, print_to_log_file=lambda *a: None)
    fake.save_checkpoint = lambda path: saved.append((path, fake.current_epoch))
    fake._stop_non_finite = lambda what: MIMPretrainerBase._stop_non_finite(fake, what)
    if latest:
        (tmp_path / "checkpoint_latest.pth").write_bytes(b"last good state")
    return fake, saved


def test_non_finite_loss_keeps_the_last_good_checkpoint_and_stops(tmp_path):
    fake, saved = _fake_pretrainer(tmp_path, latest=True)
    MIMPretrainerBase._check_finite(fake, {"loss": torch.tensor(1.0)})
    assert not saved
    with pytest.raises(FloatingPointError) as e:
        MIMPretrainerBase._check_finite(fake, {"loss": torch.tensor(math.nan), "reconstruction": torch.tensor(math.inf)})
    # the state at the fault goes to its own file; checkpoint_latest.pth (the last good state) is untouched
    assert saved == [(str(tmp_path / "checkpoint_nonfinite.pth"), 2)] and fake.current_epoch == 3
    assert (tmp_path / "checkpoint_latest.pth").read_bytes() == b"last good state"
    assert "reconstruction" in str(e.value) and "--c" in str(e.value) and "epoch 3, iteration 7" in str(e.value)


def test_non_finite_gradients_skip_the_step_then_stop(tmp_path):
    fake, saved = _fake_pretrainer(tmp_path, latest=False)
    zeroed = []
    fake.optimizer = SimpleNamespace(zero_grad=lambda set_to_none: zeroed.append(1))
    assert MIMPretrainerBase._gradients_are_finite(fake, torch.tensor(3.0))
    assert not MIMPretrainerBase._gradients_are_finite(fake, torch.tensor(math.inf))
    assert not MIMPretrainerBase._gradients_are_finite(fake, torch.tensor(math.nan))
    assert len(zeroed) == 2 and not saved  # skipped, gradients dropped, nothing saved yet
    assert MIMPretrainerBase._gradients_are_finite(fake, torch.tensor(1.0)) and fake._skipped_steps == 0
    for _ in range(2):
        MIMPretrainerBase._gradients_are_finite(fake, torch.tensor(math.nan))
    with pytest.raises(FloatingPointError, match="3 optimiser steps in a row had non-finite gradients"):
        MIMPretrainerBase._gradients_are_finite(fake, torch.tensor(math.nan))
    assert saved and saved[0][0].endswith("checkpoint_nonfinite.pth")


def test_budget_variables(monkeypatch):
    trainer = SimpleNamespace(num_epochs=1000, num_iterations_per_epoch=250, seed=None, local_rank=0,
                              print_to_log_file=lambda *a: None, my_init_kwargs={},
                              logger=SimpleNamespace(local_logger=SimpleNamespace(plot_progress_png=print)))
    monkeypatch.setenv("nnUNet_mim_epochs", "3")
    monkeypatch.setenv("nnUNet_mim_iters", "5")
    BudgetFromEnvironment.apply_budget_from_environment(trainer)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch) == (3, 5)
    assert trainer.my_init_kwargs["nnunet_mim_settings"]["nnUNet_mim_epochs"] == "3"  # stored in checkpoints
    monkeypatch.setenv("nnUNet_mim_iters", "0")
    with pytest.raises(ValueError, match="nnUNet_mim_iters='0'.*positive integer"):
        BudgetFromEnvironment.apply_budget_from_environment(trainer)
