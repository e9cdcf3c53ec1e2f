"""Derived configurations inside nnU-Net plans files.

nnU-Net plans stay the single source of truth. We only *add* configurations that inherit from an
existing one (``"inherits_from": "3d_fullres"``), so they reuse its preprocessed data (same
``data_identifier``) and every stock command (train, ``--c``, predict) works with them:

    nnunet_mim add-config small -d 4 -n 3d_small --patch 32 48 48 --stages 4 --features 16 128

Other modules (SwinUNETR, SAC-ViT) register their own derived configurations through
:func:`add_configuration`.
"""
from __future__ import annotations

import os
import shutil
from copy import deepcopy
from typing import Callable, Sequence

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, save_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_mim.architectures.swin_unetr import (
    SWIN_DIVISOR,
    SWIN_FEATURE_SIZE,
    SWIN_STRIDES,
    SWIN_WINDOW_SIZE,
    SwinUNETR,
)

PER_STAGE_KWARGS = ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage",
                    "bottleneck_channels")


def plans_path(dataset: str | int, plans_identifier: str = "nnUNetPlans") -> str:
    """Path of ``nnUNet_preprocessed/DatasetXXX_Name/<plans_identifier>.json`` (must exist)."""
    if not nnUNet_preprocessed:  # nnunetv2 2.8: an unset path object is false; 2.6/2.7: None
        raise RuntimeError("nnUNet_preprocessed is not set: export it as for any nnU-Net command.")
    path = join(str(nnUNet_preprocessed), maybe_convert_to_dataset_name(dataset), f"{plans_identifier}.json")
    if not isfile(path):
        raise FileNotFoundError(f"{path} does not exist. Run `nnUNetv2_plan_and_preprocess -d {dataset}` first.")
    return path


#: configurations nnU-Net's planners write; ours never replace them
STOCK_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")


def add_configuration(dataset: str | int, name: str, overrides: dict, parent: str = "3d_fullres",
                      plans_identifier: str = "nnUNetPlans", overwrite: bool = False) -> dict:
    """Write configuration ``name`` = ``parent`` + ``overrides`` into the plans file; return it resolved.

    Refuses to replace nnU-Net's own configurations, and any existing one unless ``overwrite``. The previous plans
    file is kept as ``<plans>.json.bak``; the new one is written to a temporary file and renamed."""
    path = plans_path(dataset, plans_identifier)
    plans = load_json(path)
    if parent not in plans["configurations"]:
        raise KeyError(f"Configuration {parent!r} is not in {path}; available: {list(plans['configurations'])}")
    if name in STOCK_CONFIGURATIONS:
        raise FileExistsError(f"{name!r} is one of nnU-Net's own configurations and is never replaced; choose another "
                              f"name with -n")
    if name in plans["configurations"] and not overwrite:
        raise FileExistsError(f"Configuration {name!r} already exists in {path}; pass --overwrite to replace it (the "
                              f"plans file is backed up to {path}.bak), or choose another name with -n")
    plans["configurations"][name] = {"inherits_from": parent, **overrides}
    PlansManager(plans).get_configuration(name)  # validates the inheritance chain
    shutil.copyfile(path, f"{path}.bak")
    save_json(plans, f"{path}.partial", sort_keys=False)
    os.replace(f"{path}.partial", path)
    return PlansManager(plans).plans["configurations"][name]


def add_derived_configuration(dataset: str | int, name: str, parent: str, plans_identifier: str,
                              make_overrides: Callable[[dict], dict], overwrite: bool = False) -> dict:
    """Add configuration ``name`` = ``parent`` + ``make_overrides(parent resolved)``; return ``name`` resolved.

    The one sequence behind every ``nnunet_mim add-config`` kind: the parent is resolved through nnU-Net's
    inheritance, the kind derives its overrides from it, :func:`add_configuration` writes them."""
    manager = PlansManager(plans_path(dataset, plans_identifier))
    if parent not in manager.available_configurations:
        raise KeyError(f"Configuration {parent!r} is not in the plans; available: {manager.available_configurations}")
    overrides = make_overrides(manager._internal_resolve_configuration_inheritance(parent))
    add_configuration(dataset, name, overrides, parent, plans_identifier, overwrite)
    return PlansManager(plans_path(dataset, plans_identifier))._internal_resolve_configuration_inheritance(name)


def features_doubling(n_stages: int, first: int, maximum: int) -> list[int]:
    """nnU-Net's feature rule: double per stage from ``first``, capped at ``maximum``."""
    return [min(first * 2 ** i, maximum) for i in range(n_stages)]


