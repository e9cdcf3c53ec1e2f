"""Third-party SwinUNETR weights (NVIDIA Swin-UNETR SSL, HybridMIM, MONAI) -> our :class:`SwinUNETR` wrapper.

Reads a *local* file with ``weights_only=True`` (nothing is downloaded); ``nnunet_mim convert-swin`` writes the result
as a ``-pretrained_weights`` file for a planned Swin configuration.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch

from nnunet_mim.architectures.swin_unetr import DECODER_BLOCKS, SwinUNETR
from nnunet_mim.nnunet.weights import WRAPPER_PREFIXES, load_checkpoint, strip_wrapper_prefixes

class SwinLoadReport(NamedTuple):
    loaded: list[str]  # our keys filled from the file
    fresh: list[str]  # our keys the file does not have (left as initialised)
    dropped: list[str]  # file keys with no place in the network (pretext heads, other shapes)
    segmentation: list[str]  # our seg_layers keys (never loaded: num_classes differs)

    def summary(self) -> str:
        return (f"{len(self.loaded)} tensors loaded, {len(self.fresh)} left as initialised "
                f"({_summarise(self.fresh)}), {len(self.dropped)} in the file unused ({_summarise(self.dropped)}), "
                f"segmentation heads not loaded")


def _summarise(keys: Sequence[str], n: int = 4) -> str:
    tops = sorted({".".join(k.split(".")[:2]) for k in keys})
    return ", ".join(tops[:n]) + (f", ... ({len(tops)} groups)" if len(tops) > n else "") if tops else "none"


_WRAPPERS = (*WRAPPER_PREFIXES, "model.")


def convert_third_party_swin_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a MONAI-style SwinUNETR / Swin-ViT state_dict to this wrapper's keys.

    Understands (after stripping ``module.``): a full MONAI ``SwinUNETR`` state_dict (``swinViT.*``,
    ``encoder1.*`` ... ``out.*``; HybridMIM's pretraining checkpoints add heads that are dropped), and the
    Swin-UNETR self-supervised encoder (NVIDIA ``model_swinvit.pt``: ``patch_embed.*``, ``layers1.0.*`` with
    ``mlp.fc1/fc2``, or ``swin_vit.*``). Keys it cannot place keep their name and are reported as unused.
    """
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = strip_wrapper_prefixes(key, _WRAPPERS)
        key = key.replace("swin_vit.", "swinViT.")
        key = re.sub(r"\.mlp\.fc([12])\.", lambda m: f".mlp.linear{m.group(1)}.", key)
        if key.startswith(("patch_embed.", "layers1", "layers2", "layers3", "layers4", "pos_drop")):
            key = "swinViT." + key
        head = key.split(".")[0]
        if head == "swinViT":
            key = "encoder." + key
        elif head in DECODER_BLOCKS:
            key = "decoder." + key
        elif key.startswith("out.conv.conv."):
            key = "decoder.seg_layers.4." + key[len("out.conv.conv."):]
        out[key] = value
    return out


def load_third_party_swin_weights(network: SwinUNETR, path: str, verbose: bool = True) -> SwinLoadReport:
    """Load NVIDIA Swin-UNETR / HybridMIM / MONAI SwinUNETR weights from a *local* file into ``network``.

    ``torch.load(weights_only=True)`` on the CPU (via :func:`nnunet_mim.nnunet.weights.load_checkpoint`); nothing is
    downloaded. Tensors whose key and shape match are copied; segmentation heads are never loaded. Those
    weights were trained with MONAI <= 1.4's patch merging: build the network with
    ``downsample="merging_legacy"`` (a warning says so otherwise).
    """
    checkpoint = load_checkpoint(path)
    for key in ("state_dict", "network_weights", "model"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    source = convert_third_party_swin_state_dict(checkpoint)
    target = network.state_dict()
    loaded, dropped, mismatched = [], [], []
    for k, v in source.items():
        if ".seg_layers." in k:
            continue
        if k not in target:
            dropped.append(k)
        elif tuple(target[k].shape) != tuple(v.shape):
            mismatched.append(f"{k}: {tuple(v.shape)} in the file, {tuple(target[k].shape)} in the network")
        else:
            target[k] = v.to(target[k].dtype)
            loaded.append(k)
    if mismatched or not loaded:
        raise ValueError(
            f"{path} does not fit this SwinUNETR (feature_size={network.feature_size}, "
            f"{network.encoder.output_channels[0]} input channel(s)): "
            + (f"{len(mismatched)} tensors have another shape, e.g. {mismatched[:3]}. " if mismatched else
               f"no tensor matches (unused keys, e.g. {dropped[:5]}). ")
            + "Create the configuration with the checkpoint's feature size (`nnunet_mim add-config swin "
              "--feature-size 48` for NVIDIA's and HybridMIM's weights) and the same input channels.")
    segmentation = [k for k in target if ".seg_layers." in k]
    fresh = [k for k in target if k not in loaded and k not in segmentation]
    network.load_state_dict(target)
    report = SwinLoadReport(loaded, fresh, dropped, segmentation)
    if getattr(network, "downsample", None) != "merging_legacy" and any(".downsample." in k for k in loaded):
        warnings.warn(f"{path}: third-party Swin weights (NVIDIA, HybridMIM) were trained with MONAI <= 1.4's patch "
                      f"merging, but this network uses downsample={network.downsample!r}: the merging layers "
                      f"will mix other sub-voxels than in training. Create the configuration with "
                      f"`nnunet_mim add-config swin ... --downsample merging_legacy`.", stacklevel=2)
    if verbose:
        print(f"Third-party Swin weights {path}: {report.summary()}")
    return report
