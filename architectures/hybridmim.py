"""The HybridMIM pretraining model (Xing et al.) around any encoder/decoder segmentation network.

The network must follow dynamic-network-architectures' U-Net convention, which nnU-Net's own
networks (``PlainConvUNet``, ``ResidualEncoderUNet``) and our SwinUNETR wrapper share:

- ``network.encoder(x)`` returns the list of skip maps, highest resolution first, bottleneck last;
  ``network.encoder.strides`` are the per-stage strides and ``network.encoder.output_channels`` the
  channels per stage;
- ``network.decoder(skips)`` maps such a list (possibly cropped) to the output at the resolution of
  the first skip, and has a ``deep_supervision`` flag.

:class:`HybridMIMModel` *re-registers* the network's ``encoder`` and ``decoder`` as its own children and
adds ``mim_heads``: its state_dict has exactly the network's keys plus ``mim_heads.*``, so a pretraining
checkpoint loads into the segmentation network with nnU-Net's stock ``-pretrained_weights``. One
``forward`` computes everything that needs gradients, which keeps DDP and torch.compile working.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from nnunet_mim.core.masking import COUNT_CLASSES, LOCATIONS_PER_SUBVOLUME, TwoLevelGrid, derive_grid, subvolume_features
from nnunet_mim.core.regions import RegionBox, crop_skips, level_scales, region_box


class HybridMIMHeads(nn.Module):
    """Count (9-way), location (8-way) and contrastive projection heads on bottleneck features.

    Linear heads as in the official code (count/location: ``Linear(C, 9)``, ``Linear(C, 8)`` per
    sub-volume; contrastive: ``Linear(C, 384)`` on the globally averaged bottleneck).
    """

    def __init__(self, bottleneck_channels: int, projection_dim: int = 384):
        super().__init__()
        self.count = nn.Linear(bottleneck_channels, COUNT_CLASSES)
        self.location = nn.Linear(bottleneck_channels, LOCATIONS_PER_SUBVOLUME)
        self.projection = nn.Linear(bottleneck_channels, projection_dim)


@dataclass
class HybridMIMOutput:
    reconstruction: torch.Tensor  # [B, C, *region] (or the full patch)
    count_logits: torch.Tensor  # [B, N_sub, 9]
    location_logits: torch.Tensor  # [B, N_sub, 8]
    projection: torch.Tensor  # [B, P], view 1 (with gradient)
    projection_second_view: torch.Tensor | None  # [B, P], view 2 (no gradient), None if not requested


def check_encoder_decoder_network(network: nn.Module) -> None:
    """Raise a clear error if ``network`` does not follow the encoder/decoder convention we rely on."""
    missing = [a for a in ("encoder", "decoder") if not isinstance(getattr(network, a, None), nn.Module)]
    if missing or not hasattr(network.encoder, "strides") or not hasattr(network.encoder, "output_channels"):
        raise TypeError(
            f"{type(network).__name__} cannot be pretrained with HybridMIM: it needs `encoder` (returning all skips, "
            f"with `strides` and `output_channels`) and `decoder` sub-modules, like nnU-Net's PlainConvUNet, "
            f"ResidualEncoderUNet or nnunet_mim's SwinUNETR wrapper.")
    own = list(network.named_parameters(recurse=False)) + list(network.named_buffers(recurse=False))
    extra_children = [n for n, _ in network.named_children() if n not in ("encoder", "decoder")]
    if own or extra_children:
        raise TypeError(f"{type(network).__name__} has parameters outside `encoder`/`decoder` "
                        f"({[n for n, _ in own] + extra_children}); HybridMIMModel would not save them.")


def add_feature_dropout(encoder: nn.Module, p: float) -> list:
    """Element-wise dropout after every encoder stage, via forward hooks (no new state_dict keys).

    HybridMIM's contrastive views differ only by dropout (SimCSE). nnU-Net's planned networks carry no
    dropout; adding ``nn.Dropout`` modules would shift ``nn.Sequential`` indices and break weight transfer.
    Returns the hook handles.
    """
    if p <= 0:
        return []
    stages = list(getattr(encoder, "stages", []))
    stem = getattr(encoder, "stem", None)
    if stem is not None:
        stages = [stem] + stages
    if not stages:
        raise TypeError(f"{type(encoder).__name__} has no `stages`; cannot add feature dropout")

    def hook(module: nn.Module, inputs, output):
        return F.dropout(output, p, module.training)

    return [s.register_forward_hook(hook) for s in stages]


class HybridMIMModel(nn.Module):
    """Two-level masked reconstruction with partial decoding, perception heads and dropout contrast.

    ``forward(x_masked)`` runs the encoder on the masked patch, the decoder on the cropped region's skip
    maps (HybridMIM Sec. III-B) or on the whole patch (``partial_region=False``), pools the bottleneck per
    sub-volume for the count/location heads (Sec. III-C), and projects the global bottleneck mean for the
    contrastive term (Sec. III-D), whose second view is a no-grad encoder pass that differs by dropout only.
    """

    def __init__(self, network: nn.Module, patch_size: Sequence[int], mask_ratio: float = 0.4,
                 partial_region: bool = True, region_fraction: float = 2 / 3, region_placement: str = "center",
                 encoder_dropout: float = 0.1, projection_dim: int = 384, pool: Sequence[int] | str | None = None):
        super().__init__()
        check_encoder_decoder_network(network)
        self.encoder = network.encoder
        self.decoder = network.decoder
        self.decoder.deep_supervision = False
        for head in list(getattr(self.decoder, "seg_layers", []))[:-1]:
            head.requires_grad_(False)  # deep-supervision heads are unused here (DDP needs no unused params)
        self.network_class_name = type(network).__name__
        self.mim_heads = HybridMIMHeads(int(network.encoder.output_channels[-1]), projection_dim)

        strides = [tuple(int(i) for i in s) for s in network.encoder.strides]
        if any(i != 1 for i in strides[0]):
            raise ValueError(f"The first encoder stage must keep full resolution (stride 1), got {strides[0]}: the "
                             f"reconstruction is read from the decoder's highest-resolution output.")
        self.scales = level_scales(strides)
        self.total_stride = tuple(int(i) for i in np.prod(np.asarray(strides), axis=0))
        self.patch_size = tuple(int(p) for p in patch_size)
        self.grid: TwoLevelGrid = derive_grid(self.patch_size, self.total_stride, pool)
        bottleneck_shape = tuple(p // s for p, s in zip(self.patch_size, self.total_stride))
        self.mask_ratio = mask_ratio
        self.partial_region = partial_region
        self.box: RegionBox = region_box(bottleneck_shape, region_fraction if partial_region else 1.0,
                                         region_placement)
        self._dropout_hooks = add_feature_dropout(self.encoder, encoder_dropout)

    def region_slices(self) -> tuple[slice, ...]:
        """Voxel slices of the reconstructed region inside the input patch."""
        return self.box.slices_at(self.total_stride)

    def forward(self, x_masked: torch.Tensor, second_view: bool = True) -> HybridMIMOutput:
        # record_function scopes name the parts in profiles (nnunet_mim benchmark --profile); free otherwise
        with record_function("hybridmim.encoder"):
            skips = self.encoder(x_masked)
        with record_function("hybridmim.decoder"):
            decoder_input = crop_skips(skips, self.box, self.scales) if self.partial_region else skips
            reconstruction = self.decoder(decoder_input)
        with record_function("hybridmim.heads"):
            bottleneck = skips[-1]
            per_subvolume = subvolume_features(bottleneck, self.grid.pool)
            projection = self.mim_heads.projection(bottleneck.flatten(2).mean(-1))
            count, location = self.mim_heads.count(per_subvolume), self.mim_heads.location(per_subvolume)
        projection_second_view = None
        if second_view:
            with torch.no_grad(), record_function("hybridmim.second_view"):
                projection_second_view = self.mim_heads.projection(self.encoder(x_masked)[-1].flatten(2).mean(-1))
        return HybridMIMOutput(reconstruction, count, location, projection, projection_second_view)
