"""Shared machinery of nnunet_mim's trainers (small nnUNetTrainer subclasses).

- :class:`BudgetFromEnvironment`: the ``nnUNet_mim_*`` environment variables shorten a run (demos, tests)
  without a trainer variant per budget, and seed it.
- :class:`MIMPretrainerBase`: loss-based validation that keeps nnU-Net's Dice bookkeeping intact, AdamW
  with per-iteration warmup + cosine, per-component loss logging and curves in progress.png,
  reconstruction previews, a NaN guard that keeps the last good checkpoint, and no final segmentation
  validation. Subclasses implement :meth:`MIMPretrainerBase.compute_losses`.
"""
from __future__ import annotations

import math
import os
from functools import partial

import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast
from torch.profiler import record_function

from nnunet_mim.core.distributed import any_rank
from nnunet_mim.nnunet import settings
from nnunet_mim.nnunet.probe_schedule import check_probe_target, probe_schedule_from_environment, run_probe
from nnunet_mim.nnunet.progress import ComponentLocalLogger, install_local_logger, local_logger
from nnunet_mim.nnunet.seeding import derived_seed, seed_everything, seeded_augmenters
from nnunet_mim.core.schedules import FunctionalLRSchedule, warmup_cosine

#: budget variables (nnunet_mim.nnunet.settings) -> trainer attribute they override
BUDGET_VARIABLES = {
    "nnUNet_mim_epochs": "num_epochs",
    "nnUNet_mim_iters": "num_iterations_per_epoch",
    "nnUNet_mim_val_iters": "num_val_iterations_per_epoch",
    "nnUNet_mim_save_every": "save_every",
}


class BudgetFromEnvironment:
    """The run settings of the environment (:mod:`nnunet_mim.nnunet.settings`), applied at ``initialize()`` after
    every ``__init__`` of a trainer variant has run:

    - the budget: ``nnUNet_mim_epochs``, ``nnUNet_mim_iters``, ``nnUNet_mim_val_iters``, ``nnUNet_mim_save_every``
      (positive integers) shorten a run (demos, tests, studies) without a trainer variant per budget;
    - the seed: ``nnUNet_mim_seed`` (or the class attribute :attr:`seed`) seeds the network's initialisation, the
      trainer's own draws, and the data-augmentation workers (:mod:`nnunet_mim.nnunet.seeding`).
    """

    seed: int | None = None  # None: unseeded, like nnU-Net

    def apply_budget_from_environment(self) -> None:
        for variable, attribute in BUDGET_VARIABLES.items():
            value = settings.read(variable)
            if value is not None:
                setattr(self, attribute, value)
                self.print_to_log_file(f"{attribute} = {value} (from {variable})")
        seed = settings.read("nnUNet_mim_seed")
        if seed is not None:
            self.seed = seed
        if self.seed is not None:
            seed_everything(derived_seed(self.seed, self.local_rank))
            self.print_to_log_file(f"seed = {self.seed} (torch, numpy, random, data-augmentation workers)")

        # stored in every checkpoint (nnU-Net saves and restores ``my_init_kwargs``): --c compares them
        self.my_init_kwargs[SETTINGS_KEY] = settings.resume_snapshot()
        logger = local_logger(self)
        logger.plot_progress_png = never_fail(logger.plot_progress_png, "progress.png", self.print_to_log_file)

    def stream_seed(self) -> int:
        """The seed of this session's random streams. A run from epoch 0 uses the run's seed. A run continued with
        ``--c`` at epoch k uses a seed derived from (seed, k): re-seeding with the run's own seed would replay the
        masks, crops and augmentations of the first epochs after k. The same seed and k give the same continuation
        (it is not bit-identical to an uninterrupted run, whose streams were not cut at k)."""
        return self.seed if self.current_epoch == 0 else derived_seed(self.seed, self.current_epoch)

    def on_train_start(self):
        # after --c has restored current_epoch, before the data loaders start
        if self.seed is not None and self.current_epoch > 0:
            seed_everything(derived_seed(self.stream_seed(), self.local_rank))
            self.print_to_log_file(f"continued at epoch {self.current_epoch}: random streams re-seeded from seed "
                                   f"{self.seed} and this epoch (no replay of the first epochs' draws)")
        super().on_train_start()

    def get_dataloaders(self):
        if self.seed is None:
            return super().get_dataloaders()
        with seeded_augmenters(nnunet_trainer_module, self.stream_seed(), self.local_rank):
            return super().get_dataloaders()

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written to ``<name>.partial`` and then renamed: a kill or a full disk during the
        write leaves the previous file intact."""
        partial = f"{filename}.partial"
        try:
            super().save_checkpoint(partial)
        except BaseException:
            if os.path.isfile(partial):
                os.remove(partial)
            raise
        if os.path.isfile(partial):  # rank 0 only, and not with checkpointing disabled
            os.replace(partial, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's ``--c``, plus a check of the settings the checkpoint was trained with against this shell's."""
        if not self.was_initialized:
            self.initialize()
        current = self.my_init_kwargs.get(SETTINGS_KEY)
        super().load_checkpoint(filename_or_checkpoint)
        stored = self.my_init_kwargs.get(SETTINGS_KEY)
        self.my_init_kwargs[SETTINGS_KEY] = current  # checkpoints written from now on describe this run
        if stored is not None and current is not None:
            check_resume_settings(stored, current, self.print_to_log_file)


