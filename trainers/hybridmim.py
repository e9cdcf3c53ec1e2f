"""HybridMIM pretraining (Xing et al., IEEE JBHI 2024) on the network nnU-Net planned.

    nnUNetv2_train D 3d_fullres all -tr HybridMIMPretrainer

The masking geometry is the paper's by default: 32^3-voxel sub-volumes split into 16^3 patches on every axis where
the plan's bottleneck stride and patch allow them (one bottleneck cell per sub-volume elsewhere). Variants are class
attributes, one per subclass: ``_fullRegion`` (decoder on the whole patch, for the speed comparison), ``_cellGrid``
(one bottleneck cell per sub-volume on every axis, the geometry before the paper's became the default), and the
Table 4 ablations
``_recOnly``, ``_recCount``, ``_recCountLocation`` and ``_recPerception`` (no contrastive term).
"""
from __future__ import annotations

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_mim.architectures.hybridmim import HybridMIMModel
from nnunet_mim.core.losses.contrastive import global_batch_size, nt_xent, nt_xent_chance
from nnunet_mim.core.losses.hybridmim import consistency_loss, count_loss, location_loss
from nnunet_mim.core.losses.reconstruction import masked_mse
from nnunet_mim.core.masking import apply_mask, count_and_location_labels, patch_mask_to_voxels, sample_two_level_mask
from nnunet_mim.nnunet.preview import save_reconstruction_preview
from nnunet_mim.nnunet.versions import build_planned_network, network_builder
from nnunet_mim.trainers.base import MIMPretrainerBase


#: HybridMIM Table 4: which loss terms each ablation keeps (the weights of the full method otherwise)
FULL_WEIGHTS = {"reconstruction": 1.0, "count": 0.1, "location": 0.1, "consistency": 0.01, "contrastive": 0.1}
#: a contrastive term still within this fraction of its chance level ln(2N - 1) after the first 10 % of the epochs is
#: reported as carrying no signal (a learning one falls far below: about 0.04 for separated views at batch 2)
INERT_CONTRAST_TOLERANCE = 0.01
ABLATIONS = {
    "recOnly": ("reconstruction",),
    "recCount": ("reconstruction", "count"),
    "recCountLocation": ("reconstruction", "count", "location"),
    "recPerception": ("reconstruction", "count", "location", "consistency"),
}


def ablation_weights(kept) -> dict[str, float]:
    return {k: (w if k in kept else 0.0) for k, w in FULL_WEIGHTS.items()}