def round_patch(patch_size: Sequence[int], multiple: int | Sequence[int], up: bool = False) -> list[int]:
    """The one patch-rounding rule: per axis a multiple of ``multiple`` (one int, or one per axis: a network's total
    stride, a token size). Nearest (halves round up, at least one multiple) keeps the patch, and the memory nnU-Net
    planned for, close to the request; ``up=True`` gives the smallest patch >= ``patch_size`` instead."""
    multiples = [int(m) for m in np.broadcast_to(np.asarray(multiple), (len(patch_size),))]
    if up:
        return [int(np.ceil(p / m) * m) for p, m in zip(patch_size, multiples)]
    return [max(m, int(np.floor(p / m + 0.5)) * m) for p, m in zip(patch_size, multiples)]


def small_configuration(parent_config: dict, n_stages: int = 4, features: tuple[int, int] = (16, 128),
                        patch_size: Sequence[int] | None = None, batch_size: int | None = None) -> dict:
    """A smaller network/patch derived from ``parent_config`` (a resolved configuration dict).

    Keeps the parent's architecture class, kernels and strides of the first ``n_stages`` stages, norm and
    non-linearity; only the depth, widths, patch size and batch size change. The patch is rounded up to
    the network's total stride.
    """
    arch = deepcopy(parent_config["architecture"])
    kwargs = arch["arch_kwargs"]
    if n_stages > kwargs["n_stages"]:
        raise ValueError(f"n_stages={n_stages} exceeds the parent's {kwargs['n_stages']} stages")
    for key in PER_STAGE_KWARGS:
        if isinstance(kwargs.get(key), (list, tuple)):
            kwargs[key] = list(kwargs[key])[:n_stages]
    kwargs["n_stages"] = n_stages
    kwargs["features_per_stage"] = features_doubling(n_stages, *features)
    if isinstance(kwargs.get("n_conv_per_stage_decoder"), (list, tuple)):
        kwargs["n_conv_per_stage_decoder"] = list(kwargs["n_conv_per_stage_decoder"])[:n_stages - 1]
    total_stride = np.prod(np.asarray(kwargs["strides"]), axis=0)
    patch = round_patch(patch_size if patch_size is not None else parent_config["patch_size"], total_stride,
                        up=True)
    return {"patch_size": patch, "batch_size": int(batch_size or parent_config["batch_size"]), "architecture": arch}


def add_small_configuration(dataset: str | int, name: str = "3d_small", parent: str = "3d_fullres",
                            plans_identifier: str = "nnUNetPlans", n_stages: int = 4,
                            features: tuple[int, int] = (16, 128), patch_size: Sequence[int] | None = None,
                            batch_size: int | None = None, overwrite: bool = False) -> dict:
    """Add a small CPU-friendly configuration inheriting ``parent`` (same preprocessed data)."""
    return add_derived_configuration(
        dataset, name, parent, plans_identifier,
        lambda parent_config: small_configuration(parent_config, n_stages, features, patch_size, batch_size), overwrite)


SWIN_NETWORK_CLASS = f"{SwinUNETR.__module__}.{SwinUNETR.__qualname__}"


