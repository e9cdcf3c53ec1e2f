"""Which kind of pretrained checkpoint a file is, and what it says about its network.

:func:`detect_format` names one of :data:`FORMATS`; :func:`read_source` turns the loaded checkpoint (always read with
``weights_only=True`` by :func:`nnunet_mim.nnunet.weights.load_checkpoint`) into a :class:`SourceModel`: the state
dict with wrappers stripped, the network as an nnU-Net plans ``architecture`` entry where the file says it, the
pretraining spacing / patch / normalisation, and the keys of the encoder, stem, input projections and learnable
position embedding (nnssl's adaptation-plan vocabulary, which dynamic-network-architectures' networks also carry).

An nnssl checkpoint stores its adaptation plan as plain containers (``AdaptationPlan.serialize()``), so it loads
with ``weights_only=True``; a file that pickled the plan object itself cannot be read safely and is refused with
the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from nnunet_mim.nnunet.weights import (
    PRETRAINING_ONLY_PREFIXES,
    WRAPPER_PREFIXES,
    input_projection_key,
    state_dict_of,
    strip_wrapper_prefixes,
)

FORMATS = {
    "nnssl": "nnssl checkpoint: 'network_weights' + 'nnssl_adaptation_plan' (OpenMind ResEnc-L, Primus)",
    "nnunet": "nnU-Net checkpoint: 'network_weights' + 'init_args' (plans, configuration) + 'trainer_name' "
              "(any dataset or plan, nnunet_mim pretraining checkpoints included)",
    "swin": "MONAI SwinUNETR / Swin-UNETR self-supervised weights (keys swinViT.*, swin_vit.* or layers1.*)",
    "state_dict": "a plain state dict of tensors (also under 'state_dict' / 'model', with module. / _orig_mod. / "
                  "model. prefixes); needs --into CONFIGURATION",
}
SWIN_KEY_STARTS = ("swinViT.", "swin_vit.", "layers1.")

UNET_MODULE = "dynamic_network_architectures.architectures.unet."
PRIMUS_CLASS = "dynamic_network_architectures.architectures.primus.Primus"
KW_REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]
#: nnssl's "ResEncL" preset (Wald et al., "Revisiting MAE pre-training for 3D medical image segmentation"), as an
#: nnU-Net plans architecture entry
RESENC_L = {
    "network_class_name": UNET_MODULE + "ResidualEncoderUNet",
    "arch_kwargs": {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
                    "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 6,
                    "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
                    "n_conv_per_stage_decoder": [1] * 5, "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
    "_kw_requires_import": KW_REQUIRES_IMPORT,
}
PRIMUS_PATCH_EMBED = [8, 8, 8]  # nnssl's Primus presets all embed 8x8x8 patches
#: the Primus sizes of dynamic-network-architectures (embed_dim, eva_depth, eva_numheads)
PRIMUS_SIZES = {"PrimusS": (396, 12, 6), "PrimusB": (792, 12, 12), "PrimusM": (864, 16, 12),
                "PrimusL": (1056, 24, 16)}
DYNAMIC_UNETS = ("ResidualEncoderUNet", "PlainConvUNet")


class UnknownCheckpointFormat(ValueError):
    """The file holds none of the formats in :data:`FORMATS`."""


@dataclass
class SourceModel:
    """What a checkpoint says about the network it was trained with."""

    format: str
    state: dict[str, torch.Tensor]
    family: str | None = None  # "unet" (ResEnc / plain U-Net), "primus", "swin"; None: unknown (plain state dict)
    architecture: dict | None = None  # nnU-Net plans entry: network_class_name, arch_kwargs, _kw_requires_import
    name: str = ""  # e.g. "ResEncL", "PrimusM", "ResidualEncoderUNet"
    in_channels: int | None = None
    channel_names: list[str] | None = None
    spacing: list[float] | None = None
    patch_size: list[int] | None = None  # recommended for finetuning
    pretrain_patch_size: list[int] | None = None  # what the network saw (sets a position embedding's token grid)
    normalization: list[str] | None = None
    prefixes: dict[str, str] = field(default_factory=dict)  # role ("encoder", "stem", "lpe") -> key prefix here
    keys_to_in_proj: list[str] = field(default_factory=list)
    encoder_only: bool = False
    swin_feature_size: int | None = None
    swin_window_size: int | None = None

    def describe(self) -> str:
        parts = [FORMATS[self.format].split(":")[0], self.name or "architecture unknown"]
        if self.in_channels is not None:
            parts.append(f"pretrained on {self.in_channels} channel(s)")
        if self.encoder_only:
            parts.append("encoder only")
        return ", ".join(parts)


def detect_format(checkpoint) -> str:
    """The key of :data:`FORMATS` that ``checkpoint`` (a loaded file) is; raises :class:`UnknownCheckpointFormat`
    listing the formats otherwise."""
    if isinstance(checkpoint, Mapping):
        if "nnssl_adaptation_plan" in checkpoint:
            if not isinstance(checkpoint["nnssl_adaptation_plan"], Mapping):
                raise UnknownCheckpointFormat(
                    "The nnssl adaptation plan in this checkpoint is not a plain dict. Re-save it as nnssl's own "
                    "trainers do: checkpoint['nnssl_adaptation_plan'] = adaptation_plan.serialize().")
            return "nnssl"
        init_args = checkpoint.get("init_args")
        if "network_weights" in checkpoint and isinstance(init_args, Mapping) and {"plans", "configuration"} <= set(
                init_args):
            return "nnunet"
        try:
            state = state_dict_of(checkpoint)
        except ValueError:
            state = {}
        if state:
            return "swin" if any(k.startswith(SWIN_KEY_STARTS) for k in _swin_keys(state)) else "state_dict"
    top = list(checkpoint)[:12] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise UnknownCheckpointFormat(
        f"Not a checkpoint format nnunet_mim import-weights reads (top level: {top}). Supported:\n"
        + "\n".join(f"  {k}: {v}" for k, v in FORMATS.items())
        + "\nRe-save the weights as one of them, e.g. torch.save({'network_weights': model.state_dict()}, path).")


def _swin_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    return [strip_wrapper_prefixes(k, (*WRAPPER_PREFIXES, "model.")) for k in state]


def read_source(checkpoint: Mapping) -> SourceModel:
    """:class:`SourceModel` of a loaded checkpoint of any of :data:`FORMATS`."""
    fmt = detect_format(checkpoint)
    return {"nnssl": read_nnssl, "nnunet": read_nnunet, "swin": read_swin, "state_dict": read_state_dict}[fmt](
        checkpoint)


def _plain_list(value) -> list | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return [float(v) if isinstance(v, float) else v for v in value]


def _present_prefix(state: Mapping[str, torch.Tensor], prefix: str | None) -> str | None:
    """``prefix`` if keys of ``state`` start with it, else the prefix without its first module (an encoder saved
    on its own: ``encoder.stages`` -> ``stages``), else None."""
    if not prefix:
        return None
    candidates = [prefix] + ([prefix.split(".", 1)[1]] if "." in prefix else [])
    for candidate in candidates:
        if any(k == candidate or k.startswith(candidate + ".") for k in state):
            return candidate
    return None


def nnssl_architecture(plan: Mapping) -> tuple[str, str, dict | None]:
    """(name, family, plans architecture entry) of an nnssl adaptation plan's ``architecture_plans``."""
    arch = plan.get("architecture_plans") or {}
    name = arch.get("arch_class_name")
    kwargs = arch.get("arch_kwargs")
    if name == "ResEncL":
        return name, "unet", {**RESENC_L, "arch_kwargs": dict(RESENC_L["arch_kwargs"])}
    if name in DYNAMIC_UNETS and kwargs:
        kwargs = dict(kwargs)
        if name == "PlainConvUNet" and "n_blocks_per_stage" in kwargs:  # nnssl's field; PlainConvUNet's name
            kwargs["n_conv_per_stage"] = kwargs.pop("n_blocks_per_stage")
        requires = [k for k in KW_REQUIRES_IMPORT if isinstance(kwargs.get(k), str)]
        return name, "unet", {"network_class_name": UNET_MODULE + name, "arch_kwargs": kwargs,
                              "_kw_requires_import": requires}
    if name in PRIMUS_SIZES:
        embed_dim, depth, heads = PRIMUS_SIZES[name]
        return name, "primus", {"network_class_name": PRIMUS_CLASS, "arch_kwargs": {
            "embed_dim": embed_dim, "eva_depth": depth, "eva_numheads": heads,
            "patch_embed_size": list(PRIMUS_PATCH_EMBED)}, "_kw_requires_import": []}
    raise UnknownCheckpointFormat(
        f"nnssl architecture {name!r} (arch_kwargs {'given' if kwargs else 'none'}) is not supported; supported: "
        f"ResEncL, {', '.join(DYNAMIC_UNETS)} with arch_kwargs, {', '.join(PRIMUS_SIZES)}.")


