"""Downstream probes: how much segmentation-relevant information does a (pretrained) body hold?

    nnunet_mim probe <checkpoint> -d D -c C          # runs these trainers twice: pretrained and random body

A probe trains only a light part of the segmentation network on a few labelled cases, for a short budget, with the
rest frozen; its validation Dice on held-out cases is the measure. Run for a pretrained checkpoint and for a random
initialisation of the same network (same seed), the difference is the signal.

- ``...Probe``: everything frozen but the segmentation heads (``.seg_layers.``: 1x1x1 convolutions on the decoder's
  features at each scale, nnU-Net's deep supervision);
- ``...ProbeDecoder``: the encoder frozen, decoder and heads trained (for pretrainers that leave the decoder at its
  initialisation, e.g. MAE / SimMIM / token MIM on SAC-ViT).

Frozen parameters get ``requires_grad=False`` before the optimiser is built, so they never change (the optimiser
never sees a gradient for them, and weight decay only touches parameters with gradients). One variant per network
family, because nnU-Net's trainer also decides which network it builds: U-Net / ResEnc (nnU-Net's plans), SwinUNETR
and SAC-ViT (our configurations). The recipe is AdamW with warmup and cosine, lr 1e-3, seeded by the probe command.
"""
from __future__ import annotations

from nnunet_mim.nnunet.weights import freeze_all_but, unwrap
from nnunet_mim.trainers.finetune import nnUNetTrainerMIMFinetuneAdamW
from nnunet_mim.trainers.sac_vit import nnUNetTrainerSACViT
from nnunet_mim.trainers.swin import nnUNetTrainerSwinUNETR

class ProbeMixin:
    """Freeze all but :attr:`probe_part` of the network before the optimiser is built."""

    probe_part: str = "heads"
    probe_lr: float = 1e-3

    def configure_optimizers(self):
        trained, total = freeze_all_but(unwrap(self.network), self.probe_part)
        self.initial_lr = self.probe_lr
        self.weight_decay = 0.0
        self.print_to_log_file(f"Probe: training the {self.probe_part} only ({trained:,} of {total:,} parameters); "
                               f"everything else is frozen")
        return super().configure_optimizers()


class nnUNetTrainerProbe(ProbeMixin, nnUNetTrainerMIMFinetuneAdamW):
    """Probe of nnU-Net's U-Nets (PlainConvUNet, ResEnc): segmentation heads only."""


class nnUNetTrainerProbeDecoder(ProbeMixin, nnUNetTrainerMIMFinetuneAdamW):
    """Probe of nnU-Net's U-Nets: decoder and heads, encoder frozen."""

    probe_part = "decoder"


class nnUNetTrainerSwinUNETRProbe(ProbeMixin, nnUNetTrainerSwinUNETR):
    """Probe of SwinUNETR configurations: segmentation heads only."""


class nnUNetTrainerSwinUNETRProbeDecoder(ProbeMixin, nnUNetTrainerSwinUNETR):
    probe_part = "decoder"


class nnUNetTrainerSACViTProbe(ProbeMixin, nnUNetTrainerSACViT):
    """Probe of SAC-ViT configurations: segmentation heads only."""


class nnUNetTrainerSACViTProbeDecoder(ProbeMixin, nnUNetTrainerSACViT):
    probe_part = "decoder"


def probe_trainer_for(network_class_name: str, part: str = "heads") -> str:
    """The probe trainer for a configuration's ``network_class_name``."""
    short = network_class_name.split(".")[-1]
    family = {"SwinUNETR": "nnUNetTrainerSwinUNETRProbe", "SACViTSeg": "nnUNetTrainerSACViTProbe"}.get(
        short, "nnUNetTrainerProbe")
    return family + ("Decoder" if part == "decoder" else "")


__all__ = ["ProbeMixin", "probe_trainer_for", "nnUNetTrainerProbe", "nnUNetTrainerProbeDecoder",
           "nnUNetTrainerSwinUNETRProbe", "nnUNetTrainerSwinUNETRProbeDecoder", "nnUNetTrainerSACViTProbe",
           "nnUNetTrainerSACViTProbeDecoder"]
