"""The base of every supervised (segmentation) trainer of nnunet_mim: one recipe skeleton, one training step.

:class:`SupervisedTrainerBase` is nnU-Net's ``nnUNetTrainer`` (data, augmentation, loss, deep supervision, AMP,
checkpoints, ``--c``, validation, prediction) with what our finetuning and ViT trainers share:

- ``initialize()`` refuses unlabeled (imported) datasets, checks that the configuration builds the network the
  trainer needs (:attr:`required_network`), applies the run budget and seed from the environment, and routes
  ``-pretrained_weights`` through the safe loader (``weights_only=True`` on the CPU, pre-flight report);
- the optimiser comes from :meth:`make_optimizer` (default AdamW on every parameter) and the learning rate from
  :meth:`lr_at` (default linear warmup over :attr:`warmup_fraction` of the run, then cosine to 0), stepped before
  every optimiser step by the base's :meth:`train_step`, so that no variant can forget it;
- the single copy of nnU-Net's training step, with the clipping norm as an attribute (:attr:`grad_clip_norm`,
  nnU-Net's 12 by default).

A variant changes attributes or overrides one hook (``make_optimizer``, ``lr_at``, ``on_pretrained_weights_loaded``,
``check_configuration``); see documentation/extending.md.
"""
from __future__ import annotations

from functools import partial

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from nnunet_mim.core.schedules import FunctionalLRSchedule, warmup_cosine
from nnunet_mim.nnunet.networks import require_network
from nnunet_mim.nnunet.weights import WeightReport, load_pretrained_weights_safely
from nnunet_mim.trainers.base import BudgetFromEnvironment, PerIterationLR, refuse_unlabeled_dataset


class SupervisedTrainerBase(BudgetFromEnvironment, PerIterationLR, nnUNetTrainer):
    """nnU-Net's supervised training with a per-iteration warmup schedule, a safe ``-pretrained_weights`` and a
    configuration check. Defaults: AdamW (``initial_lr``, ``weight_decay`` as set in ``__init__``), 5 % linear warmup,
    cosine to 0, gradient clipping at 12."""

    warmup_fraction: float = 0.05
    grad_clip_norm: float = 12.0  # nnU-Net's value
    #: the network class the configuration must build (or a subclass), with the ``nnunet_mim add-config`` kind that
    #: writes such a configuration; None accepts any network
    required_network: type | None = None
    required_network_config: str | None = None
    #: the report of ``-pretrained_weights`` in this process (None: no weights loaded, e.g. from scratch or ``--c``)
    pretrained_report: WeightReport | None = None

    # ---- set-up ---------------------------------------------------------------------------------------------------
    def initialize(self):
        if not self.was_initialized:
            refuse_unlabeled_dataset(self)
            self.check_configuration()
        self.apply_budget_from_environment()
        self.route_pretrained_weights()
        super().initialize()

    def check_configuration(self) -> None:
        """Raise, naming the command that adds a fitting configuration, when the plans build another network."""
        if self.required_network is not None:
            require_network(self.plans_manager, self.configuration_manager, self.required_network,
                            type(self).__name__, self.required_network_config, self.configuration_name)

    def route_pretrained_weights(self) -> None:
        """Make ``nnUNetv2_train -pretrained_weights`` use the safe loader in this process.

        nnU-Net's ``run_training.maybe_load_checkpoint`` calls the module-level ``load_pretrained_weights`` right
        after ``trainer.initialize()``; there is no other hook that sees the file name. nnU-Net 2.8's loader uses
        ``torch.load(weights_only=False)`` without ``map_location`` (a GPU checkpoint fails on a CPU machine, and a
        pickle can run code); ours reads ``weights_only=True`` on the CPU and reports every mismatch with the fix.
        """
        import nnunetv2.run.run_training as run_training

        trainer = self

        def load(network, fname, verbose=False):
            report = load_pretrained_weights_safely(network, fname, verbose)
            trainer.on_pretrained_weights_loaded(fname, report)
            return report

        run_training.load_pretrained_weights = load

    def on_pretrained_weights_loaded(self, fname: str, report: WeightReport) -> None:
        self.pretrained_report = report

    # ---- optimisation ---------------------------------------------------------------------------------------------
    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)

    def lr_at(self, step: int, total_steps: int, warmup_steps: int) -> float:
        return warmup_cosine(step, total_steps, warmup_steps, self.initial_lr)

    def warmup_steps(self) -> int:
        return max(1, int(self.warmup_fraction * self.total_iterations))

    def configure_optimizers(self):
        optimizer = self.make_optimizer()
        schedule = partial(self.lr_at, total_steps=self.total_iterations, warmup_steps=self.warmup_steps())
        return optimizer, FunctionalLRSchedule(optimizer, schedule, self.num_iterations_per_epoch)

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's training step, with the learning rate stepped first and :attr:`grad_clip_norm`."""
        self.step_lr()
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            loss = self.loss(self.network(data), target)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}