class HybridMIMPretrainer(MIMPretrainerBase):
    """The whole method: two-level masking, partial-region reconstruction, patch-masking perception
    (count, location, consistency) and dropout contrastive learning.

    ``L = rec + 0.1 count + 0.1 location + 0.01 consistency + 0.1 contrastive`` (official code, Sec. 1.7 of
    the notes). AdamW, lr 1e-4, weight decay 1e-3, 500 warmup iterations then cosine (official UNet run).
    """

    mask_ratio: float = 0.4
    partial_region: bool = True
    region_fraction: float = 2 / 3  # HybridMIM: 64 of 96 voxels per axis
    region_placement: str = "center"  # the official code uses the far corner: "corner"
    encoder_dropout: float = 0.1
    #: bottleneck cells per sub-volume and axis: "paper" = the paper's 32^3-voxel sub-volumes on every axis where the
    #: plan's stride and patch allow them; ``None``: one cell, two on axes the network never downsamples
    subvolume_cells: tuple[int, int, int] | str | None = "paper"
    temperature: float = 0.5
    mask_value: float = 0.0
    loss_weights: dict[str, float] = FULL_WEIGHTS
    loss_components = ("reconstruction", "count", "location", "consistency", "contrastive")

    @network_builder
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> HybridMIMModel:
        """The planned network, built to reconstruct its input channels, wrapped with the HybridMIM heads."""
        network = build_planned_network(configuration_manager, num_input_channels, num_input_channels, False)
        return HybridMIMModel(network, configuration_manager.patch_size, cls.mask_ratio, cls.partial_region,
                              cls.region_fraction, cls.region_placement, cls.encoder_dropout,
                              pool=cls.subvolume_cells)

    family = "HybridMIMPretrainer"  # the name its variants extend (HybridMIMPretrainer_recPerception, ...)

    @property
    def uses_contrast(self) -> bool:
        return self.loss_weights["contrastive"] > 0

    _inert_contrast_reported = False

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        if self.uses_contrast and not self._inert_contrast_reported and self.current_epoch >= self.num_epochs // 10:
            value = self.logger.get_value("train_contrastive", step=-1)
            samples = global_batch_size(self.batch_size)  # a collective under DDP: once
            chance = nt_xent_chance(samples)
            if abs(value - chance) < INERT_CONTRAST_TOLERANCE * chance:
                self._inert_contrast_reported = True
                self.print_to_log_file(
                    f"WARNING: the contrastive term is at its chance level (ln(2N - 1) = {chance:.4f} for a batch of "
                    f"{samples}; {value:.4f} at epoch {self.current_epoch}): the "
                    f"projections of different images are nearly the same vector, so this term carries no signal. "
                    f"On U-Nets with instance normalisation the global mean of the bottleneck hardly depends on the "
                    f"image (so in the official HybridMIM U-Net too; documentation/hybridmim.md). Training goes on; "
                    f"-tr {self.family}_recPerception pretrains without the term.")

    def initialize(self):
        super().initialize()
        if self.uses_contrast and global_batch_size(self.batch_size) < 2:
            raise ValueError(
                f"HybridMIM's contrastive term needs a global batch size >= 2 (negatives come from other samples); "
                f"the plans give batch_size={self.configuration_manager.batch_size}. Raise 'batch_size' of "
                f"configuration '{self.configuration_name}' in the plans, or pretrain without the contrastive term: "
                f"-tr {self.family}_recPerception.")
        model = self.mim_model
        self.print_to_log_file(
            f"HybridMIM on {model.network_class_name}: patch {model.patch_size}, bottleneck stride "
            f"{model.total_stride}, {model.grid.grid_shape} sub-volumes of {model.grid.subvolume} voxels split into "
            f"2x2x2 patches of {model.grid.mask_patch}, mask ratio {self.mask_ratio}; reconstruction region "
            f"{model.region_slices()} ({'partial' if self.partial_region else 'full'}, "
            f"{100 * model.box.fraction([p // s for p, s in zip(model.patch_size, model.total_stride)]):.0f}% of "
            f"the patch); contrastive {'on' if self.uses_contrast else 'off'}")

    @property
    def mim_model(self) -> HybridMIMModel:
        return self.network.module if self.is_ddp else self.network

    def compute_losses(self, data: torch.Tensor, training: bool) -> dict[str, torch.Tensor]:
        model = self.mim_model
        patch_mask = sample_two_level_mask(data.shape[0], model.grid, self.mask_ratio, device=data.device)
        voxel_mask = patch_mask_to_voxels(patch_mask, model.grid)
        counts, locations = count_and_location_labels(patch_mask)
        out = self.network(apply_mask(data, voxel_mask, self.mask_value), second_view=training and self.uses_contrast)

        region = (slice(None), slice(None), *model.region_slices())
        losses = {
            "reconstruction": masked_mse(out.reconstruction.float(), data[region], voxel_mask[region]),
            "count": count_loss(out.count_logits.float(), counts),
            "location": location_loss(out.location_logits.float(), locations),
            "consistency": consistency_loss(out.count_logits.float(), out.location_logits.float()),
        }
        if out.projection_second_view is not None:
            losses["contrastive"] = nt_xent(out.projection.float(), out.projection_second_view.float(),
                                            self.temperature)
        total = sum(self.loss_weights[k] * v for k, v in losses.items())
        # keep every head in the graph (DDP needs a gradient for every parameter)
        losses["loss"] = total + 0.0 * out.projection.sum()
        if not training and self._preview_batch is None:
            self._preview_batch = (data[:1], voxel_mask[:1], out.reconstruction[:1])
        return losses

    def on_validation_epoch_start(self):
        self._preview_batch = None
        super().on_validation_epoch_start()

    def save_preview(self, path: str) -> None:
        image, voxel_mask, reconstruction = self._preview_batch
        save_reconstruction_preview(path, image, voxel_mask, reconstruction, self.mim_model.region_slices(),
                                    self.mask_value, title=f"HybridMIM epoch {self.current_epoch - 1}")


class HybridMIMPretrainer_fullRegion(HybridMIMPretrainer):
    """Same method, decoder on the whole patch (the speed baseline of HybridMIM Sec. IV-E)."""

    partial_region = False


class HybridMIMPretrainer_recOnly(HybridMIMPretrainer):
    """Table 4 ablation: two-level masked partial reconstruction only."""

    loss_weights = ablation_weights(ABLATIONS["recOnly"])


class HybridMIMPretrainer_recCount(HybridMIMPretrainer):
    """Table 4 ablation: reconstruction + masked-patch count."""

    loss_weights = ablation_weights(ABLATIONS["recCount"])


class HybridMIMPretrainer_recCountLocation(HybridMIMPretrainer):
    """Table 4 ablation: reconstruction + count + location (no consistency, no contrastive term)."""

    loss_weights = ablation_weights(ABLATIONS["recCountLocation"])


class HybridMIMPretrainer_cellGrid(HybridMIMPretrainer):
    """One bottleneck cell per sub-volume on every axis (e.g. 8^3 sub-volumes and 4^3 patches on a stride-8 plan)
    instead of the paper's 32^3 sub-volumes: the default before the paper's geometry became it."""

    subvolume_cells = None


class HybridMIMPretrainer_paperGrid(HybridMIMPretrainer):
    """The paper's masking geometry, which is now the default: the name is kept so that results folders and commands
    made with it still resolve."""


class HybridMIMPretrainer_recPerception(HybridMIMPretrainer):
    """Table 4 ablation: reconstruction + patch-masking perception (count, location, consistency)."""

    loss_weights = ablation_weights(ABLATIONS["recPerception"])