def swin_configuration(parent_config: dict, feature_size: int = SWIN_FEATURE_SIZE,
                       patch_size: Sequence[int] | None = None, batch_size: int | None = None,
                       downsample: str = "mergingv2", window_size: int = SWIN_WINDOW_SIZE,
                       use_checkpoint: bool = False, use_v2: bool = False) -> dict:
    """Overrides for a SwinUNETR configuration (documentation/swin.md) on ``parent_config``'s data.

    The patch (the parent's unless given) is rounded to the nearest multiples of 32 per axis (up, for a parent
    patch that would otherwise give a single token), and must hold at least two bottleneck tokens (InstanceNorm in
    SwinUNETR's bottleneck block). The architecture is written
    whole (nnU-Net's configuration inheritance is a shallow update); ``strides`` is the Swin pyramid, which
    nnU-Net reads for its deep-supervision scales.
    """
    if feature_size % 12:
        raise ValueError(f"feature_size must be a multiple of 12 (MONAI SwinUNETR), got {feature_size}")
    requested = list(patch_size if patch_size is not None else parent_config["patch_size"])
    if len(requested) != 3:
        raise ValueError(f"SwinUNETR configurations are 3D; the patch size is {requested}. Derive from a 3D "
                         f"configuration (--parent 3d_fullres).")
    patch = round_patch(requested, SWIN_DIVISOR)
    if patch_size is None and int(np.prod([p // SWIN_DIVISOR for p in patch])) < 2:
        patch = round_patch(requested, SWIN_DIVISOR, up=True)  # small parent patch: round up instead
    if int(np.prod([p // SWIN_DIVISOR for p in patch])) < 2:
        raise ValueError(f"Patch {patch} (from {requested}) gives SwinUNETR a single bottleneck token; make at least "
                         f"one edge >= {2 * SWIN_DIVISOR} (--patch).")
    arch_kwargs = {"feature_size": int(feature_size), "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24],
                   "window_size": int(window_size), "norm_name": "instance", "drop_rate": 0.0, "attn_drop_rate": 0.0,
                   "dropout_path_rate": 0.0, "normalize": True, "use_checkpoint": bool(use_checkpoint),
                   "use_v2": bool(use_v2), "downsample": downsample,
                   "strides": [list(s) for s in SWIN_STRIDES]}
    return {"patch_size": patch, "batch_size": int(batch_size or parent_config["batch_size"]),
            "architecture": {"network_class_name": SWIN_NETWORK_CLASS, "arch_kwargs": arch_kwargs,
                             "_kw_requires_import": []}}


def add_swin_configuration(dataset: str | int, name: str = "3d_swin", parent: str = "3d_fullres",
                           plans_identifier: str = "nnUNetPlans", feature_size: int = SWIN_FEATURE_SIZE,
                           patch_size: Sequence[int] | None = None, batch_size: int | None = None,
                           downsample: str = "mergingv2", window_size: int = SWIN_WINDOW_SIZE, use_checkpoint: bool = False,
                           use_v2: bool = False, overwrite: bool = False) -> dict:
    """Add a SwinUNETR configuration inheriting ``parent`` (same preprocessed data); see :func:`swin_configuration`."""
    return add_derived_configuration(
        dataset, name, parent, plans_identifier,
        lambda parent_config: swin_configuration(parent_config, feature_size, patch_size, batch_size, downsample,
                                                 window_size, use_checkpoint, use_v2), overwrite)


def unet_configuration_for_patch(parent_config: dict, patch_size: Sequence[int], max_features: int = 320,
                                 min_edge: int = 4) -> dict:
    """nnU-Net's default U-Net topology re-planned for another patch size on ``parent_config``'s data.

    Stages, strides and kernels come from nnU-Net's own ``get_pool_and_conv_props`` (what the experiment planner
    runs), features double from the parent's first width up to ``max_features`` (nnU-Net 3D: 320); class, norm,
    non-linearity and convolutions per stage are the parent's. For "same patch" comparisons (SAC-ViT benchmark).
    """
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    arch = deepcopy(parent_config["architecture"])
    kwargs = arch["arch_kwargs"]
    _, strides, kernels, patch, _ = get_pool_and_conv_props(parent_config["spacing"], list(patch_size), min_edge,
                                                           999999)
    n = len(strides)
    kwargs["n_stages"] = n
    kwargs["strides"] = [list(s) for s in strides]
    kwargs["kernel_sizes"] = [list(k) for k in kernels]
    kwargs["features_per_stage"] = features_doubling(n, int(kwargs["features_per_stage"][0]), max_features)
    for key in ("n_conv_per_stage", "n_blocks_per_stage"):
        if isinstance(kwargs.get(key), (list, tuple)):
            kwargs[key] = [kwargs[key][min(i, len(kwargs[key]) - 1)] for i in range(n)]
    if isinstance(kwargs.get("n_conv_per_stage_decoder"), (list, tuple)):
        kwargs["n_conv_per_stage_decoder"] = [kwargs["n_conv_per_stage_decoder"][0]] * (n - 1)
    return {"patch_size": [int(p) for p in patch], "architecture": arch}


def add_unet_configuration(dataset: str | int, name: str, patch_size: Sequence[int], parent: str = "3d_fullres",
                           plans_identifier: str = "nnUNetPlans", batch_size: int | None = None,
                           overwrite: bool = False) -> dict:
    """Add the default U-Net re-planned for ``patch_size`` (see :func:`unet_configuration_for_patch`)."""
    def overrides(parent_config: dict) -> dict:
        out = unet_configuration_for_patch(parent_config, patch_size)
        return {**out, "batch_size": int(batch_size)} if batch_size else out

    return add_derived_configuration(dataset, name, parent, plans_identifier, overrides, overwrite)


def describe(dataset: str | int, configuration: str, plans_identifier: str = "nnUNetPlans") -> str:
    cm = PlansManager(plans_path(dataset, plans_identifier)).get_configuration(configuration)
    kw = cm.network_arch_init_kwargs
    return (f"{configuration}: {cm.network_arch_class_name.split('.')[-1]}, patch {cm.patch_size}, batch "
            f"{cm.batch_size}, stages {kw.get('n_stages')}, features {kw.get('features_per_stage')}, strides "
            f"{kw.get('strides')}, data {cm.data_identifier}")


def dataset_folder(dataset: str | int) -> str:
    return join(str(nnUNet_preprocessed), maybe_convert_to_dataset_name(dataset))