SETTINGS_KEY = "nnunet_mim_settings"
#: settings whose change would corrupt a resumed run: refused on --c (the others are reported)
REFUSED_ON_RESUME = ("nnUNet_mim_tokenizer", "nnUNet_mim_vgg16_weights", "nnUNet_mim_lpips_weights")


def check_resume_settings(stored: dict, current: dict, log=print) -> list[str]:
    """Compare the settings a checkpoint was trained with to the environment of ``--c``. Refuses changes that would
    corrupt the run (another tokenizer, other perceptual-loss weights); warns about every other difference."""
    changed = [k for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
    fatal = [k for k in changed if k in REFUSED_ON_RESUME]
    if fatal:
        raise RuntimeError(
            "This checkpoint was trained with other settings than this shell has; resuming would mix two runs: "
            + "; ".join(f"{k}={stored.get(k)!r} then, {current.get(k)!r} now" for k in fatal)
            + ". Set them back (e.g. `export " + "; export ".join(f"{k}={stored.get(k) or ''}" for k in fatal)
            + "`) or start a new run in another results folder.")
    for k in changed:
        log(f"WARNING: resuming with {k}={current.get(k)!r}; the checkpoint was trained with {stored.get(k)!r}. "
            + ("The schedule and the number of epochs follow the new value from here on."
               if k in BUDGET_VARIABLES else "The new value applies from here on."))
    return changed


def refuse_unlabeled_dataset(trainer) -> None:
    """Segmentation trainers refuse a dataset made by ``nnunet_mim import-unlabeled``: its labels are all background."""
    imported = trainer.dataset_json.get("nnunet_mim_unlabeled_import")
    if imported:
        raise ValueError(f"{trainer.plans_manager.dataset_name} was made by `nnunet_mim import-unlabeled` and has no "
                         f"labels: pretrain on it (e.g. -tr HybridMIMPretrainer), then finetune on the labeled target "
                         f"{imported.get('plans_from')} with -pretrained_weights.")


def never_fail(method, what: str, log):
    """``method``, but an exception (a full disk, a permission error, a display problem) only logs a warning: a figure
    must never stop training."""
    def safe(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - deliberately broad: figures are optional output
            log(f"WARNING: could not write {what} ({type(e).__name__}: {e}); training goes on")
    return safe


def mean_across_ranks(value: float) -> float:
    """Average a python float over DDP ranks (identity without a process group)."""
    if dist.is_available() and dist.is_initialized():
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
        return float(np.nanmean(values))
    return value


class PerIterationLR:
    """Step a :class:`FunctionalLRSchedule` before every optimiser step instead of once per epoch."""

    _iteration_in_epoch = 0

    def on_train_epoch_start(self):
        self._iteration_in_epoch = 0
        super().on_train_epoch_start()

    def step_lr(self) -> None:
        self.lr_scheduler.step_iteration(self.current_epoch, self._iteration_in_epoch)
        self._iteration_in_epoch += 1

    @property
    def total_iterations(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    def warmup_cosine_schedule(self, optimizer: torch.optim.Optimizer, warmup_steps: int) -> FunctionalLRSchedule:
        """Linear warmup to ``initial_lr`` then cosine to 0 at the end of the run, stepped per iteration."""
        schedule = partial(warmup_cosine, total_steps=self.total_iterations, warmup_steps=warmup_steps,
                           peak_lr=self.initial_lr)
        return FunctionalLRSchedule(optimizer, schedule, self.num_iterations_per_epoch)


class MIMPretrainerBase(BudgetFromEnvironment, PerIterationLR, nnUNetTrainer):
    """Base of the self-supervised pretrainers: nnU-Net's data pipeline and checkpoints, our losses.

    ``compute_losses(data, training)`` returns a dict with the weighted total under ``"loss"`` and the
    unweighted components under the names in :attr:`loss_components`. Validation is loss-based: the
    "pseudo dice" that nnU-Net logs and uses for ``checkpoint_best.pth`` is ``exp(-val_loss)``, a
    monotone stand-in, so the best checkpoint is the one with the lowest (EMA) validation loss.
    """

    loss_components: tuple[str, ...] = ()
    warmup_iterations: int = 500  # HybridMIM / Swin-UNETR pretraining; capped at 10 % of a short run
    preview_every: int = 10  # epochs between reconstruction previews
    grad_clip_norm: float = 12.0  # nnU-Net's value; pretrainers may set their method's own

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-4
        self.weight_decay = 1e-3
        self.num_epochs = 400  # x 250 iterations = 100k steps (HybridMIM)
        self.save_every = 10
        self.enable_deep_supervision = False
        self.oversample_foreground_percent = 0.0  # pretraining must not depend on labels
        install_local_logger(self, ComponentLocalLogger(self.loss_components))
        self._preview_batch = None

    # ---- set-up ---------------------------------------------------------------------------------
    def initialize(self):
        self.apply_budget_from_environment()
        self.probe_schedule = probe_schedule_from_environment()
        if self.probe_schedule is not None:
            check_probe_target(self.probe_schedule, self.configuration_name)
            s = self.probe_schedule
            self.print_to_log_file(f"downstream probe every {s.every} epochs and at the end: {s.part} trained on "
                                   f"dataset {s.dataset} ({s.epochs} x {s.iters} iterations), in progress.png")
        super().initialize()

    def _do_i_compile(self):
        return False  # the MIM forward returns structured outputs; keep eager (documented)

    def _build_loss(self):
        return None  # losses are computed in compute_losses

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, self.warmup_cosine_schedule(optimizer, self.pretraining_warmup_steps())

    def pretraining_warmup_steps(self) -> int:
        """``warmup_iterations``, capped at 10 % of a short run."""
        return min(self.warmup_iterations, max(1, self.total_iterations // 10))

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("Pretraining: no segmentation validation (the network reconstructs images). "
                               "Finetune with -pretrained_weights to get a segmentation model.")

    # ---- the pretext task -----------------------------------------------------------------------
    def compute_losses(self, data: torch.Tensor, training: bool) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def save_preview(self, path: str) -> None:
        """Write a preview PNG from ``self._preview_batch`` (set by :meth:`compute_losses`)."""

    # ---- steps ----------------------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def train_step(self, batch: dict) -> dict:
        """One step on ``compute_losses``: it backpropagates ``losses["objective"]`` when the pretext task has one
        (e.g. two players) and ``losses["loss"]`` otherwise; ``loss`` is what nnU-Net logs."""
        self.step_lr()
        data = batch["data"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast(), record_function("train.forward_and_losses"):
            losses = self.compute_losses(data, training=True)
        objective = losses.pop("objective", None)
        total = losses["loss"] if objective is None else objective
        self._check_finite({**losses, "loss": total})
        if self.grad_scaler is not None:  # AMP: the scaler itself skips steps with non-finite gradients
            with record_function("train.backward"):
                self.grad_scaler.scale(total).backward()
            with record_function("train.optimizer"):
                self.grad_scaler.unscale_(self.optimizer)
                self.clip_gradients()
                self.grad_scaler.step(self.optimizer)
                self.grad_scaler.update()
        else:
            with record_function("train.backward"):
                total.backward()
            with record_function("train.optimizer"):
                norm = self.clip_gradients()
                if self._gradients_are_finite(norm):
                    self.optimizer.step()
        return {k: v.detach().float().cpu().numpy() for k, v in losses.items()}

    def clip_gradients(self) -> torch.Tensor:
        """Clip and return the total gradient norm (checked before the optimiser step)."""
        return torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)

    max_skipped_steps: int = 3  # consecutive steps with non-finite gradients before the run stops
    _skipped_steps = 0

    def _gradients_are_finite(self, norm: torch.Tensor) -> bool:
        """Skip the optimiser step when the gradient norm is not finite (all DDP ranks decide together); stop after
        :attr:`max_skipped_steps` such steps in a row."""
        bad = any_rank(not torch.isfinite(norm).item())
        if not bad:
            self._skipped_steps = 0
            return True
        self._skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.print_to_log_file(f"WARNING: non-finite gradient norm at epoch {self.current_epoch}, iteration "
                               f"{self._iteration_in_epoch}: optimiser step skipped ({self._skipped_steps} in a row)")
        if self._skipped_steps >= self.max_skipped_steps:
            self._stop_non_finite(f"{self._skipped_steps} optimiser steps in a row had non-finite gradients")
        return False

    def validation_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        with self._autocast():
            losses = self.compute_losses(data, training=False)
        losses.pop("objective", None)
        return {k: v.detach().float().cpu().numpy() for k, v in losses.items()}

    def _check_finite(self, losses: dict[str, torch.Tensor]) -> None:
        """Stop on a non-finite loss *before* the optimiser step (every DDP rank stops together)."""
        if not any_rank(not torch.isfinite(losses["loss"]).item()):
            return
        values = {k: float(v.detach()) for k, v in losses.items()}
        self._stop_non_finite(f"non-finite pretraining loss {values}")

    def _stop_non_finite(self, what: str) -> None:
        """Keep the last good ``checkpoint_latest.pth``; save the current state as ``checkpoint_nonfinite.pth`` for
        inspection, and stop with what to do."""
        path = join(self.output_folder, "checkpoint_nonfinite.pth")
        self.current_epoch -= 1  # the epoch is incomplete (same trick as nnU-Net's on_train_end)
        self.save_checkpoint(path)
        self.current_epoch += 1
        latest = join(self.output_folder, "checkpoint_latest.pth")
        resume = (f"`nnUNetv2_train ... --c` resumes from the last good {latest}" if os.path.isfile(latest) else
                  "no checkpoint_latest.pth was written yet, so `--c` starts again from the beginning")
        raise FloatingPointError(
            f"Stopped at epoch {self.current_epoch}, iteration {self._iteration_in_epoch}: {what}. The state at this "
            f"point is in {path} (for inspection, not for resuming); {resume}. Lower the learning rate "
            f"(initial_lr={self.initial_lr}) or check the input data for NaNs/extreme values first.")

    # ---- logging --------------------------------------------------------------------------------
    def _log_components(self, split: str, outputs: dict) -> None:
        for name in self.loss_components:
            value = float(np.mean(outputs[name])) if name in outputs else math.nan
            self.logger.log(f"{split}_{name}", mean_across_ranks(value), self.current_epoch)

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        self._log_components("train", collate_outputs(train_outputs))

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        outputs = collate_outputs(val_outputs)
        loss = mean_across_ranks(float(np.mean(outputs["loss"])))
        stand_in = math.exp(-loss)
        self.logger.log("val_losses", loss, self.current_epoch)
        self.logger.log("mean_fg_dice", stand_in, self.current_epoch)
        self.logger.log("dice_per_class_or_region", [stand_in], self.current_epoch)
        self._log_components("val", outputs)

    def on_epoch_end(self):
        epoch = self.current_epoch
        parts = ", ".join(f"{c} {self.logger.get_value(f'train_{c}', step=-1):.4g}" for c in self.loss_components)
        self.print_to_log_file(f"train components: {parts}")
        self.print_to_log_file("(pretraining: 'pseudo dice' below is exp(-val_loss); best = lowest val loss)")
        self._log_probe(epoch)
        super().on_epoch_end()
        last = epoch == self.num_epochs - 1
        if self.local_rank == 0 and self._preview_batch is not None and (epoch % self.preview_every == 0 or last):
            never_fail(self.save_preview, "a preview", self.print_to_log_file)(
                join(self.output_folder, "previews", f"epoch_{epoch:04d}.png"))


    probe_schedule = None

    def _log_probe(self, epoch: int) -> None:
        """The downstream probe on this epoch's weights when one is due (:mod:`nnunet_mim.nnunet.probe_schedule`);
        NaN otherwise. A failing probe is a warning, never the end of the pretraining."""
        values = {"probe_dice": math.nan, "probe_random_dice": math.nan}
        s = self.probe_schedule
        if s is not None and self.local_rank == 0 and s.due(epoch, self.num_epochs):
            checkpoint = join(self.output_folder, "checkpoint_probe.pth")
            try:
                self.save_checkpoint(checkpoint)
                result = run_probe(s, checkpoint, self.configuration_name, join(self.output_folder, "probe"), epoch,
                                   self.seed)
                values = {"probe_dice": result["pretrained"]["dice"], "probe_random_dice": result["random"]["dice"]}
                self.print_to_log_file(f"probe after epoch {epoch}: validation Dice {values['probe_dice']:.4f} "
                                       f"(random body {values['probe_random_dice']:.4f})")
            except Exception as e:  # noqa: BLE001 - the probe is a measurement; the pretraining goes on
                self.print_to_log_file(f"WARNING: the probe after epoch {epoch} failed ({type(e).__name__}: "
                                       f"{str(e)[-2000:]}); pretraining goes on")
            finally:
                if os.path.isfile(checkpoint):
                    os.remove(checkpoint)
        for key, value in values.items():
            self.logger.log(key, value, epoch)


def require_package_import(module_name: str) -> None:
    """Trainer modules are ``nnunet_mim.trainers.<name>``. nnU-Net imports the files of ``nnUNet_extTrainer`` as
    top-level modules: pointed at the ``trainers/`` source folder it would make a second copy of every class (and
    ``isinstance`` checks between the copies fail). The index folder of ``nnunet_mim ext-path`` avoids that."""
    if not module_name.startswith("nnunet_mim.trainers."):
        from nnunet_mim import ext_trainer_path

        raise ImportError(f"nnunet_mim's trainer module was imported as {module_name!r}: nnUNet_extTrainer points at "
                          f"the trainers/ source folder. Set it to the index folder instead: "
                          f"`export nnUNet_extTrainer=$(nnunet_mim ext-path)` (here: {ext_trainer_path()}).")


# nnU-Net imports the modules of a folder in alphabetical order, so this one comes first from trainers/
require_package_import(__name__)
