"""SAC-ViT (PUMIT) trainers: supervised training / finetuning, and the shared base of the SAC-ViT pretrainers.

    nnunet_mim add-config sac-vit -d D                        # adds configuration 3d_sac_vit to the plans
    nnUNetv2_train D 3d_sac_vit 0 -tr nnUNetTrainerSACViT     # from scratch
    nnUNetv2_train D 3d_sac_vit 0 -tr nnUNetTrainerSACViTFinetune -pretrained_weights <pretraining checkpoint>
    nnUNetv2_predict ... -c 3d_sac_vit -tr nnUNetTrainerSACViT[Finetune]

ViT optimisation (PUMIT's BTCV recipe, official ``downstream`` configs): AdamW lr 1e-4, weight decay 0.05 (none on
biases, norms, position embedding, cls / mask tokens), linear warmup over 10 % of the run then cosine to 0, stepped
per iteration, gradient clipping at norm 1. Finetuning adds layer-wise lr decay (BEiT / MAE: block ``i`` of ``L``
gets ``decay ** (L + 1 - (i + 1))``; patch embedding, position embedding and tokens ``decay ** (L + 1)``; final norm,
U-Net decoder and heads 1).
"""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_mim.architectures.sac_vit import SACViTPretrainNet, SACViTSeg
from nnunet_mim.nnunet import settings
from nnunet_mim.nnunet.eva02_weights import load_eva02_2d_weights
from nnunet_mim.nnunet.sac_vit_plans import check_patch_and_spacing_agree
from nnunet_mim.nnunet.networks import require_network
from nnunet_mim.nnunet.versions import (
    build_planned_network,
    knows_only_the_architecture,
    network_builder,
    trainer_name,
)
from nnunet_mim.trainers.base import MIMPretrainerBase
from nnunet_mim.trainers.supervised import SupervisedTrainerBase
from nnunet_mim.nnunet.weights import unwrap

#: parameter names (last component) that never get weight decay, whatever their shape
NO_WEIGHT_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token")
#: optional EVA-02 2D checkpoint (local file, never downloaded) to initialise the SAC-ViT encoder from
EVA02_WEIGHTS_ENV = settings.setting("nnUNet_mim_eva02_weights").name


def maybe_load_eva02(trainer, network: nn.Module) -> None:
    """Initialise the encoder from ``$nnUNet_mim_eva02_weights`` when set (PUMIT initialises its ViT from EVA-02):
    2D-to-3D inflation by :func:`load_eva02_2d_weights` (``weights_only``), report in the training log. Unset: nothing
    happens; set to a missing file: ``FileNotFoundError``. ``-pretrained_weights`` and ``--c`` load afterwards and
    take precedence."""
    path = settings.read(EVA02_WEIGHTS_ENV)
    if not path:
        return
    report = load_eva02_2d_weights(unwrap(network).encoder, path, verbose=False)
    trainer.print_to_log_file(f"SAC-ViT encoder initialised from EVA-02 2D weights {path} (inflated to 3D); encoder "
                              f"keys left at their initialisation: {report.missing_keys}; unused checkpoint keys: "
                              f"{report.unexpected_keys}")


def require_sac_vit_configuration(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                  trainer: str) -> None:
    """Raise with the command that creates a SAC-ViT configuration when the plans build another network."""
    require_network(plans_manager, configuration_manager, SACViTSeg, trainer, "sac-vit")
    if not knows_only_the_architecture(configuration_manager):  # nnunetv2 2.6's predictor passes no data fields
        check_patch_and_spacing_agree(configuration_manager)


def build_sac_vit_seg(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                      num_input_channels: int, num_output_channels: int, trainer: str) -> SACViTSeg:
    """The configuration's :class:`SACViTSeg` without deep supervision (what pretraining networks wrap)."""
    require_sac_vit_configuration(plans_manager, configuration_manager, trainer)
    seg = build_planned_network(configuration_manager, num_input_channels, num_output_channels, False)
    assert isinstance(seg, SACViTSeg)
    return seg


