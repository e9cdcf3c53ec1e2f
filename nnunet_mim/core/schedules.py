"""Learning-rate schedules that nnU-Net trainers can drive.

nnU-Net calls ``lr_scheduler.step(current_epoch)`` at the start of every epoch. Our schedules are pure
functions of the step counter, so a run resumed with ``--c`` continues on exactly the same curve: the
counter is restored from the checkpoint's epoch and nothing else needs saving. Param groups may carry an
``lr_scale`` (layer-wise lr decay); the scheduled lr is multiplied by it.
"""
from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Linear warmup from ~0 to ``peak_lr`` over ``warmup_steps``, then cosine to ``min_lr`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def warmup_poly(step: int, total_steps: int, warmup_steps: int, peak_lr: float, exponent: float = 0.9) -> float:
    """Linear warmup, then nnU-Net's polynomial decay ``(1 - t / T) ** 0.9`` over the remaining steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * (1.0 - progress) ** exponent


class FunctionalLRSchedule:
    """Sets every param group's lr from ``fn(step)``; ``step(epoch)`` is what nnU-Net calls per epoch.

    With ``iterations_per_epoch > 1`` the schedule runs per iteration: the trainer calls
    :meth:`step_iteration` before each optimiser step and :meth:`step` (epoch start) sets the first one.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, fn, iterations_per_epoch: int = 1):
        self.optimizer = optimizer
        self.fn = fn
        self.iterations_per_epoch = iterations_per_epoch
        self.step(0)

    def _set(self, step: int) -> None:
        lr = self.fn(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self, epoch: int | None = None) -> None:
        self._set((epoch or 0) * self.iterations_per_epoch)

    def step_iteration(self, epoch: int, iteration: int) -> None:
        self._set(epoch * self.iterations_per_epoch + iteration)
