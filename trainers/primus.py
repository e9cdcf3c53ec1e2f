"""Primus (dynamic-network-architectures) in nnU-Net: finetuning and from-scratch training on a Primus configuration.

    nnunet_mim add-config primus -d D [--size M]                 # configuration 3d_primus (plans)
    nnUNetv2_train D 3d_primus 0 -tr nnUNetTrainerMIMFinetunePrimus -pretrained_weights <Primus checkpoint>
    nnUNetv2_train D 3d_primus 0 -tr nnUNetTrainerMIMScratchPrimus        # the from-scratch baseline
    nnUNetv2_predict ... -c 3d_primus -tr nnUNetTrainerMIMFinetunePrimus

The recipe of the Primus / OpenMind finetuning code (nnU-Net's Primus trainers and its pretrained-weights adaptation):
AdamW with betas (0.9, 0.98) and weight decay 0.05 on every parameter, lr 1e-4 with pretrained weights (3e-4 from
scratch), linear warmup over 5 % of the run, gradient clipping at norm 1, no deep supervision (Primus has a single
full-resolution output). The decay after the warmup is cosine to 0, per iteration, like our other ViT trainers
(theirs: poly 0.9 per epoch); documentation/deviations.md. Everything else is nnU-Net's (data, augmentation, Dice +
CE, AMP, checkpoints, ``--c``, validation, prediction); ``-pretrained_weights`` goes through the safe loader.
"""
from __future__ import annotations

import math

import torch
from dynamic_network_architectures.architectures.primus import Primus
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_mim.nnunet.networks import require_network
from nnunet_mim.nnunet.primus_plans import token_grid
from nnunet_mim.nnunet.versions import network_builder, trainer_name
from nnunet_mim.nnunet.weights import unwrap
from nnunet_mim.trainers.supervised import SupervisedTrainerBase


class nnUNetTrainerMIMFinetunePrimus(SupervisedTrainerBase):
    """Finetuning Primus on a Primus configuration (``nnunet_mim add-config primus``), without deep supervision.

    The network is built from the plans without nnU-Net's ``deep_supervision`` argument (Primus has none), and
    :meth:`set_deep_supervision_enabled` has nothing to switch; with ``enable_deep_supervision = False`` nnU-Net's
    loss and data pipeline use the single full-resolution target.
    """

    required_network = Primus
    required_network_config = "primus"
    warmup_fraction: float = 0.05  # 50 of 1000 epochs in the Primus trainers
    grad_clip_norm: float = 1.0
    adamw_betas: tuple[float, float] = (0.9, 0.98)
    peak_lr: float = 1e-4  # with pretrained weights
    expects_pretrained_weights: bool = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.peak_lr
        self.weight_decay = 5e-2
        self.enable_deep_supervision = False

    @network_builder
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """The plans' Primus (single output whatever ``enable_deep_supervision`` says: Primus has no such option)."""
        require_network(plans_manager, configuration_manager, Primus, trainer_name(cls), cls.required_network_config)
        return get_network_from_plans(configuration_manager.network_arch_class_name,
                                      configuration_manager.network_arch_init_kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=None)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """Primus has a single output: nothing to switch (nnU-Net's version sets ``network.decoder``)."""

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                 betas=self.adamw_betas)

    def initialize(self):
        super().initialize()
        net = unwrap(self.network)
        kw = self.configuration_manager.network_arch_init_kwargs
        grid = token_grid(self.configuration_manager.patch_size, kw["patch_embed_size"])
        self.print_to_log_file(
            f"Primus: embed {net.embed_dim}, depth {len(net.eva.blocks)}, heads {kw['eva_numheads']}, patch "
            f"{self.configuration_manager.patch_size} -> token grid {grid} = {math.prod(grid)} tokens, "
            f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters; AdamW lr {self.initial_lr} betas "
            f"{self.adamw_betas} wd {self.weight_decay}, warmup {self.warmup_fraction:.0%} then cosine, grad clip "
            f"{self.grad_clip_norm}, no deep supervision")

    def on_train_start(self):
        super().on_train_start()
        if self.pretrained_report is None and self.expects_pretrained_weights:
            self.print_to_log_file(
                f"WARNING: {type(self).__name__} without -pretrained_weights (or resumed with --c): no pretrained "
                f"weights were loaded in this run. For training from scratch use nnUNetTrainerMIMScratchPrimus.")


class nnUNetTrainerMIMScratchPrimus(nnUNetTrainerMIMFinetunePrimus):
    """Primus from scratch (the baseline): the same recipe at the Primus paper's lr 3e-4."""

    peak_lr = 3e-4
    expects_pretrained_weights = False
