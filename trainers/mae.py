"""MAE pretraining of SAC-ViT (He et al. 2022; the MAE baseline of Chen et al. 2022, "Masked Image Modeling
Advances 3D Medical Image Analysis", official code ZEKAICHEN/MIM-Med3D).

    nnunet_mim add-config sac-vit -d D                       # configuration 3d_sac_vit
    nnUNetv2_train D 3d_sac_vit all -tr MAEPretrainer
    nnUNetv2_train D 3d_sac_vit 0 -tr nnUNetTrainerSACViTFinetune -pretrained_weights \\
        $nnUNet_results/DatasetD_*/MAEPretrainer__nnUNetPlans__3d_sac_vit/fold_all/checkpoint_final.pth

Variants (nnU-Net style, one class attribute each): ``_mask50`` / ``_mask90`` (mask ratio), ``_maskBlock2`` (mask
units of 2x2x2 tokens = 32-voxel in-plane masked patches), ``_mse`` / ``_normPix`` (loss), ``_dec8x512`` (the
official 8-block, 512-wide decoder). See documentation/mae_simmim.md.
"""
from __future__ import annotations

import math

import torch
from torch.profiler import record_function

from nnunet_mim.architectures.mae_decoder import MAENet
from nnunet_mim.architectures.sac_vit import SACViTSeg
from nnunet_mim.core.losses.reconstruction import masked_l1, masked_mse
from nnunet_mim.core.patches import block_token_mask, grid_of, mae_indices, patchify, token_mask_to_voxels, unpatchify
from nnunet_mim.nnunet.preview import save_reconstruction_preview
from nnunet_mim.trainers.sac_vit import SACViTPretrainerBase


