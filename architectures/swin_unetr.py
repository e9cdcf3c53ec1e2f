"""MONAI's SwinUNETR (Hatamizadeh et al. 2022) as an nnU-Net v2 network, split into ``encoder`` / ``decoder``.

nnU-Net instantiates the class named in the plans as ``SwinUNETR(input_channels=..., num_classes=...,
deep_supervision=..., **arch_kwargs)``; ``nnunet_mim add-config swin`` writes such a configuration
(documentation/swin.md). The wrapper builds MONAI's ``SwinUNETR`` (we do not re-implement Swin) and moves its
modules into two children, following the dynamic-network-architectures U-Net convention that nnU-Net and
:class:`nnunet_mim.architectures.hybridmim.HybridMIMModel` rely on:

* :class:`SwinUNETREncoder` -- MONAI's ``swinViT`` (patch embedding + 4 Swin stages with patch merging).
  ``encoder(x)`` returns ``[x, hs0, hs1, hs2, hs3, hs4]`` at strides 1, 2, 4, 8, 16, 32 (``strides``,
  ``output_channels``); ``hs4`` is the bottleneck (``16 * feature_size`` channels, one token per 32^3 voxels).
* :class:`SwinUNETRDecoder` -- MONAI's convolutional blocks ``encoder1..4``, ``encoder10`` (applied to the skip
  maps) and ``decoder5..1``, plus ``seg_layers`` (1x1x1 convolutions; the last is MONAI's ``out``; the others
  are nnU-Net deep-supervision heads at strides 2..16). ``decoder(skips)`` works on spatially cropped skips:
  HybridMIM's partial-region prediction crops the raw input and every Swin map and runs all convolutional
  blocks on the crop, exactly as the official HybridMIM SwinUNETR does.

Keys: ``encoder.swinViT.*`` and ``decoder.<MONAI block>.*`` (MONAI's names below the prefix), segmentation heads
``decoder.seg_layers.{0..4}.*`` -- skipped by nnU-Net's ``-pretrained_weights``.

Patch merging: MONAI 1.5 changed ``downsample="merging"`` (the 0.9-1.4 layer concatenated two sub-voxels twice
and two never; MONAI PR #8285). ``"mergingv2"`` (our default) is the standard Swin merging and means the same in
every MONAI version; ``"merging_legacy"`` (:class:`LegacyPatchMerging`) reproduces the MONAI <= 1.4 layer, which
NVIDIA's Swin-UNETR and HybridMIM's published Swin weights were trained with; ``"merging"`` is whatever the
installed MONAI does. :mod:`nnunet_mim.nnunet.swin_weights` / ``nnunet_mim convert-swin`` load such weights from a local file (``weights_only=True``; nothing is downloaded).
"""
from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "SWIN_STRIDES",
    "SWIN_DIVISOR",
    "SWIN_FEATURE_SIZE",
    "SWIN_WINDOW_SIZE",
    "DOWNSAMPLE_MODES",
    "LegacyPatchMerging",
    "SwinUNETREncoder",
    "SwinUNETRDecoder",
    "SwinUNETR",
    "check_swin_patch_size",
    "swin_patch_sizes_near",
    "build_monai_swin_unetr",
]

#: per-stage strides of the skip list [input, patch embedding, stage 1..4] (patch merging halves every axis)
SWIN_STRIDES: tuple[tuple[int, int, int], ...] = ((1, 1, 1),) + ((2, 2, 2),) * 5
#: every spatial input size must be a multiple of this (patch size 2, four patch mergings: 2 ** 5)
SWIN_DIVISOR = 32
#: Swin-UNETR's defaults (Hatamizadeh et al.; MONAI; the NVIDIA / HybridMIM pretrained weights): embedding width and
#: attention window
SWIN_FEATURE_SIZE = 48
SWIN_WINDOW_SIZE = 7
DOWNSAMPLE_MODES = ("mergingv2", "merging_legacy", "merging")

# MONAI SwinUNETR keyword -> default; only these reach MONAI (everything else is ours or nnU-Net's)
_MONAI_DEFAULTS = {
    "depths": (2, 2, 2, 2),
    "num_heads": (3, 6, 12, 24),
    "window_size": 7,
    "qkv_bias": True,
    "mlp_ratio": 4.0,
    "feature_size": 24,
    "norm_name": "instance",
    "drop_rate": 0.0,
    "attn_drop_rate": 0.0,
    "dropout_path_rate": 0.0,
    "normalize": True,
    "patch_norm": False,
    "use_checkpoint": False,
    "use_v2": False,
}
DECODER_BLOCKS = ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10",
                   "decoder5", "decoder4", "decoder3", "decoder2", "decoder1")


