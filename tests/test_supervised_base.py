"""Every supervised trainer shares one recipe skeleton: it steps the learning rate once per optimiser step, clips at
its own norm, and checks that the plans build the network it trains."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch
from torch import nn

import nnunet_mim.trainers as trainers_pkg
from nnunet_mim.trainers.base import MIMPretrainerBase
from nnunet_mim.trainers.supervised import SupervisedTrainerBase


def _trainer_classes():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    out = {}
    for info in pkgutil.iter_modules(trainers_pkg.__path__):
        module = importlib.import_module(f"nnunet_mim.trainers.{info.name}")
        for name, cls in vars(module).items():
            if (inspect.isclass(cls) and issubclass(cls, nnUNetTrainer) and cls.__module__ == module.__name__
                    and not issubclass(cls, MIMPretrainerBase) and cls is not SupervisedTrainerBase):
                out[name] = cls
    return out


SUPERVISED = _trainer_classes()


def test_every_supervised_trainer_uses_the_base():
    assert {"nnUNetTrainerMIMFinetune", "nnUNetTrainerMIMFinetuneAdamW", "nnUNetTrainerSwinUNETR",
            "nnUNetTrainerSACViT", "nnUNetTrainerProbe"} <= set(SUPERVISED)
    assert [n for n, c in SUPERVISED.items() if not issubclass(c, SupervisedTrainerBase)] == []


class _Schedule:
    def __init__(self):
        self.calls = []

    def step_iteration(self, epoch, iteration):
        self.calls.append((epoch, iteration))


def _bare(cls):
    """An instance without nnU-Net's __init__ (no plans needed), with what ``train_step`` reads."""
    trainer = object.__new__(cls)
    net = nn.Module()
    net.encoder = nn.Conv3d(1, 2, 1)
    net.decoder = nn.Module()
    net.decoder.seg_layers = nn.ModuleList([nn.Conv3d(2, 2, 1)])
    net.forward = lambda x: net.decoder.seg_layers[0](net.encoder(x))
    trainer.network = net
    trainer.device = torch.device("cpu")
    trainer.grad_scaler = None
    trainer.optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer.lr_scheduler = _Schedule()
    trainer.loss = lambda out, target: ((out - target) ** 2).mean() * 1e6  # a huge gradient: clipping matters
    trainer.current_epoch, trainer._iteration_in_epoch = 0, 0
    trainer.num_epochs, trainer.num_iterations_per_epoch = 2, 5
    return trainer


@pytest.mark.parametrize("name", sorted(SUPERVISED))
def test_train_step_steps_the_lr_once_and_clips_at_the_trainers_norm(name, monkeypatch):
    cls = SUPERVISED[name]
    trainer = _bare(cls)
    norms = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: norms.append(max_norm) or
                        clip(params, max_norm))
    batch = {"data": torch.randn(1, 1, 2, 2, 2), "target": torch.randn(1, 2, 2, 2, 2)}
    before = [p.detach().clone() for p in trainer.network.parameters()]
    out = cls.train_step(trainer, batch)
    assert trainer.lr_scheduler.calls == [(0, 0)] and trainer._iteration_in_epoch == 1
    assert norms == [cls.grad_clip_norm] and "loss" in out
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.network.parameters(), before)])
    assert 0 < step.norm() <= 0.1 * cls.grad_clip_norm + 1e-6  # lr x clipped norm bounds an SGD step


def test_sac_vit_trainers_clip_at_one_and_the_others_at_nnunets_twelve():
    assert SUPERVISED["nnUNetTrainerSACViT"].grad_clip_norm == 1.0
    assert SUPERVISED["nnUNetTrainerMIMFinetuneAdamW"].grad_clip_norm == 12.0


def test_network_check_names_the_command_that_adds_the_configuration():
    from types import SimpleNamespace

    from nnunet_mim.architectures.sac_vit import SACViTSeg
    from nnunet_mim.nnunet.networks import require_network

    plans = SimpleNamespace(dataset_name="Dataset007_X", plans_name="nnUNetPlans")
    unet = SimpleNamespace(network_arch_class_name="dynamic_network_architectures.architectures.unet.PlainConvUNet")
    with pytest.raises(RuntimeError, match="nnunet_mim add-config sac-vit -d Dataset007_X") as e:
        require_network(plans, unet, SACViTSeg, "nnUNetTrainerSACViT", "sac-vit", "3d_fullres")
    assert "configuration '3d_fullres' builds PlainConvUNet" in str(e.value) and "3d_sac_vit" in str(e.value)
    sac = SimpleNamespace(network_arch_class_name="nnunet_mim.architectures.sac_vit.SACViTSeg")
    require_network(plans, sac, SACViTSeg, "nnUNetTrainerSACViT", "sac-vit")
