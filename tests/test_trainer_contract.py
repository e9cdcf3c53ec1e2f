"""Every trainer nnU-Net can find (the classes of ``nnunet_mim ext-path``'s index) builds its network the way each
supported nnunetv2 calls ``build_network_architecture``:

- on the class, with the installed release's arguments (what ``nnUNetv2_predict`` and ``check-weights`` do);
- with nnunetv2 2.6's arguments (the architecture fields instead of the managers): from a trainer instance
  (2.6's training) the network equals the managers-form one; on the class (2.6's predictor) segmentation trainers
  build the same network and pretrainers that need more than the architecture say so;
- its signature shows ``plans_manager``, so 2.7 and 2.8 pass the managers (no deprecated path).

The plans are a tiny in-memory dict with one configuration per network family (toy sizes, no data, no workspace).
"""
from __future__ import annotations

import importlib.util
import inspect
import os
from types import SimpleNamespace

import pytest
from torch import nn

from nnunet_mim import ext_trainer_path
from nnunet_mim.nnunet.plans import small_configuration, swin_configuration
from nnunet_mim.nnunet.sac_vit_plans import sac_vit_configuration
from nnunet_mim.nnunet.versions import call_build_network_architecture, network_builder

IN_CHANNELS, OUT_CHANNELS = 1, 3
UNET = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": 4, "features_per_stage": [32, 64, 128, 256],
                        "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 4,
                        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [2, 2, 2, 2],
                        "n_conv_per_stage_decoder": [2, 2, 2], "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
PARENT = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
          "patch_size": [32, 32, 64], "median_image_size_in_voxels": [40, 40, 80], "spacing": [1.0, 1.0, 1.0],
          "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
          "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
          "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
          "resampling_fn_probabilities": "resample_data_or_seg_to_shape", "resampling_fn_probabilities_kwargs": {},
          "architecture": UNET, "batch_dice": False}


def _configurations() -> dict[str, dict]:
    """One toy configuration per network family, each inheriting the U-Net parent as ``nnunet_mim add-config`` does."""
    configs = {"3d_fullres": PARENT,
               "3d_small": {"inherits_from": "3d_fullres", **small_configuration(PARENT, 3, (4, 16))},
               "3d_swin": {"inherits_from": "3d_fullres",
                           **swin_configuration(PARENT, feature_size=12, patch_size=(32, 32, 64), window_size=4)},
               "3d_sac_vit": {"inherits_from": "3d_fullres",
                              **sac_vit_configuration(PARENT, "S", (32, 32, 32), embed_dim=48, depth=2, num_heads=3,
                                                      decoder_channels=[4, 8, 8, 16, 16, 16])}}
    try:
        from nnunet_mim.nnunet.primus_plans import primus_configuration
    except ImportError:
        pass
    else:
        configs["3d_primus"] = {"inherits_from": "3d_fullres", **primus_configuration(
            PARENT, {"embed_dim": 48, "eva_depth": 2, "eva_numheads": 8}, (32, 32, 32))}
    return configs


