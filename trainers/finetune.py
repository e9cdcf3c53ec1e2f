"""Finetuning trainers for pretrained weights.

    nnUNetv2_train D 3d_fullres 0 -tr nnUNetTrainerMIMFinetune -pretrained_weights <pretraining checkpoint>

nnU-Net's own ``nnUNetTrainer`` also accepts our checkpoints (encoder and decoder load, segmentation
layers start fresh). These variants add what pretrained weights want:

- a linear learning-rate warmup (per iteration, 5 % of the run) before nnU-Net's poly decay, so the
  fresh segmentation layers do not wreck the pretrained features in the first steps;
- a safe ``-pretrained_weights`` (``weights_only=True`` on the CPU, and a pre-flight report listing every missing
  key, shape or input-channel mismatch with the fix), from :class:`~nnunet_mim.trainers.supervised.SupervisedTrainerBase`.
"""
from __future__ import annotations

import torch

from nnunet_mim.core.schedules import warmup_poly
from nnunet_mim.nnunet.weights import freeze_all_but, is_segmentation_head, unwrap
from nnunet_mim.trainers.supervised import SupervisedTrainerBase


class nnUNetTrainerMIMFinetune(SupervisedTrainerBase):
    """nnU-Net's recipe (SGD, lr 1e-2, poly) with a 5 % linear warmup and safe pretrained-weight loading."""

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                               momentum=0.99, nesterov=True)

    def lr_at(self, step: int, total_steps: int, warmup_steps: int) -> float:
        return warmup_poly(step, total_steps, warmup_steps, self.initial_lr)


class nnUNetTrainerMIMScratch(nnUNetTrainerMIMFinetune):
    """The same recipe without pretrained weights: the from-scratch baseline, in its own results folder."""


class nnUNetTrainerMIMFinetuneAdamW(SupervisedTrainerBase):
    """AdamW (lr 1e-3, weight decay 1e-4), 5 % warmup, cosine decay: for short budgets.

    nnU-Net's SGD recipe is tuned for 250k iterations; measured on the deep-GM demo data, it still predicts
    only background after 650 iterations, while this recipe reaches Dice ~0.7 on the large structures
    after 250 (documentation/results.md). The demo and the label-efficiency study use it for both arms.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3
        self.weight_decay = 1e-4


class nnUNetTrainerMIMScratchAdamW(nnUNetTrainerMIMFinetuneAdamW):
    """The AdamW short-budget recipe without pretrained weights (the from-scratch baseline)."""


# ---- recipes for pretrained weights (chosen on the validation split by `nnunet_mim study`) -------------------------


class nnUNetTrainerMIMFinetuneAdamW_headsFirst(nnUNetTrainerMIMFinetuneAdamW):
    """Linear probe, then finetune: the pretrained body is frozen while the fresh segmentation layers train for the
    first :attr:`heads_first_fraction` of the iterations; then everything trains (same AdamW schedule)."""

    heads_first_fraction: float = 0.1

    def _set_body_trainable(self, trainable: bool) -> None:
        freeze_all_but(unwrap(self.network), "all" if trainable else "heads")

    def train_step(self, batch: dict) -> dict:
        step = self.current_epoch * self.num_iterations_per_epoch + self._iteration_in_epoch
        self._set_body_trainable(step >= int(self.heads_first_fraction * self.total_iterations))
        return super().train_step(batch)


class nnUNetTrainerMIMFinetuneAdamW_bodyLr01(nnUNetTrainerMIMFinetuneAdamW):
    """A lower learning rate for the pretrained body: :attr:`body_lr_scale` x the schedule; the fresh segmentation
    layers get the full rate."""

    body_lr_scale: float = 0.1

    def make_optimizer(self) -> torch.optim.Optimizer:
        heads = [p for n, p in self.network.named_parameters() if is_segmentation_head(n)]
        body = [p for n, p in self.network.named_parameters() if not is_segmentation_head(n)]
        return torch.optim.AdamW([{"params": body, "lr_scale": self.body_lr_scale}, {"params": heads}],
                                 self.initial_lr, weight_decay=self.weight_decay)


class nnUNetTrainerMIMFinetuneAdamW_lr3e4(nnUNetTrainerMIMFinetuneAdamW):
    """A lower peak learning rate: 3e-4 instead of 1e-3, everything else the same."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 3e-4