# ------------------------------------------------------------------------------------------ MONAI glue
def _monai():
    try:
        import monai
        from monai.networks.nets import swin_unetr
    except ImportError as e:  # pragma: no cover - monai is an install requirement
        raise ImportError("The SwinUNETR configuration needs MONAI (pip install 'monai>=1.5,<1.7').") from e
    return monai, swin_unetr


class LegacyPatchMerging(nn.Module):
    """MONAI 0.9-1.4 ``PatchMerging`` (``downsample="merging"`` before MONAI 1.5), bit for bit, 3D.

    It concatenates the 8 sub-voxels of each 2x2x2 cell in the order (d, h, w) = 000, 100, 010, 001, 101, 010,
    001, 111: sub-voxels 010 and 001 twice, 110 and 011 never (fixed in MONAI 1.5, PR #8285). NVIDIA's
    self-supervised Swin-UNETR weights and HybridMIM's Swin weights were trained with it; load them into a
    configuration built with ``downsample="merging_legacy"`` to get the features they were trained to produce.
    Same parameters and keys (``reduction``, ``norm``) as MONAI's merging layers.
    """

    ORDER = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))

    def __init__(self, dim: int, norm_layer: type[nn.Module] = nn.LayerNorm, spatial_dims: int = 3):
        super().__init__()
        if spatial_dims != 3:
            raise ValueError("LegacyPatchMerging is 3D only")
        self.dim = dim
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(8 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, D, H, W, C] -> [B, D/2, H/2, W/2, 2C]
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = nn.functional.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in self.ORDER], -1)
        return self.reduction(self.norm(x))


def build_monai_swin_unetr(in_channels: int, out_channels: int, downsample: str = "mergingv2", **kwargs) -> nn.Module:
    """MONAI ``SwinUNETR`` built portably across MONAI 1.3-1.6.

    ``img_size`` is passed only where the installed MONAI still requires it (1.3/1.4: deprecated, used only for
    a divisibility check at construction; our encoder checks every input instead). Keywords that the installed
    MONAI does not know are dropped when they hold MONAI's default and raise a clear error otherwise.
    """
    monai, swin_unetr = _monai()
    if downsample not in DOWNSAMPLE_MODES:
        raise ValueError(f"downsample must be one of {DOWNSAMPLE_MODES}, got {downsample!r}")
    unknown = set(kwargs) - set(_MONAI_DEFAULTS)
    if unknown:
        raise TypeError(f"Unknown SwinUNETR argument(s) {sorted(unknown)}; known: {sorted(_MONAI_DEFAULTS)}")
    params = inspect.signature(swin_unetr.SwinUNETR.__init__).parameters
    call = {}
    for key, value in kwargs.items():
        if key in params:
            call[key] = tuple(value) if isinstance(value, list) else value
        elif value != _MONAI_DEFAULTS[key] and not (isinstance(value, (list, tuple)) and
                                                     tuple(value) == _MONAI_DEFAULTS[key]):
            raise TypeError(f"MONAI {monai.__version__}'s SwinUNETR has no argument {key!r} (you set {value!r}); "
                            f"upgrade MONAI (nnunet_mim is tested with 1.6) or remove it from the plans' arch_kwargs.")
    if "img_size" in params:  # MONAI <= 1.4: required positional, deprecated, only validated
        call["img_size"] = (SWIN_DIVISOR,) * 3
    call["downsample"] = LegacyPatchMerging if downsample == "merging_legacy" else downsample
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return swin_unetr.SwinUNETR(in_channels=in_channels, out_channels=out_channels, spatial_dims=3, **call)


