"""SwinUNETR in nnU-Net: supervised training and HybridMIM pretraining on the Swin backbone.

    nnunet_mim add-config swin -d D                                   # configuration 3d_swin (plans)
    nnUNetv2_train D 3d_swin 0 -tr nnUNetTrainerSwinUNETR            # supervised, from scratch
    nnUNetv2_train D 3d_swin all -tr HybridMIMPretrainerSwin         # HybridMIM pretraining
    nnUNetv2_train D 3d_swin 0 -tr nnUNetTrainerSwinUNETR -pretrained_weights <pretraining checkpoint_final.pth>
    nnUNetv2_predict ... -c 3d_swin -tr nnUNetTrainerSwinUNETR

The network comes from the plans (``architectures/swin_unetr.py``); these trainers only change the recipe.
See documentation/swin.md.
"""
from __future__ import annotations


import numpy as np
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_mim.architectures.swin_unetr import SwinUNETR, check_swin_patch_size
from nnunet_mim.architectures.hybridmim import HybridMIMModel
from nnunet_mim.nnunet.versions import build_planned_network, network_builder, trainer_name
from nnunet_mim.nnunet.networks import require_network
from nnunet_mim.trainers.supervised import SupervisedTrainerBase
from nnunet_mim.trainers.hybridmim import ABLATIONS, HybridMIMPretrainer, ablation_weights


def require_swin_configuration(configuration_manager: ConfigurationManager, configuration_name: str | None,
                               trainer_name: str, plans_manager: PlansManager | None = None) -> None:
    """Clear errors when a Swin trainer meets a configuration that is not SwinUNETR or has an unusable patch."""
    require_network(plans_manager, configuration_manager, SwinUNETR, trainer_name, "swin", configuration_name)
    check_swin_patch_size(configuration_manager.patch_size, configuration_name, require_two_tokens=True)


class nnUNetTrainerSwinUNETR(SupervisedTrainerBase):
    """Supervised SwinUNETR: AdamW (lr 1e-4, weight decay 1e-5), linear warmup over 5 % of the run, cosine to 0.

    The recipe of Swin-UNETR (Hatamizadeh et al.; MONAI research-contributions BTCV: AdamW 1e-4, decay 1e-5,
    warmup-cosine) and of HybridMIM's finetuning (paper Sec. IV-C: AdamW, lr 1e-4, decay 1e-5, warmup), stepped
    per iteration. nnU-Net's SGD at 1e-2 is not used: it is tuned for its CNNs and diverges or stalls with
    transformer blocks. Everything else is nnU-Net's (data, augmentation, loss, deep supervision at strides
    1..16, AMP on CUDA, gradient clipping at 12, checkpoints, ``--c``, validation, prediction).
    ``-pretrained_weights`` goes through the safe loader and pre-flight report (:mod:`nnunet_mim.nnunet.weights`).
    """

    warmup_fraction: float = 0.05

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-4
        self.weight_decay = 1e-5

    def check_configuration(self) -> None:
        require_swin_configuration(self.configuration_manager, self.configuration_name, type(self).__name__,
                                   self.plans_manager)