def vit_layer_id(name: str, depth: int) -> int:
    """BEiT layer id of a parameter of a SAC-ViT network (SACViTSeg or a pretraining wrapper).

    0: patch embedding, position embedding, cls / mask tokens; ``i + 1``: encoder block ``i``; ``depth + 1``:
    everything after the blocks (final norm, U-Net decoder, heads, pretraining modules).
    """
    if name.startswith("encoder."):
        sub = name[len("encoder."):]
        if sub.startswith("blocks."):
            return int(sub.split(".")[1]) + 1
        if sub.startswith(("patch_embed.", *NO_WEIGHT_DECAY_NAMES)):
            return 0
    return depth + 1


def sac_vit_param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups: no weight decay on 1-D parameters (biases, norms) and on position embedding / tokens;
    ``lr_scale = layer_decay ** (depth + 1 - layer_id)`` (honoured by :class:`FunctionalLRSchedule`).

    Frozen parameters are left out. Groups are ordered by decreasing ``lr_scale`` so that group 0 (whose lr nnU-Net
    logs) carries the base learning rate.
    """
    depth = len(model.encoder.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = vit_layer_id(name, depth)
        last = name.split(".")[-1]
        no_decay = p.ndim <= 1 or any(t in last for t in NO_WEIGHT_DECAY_NAMES)
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": float(layer_decay ** (depth + 1 - layer)), "layer_id": layer}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], k[1]))]


def make_adamw(param_groups: list[dict], lr: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel where the device supports it (CUDA, and CPU since torch 2.4: about 4x faster than
    the per-tensor loop on a ViT-B on CPU), else the default implementation. Same state dict either way."""
    try:
        return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.999), fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.999))


class nnUNetTrainerSACViT(SupervisedTrainerBase):
    """Supervised SAC-ViT on a SAC-ViT configuration (``nnunet_mim add-config sac-vit``): AdamW, warmup + cosine per
    iteration, no weight decay on norms / biases / embeddings, gradient clipping at 1. nnU-Net's loss (Dice + CE,
    deep supervision on the 5 decoder outputs), data augmentation, sliding-window validation and inference."""

    warmup_fraction: float = 0.1  # PUMIT BTCV: 5k warmup of 50k steps
    layer_decay: float = 1.0
    grad_clip_norm: float = 1.0  # PUMIT downstream; nnU-Net's default is 12
    required_network = SACViTSeg
    required_network_config = "sac-vit"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-4
        self.weight_decay = 0.05

    def initialize(self):
        super().initialize()
        maybe_load_eva02(self, self.network)
        net = unwrap(self.network)
        n_params = sum(p.numel() for p in net.parameters())
        enc = net.encoder
        self.print_to_log_file(
            f"SAC-ViT: embed {enc.embed_dim}, depth {len(enc.blocks)}, heads {enc.num_heads}, DA {net.da}, patch "
            f"{net.patch_size} -> token grid {enc.token_grid(net.patch_size)}, {n_params / 1e6:.2f} M parameters; "
            f"AdamW lr {self.initial_lr} wd {self.weight_decay}, warmup {self.warmup_fraction:.0%} then cosine, "
            f"layer decay {self.layer_decay}, grad clip {self.grad_clip_norm}")

    @network_builder
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        require_sac_vit_configuration(plans_manager, configuration_manager, trainer_name(cls))
        return build_planned_network(configuration_manager, num_input_channels, num_output_channels,
                                     enable_deep_supervision)

    # ---- pretrained weights -----------------------------------------------------------------------
    def on_pretrained_weights_loaded(self, fname: str, report) -> None:
        """A per-part summary of ``-pretrained_weights`` in the training log (besides the safe loader's report)."""
        self.pretrained_report = report
        parts = defaultdict(int)
        for k in report.matched:
            parts[k.split(".")[0]] += 1
        note = (" nnunet_mim's SAC-ViT pretrainers keep the U-Net decoder frozen at its initialisation: only the "
                "encoder carries pretraining." if report.pretraining_only else "")
        self.print_to_log_file(
            f"Pretrained weights from {fname}: {dict(parts)} tensors transferred (segmentation layers start fresh), "
            f"{len(report.pretraining_only)} pretraining-only tensors dropped.{note}")

    # ---- optimisation -----------------------------------------------------------------------------
    def make_optimizer(self) -> torch.optim.Optimizer:
        return make_adamw(sac_vit_param_groups(unwrap(self.network), self.weight_decay, self.layer_decay),
                          self.initial_lr)


