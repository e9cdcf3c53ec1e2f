"""Finetuning recipes for pretrained weights: what each one trains, and at which rate."""
from types import SimpleNamespace

import torch
from torch import nn

from nnunet_mim.core.schedules import FunctionalLRSchedule
from nnunet_mim.trainers.finetune import (
    nnUNetTrainerMIMFinetuneAdamW_bodyLr01,
    nnUNetTrainerMIMFinetuneAdamW_headsFirst,
)


def _net():
    net = nn.Module()
    net.encoder = nn.Conv3d(1, 2, 1)
    net.decoder = nn.Module()
    net.decoder.seg_layers = nn.ModuleList([nn.Conv3d(2, 3, 1)])
    return net


def test_body_lr_scale_reaches_the_optimizer_through_the_schedule():
    fake = SimpleNamespace(network=_net(), initial_lr=1e-3, weight_decay=1e-4, body_lr_scale=0.1)
    opt = nnUNetTrainerMIMFinetuneAdamW_bodyLr01.make_optimizer(fake)
    FunctionalLRSchedule(opt, lambda step: 1e-3).step(0)
    body, heads = opt.param_groups
    assert body["lr"] == 1e-4 and heads["lr"] == 1e-3
    assert {id(p) for p in heads["params"]} == {id(p) for p in fake.network.decoder.seg_layers.parameters()}


def test_heads_first_freezes_only_the_body():
    fake = SimpleNamespace(network=_net())
    nnUNetTrainerMIMFinetuneAdamW_headsFirst._set_body_trainable(fake, False)
    assert not any(p.requires_grad for p in fake.network.encoder.parameters())
    assert all(p.requires_grad for p in fake.network.decoder.seg_layers.parameters())
    nnUNetTrainerMIMFinetuneAdamW_headsFirst._set_body_trainable(fake, True)
    assert all(p.requires_grad for p in fake.network.parameters())
    assert torch.is_grad_enabled()