def read_nnssl(checkpoint: Mapping) -> SourceModel:
    plan = checkpoint["nnssl_adaptation_plan"]
    state = state_dict_of(checkpoint)
    name, family, architecture = nnssl_architecture(plan)
    configurations = (plan.get("pretrain_plan") or {}).get("configurations") or {}
    config = next(iter(configurations.values()), {}) if configurations else {}
    prefixes = {role: _present_prefix(state, plan.get(key)) for role, key in
                (("encoder", "key_to_encoder"), ("stem", "key_to_stem"), ("lpe", "key_to_lpe"))}
    source = SourceModel(
        format="nnssl", state=state, family=family, architecture=architecture, name=name,
        in_channels=plan.get("pretrain_num_input_channels"),
        spacing=_plain_list(config.get("spacing")),
        patch_size=_plain_list(plan.get("recommended_downstream_patchsize") or config.get("patch_size")),
        pretrain_patch_size=_plain_list(config.get("patch_size")),
        normalization=_plain_list(config.get("normalization_schemes")),
        prefixes={k: v for k, v in prefixes.items() if v},
        keys_to_in_proj=list(plan.get("keys_to_in_proj") or ()),
        encoder_only=family == "unet" and not any(k.startswith("decoder.") for k in state))
    if source.in_channels is None:
        key = input_projection_key(torch.nn.Module(), state)
        source.in_channels = int(state[key].shape[1]) if key else None
    if "encoder" not in source.prefixes:
        raise UnknownCheckpointFormat(f"The nnssl checkpoint's key_to_encoder {plan.get('key_to_encoder')!r} names "
                                      f"no tensor of its network_weights (first keys: {list(state)[:5]}).")
    return source