def normalized_patch_targets(target: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE ``norm_pix_loss``: each patch vector ``[..., P]`` standardised by its own mean / (unbiased) variance.
    Returns ``(normalised, mean, std)``."""
    mean = target.mean(-1, keepdim=True)
    std = (target.var(-1, keepdim=True) + eps).sqrt()
    return (target - mean) / std, mean, std


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor, kind: str = "l1"
                      ) -> torch.Tensor:
    """Mean L1 (or squared) error over the voxels of the masked tokens only. ``pred`` / ``target``: ``[B, N, P]``;
    ``token_mask``: bool ``[B, N]``."""
    fn = {"l1": masked_l1, "mse": masked_mse}[kind]
    return fn(pred, target, token_mask.unsqueeze(-1))


class PixelMIMMixin:
    """Shared by MAE and SimMIM: mask sampling on the token grid, patch targets, loss, preview."""

    mask_ratio: float = 0.75
    mask_block: tuple[int, int, int] = (1, 1, 1)  # mask unit in tokens (SimMIM's masked patch size / token size)
    loss_type: str = "l1"
    norm_pix: bool = False
    loss_components = ("reconstruction",)

    def _check_mask_grid(self) -> None:
        model = self.mim_model
        grid = model.token_grid()
        try:
            grid_of(grid, self.mask_block)
        except ValueError:
            raise ValueError(f"{type(self).__name__} masks blocks of {self.mask_block} tokens, but the token grid "
                             f"{grid} of patch {list(model.patch_size)} is not divisible by it; choose a patch whose "
                             f"token grid is (`nnunet_mim add-config sac-vit --patch ...`).") from None
        n_units = math.prod(grid) // math.prod(self.mask_block)
        masked = int(self.mask_ratio * n_units)
        if masked < 1 or masked >= n_units:
            raise ValueError(f"{type(self).__name__}: mask ratio {self.mask_ratio} of {n_units} mask unit(s) (token grid "
                             f"{grid}, blocks of {self.mask_block} tokens) masks {masked}: at least one unit must be "
                             f"masked and one visible; use a larger patch (`nnunet_mim add-config sac-vit --patch ...`).")

    def _describe_masking(self) -> str:
        model = self.mim_model
        grid = model.token_grid()
        n = math.prod(grid)
        unit = tuple(b * t for b, t in zip(self.mask_block, model.token_size))
        n_units = n // math.prod(self.mask_block)
        return (f"token {model.token_size} voxels, grid {grid} ({n} tokens), masked units of {unit} voxels: "
                f"{int(self.mask_ratio * n_units)} of {n_units} masked (ratio {self.mask_ratio}); loss "
                f"{self.loss_type}{' on per-patch normalised targets' if self.norm_pix else ''} on masked patches")

    def _sample_mask(self, data: torch.Tensor) -> torch.Tensor:
        return block_token_mask(data.shape[0], self.mim_model.token_grid(), self.mask_ratio, self.mask_block,
                                device=data.device)

    def _pixel_losses(self, data: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, training: bool
                      ) -> dict[str, torch.Tensor]:
        model = self.mim_model
        target = patchify(data.float(), model.token_size)
        stats = None
        if self.norm_pix:
            target, mean, std = normalized_patch_targets(target)
            stats = (mean, std)
        loss = masked_patch_loss(pred.float(), target, mask, self.loss_type)
        if not training and self._preview_batch is None:
            shown = pred[:1].detach().float()
            if stats is not None:  # back to intensities for the picture
                shown = shown * stats[1][:1] + stats[0][:1]
            grid = model.token_grid(data.shape[2:])
            self._preview_batch = (data[:1].detach(), token_mask_to_voxels(mask[:1], grid, model.token_size),
                                   unpatchify(shown, grid, model.token_size, data.shape[1]))
        return {"reconstruction": loss, "loss": loss}

    def save_preview(self, path: str) -> None:
        image, voxel_mask, reconstruction = self._preview_batch
        save_reconstruction_preview(path, image, voxel_mask, reconstruction, None, 0.0,
                                    title=f"{type(self).__name__} epoch {self.current_epoch - 1}")


class MAEPretrainer(PixelMIMMixin, SACViTPretrainerBase):
    """MAE on SAC-ViT: mask 75 % of the tokens uniformly, encode the visible 25 % only, decode with a lightweight
    transformer (default 2 blocks of width 384; official 8 x 512), L1 on the masked patches (official; ``_mse`` and
    ``_normPix`` variants). AdamW lr 1e-4, weight decay 0.05, warmup + cosine (shared by the SAC-ViT pretrainers for
    comparability; official MIM-Med3D MAE: lr 3e-4 on 16 crops per GPU)."""

    decoder_dim: int = 384
    decoder_depth: int = 2
    decoder_heads: int = 6

    @classmethod
    def wrap_network(cls, seg: SACViTSeg, num_input_channels: int) -> MAENet:
        return MAENet(seg, num_input_channels, cls.decoder_dim, cls.decoder_depth, cls.decoder_heads)

    def initialize(self):
        super().initialize()
        self._check_mask_grid()
        model = self.mim_model
        self.print_to_log_file(
            f"MAE on SAC-ViT (embed {model.embed_dim}, depth {len(model.encoder.blocks)}, DA {model.da}): "
            f"{self._describe_masking()}; the encoder sees the visible tokens only; decoder {self.decoder_depth} x "
            f"{self.decoder_dim} (heads {self.decoder_heads})")

    def compute_losses(self, data: torch.Tensor, training: bool) -> dict[str, torch.Tensor]:
        mask = self._sample_mask(data)
        ids_keep, ids_restore, _ = mae_indices(mask)
        with record_function("mim.mae"):
            pred = self.network(data, ids_keep, ids_restore)
        return self._pixel_losses(data, pred, mask, training)


class MAEPretrainer_mask50(MAEPretrainer):
    mask_ratio = 0.5


class MAEPretrainer_mask90(MAEPretrainer):
    mask_ratio = 0.9


class MAEPretrainer_maskBlock2(MAEPretrainer):
    """Masked units of 2 x 2 x 2 tokens (32 voxels in-plane)."""

    mask_block = (2, 2, 2)


class MAEPretrainer_mse(MAEPretrainer):
    loss_type = "mse"


class MAEPretrainer_normPix(MAEPretrainer):
    """MSE on per-patch normalised targets (MAE's ``norm_pix_loss``)."""

    loss_type = "mse"
    norm_pix = True


class MAEPretrainer_dec8x512(MAEPretrainer):
    """The official MIM-Med3D / MAE decoder: 8 blocks of width 512, 8 heads."""

    decoder_dim = 512
    decoder_depth = 8
    decoder_heads = 8
