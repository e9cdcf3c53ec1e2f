"""Primus configurations in nnU-Net plans (``nnunet_mim add-config primus``).

A Primus configuration inherits a parent (``3d_fullres``) and so its preprocessed data; it names
dynamic-network-architectures' :class:`~dynamic_network_architectures.architectures.primus.Primus` (the class that
takes ``input_channels`` / ``num_classes`` as nnU-Net's ``get_network_from_plans`` passes them; the ``PrimusS/B/M/L``
shortcuts take ``output_channels`` and cannot be built from plans) with explicit ``arch_kwargs``: the preset's
width / depth / heads, ``patch_embed_size``, and ``input_shape`` = the patch size, rounded to whole tokens.

Defaults are the Primus paper's (nnU-Net's ``nnUNet_Primus_*_Trainer``, nnssl's ``get_primus``): 8^3 patch embedding,
drop path 0.2, LayerScale ``init_values`` 0.1, ``scale_attn_inner``, RoPE plus a learnable absolute position
embedding, no register tokens. Primus has no deep supervision: train it with ``nnUNetTrainerMIMFinetunePrimus``
(``trainers/primus.py``), not with the stock ``nnUNetTrainer``.
"""
from __future__ import annotations

import inspect
import json
import math
import warnings
from collections.abc import Mapping, Sequence

from nnunet_mim.nnunet.plans import add_derived_configuration, round_patch

PRIMUS_NETWORK_CLASS = "dynamic_network_architectures.architectures.primus.Primus"
#: the paper's token size (voxels per axis)
PRIMUS_PATCH_EMBED = (8, 8, 8)
#: the paper's regularisation and block options, on top of a preset
PRIMUS_DEFAULTS = {"drop_path_rate": 0.2, "init_values": 0.1, "scale_attn_inner": True, "use_rot_pos_emb": True,
                   "use_abs_pos_embed": True, "num_register_tokens": 0}
#: Eva's 3D RoPE uses head_dim / 1.5 channels, which must be divisible by 4
ROPE_HEAD_DIM_MULTIPLE = 6
#: Primus's patch decoder upsamples by transposed convolutions of stride 2
PATCH_EMBED_BASE = 2


def _primus_module():
    with warnings.catch_warnings():  # torch.jit deprecation noise from timm
        warnings.simplefilter("ignore")
        from dynamic_network_architectures.architectures import primus
    return primus


def primus_presets() -> dict[str, dict]:
    """The Primus paper's S / B / M / L sizes, as dynamic-network-architectures defines them (embed_dim, eva_depth,
    eva_numheads)."""
    return {k: dict(v) for k, v in _primus_module()._PRIMUS_CONFIGS.items()}


