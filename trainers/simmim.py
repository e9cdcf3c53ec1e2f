"""SimMIM pretraining of SAC-ViT (Xie et al. 2022; the SimMIM baseline of Chen et al. 2022, official code
ZEKAICHEN/MIM-Med3D).

    nnUNetv2_train D 3d_sac_vit all -tr SimMIMPretrainer

Variants: ``_mask50`` / ``_mask90`` (mask ratio), ``_maskBlock2`` (32-voxel in-plane masked patches, SimMIM's
"masked patch size" of 2 tokens). See documentation/mae_simmim.md.
"""
from __future__ import annotations

import torch
from torch.profiler import record_function

from nnunet_mim.architectures.mae_decoder import SimMIMNet
from nnunet_mim.architectures.sac_vit import SACViTSeg
from nnunet_mim.trainers.mae import PixelMIMMixin
from nnunet_mim.trainers.sac_vit import SACViTPretrainerBase


class SimMIMPretrainer(PixelMIMMixin, SACViTPretrainerBase):
    """SimMIM on SAC-ViT: 75 % of the tokens replaced by a learnable mask token (all tokens through the encoder),
    one linear projection per token back to its voxels, L1 on the masked voxels. AdamW lr 1e-4, weight decay 0.05
    (official MIM-Med3D SimMIM: lr 1e-4, weight decay 1e-5)."""

    @classmethod
    def wrap_network(cls, seg: SACViTSeg, num_input_channels: int) -> SimMIMNet:
        return SimMIMNet(seg, num_input_channels)

    def initialize(self):
        super().initialize()
        self._check_mask_grid()
        model = self.mim_model
        self.print_to_log_file(
            f"SimMIM on SAC-ViT (embed {model.embed_dim}, depth {len(model.encoder.blocks)}, DA {model.da}): "
            f"{self._describe_masking()}; mask tokens in the encoder, linear head to voxels")

    def compute_losses(self, data: torch.Tensor, training: bool) -> dict[str, torch.Tensor]:
        mask = self._sample_mask(data)
        with record_function("mim.simmim"):
            pred = self.network(data, mask)
        return self._pixel_losses(data, pred, mask, training)


class SimMIMPretrainer_mask50(SimMIMPretrainer):
    mask_ratio = 0.5


class SimMIMPretrainer_mask90(SimMIMPretrainer):
    mask_ratio = 0.9


class SimMIMPretrainer_maskBlock2(SimMIMPretrainer):
    """Masked units of 2 x 2 x 2 tokens (32 voxels in-plane; SimMIM's best masked patch size is 2x the ViT patch)."""

    mask_block = (2, 2, 2)
