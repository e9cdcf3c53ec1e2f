"""Fault injection: a failing or killed checkpoint write, a figure that cannot be written, --c in another shell."""
from __future__ import annotations

import os

import pytest

from nnunet_mim.nnunet import settings
from nnunet_mim.trainers.base import BudgetFromEnvironment, check_resume_settings, never_fail


class _NnUNetSave:
    """Stands in for nnUNetTrainer.save_checkpoint: writes the file in two parts, optionally dying in between."""

    die_after_first_part = False

    def save_checkpoint(self, filename):
        with open(filename, "wb") as f:
            f.write(b"new state, part 1;")
            f.flush()
            if self.die_after_first_part:
                raise OSError(28, "No space left on device")
            f.write(b" part 2")


class _Trainer(BudgetFromEnvironment, _NnUNetSave):
    pass


def test_checkpoint_writes_are_atomic(tmp_path):
    path = tmp_path / "checkpoint_latest.pth"
    path.write_bytes(b"last good state")
    trainer = _Trainer()
    trainer.die_after_first_part = True
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint(str(path))
    assert path.read_bytes() == b"last good state" and os.listdir(tmp_path) == ["checkpoint_latest.pth"]
    trainer.die_after_first_part = False
    trainer.save_checkpoint(str(path))
    assert path.read_bytes() == b"new state, part 1; part 2" and os.listdir(tmp_path) == ["checkpoint_latest.pth"]


def test_a_kill_during_the_write_leaves_the_previous_checkpoint(tmp_path):
    """A SIGKILL mid-write: the child process dies inside nnU-Net's write; the old file must survive."""
    import multiprocessing
    import signal

    path = tmp_path / "checkpoint_latest.pth"
    path.write_bytes(b"last good state")

    def write_and_get_killed():
        class Killed(_NnUNetSave):
            def save_checkpoint(self, filename):
                with open(filename, "wb") as f:
                    f.write(b"half")
                    f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)

        class T(BudgetFromEnvironment, Killed):
            pass

        T().save_checkpoint(str(path))

    proc = multiprocessing.get_context("fork").Process(target=write_and_get_killed)
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    assert path.read_bytes() == b"last good state"


def test_figures_never_stop_training(tmp_path):
    logged = []

    def plot():
        raise PermissionError(13, "Permission denied", str(tmp_path / "progress.png"))

    never_fail(plot, "progress.png", logged.append)()  # no exception
    assert "could not write progress.png" in logged[0] and "training goes on" in logged[0]


def test_resume_with_other_settings_warns_or_refuses():
    stored = settings.resume_snapshot({"nnUNet_mim_epochs": "30", "nnUNet_mim_tokenizer": "/a/tok.pth"})
    same = dict(stored)
    assert check_resume_settings(stored, same, print) == []
    warnings = []
    longer = {**stored, "nnUNet_mim_epochs": "60"}
    assert check_resume_settings(stored, longer, warnings.append) == ["nnUNet_mim_epochs"]
    assert "nnUNet_mim_epochs='60'" in warnings[0] and "'30'" in warnings[0]
    with pytest.raises(RuntimeError, match=r"nnUNet_mim_tokenizer='/a/tok.pth' then, '/b/tok.pth' now"):
        check_resume_settings(stored, {**stored, "nnUNet_mim_tokenizer": "/b/tok.pth"}, print)


def test_import_unlabeled_checks_the_raw_image():
    """+Inf survives CT normalisation's clipping as a finite value, so the check reads the raw image."""
    from types import SimpleNamespace

    import numpy as np

    from nnunet_mim.nnunet.unlabeled import check_raw_image

    def reader(array):
        return SimpleNamespace(read_images=lambda files: (array, {}))

    good = np.random.default_rng(0).normal(size=(1, 4, 4, 4))
    check_raw_image(["ok.nii.gz"], reader(good))
    bad = good.copy()
    bad[0, 1, 2, 3] = np.inf
    with pytest.raises(ValueError, match="1 voxel.*NaN or infinite"):
        check_raw_image(["ct.nii.gz"], reader(bad))
    with pytest.warns(UserWarning, match="channel 0 is constant"):
        check_raw_image(["flat.nii.gz"], reader(np.zeros((1, 4, 4, 4))))


def test_ext_trainer_pointing_at_the_source_folder_names_the_fix(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "nnUNet_extTrainer": str(root / "trainers"), "nnUNet_raw": str(tmp_path),
           "nnUNet_preprocessed": str(tmp_path), "nnUNet_results": str(tmp_path)}
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
            "f('HybridMIMPretrainer')")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "export nnUNet_extTrainer=$(nnunet_mim ext-path)" in proc.stderr


def test_a_continued_run_draws_new_random_numbers_not_a_replay():
    """``--c`` at epoch k: initialize() has seeded the process as for a fresh run; the continuation must not replay
    the first epochs' masks, crops and augmentations, and the same continuation must repeat."""
    import torch

    from nnunet_mim.nnunet.seeding import derived_seed, seed_everything

    class NnUNetStart:  # stands for nnUNetTrainer.on_train_start: builds the loaders, draws
        def on_train_start(self):
            self.draws = torch.rand(4)
            self.worker_seed = self.stream_seed()

    class Trainer(BudgetFromEnvironment, NnUNetStart):
        seed, local_rank = 3, 0

        def print_to_log_file(self, *args):
            pass

    def start(epoch):
        trainer = Trainer()
        trainer.current_epoch = epoch
        seed_everything(derived_seed(trainer.seed, trainer.local_rank))  # what initialize() does, fresh or --c
        trainer.on_train_start()
        return trainer

    fresh, continued, again, later = start(0), start(5), start(5), start(6)
    assert not torch.equal(fresh.draws, continued.draws) and fresh.worker_seed != continued.worker_seed
    assert torch.equal(continued.draws, again.draws) and continued.worker_seed == again.worker_seed
    assert not torch.equal(continued.draws, later.draws) and continued.worker_seed != later.worker_seed
    assert fresh.worker_seed == 3  # a run from epoch 0 is seeded as before