class nnUNetTrainerSwinUNETR_noDS(nnUNetTrainerSwinUNETR):
    """Without deep supervision: the single full-resolution output of the original SwinUNETR."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False

    @network_builder
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        network = build_planned_network(configuration_manager, num_input_channels, num_output_channels,
                                        enable_deep_supervision)
        if not enable_deep_supervision:  # the unused deep-supervision heads get no gradient (DDP needs none)
            for head in list(network.decoder.seg_layers)[:-1]:
                head.requires_grad_(False)
        return network


class HybridMIMPretrainerSwin(HybridMIMPretrainer):
    """HybridMIM on the SwinUNETR configuration, as the official Swin variant does it.

    - masking grid: sub-volumes of 32^3 voxels = one bottleneck token each (the masking grid is derived from
      the network's total stride, 32), split into 2x2x2 patches of 16^3; count/location heads act per token;
    - partial-region decoding: the raw image and every Swin map are cropped to the box, and all of SwinUNETR's
      convolutional blocks (``encoder1..4``, ``encoder10``, ``decoder5..1``) run on the crop only;
    - contrastive views differ by MONAI's own dropout (``drop_rate=0.1``: after the patch embedding, in the
      attention projection and MLP), as in the official code; no extra feature-dropout hooks. The second view
      runs the Swin transformer only (no gradient). The projection reads the mean of the bottleneck tokens
      (official: token index 1; documentation/swin.md).
    - optimiser: AdamW, lr 1e-4, weight decay 1e-5 (HybridMIM paper Sec. IV-C for both backbones; the
      official README's Swin run used 6e-6 / 0.1, copied from Swin-UNETR pretraining: ``_officialLR``), 500
      warmup iterations then cosine.

    Dropout is a pretraining-only setting (no parameters): the checkpoint loads into the plans' network
    (``drop_rate`` 0) with ``-pretrained_weights``.
    """

    family = "HybridMIMPretrainerSwin"

    encoder_dropout: float = 0.0
    swin_drop_rate: float = 0.1
    swin_initial_lr: float = 1e-4
    swin_weight_decay: float = 1e-5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.swin_initial_lr
        self.weight_decay = self.swin_weight_decay

    @network_builder
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> HybridMIMModel:
        require_swin_configuration(configuration_manager, None, trainer_name(cls))
        kwargs = {**configuration_manager.network_arch_init_kwargs, "drop_rate": cls.swin_drop_rate}
        network = get_network_from_plans(configuration_manager.network_arch_class_name, kwargs,
                                         configuration_manager.network_arch_init_kwargs_req_import,
                                         num_input_channels, num_input_channels, allow_init=True,
                                         deep_supervision=False)
        return HybridMIMModel(network, configuration_manager.patch_size, cls.mask_ratio, cls.partial_region,
                              cls.region_fraction, cls.region_placement, cls.encoder_dropout,
                              pool=cls.subvolume_cells)

    def initialize(self):
        if not self.was_initialized:
            require_swin_configuration(self.configuration_manager, self.configuration_name, type(self).__name__,
                                       self.plans_manager)
        super().initialize()
        model = self.mim_model
        if self.partial_region and int(np.prod(model.box.size)) < 2:
            raise ValueError(
                f"The partial reconstruction region of patch {model.patch_size} spans a single bottleneck token "
                f"({model.box}); SwinUNETR's instance-normed bottleneck block cannot train on it. Make one patch edge "
                f">= 96 (`nnunet_mim add-config swin ... --patch`) or pretrain with "
                f"-tr {type(self).__name__}_fullRegion.")
        self.print_to_log_file(
            f"Swin: {model.grid.num_subvolumes} bottleneck tokens = {model.grid.grid_shape} sub-volumes of "
            f"{model.grid.subvolume} voxels; contrastive views from MONAI dropout (drop_rate={self.swin_drop_rate}); "
            f"AdamW lr {self.initial_lr}, weight decay {self.weight_decay}")


class HybridMIMPretrainerSwin_fullRegion(HybridMIMPretrainerSwin):
    """Decoder on the whole patch ("Not partial" in HybridMIM Fig. 5): the speed baseline."""

    partial_region = False


class HybridMIMPretrainerSwin_officialLR(HybridMIMPretrainerSwin):
    """The official README's Swin run: AdamW lr 6e-6, weight decay 0.1 (from Swin-UNETR pretraining)."""

    swin_initial_lr = 6e-6
    swin_weight_decay = 0.1


class HybridMIMPretrainerSwin_recOnly(HybridMIMPretrainerSwin):
    """Table 4 ablation on Swin: two-level masked partial reconstruction only."""

    loss_weights = ablation_weights(ABLATIONS["recOnly"])


class HybridMIMPretrainerSwin_recCount(HybridMIMPretrainerSwin):
    """Table 4 ablation on Swin: reconstruction + masked-patch count."""

    loss_weights = ablation_weights(ABLATIONS["recCount"])


class HybridMIMPretrainerSwin_recCountLocation(HybridMIMPretrainerSwin):
    """Table 4 ablation on Swin: reconstruction + count + location."""

    loss_weights = ablation_weights(ABLATIONS["recCountLocation"])


class HybridMIMPretrainerSwin_recPerception(HybridMIMPretrainerSwin):
    """Table 4 ablation on Swin: reconstruction + count, location, consistency (no contrastive term; batch 1 works)."""

    loss_weights = ablation_weights(ABLATIONS["recPerception"])