@pytest.fixture(scope="module")
def plans_manager():
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager({"dataset_name": "Dataset999_Contract", "plans_name": "nnUNetPlans",
                         "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
                         "original_median_shape_after_transp": [40, 40, 80], "image_reader_writer": "SimpleITKIO",
                         "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
                         "configurations": _configurations(), "experiment_planner_used": "ExperimentPlanner",
                         "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {}})


def exported_trainers() -> dict[str, type]:
    """The classes nnU-Net finds: those the trainer index (``nnunet_mim ext-path``) re-exports."""
    path = os.path.join(ext_trainer_path(), "nnunet_mim_trainer_index.py")
    spec = importlib.util.spec_from_file_location("nnunet_mim_trainer_index_contract", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {k: v for k, v in vars(module).items() if isinstance(v, type) and not k.startswith("_")}


TRAINERS = exported_trainers()


def is_pretrainer(cls: type) -> bool:
    from nnunet_mim.trainers.base import MIMPretrainerBase

    return issubclass(cls, MIMPretrainerBase)


def own_builder(cls: type) -> bool:
    """Whether the trainer (or one of our bases) defines ``build_network_architecture`` (not nnU-Net's own)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return inspect.getattr_static(cls, "build_network_architecture") is not \
        inspect.getattr_static(nnUNetTrainer, "build_network_architecture")


def shapes(network: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in network.state_dict().items()}


def build_on_class(cls: type, plans_manager) -> tuple[str, nn.Module] | tuple[None, dict]:
    """The first toy configuration on which the class builds, with the installed release's call; else the errors."""
    errors = {}
    for name in plans_manager.available_configurations:
        cm = plans_manager.get_configuration(name)
        try:
            return name, call_build_network_architecture(cls, plans_manager, cm, IN_CHANNELS, OUT_CHANNELS, False)
        except NotImplementedError:
            raise
        except Exception as e:  # noqa: BLE001 - a configuration of another family: try the next one
            errors[name] = f"{type(e).__name__}: {e}"
    return None, errors


def legacy_arguments(cm, deep_supervision: bool) -> tuple:
    """nnunetv2 2.6's arguments (``nnUNetTrainer.initialize`` and ``nnUNetPredictor``)."""
    return (cm.network_arch_class_name, cm.network_arch_init_kwargs, cm.network_arch_init_kwargs_req_import,
            IN_CHANNELS, OUT_CHANNELS, deep_supervision)


def bare_trainer(cls: type, plans_manager, cm):
    """A trainer instance as far as building needs it (nnU-Net's ``__init__`` would need a dataset on disk)."""
    trainer = cls.__new__(cls)
    trainer.plans_manager, trainer.configuration_manager = plans_manager, cm
    trainer.tokenizer = SimpleNamespace(num_embeddings=5)  # TokenMIMPretrainer: the loaded tokenizer's codebook
    return trainer


def test_the_index_exports_the_trainers():
    assert {"HybridMIMPretrainer", "nnUNetTrainerMIMFinetune", "TokenMIMPretrainer", "nnUNetTrainerSACViT",
            "HybridMIMPretrainerSwin", "MAEPretrainer"} <= set(TRAINERS)
    assert all(v.__module__.startswith("nnunet_mim.trainers.") for v in TRAINERS.values())


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_builds_on_the_class_with_every_release_signature(name, plans_manager):
    cls = TRAINERS[name]
    # 2.7 / 2.8 choose the call by this signature; without plans_manager they take the deprecated path
    assert "plans_manager" in inspect.signature(cls.build_network_architecture).parameters
    try:
        config, network = build_on_class(cls, plans_manager)
    except NotImplementedError:  # an abstract base (subclasses provide the network)
        assert name.endswith("Base"), f"{name} cannot build a network"
        return
    assert config is not None, f"{name} builds on none of the toy configurations: {network}"
    assert isinstance(network, nn.Module)
    if not own_builder(cls):
        return  # nnU-Net's own builder: each release calls its own signature
    assert isinstance(inspect.getattr_static(cls, "build_network_architecture"), network_builder), \
        f"{name} overrides build_network_architecture without @network_builder: nnunetv2 2.6 could not call it"
    cm = plans_manager.get_configuration(config)

    # 2.6 training: the trainer instance's call with the architecture fields
    trainer = bare_trainer(cls, plans_manager, cm)
    from_fields = trainer.build_network_architecture(*legacy_arguments(cm, True))
    from_managers = trainer.build_network_architecture(plans_manager, cm, IN_CHANNELS, OUT_CHANNELS, True)
    assert shapes(from_fields) == shapes(from_managers)

    # 2.6 prediction: the class's call with the architecture fields
    try:
        legacy = cls.build_network_architecture(*legacy_arguments(cm, False))
    except RuntimeError as e:
        assert is_pretrainer(cls), f"segmentation trainer {name} must build from the architecture alone: {e}"
        assert "nnunetv2 >= 2.7" in str(e)
    else:
        assert shapes(legacy) == shapes(network)


def test_token_mim_head_follows_the_loaded_tokenizer_and_builds_on_the_class(plans_manager):
    from nnunet_mim.trainers.token_mim import TokenMIMPretrainer, VisualTokenizerTrainer

    cm = plans_manager.get_configuration("3d_sac_vit")
    on_class = TokenMIMPretrainer.build_network_architecture(plans_manager, cm, IN_CHANNELS, OUT_CHANNELS, False)
    assert on_class.mim_head[-1].out_features == VisualTokenizerTrainer.num_embeddings
    trainer = bare_trainer(TokenMIMPretrainer, plans_manager, cm)
    on_trainer = trainer.build_network_architecture(plans_manager, cm, IN_CHANNELS, OUT_CHANNELS, True)
    assert on_trainer.mim_head[-1].out_features == 5
    # the keys -pretrained_weights transfers are the same either way
    body = {k: v for k, v in shapes(on_class).items() if not k.startswith("mim_")}
    assert body == {k: v for k, v in shapes(on_trainer).items() if not k.startswith("mim_")}
    trainer.tokenizer = None
    with pytest.raises(RuntimeError, match="after loading the tokenizer"):
        trainer.build_network_architecture(plans_manager, cm, IN_CHANNELS, OUT_CHANNELS, True)


def test_network_builder_refuses_another_signature():
    with pytest.raises(TypeError, match="plans_manager"):
        network_builder(lambda cls, architecture_class_name, arch_init_kwargs: None)
