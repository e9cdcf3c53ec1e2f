"""SAC-ViT configurations in nnU-Net plans (``nnunet_mim add-config sac-vit``).

A SAC-ViT configuration inherits a parent (``3d_fullres``) and so its preprocessed data; it names
:class:`nnunet_mim.architectures.sac_vit.SACViTSeg` with :func:`~nnunet_mim.architectures.sac_vit.sac_vit_arch_kwargs`.
The patch is rounded to whole tokens; DA comes from the parent's spacing.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence

from nnunet_mim.architectures.sac_vit import (
    SAC_VIT_NETWORK_CLASS,
    SAC_VIT_PRESETS,
    TOKEN_SIZE,
    sac_vit_arch_kwargs,
)
from nnunet_mim.core.sac import degree_of_anisotropy, sac_token_size
from nnunet_mim.nnunet.plans import round_patch


def round_patch_to_tokens(patch_size: Sequence[int], da: int, min_tokens: int = 2) -> list[int]:
    """Nearest multiple of the token size ``(16 >> DA, 16, 16)`` per axis (ties round up, at least one token per
    axis); grows the last axis by one token if the patch would hold fewer than ``min_tokens`` tokens.

    Nearest rather than up keeps the patch (and memory) close to what nnU-Net planned for the GPU budget
    (:func:`~nnunet_mim.nnunet.plans.round_patch`).
    """
    token = sac_token_size(da, TOKEN_SIZE)
    out = round_patch(patch_size, token)
    if math.prod(o // t for o, t in zip(out, token)) < min_tokens:
        out[-1] += token[-1]
    return out


def sac_vit_configuration(
    parent_config: dict,
    size: str = "B",
    patch_size: Sequence[int] | None = None,
    batch_size: int | None = None,
    **arch_overrides,
) -> dict:
    """Configuration overrides (``patch_size``, ``batch_size``, ``architecture``) that turn a resolved nnU-Net
    configuration (e.g. ``3d_fullres``) into a SAC-ViT one on the same preprocessed data.

    DA comes from the parent's ``spacing`` (the plan's target spacing); the patch (parent's unless given) is rounded to
    the token size with :func:`round_patch_to_tokens`. ``arch_overrides`` go to :func:`sac_vit_arch_kwargs`
    (``embed_dim``, ``depth``, ``num_heads``, ``decoder_channels``, ...). ``architecture`` is given whole, because
    nnU-Net's configuration inheritance is a shallow update.
    """
    if size not in SAC_VIT_PRESETS:
        raise ValueError(f"size must be one of {sorted(SAC_VIT_PRESETS)}, got {size!r}")
    spacing = [float(s) for s in parent_config["spacing"]]
    if len(spacing) != 3:
        raise ValueError(f"SAC-ViT is a 3D network; the parent configuration has spacing {spacing}")
    da = degree_of_anisotropy(spacing)
    patch = round_patch_to_tokens(patch_size if patch_size is not None else parent_config["patch_size"], da)
    arch_kwargs = json.loads(json.dumps(sac_vit_arch_kwargs(patch, spacing, size, **arch_overrides)))  # plans = JSON
    return {
        "patch_size": patch,
        "batch_size": int(batch_size or parent_config["batch_size"]),
        "architecture": {"network_class_name": SAC_VIT_NETWORK_CLASS, "arch_kwargs": arch_kwargs,
                         "_kw_requires_import": []},
    }


def add_sac_vit_configuration(
    dataset: str | int,
    name: str = "3d_sac_vit",
    parent: str = "3d_fullres",
    plans_identifier: str = "nnUNetPlans",
    size: str = "B",
    patch_size: Sequence[int] | None = None,
    batch_size: int | None = None,
    overwrite: bool = False,
    **arch_overrides,
) -> tuple[dict, str]:
    """Add SAC-ViT configuration ``name`` inheriting ``parent`` to a dataset's plans (``nnunet_mim add-config
    sac-vit``). Returns the resolved configuration and a one-paragraph description."""
    from nnunet_mim.nnunet.plans import add_derived_configuration

    requested = list(patch_size) if patch_size is not None else []

    def overrides(parent_config: dict) -> dict:
        requested[:] = requested or parent_config["patch_size"]
        return sac_vit_configuration(parent_config, size, patch_size, batch_size, **arch_overrides)

    resolved = add_derived_configuration(dataset, name, parent, plans_identifier, overrides, overwrite)
    kw = resolved["architecture"]["arch_kwargs"]
    da = degree_of_anisotropy(kw["spacing"])
    grid = [p // t for p, t in zip(resolved["patch_size"], sac_token_size(da, TOKEN_SIZE))]
    label = f"SAC-ViT-{size}" + (f" with overrides {sorted(arch_overrides)}" if arch_overrides else "")
    text = (f"{name}: {label} (embed {kw['embed_dim']}, depth {kw['depth']}, heads {kw['num_heads']}) "
            f"inheriting {parent}; spacing {[round(s, 4) for s in kw['spacing']]} -> DA {da}, token "
            f"{sac_token_size(da, TOKEN_SIZE)} voxels; patch {resolved['patch_size']} (requested {requested}) -> "
            f"token grid {grid} = {math.prod(grid)} tokens; batch {resolved['batch_size']}; "
            f"data {resolved['data_identifier']}")
    return resolved, text


def check_patch_and_spacing_agree(configuration_manager, configuration_name: str | None = None) -> None:
    """A SAC-ViT configuration names its patch size and spacing twice: nnU-Net reads ``patch_size`` / ``spacing`` of
    the configuration (data), the network its ``arch_kwargs`` (token grid, DA). Raise ``ValueError`` with the fix when
    someone edited one copy and not the other."""
    kwargs = configuration_manager.network_arch_init_kwargs
    where = f"configuration '{configuration_name}'" if configuration_name else "this SAC-ViT configuration"
    pairs = (("patch_size", [int(p) for p in configuration_manager.patch_size], kwargs.get("patch_size")),
             ("spacing", [float(s) for s in configuration_manager.spacing], kwargs.get("spacing")))
    for name, data_value, arch_value in pairs:
        if arch_value is None:
            continue
        if len(arch_value) != len(data_value) or any(not math.isclose(float(a), float(d), rel_tol=1e-4)
                                                     for a, d in zip(arch_value, data_value)):
            raise ValueError(
                f"The {name} of {where} is {data_value}, but its architecture's arch_kwargs say {list(arch_value)}: "
                f"the network would be built for other data than nnU-Net feeds it. Write the configuration again "
                f"with `nnunet_mim add-config sac-vit -d DATASET -n NAME --patch ... --overwrite`, or make "
                f"\"{name}\" and \"architecture\" -> \"arch_kwargs\" -> \"{name}\" equal in nnUNetPlans.json.")