class nnUNetTrainerSACViTFinetune(nnUNetTrainerSACViT):
    """Finetuning a pretrained SAC-ViT (``-pretrained_weights``): the supervised recipe, without layer-wise lr decay
    (neither the PUMIT paper nor its official BTCV configuration uses one). ``_layerDecay075`` adds the BEiT / MAE
    ViT-B default of 0.75."""

    layer_decay: float = 1.0

    def on_train_start(self):
        super().on_train_start()
        if self.pretrained_report is None:
            decay = (f" Layer-wise lr decay {self.layer_decay} is applied to whatever weights the network has."
                     if self.layer_decay != 1.0 else "")
            self.print_to_log_file(
                f"WARNING: {type(self).__name__} without -pretrained_weights (or resumed with --c): no pretrained "
                f"weights were loaded in this run.{decay} For training from scratch use nnUNetTrainerSACViT.")


class nnUNetTrainerSACViTFinetune_layerDecay075(nnUNetTrainerSACViTFinetune):
    """Finetuning with layer-wise lr decay 0.75 (BEiT / MAE ViT-B): block ``i`` of ``L`` gets ``0.75^(L-i)``."""

    layer_decay = 0.75


class nnUNetTrainerSACViTFinetune_noLLRD(nnUNetTrainerSACViTFinetune):
    """Finetuning without layer-wise lr decay: the same as ``nnUNetTrainerSACViTFinetune``, under its own name
    (own results folder)."""

    layer_decay = 1.0


# ================================================================================================================
# pretraining base
# ================================================================================================================
class SACViTPretrainerBase(MIMPretrainerBase):
    """Base of the SAC-ViT pretrainers (token MIM, MAE, SimMIM, SimCLR) on a SAC-ViT configuration.

    The network is a :class:`SACViTPretrainNet` (segmentation network's keys + ``mim_*``; frozen U-Net decoder).
    Subclasses implement :meth:`wrap_network` (classmethod: ``SACViTSeg -> SACViTPretrainNet``) and
    :meth:`compute_losses`. AdamW with the SAC-ViT parameter groups (no weight decay on tokens / embeddings / norms).
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.weight_decay = 0.05
        self.step_timings: dict[str, list[float]] = defaultdict(list)

    @network_builder
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> SACViTPretrainNet:
        seg = build_sac_vit_seg(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                trainer_name(cls))
        return cls.wrap_network(seg, num_input_channels)

    @classmethod
    def wrap_network(cls, seg: SACViTSeg, num_input_channels: int) -> SACViTPretrainNet:
        raise NotImplementedError

    @property
    def mim_model(self) -> SACViTPretrainNet:
        return unwrap(self.network)

    def initialize(self):
        super().initialize()
        maybe_load_eva02(self, self.network)

    def configure_optimizers(self):
        groups = sac_vit_param_groups(self.mim_model, self.weight_decay)
        optimizer = make_adamw(groups, self.initial_lr)
        return optimizer, self.warmup_cosine_schedule(optimizer, self.pretraining_warmup_steps())

    def on_validation_epoch_start(self):
        self._preview_batch = None
        super().on_validation_epoch_start()

    # ---- timing helpers (benchmarks, tokenizer share) --------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, name: str):
        """Context manager adding the wall time of a block (device-synchronised) to ``step_timings[name]``."""
        trainer = self

        class _Timer:
            def __enter__(self):
                trainer._sync()
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                trainer._sync()
                trainer.step_timings[name].append(time.perf_counter() - self.t)
                return False

        return _Timer()

    def train_step(self, batch: dict) -> dict:
        with self.timed("step"):
            return super().train_step(batch)

    def on_train_epoch_start(self):
        self.step_timings.clear()
        super().on_train_epoch_start()

    def mean_step_time(self, name: str = "step") -> float:
        values = self.step_timings.get(name, [])
        return float(np.mean(values)) if values else float("nan")