def read_nnunet(checkpoint: Mapping) -> SourceModel:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    init_args = checkpoint["init_args"]
    state = state_dict_of(checkpoint)
    cm = PlansManager(dict(init_args["plans"])).get_configuration(init_args["configuration"])
    class_name = cm.network_arch_class_name
    family = "unet" if class_name.startswith(UNET_MODULE) else (
        "primus" if class_name == PRIMUS_CLASS else "swin" if class_name.endswith("SwinUNETR") else None)
    channel_names = (init_args.get("dataset_json") or {}).get("channel_names") or (
        init_args.get("dataset_json") or {}).get("modality")
    key = input_projection_key(torch.nn.Module(), {k: v for k, v in state.items()
                                                   if not k.startswith(PRETRAINING_ONLY_PREFIXES)})
    return SourceModel(
        format="nnunet", state=state, family=family, name=class_name.split(".")[-1],
        architecture={"network_class_name": class_name, "arch_kwargs": dict(cm.network_arch_init_kwargs),
                      "_kw_requires_import": list(cm.network_arch_init_kwargs_req_import)},
        in_channels=int(state[key].shape[1]) if key else None,
        channel_names=[channel_names[k] for k in sorted(channel_names, key=int)] if channel_names else None,
        spacing=[float(s) for s in cm.spacing], patch_size=[int(p) for p in cm.patch_size],
        pretrain_patch_size=[int(p) for p in cm.patch_size], normalization=list(cm.normalization_schemes),
        encoder_only=family == "unet" and not any(k.startswith("decoder.") for k in state))


def read_swin(checkpoint: Mapping) -> SourceModel:
    from nnunet_mim.nnunet.swin_weights import convert_third_party_swin_state_dict

    state = convert_third_party_swin_state_dict(state_dict_of(checkpoint))
    embed = state.get("encoder.swinViT.patch_embed.proj.weight")
    table = next((v for k, v in state.items() if k.endswith("relative_position_bias_table")), None)
    return SourceModel(format="swin", state=state, family="swin", name="SwinUNETR",
                       in_channels=int(embed.shape[1]) if embed is not None else None,
                       swin_feature_size=int(embed.shape[0]) if embed is not None else None,
                       # the table has (2 w - 1)^3 rows for a window of w voxels per axis
                       swin_window_size=(round(table.shape[0] ** (1 / 3)) + 1) // 2 if table is not None else None,
                       encoder_only=not any(k.startswith("decoder.") for k in state))


def read_state_dict(checkpoint: Mapping) -> SourceModel:
    state = state_dict_of(checkpoint)
    key = input_projection_key(torch.nn.Module(), state)
    return SourceModel(format="state_dict", state=state, in_channels=int(state[key].shape[1]) if key else None)