def check_primus_kwargs(arch_kwargs: Mapping) -> None:
    """Raise with the fix when Primus could not be built from ``arch_kwargs`` (unknown keys, heads, token size)."""
    known = set(inspect.signature(_primus_module().Primus.__init__).parameters) - {"self", "input_channels",
                                                                                  "num_classes"}
    unknown = sorted(set(arch_kwargs) - known)
    if unknown:
        raise ValueError(f"Primus has no argument(s) {unknown}; known: {sorted(known)}")
    embed, heads = int(arch_kwargs["embed_dim"]), int(arch_kwargs["eva_numheads"])
    if embed % heads:
        raise ValueError(f"embed_dim {embed} is not divisible by {heads} heads")
    if arch_kwargs.get("use_rot_pos_emb", True) and (embed // heads) % ROPE_HEAD_DIM_MULTIPLE:
        raise ValueError(f"Primus's 3D RoPE needs a head width (embed_dim / heads = {embed}/{heads}) divisible by "
                         f"{ROPE_HEAD_DIM_MULTIPLE}; e.g. embed 48 with 4 or 8 heads, embed 36 with 3 or 6.")
    pe = [int(p) for p in arch_kwargs["patch_embed_size"]]
    if len(pe) != 3 or any(p < PATCH_EMBED_BASE or p & (p - 1) for p in pe):
        raise ValueError(f"patch_embed_size must be 3 powers of two >= 2 (Primus's patch decoder), got {pe}")


def token_grid(patch_size: Sequence[int], patch_embed_size: Sequence[int]) -> list[int]:
    """Tokens per axis of a Primus configuration: ``patch_size // patch_embed_size``."""
    return [int(p) // int(e) for p, e in zip(patch_size, patch_embed_size)]


def primus_configuration(
    parent_config: dict,
    config_name_or_kwargs: str | Mapping = "B",
    patch_size: Sequence[int] | None = None,
    batch_size: int | None = None,
    patch_embed_size: Sequence[int] | int = PRIMUS_PATCH_EMBED,
    **arch_overrides,
) -> dict:
    """Configuration overrides (``patch_size``, ``batch_size``, ``architecture``) that turn a resolved 3D nnU-Net
    configuration into a Primus one on the same preprocessed data.

    ``config_name_or_kwargs``: a preset (``"S"``, ``"B"``, ``"M"``, ``"L"``) or the size as keyword arguments of
    ``Primus`` (``embed_dim``, ``eva_depth``, ``eva_numheads``, and any other, e.g. read from a checkpoint); on top of
    :data:`PRIMUS_DEFAULTS`. ``arch_overrides`` (any ``Primus`` argument) come last. The patch (the parent's unless
    given) is rounded per axis to the nearest multiple of the patch embedding size
    (:func:`~nnunet_mim.nnunet.plans.round_patch`) and becomes ``input_shape``. ``architecture`` is given
    whole, because nnU-Net's configuration inheritance is a shallow update.
    """
    presets = primus_presets()
    if isinstance(config_name_or_kwargs, str):
        if config_name_or_kwargs not in presets:
            raise ValueError(f"Primus size must be one of {sorted(presets)}, got {config_name_or_kwargs!r}")
        size = presets[config_name_or_kwargs]
    else:
        size = dict(config_name_or_kwargs)
        missing = {"embed_dim", "eva_depth", "eva_numheads"} - set(size)
        if missing:
            raise ValueError(f"Primus arguments without a preset need {sorted(missing)}")
    requested = list(patch_size if patch_size is not None else parent_config["patch_size"])
    if len(requested) != 3:
        raise ValueError(f"Primus is a 3D network; the patch size is {requested}. Derive from a 3D configuration "
                         f"(--parent 3d_fullres).")
    pe = [int(patch_embed_size)] * 3 if isinstance(patch_embed_size, int) else [int(p) for p in patch_embed_size]
    arch_kwargs = {**PRIMUS_DEFAULTS, **size, **arch_overrides, "patch_embed_size": pe}
    check_primus_kwargs(arch_kwargs)
    patch = round_patch(requested, pe)
    arch_kwargs["input_shape"] = patch
    arch_kwargs = json.loads(json.dumps(arch_kwargs))  # plans are JSON
    return {
        "patch_size": patch,
        "batch_size": int(batch_size or parent_config["batch_size"]),
        "architecture": {"network_class_name": PRIMUS_NETWORK_CLASS, "arch_kwargs": arch_kwargs,
                         "_kw_requires_import": []},
    }


def add_primus_configuration(
    dataset: str | int,
    name: str = "3d_primus",
    parent: str = "3d_fullres",
    plans: str = "nnUNetPlans",
    config_name_or_kwargs: str | Mapping = "B",
    patch_size: Sequence[int] | None = None,
    batch_size: int | None = None,
    patch_embed_size: Sequence[int] | int = PRIMUS_PATCH_EMBED,
    overwrite: bool = False,
    **arch_overrides,
) -> tuple[dict, str]:
    """Add Primus configuration ``name`` inheriting ``parent`` to a dataset's plans (``nnunet_mim add-config
    primus``); see :func:`primus_configuration`. Returns the resolved configuration and a one-paragraph description."""
    requested = list(patch_size) if patch_size is not None else []

    def overrides(parent_config: dict) -> dict:
        requested[:] = requested or parent_config["patch_size"]
        return primus_configuration(parent_config, config_name_or_kwargs, patch_size, batch_size, patch_embed_size,
                                    **arch_overrides)

    resolved = add_derived_configuration(dataset, name, parent, plans, overrides, overwrite)
    kw = resolved["architecture"]["arch_kwargs"]
    grid = token_grid(resolved["patch_size"], kw["patch_embed_size"])
    label = (f"Primus-{config_name_or_kwargs}" if isinstance(config_name_or_kwargs, str) else "Primus") + \
        (f" with overrides {sorted(arch_overrides)}" if arch_overrides else "")
    text = (f"{name}: {label} (embed {kw['embed_dim']}, depth {kw['eva_depth']}, heads {kw['eva_numheads']}, patch "
            f"embedding {kw['patch_embed_size']}) inheriting {parent}; patch {resolved['patch_size']} (requested "
            f"{requested}) -> token grid {grid} = {math.prod(grid)} tokens; batch {resolved['batch_size']}; data "
            f"{resolved['data_identifier']}. Train with `nnUNetv2_train {dataset} {name} FOLD -tr "
            f"nnUNetTrainerMIMFinetunePrimus` (documentation/primus.md)")
    return resolved, text
