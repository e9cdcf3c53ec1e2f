"""A naive contrastive baseline for the MIM comparison of Chen et al. 2022: SimCLR (Chen et al. 2020) on SAC-ViT.

    nnUNetv2_train D 3d_sac_vit all -tr SimCLRPretrainer

Each sample of nnU-Net's (already augmented) batch gives two views: an independent random resized crop (volume
fraction U(0.35, 1), resized back to the patch), random flips and a random intensity scale / shift / Gaussian noise.
The encoder's mean patch token goes through a 2-layer projector; loss NT-Xent (``nnunet_mim.core.losses.contrastive``,
shared with HybridMIM; negatives gathered across DDP ranks), temperature 0.5.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.profiler import record_function

from nnunet_mim.architectures.sac_vit import SACViTPretrainNet, SACViTSeg
from nnunet_mim.core.losses.contrastive import global_batch_size, nt_xent
from nnunet_mim.trainers.sac_vit import SACViTPretrainerBase
from nnunet_mim.nnunet.preview import save_volume_panels


def random_resized_crop(x: torch.Tensor, volume_fraction: tuple[float, float] = (0.35, 1.0),
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """One sample ``[C, D, H, W]``: a random box of ``U(volume_fraction)`` of the volume (edge ratios jittered by
    up to 1.25x), resized back to ``[D, H, W]`` with trilinear interpolation."""
    shape = x.shape[1:]
    s = float(torch.empty(1).uniform_(*volume_fraction, generator=generator))
    jitter = torch.empty(3).uniform_(0.8, 1.25, generator=generator)
    jitter = jitter / jitter.prod() ** (1 / 3)
    edges = [max(1, min(n, round(n * s ** (1 / 3) * float(j)))) for n, j in zip(shape, jitter)]
    starts = [int(torch.randint(0, n - e + 1, (1,), generator=generator)) for n, e in zip(shape, edges)]
    box = x[:, starts[0]:starts[0] + edges[0], starts[1]:starts[1] + edges[1], starts[2]:starts[2] + edges[2]]
    return F.interpolate(box[None], size=tuple(shape), mode="trilinear", align_corners=False)[0]


def simclr_view(batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """An augmented view of every sample of ``[B, C, D, H, W]`` (crop-resize, flips, intensity)."""
    views = []
    for x in batch:
        v = random_resized_crop(x, generator=generator)
        for axis in (1, 2, 3):
            if float(torch.rand(1, generator=generator)) < 0.5:
                v = v.flip(axis)
        scale = float(torch.empty(1).uniform_(0.8, 1.2, generator=generator))
        shift = float(torch.empty(1).uniform_(-0.2, 0.2, generator=generator))
        sigma = float(torch.empty(1).uniform_(0.0, 0.1, generator=generator))
        noise = torch.randn(v.shape, generator=generator).to(v.device) * sigma
        views.append(v * scale + shift + noise)
    return torch.stack(views)


class SimCLRNet(SACViTPretrainNet):
    """SAC-ViT encoder -> mean of the patch tokens -> projector ``Linear - GELU - Linear`` (``mim_projector``)."""

    def __init__(self, seg: SACViTSeg, projection_dim: int = 128):
        super().__init__(seg)
        c = self.embed_dim
        self.mim_projector = nn.Sequential(nn.Linear(c, c), nn.GELU(), nn.Linear(c, projection_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_tokens(self.encoder.forward_features(x, da=self.da))
        return self.mim_projector(tokens.mean(1))


class SimCLRPretrainer(SACViTPretrainerBase):
    """SimCLR on SAC-ViT (two augmented views per sample, NT-Xent with temperature 0.5). Needs a global batch of at
    least 2 (negatives come from the other samples)."""

    temperature: float = 0.5
    projection_dim: int = 128
    loss_components = ("nt_xent", "positive_cosine")

    @classmethod
    def wrap_network(cls, seg: SACViTSeg, num_input_channels: int) -> SimCLRNet:
        return SimCLRNet(seg, cls.projection_dim)

    def initialize(self):
        super().initialize()
        if global_batch_size(self.batch_size) < 2:
            raise ValueError(f"SimCLR needs a global batch size >= 2 (negatives are the other samples); the plans give "
                             f"batch_size={self.configuration_manager.batch_size}. Raise it (`nnunet_mim add-config "
                             f"sac-vit ... --batch-size 2`).")
        self.print_to_log_file(f"SimCLR on SAC-ViT: two views per sample (crop-resize, flips, intensity), mean patch "
                               f"token -> projector {self.mim_model.embed_dim}->{self.projection_dim}, NT-Xent "
                               f"temperature {self.temperature}")

    def compute_losses(self, data: torch.Tensor, training: bool) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            v1, v2 = simclr_view(data), simclr_view(data)
        b = data.shape[0]
        with record_function("mim.simclr"):
            z = self.network(torch.cat([v1, v2])).float()
        z1, z2 = z[:b], z[b:]
        loss = nt_xent(z1, z2, self.temperature)
        cosine = F.cosine_similarity(z1.detach(), z2.detach(), dim=-1).mean()
        if not training and self._preview_batch is None:
            self._preview_batch = (data[:1].detach(), v1[:1], v2[:1])
        return {"nt_xent": loss, "positive_cosine": cosine, "loss": loss}

    def save_preview(self, path: str) -> None:
        image, v1, v2 = (t[0, 0].float().cpu().numpy() for t in self._preview_batch)
        save_volume_panels(path, [("input", image, "gray"), ("view 1", v1, "gray"), ("view 2", v2, "gray")],
                           f"SimCLR views, epoch {self.current_epoch - 1}")