# ------------------------------------------------------------------------------------------ patch sizes
def swin_patch_sizes_near(patch_size: Sequence[int]) -> tuple[list[int], list[int]]:
    """The multiples of 32 just below (at least 32) and just above ``patch_size``, per axis."""
    below = [max(SWIN_DIVISOR, (int(p) // SWIN_DIVISOR) * SWIN_DIVISOR) for p in patch_size]
    above = [-(-int(p) // SWIN_DIVISOR) * SWIN_DIVISOR for p in patch_size]
    return below, above


def check_swin_patch_size(patch_size: Sequence[int], configuration: str | None = None,
                          require_two_tokens: bool = False) -> None:
    """Raise ``ValueError`` saying what to do when SwinUNETR cannot take ``patch_size`` (3D, multiples of 32;
    for training, ``require_two_tokens``: more than one bottleneck token)."""
    patch_size = [int(p) for p in patch_size]
    where = f" of configuration '{configuration}'" if configuration else ""
    if len(patch_size) != 3:
        raise ValueError(f"SwinUNETR in nnunet_mim is 3D only; the patch size{where} is {patch_size}. Use a 3D "
                         f"configuration (nnunet_mim add-config swin derives one from 3d_fullres).")
    if any(p % SWIN_DIVISOR or p < SWIN_DIVISOR for p in patch_size):
        below, above = swin_patch_sizes_near(patch_size)
        raise ValueError(
            f"SwinUNETR needs every patch edge to be a multiple of {SWIN_DIVISOR} (a 2x2x2 patch embedding and four "
            f"2x patch mergings), but the patch size{where} is {patch_size}. Use e.g. {below} or {above}: "
            f"`nnunet_mim add-config swin -d DATASET --patch {' '.join(map(str, below))}` writes a configuration "
            f"with such a patch (it rounds any --patch to multiples of {SWIN_DIVISOR}), or set \"patch_size\" of the "
            f"configuration in nnUNetPlans.json.")
    if require_two_tokens and all(p == SWIN_DIVISOR for p in patch_size):
        raise ValueError(f"The patch size{where} {patch_size} gives SwinUNETR a single bottleneck token, on which its "
                         f"instance norms cannot train. Make at least one edge >= {2 * SWIN_DIVISOR} (`nnunet_mim "
                         f"add-config swin -d DATASET --patch ...`).")


# ------------------------------------------------------------------------------------------ the network
class SwinUNETREncoder(nn.Module):
    """MONAI's Swin transformer; returns the skip list ``[x, hs0, ..., hs4]`` (strides 1, 2, ..., 32).

    The first "skip" is the input itself: in SwinUNETR the full-resolution branch (``encoder1``, a residual
    conv block) reads the raw image, and it belongs to the decoder side so that partial-region decoding crops
    the image, as the official HybridMIM code does.
    """

    def __init__(self, swin_vit: nn.Module, input_channels: int, feature_size: int, normalize: bool = True):
        super().__init__()
        self.swinViT = swin_vit
        self.normalize = normalize
        self.strides = [list(s) for s in SWIN_STRIDES]
        self.output_channels = [input_channels] + [feature_size * 2 ** i for i in range(5)]

    @property
    def stages(self) -> list[nn.Module]:
        """Patch embedding and the four Swin stages (for forward hooks such as HybridMIM's feature dropout).

        A plain list (not registered again), so the state_dict keys stay ``encoder.swinViT.*``.
        """
        vit = self.swinViT
        return [vit.patch_embed, vit.layers1[0], vit.layers2[0], vit.layers3[0], vit.layers4[0]]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            if x.dim() != 5 or any(s % SWIN_DIVISOR for s in x.shape[2:]):
                check_swin_patch_size(x.shape[2:])
        return [x, *self.swinViT(x, self.normalize)]


class SwinUNETRDecoder(nn.Module):
    """MONAI's convolutional SwinUNETR blocks on a (possibly cropped) skip list, plus nnU-Net's ``seg_layers``.

    ``seg_layers`` are ordered like dynamic-network-architectures' (lowest resolution first): 0..3 are
    deep-supervision heads at strides 16, 8, 4, 2; 4 is the full-resolution output (MONAI's ``out``). With
    ``deep_supervision`` the forward returns ``[stride 1, 2, 4, 8, 16]`` logits (nnU-Net's order), else one map.
    """

    def __init__(self, monai_net: nn.Module, feature_size: int, num_classes: int, deep_supervision: bool = False):
        super().__init__()
        for name in DECODER_BLOCKS:
            self.add_module(name, getattr(monai_net, name))
        f = feature_size
        self.seg_layers = nn.ModuleList(nn.Conv3d(c, num_classes, 1, bias=True) for c in (8 * f, 4 * f, 2 * f, f, f))
        self.deep_supervision = deep_supervision

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        x, hs0, hs1, hs2, hs3, hs4 = skips
        if self.training and hs4.shape[2:].numel() == 1 and isinstance(self.encoder10.layer.norm1, nn.InstanceNorm3d):
            raise ValueError(
                f"SwinUNETR's decoder got a bottleneck of a single token ({tuple(hs4.shape[2:])}; input "
                f"{tuple(x.shape[2:])}): its instance norms cannot train on one voxel. Use a patch with at least two "
                f"bottleneck tokens (one edge >= 64). For HybridMIM partial-region decoding the reconstructed box "
                f"must span >= 2 tokens: make one patch edge >= 96 or use -tr HybridMIMPretrainerSwin_fullRegion.")
        enc0 = self.encoder1(x)
        enc1 = self.encoder2(hs0)
        enc2 = self.encoder3(hs1)
        enc3 = self.encoder4(hs2)
        dec4 = self.encoder10(hs4)
        dec3 = self.decoder5(dec4, hs3)  # stride 16
        dec2 = self.decoder4(dec3, enc3)  # 8
        dec1 = self.decoder3(dec2, enc2)  # 4
        dec0 = self.decoder2(dec1, enc1)  # 2
        out = self.decoder1(dec0, enc0)  # 1
        if not self.deep_supervision:
            return self.seg_layers[-1](out)
        return [self.seg_layers[4](out), self.seg_layers[3](dec0), self.seg_layers[2](dec1),
                self.seg_layers[1](dec2), self.seg_layers[0](dec3)]


class SwinUNETR(nn.Module):
    """MONAI SwinUNETR with nnU-Net's constructor, ``encoder``/``decoder`` split and deep supervision.

    Args (``arch_kwargs`` in the plans, written by ``nnunet_mim add-config swin``):
        input_channels, num_classes, deep_supervision: given by nnU-Net.
        feature_size: Swin embedding width (multiple of 12; 48 = the paper's SwinUNETR / HybridMIM).
        depths, num_heads, window_size, qkv_bias, mlp_ratio, norm_name, drop_rate, attn_drop_rate,
        dropout_path_rate, normalize, patch_norm, use_checkpoint, use_v2: MONAI's SwinUNETR arguments.
        downsample: ``"mergingv2"`` (default, standard Swin, version-independent), ``"merging_legacy"``
            (MONAI <= 1.4 merging, for NVIDIA/HybridMIM weights) or ``"merging"`` (the installed MONAI's).
        strides: the per-stage strides nnU-Net reads as ``pool_op_kernel_sizes`` (deep-supervision scales);
            must be the Swin pyramid ``[[1,1,1]] + [[2,2,2]] * 5`` and may be omitted.
    """

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False,
                 feature_size: int = 48, downsample: str = "mergingv2",
                 strides: Sequence[Sequence[int]] | None = None, **monai_kwargs):
        super().__init__()
        if strides is not None and [list(map(int, s)) for s in strides] != [list(s) for s in SWIN_STRIDES]:
            raise ValueError(f"SwinUNETR's pyramid has strides {[list(s) for s in SWIN_STRIDES]} (the 'strides' "
                             f"arch_kwarg only tells nnU-Net its deep-supervision scales); got {strides}. "
                             f"Recreate the configuration with `nnunet_mim add-config swin`.")
        if feature_size % 12:
            raise ValueError(f"feature_size must be a multiple of 12 (MONAI SwinUNETR), got {feature_size}")
        monai_net = build_monai_swin_unetr(input_channels, num_classes, downsample, feature_size=feature_size,
                                           **monai_kwargs)
        self.encoder = SwinUNETREncoder(monai_net.swinViT, input_channels, feature_size,
                                        monai_kwargs.get("normalize", True))
        self.decoder = SwinUNETRDecoder(monai_net, feature_size, num_classes, deep_supervision)
        self.feature_size = feature_size
        self.downsample = downsample
        # dynamic-network-architectures' weight-key attributes (read by pretraining / weight-adaptation tools):
        # the encoder, the stem, and every layer that reads the raw input (its weight's dim 1 = input channels)
        self.key_to_encoder = "encoder.swinViT"
        self.key_to_stem = "encoder.swinViT.patch_embed"
        self.keys_to_in_proj = ("encoder.swinViT.patch_embed.proj", "decoder.encoder1.layer.conv1.conv",
                                "decoder.encoder1.layer.conv3.conv")
        self.key_to_lpe = None  # relative position bias only, no learnable absolute position embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.decoder(self.encoder(x))

