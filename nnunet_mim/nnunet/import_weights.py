"""Third-party / other-plan checkpoints -> a configuration of the target dataset and a ``-pretrained_weights`` file.

Three steps, each a function (``nnunet_mim import-weights`` runs them in order):

1. :func:`configuration_overrides`: a new configuration inheriting the target's ``3d_fullres`` (its normalisation
   and resampling are never changed) with the checkpoint's architecture, and by default its spacing and recommended
   patch. Another spacing means another ``data_identifier``: the data must then be preprocessed for it.
2. :func:`convert_weights`: every tensor of the network nnU-Net builds for that configuration (built by the trainer's
   ``build_network_architecture``, see :func:`nnunet_mim.nnunet.networks.build_network_for`) is filled in place
   from the checkpoint by key (after mapping nnssl's ``key_to_encoder`` / ``key_to_stem`` / ``key_to_lpe`` onto the
   network's own) and shape, or adapted (input channels, kernel sizes, position-embedding grid:
   ``nnunet_mim.core.adapt``, ``nnunet_mim.core.pos_embed``), or left as initialised ("fresh"); segmentation heads
   are never transferred. Tensors shared by two keys (the ResEnc decoder's ``decoder.encoder.*``) are one entry.
   The written file holds the *whole* state dict, so nnU-Net's own loader and ours accept it.
3. :func:`plan_warnings`: normalisation and spacing that differ between pretraining and target.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from nnunet_mim.core.adapt import adapt_kernel, map_input_channels, spread_input_channels
from nnunet_mim.nnunet.checkpoint_formats import SourceModel
from nnunet_mim.architectures.swin_unetr import SWIN_DIVISOR, SWIN_FEATURE_SIZE, SWIN_WINDOW_SIZE
from nnunet_mim.nnunet.plans import round_patch
from nnunet_mim.nnunet.weights import PRETRAINING_ONLY_PREFIXES, input_projection_key, is_segmentation_head

#: trainer to finetune each family with (Primus has no deep supervision; Swin has its own trainer)
DEFAULT_TRAINERS = {"unet": "nnUNetTrainerMIMFinetune", "primus": "nnUNetTrainerMIMFinetunePrimus",
                    "swin": "nnUNetTrainerSwinUNETR"}
SPACING_RTOL = 0.05  # relative spacing difference below which two spacings count as the same
ROLES = ("lpe", "stem", "encoder")  # most specific first


# ---- 1. the configuration ------------------------------------------------------------------------------------------

def configuration_overrides(source: SourceModel, parent_config: dict, name: str, plans_identifier: str,
                            patch_size: Sequence[int] | None = None, batch_size: int | None = None,
                            spacing: str = "checkpoint") -> dict:
    """Overrides of ``parent_config`` (resolved) for a configuration that can take ``source``'s weights.

    ``spacing="checkpoint"`` uses the pretraining spacing when the checkpoint has one (and then a data identifier of
    its own when it differs from the parent's); ``"target"`` keeps the parent's spacing and preprocessed data."""
    if spacing not in ("checkpoint", "target"):
        raise ValueError(f"spacing must be 'checkpoint' or 'target', got {spacing!r}")
    patch = list(patch_size or source.patch_size or parent_config["patch_size"])
    if len(patch) != len(parent_config["patch_size"]):
        raise ValueError(f"Patch {patch} has {len(patch)} axes, the parent configuration "
                         f"{len(parent_config['patch_size'])}: give --patch with as many axes, and derive a 3D network "
                         f"from a 3D configuration (--parent 3d_fullres).")
    batch = int(batch_size or parent_config["batch_size"])
    if source.family == "primus":
        from nnunet_mim.nnunet.primus_plans import primus_configuration

        kwargs = dict(source.architecture["arch_kwargs"])
        embed = kwargs.pop("patch_embed_size")
        kwargs.pop("input_shape", None)
        overrides = primus_configuration(parent_config, kwargs, patch, batch, embed)
    elif source.family == "swin" and source.architecture is None:
        from nnunet_mim.nnunet.plans import swin_configuration

        overrides = swin_configuration(parent_config, source.swin_feature_size or SWIN_FEATURE_SIZE, patch, batch,
                                       downsample="merging_legacy",  # third-party Swin weights: MONAI <= 1.4 merging
                                       window_size=source.swin_window_size or SWIN_WINDOW_SIZE)
    elif source.architecture is not None:
        arch = {**source.architecture, "arch_kwargs": dict(source.architecture["arch_kwargs"])}
        if source.family == "unet":
            patch = round_patch(patch, np.prod(np.asarray(arch["arch_kwargs"]["strides"]), axis=0), up=True)
        elif source.family == "swin":
            patch = round_patch(patch, SWIN_DIVISOR)
        overrides = {"patch_size": [int(p) for p in patch], "batch_size": batch, "architecture": arch}
    else:
        raise ValueError("This checkpoint does not say which network it belongs to (a plain state dict): convert it "
                         "into an existing configuration with --into CONFIGURATION.")
    if spacing == "checkpoint" and source.spacing and not same_spacing(source.spacing, parent_config["spacing"]):
        overrides["spacing"] = [float(s) for s in source.spacing]
        overrides["data_identifier"] = f"{plans_identifier}_{name}"
    return overrides


def same_spacing(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and bool(np.allclose(a, b, rtol=SPACING_RTOL))


# ---- 2. the weights ------------------------------------------------------------------------------------------------

@dataclass
class ImportReport:
    """What happened to every tensor of the target network (aliases counted once)."""

    loaded: list[str] = field(default_factory=list)
    adapted: list[tuple[str, str]] = field(default_factory=list)  # key, how
    fresh: list[tuple[str, str]] = field(default_factory=list)  # key, why
    segmentation: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # checkpoint keys with no place in the target
    pretraining_only: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    channels: str = ""


def channel_mapping(source_channels: int, target_names: Sequence[str], source_names: Sequence[str] | None = None,
                    channel_map: Sequence[str] | None = None) -> list[int | None] | None:
    """Pretrained channel for each target channel (None: no counterpart), or None when no names say it.

    ``channel_map`` entries are ``TARGET=SOURCE`` with a channel name (dataset.json ``channel_names``) or index on
    each side; without it, names the checkpoint records are matched case-insensitively."""
    def index(token: str, names: Sequence[str] | None, count: int, side: str) -> int:
        lowered = [n.lower() for n in names or ()]
        if token.lower() in lowered:
            return lowered.index(token.lower())
        if token.isdigit() and int(token) < count:
            return int(token)
        raise ValueError(f"--channel-map: {side} channel {token!r} is neither a name ({list(names or [])}) nor an "
                         f"index below {count}")

    if channel_map:
        mapping: list[int | None] = [None] * len(target_names)
        for entry in channel_map:
            target, _, source = entry.partition("=")
            if not source:
                raise ValueError(f"--channel-map entries are TARGET=SOURCE, got {entry!r}")
            mapping[index(target, target_names, len(target_names), "target")] = index(
                source, source_names, source_channels, "checkpoint")
        return mapping
    if source_names:
        lowered = [n.lower() for n in source_names]
        mapping = [lowered.index(n.lower()) if n.lower() in lowered else None for n in target_names]
        if any(m is not None for m in mapping):
            return mapping
    return None


def channel_rule(source_channels: int, target_channels: int, mapping: list[int | None] | None, fill: str):
    """(function adapting an input-projection weight, description) for the importer's channel rule."""
    if mapping is not None:
        described = ", ".join(f"{t}<-{'init ' + fill if s is None else s}" for t, s in enumerate(mapping))
        return (lambda w: map_input_channels(w, mapping, fill),
                f"input channels by name (target<-checkpoint: {described}; unmatched start at {fill})")
    if source_channels == target_channels:
        return None, ""
    return (lambda w: spread_input_channels(w, target_channels),
            f"input channels {source_channels} -> {target_channels}: summed over the checkpoint's channels, repeated "
            f"and divided by {target_channels} (an image given in every channel yields the pretrained response)")


def remap_keys(state: dict[str, torch.Tensor], source_prefixes: dict[str, str], network: nn.Module) -> dict:
    """Rename the checkpoint's encoder / stem / position-embedding keys to the network's (nnssl vocabulary)."""
    target = {"encoder": getattr(network, "key_to_encoder", None), "stem": getattr(network, "key_to_stem", None),
              "lpe": getattr(network, "key_to_lpe", None)}
    out = {}
    for key, value in state.items():
        for role in ROLES:
            prefix, new = source_prefixes.get(role), target[role]
            if prefix and new and (key == prefix or key.startswith(prefix + ".")):
                key = new + key[len(prefix):]
                break
        out.setdefault(key, value)
    return out


def _alias_groups(state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    groups: dict[tuple, list[str]] = {}
    for key, value in state.items():
        groups.setdefault((value.data_ptr(), tuple(value.shape), value.stride(), key if value.numel() == 0 else ""),
                          []).append(key)
    return {keys[0]: keys for keys in groups.values()}


def _is_conv(network: nn.Module, key: str) -> bool:
    try:
        module = network.get_submodule(key.rsplit(".", 1)[0])
    except AttributeError:
        return False
    return isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd)


def convert_weights(source: SourceModel, network: nn.Module, target_channel_names: Sequence[str] | None = None,
                    channel_map: Sequence[str] | None = None, channel_fill: str = "zero",
                    grids: tuple[Sequence[int], Sequence[int]] | None = None) -> ImportReport:
    """Fill ``network`` in place from ``source`` (see the module docstring); ``grids`` = (pretraining, target) token
    grid of a learnable position embedding."""
    state = remap_keys(source.state, source.prefixes, network)
    target = network.state_dict()
    report = ImportReport()
    proj_key = input_projection_key(network, target)
    target_channels = int(target[proj_key].shape[1]) if proj_key else None
    source_channels = source.in_channels or target_channels
    names = list(target_channel_names or [str(i) for i in range(target_channels or 0)])
    mapping = channel_mapping(source_channels or 0, names, source.channel_names, channel_map)
    adapt_channels, report.channels = channel_rule(source_channels, target_channels, mapping, channel_fill) \
        if target_channels else (None, "")
    lpe = getattr(network, "key_to_lpe", None)
    in_proj = {proj_key} | {f"{k}.weight" for k in getattr(network, "keys_to_in_proj", ())}
    reorder = mapping is not None and mapping != list(range(target_channels or 0))  # names in another order
    groups = _alias_groups(target)
    for key, aliases in groups.items():
        if is_segmentation_head(key):
            report.segmentation.append(key)
            continue
        found = next((a for a in aliases if a in state), None)
        if found is None:
            report.fresh.append((key, "not in the checkpoint"))
            continue
        value, want = state[found], target[key]
        notes = []
        force_channels = reorder and bool(in_proj & set(aliases))
        if tuple(value.shape) != tuple(want.shape) or force_channels:
            try:
                value, notes = _adapt(key, value, want, network, lpe, grids, adapt_channels, source_channels,
                                      target_channels, force_channels)
            except ValueError as e:
                report.fresh.append((key, str(e)))
                continue
        with torch.no_grad():
            want.copy_(value.to(want.dtype))
        (report.adapted.append((key, "; ".join(notes))) if notes else report.loaded.append(key))
    known = {a for aliases in groups.values() for a in aliases}
    seen = {state[k].data_ptr() for k in state if k in known}  # a tensor saved under two keys is one tensor
    for key, value in state.items():
        if key not in known and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            (report.pretraining_only if key.startswith(PRETRAINING_ONLY_PREFIXES) else report.unused).append(key)
    return report


def _adapt(key, value, want, network, lpe, grids, adapt_channels, source_channels, target_channels,
           force_channels=False):
    """(adapted tensor, notes) or ValueError with the reason it stays fresh."""
    shapes = f"{tuple(value.shape)} in the checkpoint, {tuple(want.shape)} here"
    if lpe and key == lpe:
        if grids is None:
            raise ValueError(f"position embedding {shapes}, token grids unknown")
        from nnunet_mim.core.pos_embed import resize_pos_embed

        old, new = grids
        prefix = int(value.shape[1]) - int(np.prod(old))
        return resize_pos_embed(value, old, new, prefix), [f"position embedding resampled (trilinear) from token "
                                                          f"grid {list(old)} to {list(new)}"]
    if value.ndim != want.ndim or value.ndim < 3 or not _is_conv(network, key) or value.shape[0] != want.shape[0]:
        raise ValueError(f"shape {shapes}")
    notes = []
    if value.shape[1] != want.shape[1] or force_channels:
        if adapt_channels is None or (value.shape[1], want.shape[1]) != (source_channels, target_channels):
            raise ValueError(f"input channels {shapes}")
        value = adapt_channels(value)
        notes.append("input channels adapted")
    if tuple(value.shape[2:]) != tuple(want.shape[2:]):
        value, kernel_notes = adapt_kernel(value, want.shape[2:])
        notes.append("kernel " + ", ".join(kernel_notes))
    return value, notes


# ---- 3. warnings ---------------------------------------------------------------------------------------------------

def plan_warnings(source: SourceModel, normalization: Sequence[str], spacing: Sequence[float]) -> list[str]:
    """Differences between pretraining and the target configuration that the weights cannot fix."""
    out = []
    if source.normalization and set(source.normalization) != set(normalization):
        out.append(f"NORMALISATION: pretrained with {sorted(set(source.normalization))}, the target configuration "
                   f"uses {list(normalization)}"
                   + (" (CT intensities against a model pretrained on z-scored images: the features see another "
                      "intensity distribution)" if "CTNormalization" in normalization else "")
                   + ". The target's normalisation is kept; to change it, edit normalization_schemes in the plans "
                     "and re-run nnUNetv2_preprocess.")
    if source.spacing and not same_spacing(source.spacing, spacing):
        out.append(f"SPACING: pretrained at {list(source.spacing)} mm, the target configuration uses "
                   f"{[round(float(s), 4) for s in spacing]} mm: structures appear at another scale than in "
                   f"pretraining (use --spacing checkpoint to resample the target to the pretraining spacing).")
    return out


def _groups(keys: Sequence[str], depth: int = 2) -> str:
    counts: dict[str, int] = {}
    for k in keys:
        top = ".".join(k.split(".")[:depth])
        counts[top] = counts.get(top, 0) + 1
    return ", ".join(f"{k}.* ({n})" for k, n in counts.items())


def format_import_report(report: ImportReport, header: str, limit: int = 12) -> str:
    """The pre-flight report: what loaded, what was adapted and how, what starts fresh and why."""
    lines = [header,
             f"  loaded as is: {len(report.loaded)} tensors" + (f" [{_groups(report.loaded)}]" if report.loaded else ""),
             f"  adapted: {len(report.adapted)} tensors"]
    if report.channels and any("input channels" in how for _, how in report.adapted):
        lines.append(f"    rule: {report.channels}")
    lines += [f"    {k}: {how}" for k, how in report.adapted[:limit]]
    lines.append(f"  fresh (nnU-Net's initialisation): {len(report.fresh)} tensors"
                 + (f" [{_groups([k for k, _ in report.fresh])}]" if report.fresh else ""))
    why: dict[str, list[str]] = {}
    for k, reason in report.fresh:
        why.setdefault(reason.split(":")[0] if reason.startswith("shape") else reason, []).append(k)
    for reason, keys in why.items():
        lines.append(f"    {reason}: {', '.join(keys[:limit])}" + (f" ... (+{len(keys) - limit})"
                                                                       if len(keys) > limit else ""))
    if report.segmentation:
        lines.append(f"  segmentation layers: {len(report.segmentation)} tensors, fresh (never transferred)")
    if report.pretraining_only:
        lines.append(f"  pretraining-only (dropped, as intended): {_groups(report.pretraining_only)}")
    if report.unused:
        lines.append(f"  in the checkpoint, unused: {len(report.unused)} tensors [{_groups(report.unused)}]")
    lines += [f"  WARNING {w}" for w in report.warnings]
    return "\n".join(lines)
