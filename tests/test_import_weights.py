"""``nnunet_mim import-weights``: the adaptation rules on toy tensors, format detection on format-faithful
checkpoints (nnssl's real key layout and adaptation-plan fields, built here from tiny dynamic-network-architectures
networks with random weights), the converter, and one end-to-end import -> finetune -> predict on the tiny dataset.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

from helpers import TINY_ID, TRAIN_BUDGET
from nnunet_mim.core.adapt import (
    adapt_kernel,
    collapse_kernel_axis,
    map_input_channels,
    pad_kernel_axis,
    spread_input_channels,
)
from nnunet_mim.nnunet.checkpoint_formats import (
    FORMATS,
    RESENC_L,
    UnknownCheckpointFormat,
    detect_format,
    read_source,
)
from nnunet_mim.nnunet.import_weights import (
    channel_mapping,
    configuration_overrides,
    convert_weights,
    format_import_report,
    plan_warnings,
)
from nnunet_mim.nnunet.weights import load_checkpoint, state_dict_of

# ---- toy tensors ---------------------------------------------------------------------------------------------------


def test_channel_spread_keeps_the_response_to_a_replicated_input():
    torch.manual_seed(0)
    for source_channels, target in ((1, 3), (2, 4), (3, 1)):
        w = torch.randn(5, source_channels, 3, 3, 3)
        x = torch.randn(2, 1, 6, 6, 6)
        expected = F.conv3d(x.expand(-1, source_channels, -1, -1, -1), w, padding=1)
        got = F.conv3d(x.expand(-1, target, -1, -1, -1), spread_input_channels(w, target), padding=1)
        assert torch.allclose(got, expected, atol=1e-5)
    # repeat without dividing would not keep it
    w = torch.randn(5, 1, 3, 3, 3)
    x = torch.randn(1, 1, 6, 6, 6)
    assert not torch.allclose(F.conv3d(x.expand(-1, 3, -1, -1, -1), w.repeat(1, 3, 1, 1, 1), padding=1),
                              F.conv3d(x, w, padding=1), atol=1e-3)


def test_channel_map_copies_named_channels_and_zero_fill_keeps_their_response():
    torch.manual_seed(0)
    w = torch.randn(4, 2, 3, 3, 3)  # pretrained on (T1, FLAIR)
    adapted = map_input_channels(w, [1, None, 0], fill="zero")  # target (FLAIR, T2, T1)
    a, b, noise = (torch.randn(1, 1, 5, 5, 5) for _ in range(3))
    assert torch.allclose(F.conv3d(torch.cat([b, noise, a], 1), adapted, padding=1),
                          F.conv3d(torch.cat([a, b], 1), w, padding=1), atol=1e-5)
    mean = map_input_channels(w, [None, 0], fill="mean")
    assert torch.equal(mean[:, 0], w.mean(1)) and torch.equal(mean[:, 1], w[:, 0])
    with pytest.raises(ValueError, match="names channel 2"):
        map_input_channels(w, [2])


def test_channel_mapping_by_names_and_by_argument():
    assert channel_mapping(2, ["FLAIR", "T2", "t1"], ["T1", "FLAIR"]) == [1, None, 0]
    assert channel_mapping(1, ["CT"], ["T1"]) is None  # nothing matches: the spread rule applies
    assert channel_mapping(1, ["T1", "T2"], None, ["T2=0"]) == [None, 0]
    assert channel_mapping(2, ["T1", "T2"], ["a", "b"], ["1=b", "T1=a"]) == [0, 1]
    with pytest.raises(ValueError, match="TARGET=SOURCE"):
        channel_mapping(1, ["T1"], None, ["T1"])
    with pytest.raises(ValueError, match="neither a name"):
        channel_mapping(1, ["T1"], None, ["PD=0"])


def test_kernel_collapse_by_sum_keeps_the_response_to_an_input_constant_along_the_axis():
    torch.manual_seed(0)
    w = torch.randn(4, 2, 3, 3, 3)
    x = torch.randn(1, 2, 1, 7, 7).expand(-1, -1, 6, -1, -1)  # constant along the first spatial axis
    full = F.conv3d(x, w, padding=1)[:, :, 1:-1]  # away from the zero-padded borders of that axis
    collapsed = F.conv3d(x, collapse_kernel_axis(w, 0), padding=(0, 1, 1))[:, :, 1:-1]
    assert collapsed.shape == full.shape and torch.allclose(collapsed, full, atol=1e-5)
    averaged = F.conv3d(x, w.mean(2, keepdim=True), padding=(0, 1, 1))[:, :, 1:-1]
    assert not torch.allclose(averaged, full, atol=1e-3)  # averaging scales it by 1/3
    adapted, notes = adapt_kernel(w, (1, 3, 3))
    assert torch.equal(adapted, collapse_kernel_axis(w, 0)) and notes == ["axis 0: 3 -> 1 (taps summed)"]


def test_kernel_padding_keeps_every_response():
    torch.manual_seed(0)
    w = torch.randn(4, 2, 1, 3, 3)
    x = torch.randn(1, 2, 5, 6, 6)
    padded = pad_kernel_axis(w, 0, 3)
    assert torch.allclose(F.conv3d(x, padded, padding=1), F.conv3d(x, w, padding=(0, 1, 1)), atol=1e-5)
    with pytest.raises(ValueError, match="5 -> 3"):
        adapt_kernel(torch.randn(2, 1, 5, 3, 3), (3, 3, 3))


# ---- format-faithful checkpoints -----------------------------------------------------------------------------------

DNA_KWARGS = {  # nnssl DynamicArchitecturePlans.serialize(): classes as dotted names
    "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_blocks_per_stage": [1, 1, 1],
    "n_conv_per_stage_decoder": [1, 1], "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
    "nonlin": "torch.nn.modules.activation.LeakyReLU", "nonlin_kwargs": {"inplace": True}}


def resenc(kwargs: dict, in_channels: int = 1, num_classes: int = 2, seed: int = 0) -> ResidualEncoderUNet:
    from pydoc import locate

    torch.manual_seed(seed)
    built = {k: locate(v) if k in ("conv_op", "norm_op", "nonlin") else v for k, v in kwargs.items()}
    return ResidualEncoderUNet(input_channels=in_channels, num_classes=num_classes, **built)


def nnssl_checkpoint(state: dict, arch_class_name: str = "ResidualEncoderUNet", arch_kwargs: dict | None = None,
                     spacing=(1.0, 1.0, 1.0), patch=(16, 32, 32), normalization=("ZScoreNormalization",),
                     in_channels: int = 1, **plan_fields) -> dict:
    """What nnssl's AbstractBaseTrainer.save_checkpoint writes (adaptation plan as AdaptationPlan.serialize())."""
    configuration = {
        "data_identifier": "nnsslPlans_onemmiso", "preprocessor_name": "DefaultPreprocessor",
        "spacing_style": "onemmiso", "normalization_schemes": list(normalization), "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": {"order": 3},
        "resampling_fn_mask": "resample_data_or_seg_to_shape", "resampling_fn_mask_kwargs": {"order": 1},
        "spacing": list(spacing), "patch_size": list(patch)}
    plan = {
        "architecture_plans": {"arch_class_name": arch_class_name, "arch_kwargs": arch_kwargs,
                               "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"] if arch_kwargs
                               else None},
        "pretrain_plan": {"dataset_name": "Dataset745_OpenMind", "plans_name": "nnsslPlans",
                          "original_median_spacing_after_transp": [1, 1, 1], "image_reader_writer": "SimpleITKIO",
                          "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
                          "configurations": {"onemmiso": configuration},
                          "experiment_planner_used": "ExperimentPlanner"},
        "pretrain_num_input_channels": in_channels, "recommended_downstream_patchsize": list(patch),
        "key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem",
        "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"], "key_to_lpe": None,
        **plan_fields}
    return {"network_weights": state, "optimizer_state": {}, "grad_scaler_state": None, "logging": {},
            "_best_ema": None, "current_epoch": 1000, "init_args": {"plan": plan["pretrain_plan"],
                                                                     "configuration_name": "onemmiso"},
            "trainer_name": "BaseMAETrainer", "nnssl_adaptation_plan": plan}


def encoder_only(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("encoder.")}


def test_nnssl_checkpoint_loads_with_weights_only_and_is_detected(tmp_path):
    net = resenc(DNA_KWARGS)
    torch.save(nnssl_checkpoint(net.state_dict(), arch_kwargs=DNA_KWARGS), tmp_path / "checkpoint_final.pth")
    checkpoint = load_checkpoint(tmp_path / "checkpoint_final.pth")
    assert detect_format(checkpoint) == "nnssl"
    source = read_source(checkpoint)
    assert source.family == "unet" and source.name == "ResidualEncoderUNet" and not source.encoder_only
    assert source.architecture["network_class_name"].endswith("unet.ResidualEncoderUNet")
    assert source.spacing == [1.0, 1.0, 1.0] and source.patch_size == [16, 32, 32] and source.in_channels == 1
    assert source.normalization == ["ZScoreNormalization"]
    assert source.prefixes == {"encoder": "encoder.stages", "stem": "encoder.stem"}


def test_nnssl_resencl_preset_builds_nnssls_network():
    source = read_source(nnssl_checkpoint({"encoder.stages.0.w": torch.zeros(1)}, "ResEncL"))
    kw = source.architecture["arch_kwargs"]
    assert source.architecture == RESENC_L | {"arch_kwargs": kw}
    assert kw["features_per_stage"] == [32, 64, 128, 256, 320, 320] and kw["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6]


def test_detection_of_each_format_with_wrappers():
    t = torch.zeros(2, 1, 3, 3, 3)
    nnunet = {"network_weights": {"encoder.x.weight": t}, "trainer_name": "nnUNetTrainer",
              "init_args": {"plans": {}, "configuration": "3d_fullres", "fold": 0}}
    assert detect_format(nnunet) == "nnunet"
    assert detect_format({"state_dict": {"module.swinViT.patch_embed.proj.weight": t}}) == "swin"
    assert detect_format({"model.layers1.0.blocks.0.norm1.weight": t}) == "swin"
    for wrapped in ({"module._orig_mod.encoder.a": t}, {"state_dict": {"model.module.encoder.a": t}},
                    {"model": {"_orig_mod.encoder.a": t}}):
        assert detect_format(wrapped) == "state_dict"
        assert list(state_dict_of(wrapped)) == ["encoder.a"]
    # a network with its own `model` child among others keeps its keys
    assert sorted(state_dict_of({"model.a": t, "head.b": t})) == ["head.b", "model.a"]


def test_unknown_format_lists_the_formats():
    for bad in ({"epoch": 3, "notes": "x"}, [torch.zeros(1)]):
        with pytest.raises(UnknownCheckpointFormat) as e:
            detect_format(bad)
        assert all(k in str(e.value) for k in FORMATS)
    with pytest.raises(UnknownCheckpointFormat, match=r"serialize\(\)"):
        detect_format({"network_weights": {}, "nnssl_adaptation_plan": object()})
    with pytest.raises(UnknownCheckpointFormat, match="not supported"):
        read_source(nnssl_checkpoint({"encoder.stages.a": torch.zeros(1)}, "NoSkipResEncL"))


@dataclass
class AdaptationPlan:  # stands for nnssl's class: a plan pickled as an object, not serialize()d
    key_to_encoder: str = "encoder.stages"


def test_command_refuses_unknown_and_unsafe_files_with_the_fix(tmp_path):
    from nnunet_mim.apps.cli import build_parser

    def run(path):
        args = build_parser("import-weights").parse_args(["import-weights", str(path), "-d", "1"])
        with pytest.raises(SystemExit) as e:
            args.func(args)
        return str(e.value)

    torch.save({"epoch": 3, "notes": "x"}, tmp_path / "unknown.pth")
    assert all(k in run(tmp_path / "unknown.pth") for k in FORMATS)
    torch.save({"network_weights": {}, "nnssl_adaptation_plan": AdaptationPlan()}, tmp_path / "object.pth")
    assert "serialize()" in run(tmp_path / "object.pth")


# ---- converter -----------------------------------------------------------------------------------------------------

def test_encoder_only_nnssl_checkpoint_loads_the_encoder_and_lists_the_fresh_decoder():
    source_net = resenc(DNA_KWARGS, seed=1)
    for layout in ("encoder.", ""):  # encoder saved under its own name, or on its own (stem.* / stages.*)
        state = {k[len("encoder."):] if not layout else k: v for k, v in encoder_only(source_net.state_dict()).items()}
        source = read_source(nnssl_checkpoint(state, arch_kwargs=DNA_KWARGS))
        assert source.encoder_only
        target = resenc(DNA_KWARGS, in_channels=1, num_classes=4, seed=2)
        report = convert_weights(source, target)
        for k, v in encoder_only(source_net.state_dict()).items():
            assert torch.equal(target.state_dict()[k], v), k
            assert torch.equal(target.state_dict()["decoder." + k], v)  # the decoder's alias of the encoder
        fresh = [k for k, _ in report.fresh]
        assert fresh and all(k.startswith("decoder.") for k in fresh) and not report.adapted and not report.unused
        assert not any(k.startswith("decoder.encoder.") for k in report.loaded + fresh)  # aliases counted once
        assert report.segmentation and all(".seg_layers." in k for k in report.segmentation)


def test_channels_kernels_and_stages_are_adapted_and_listed():
    source_net = resenc(DNA_KWARGS, seed=1)
    source = read_source(nnssl_checkpoint(source_net.state_dict(), arch_kwargs=DNA_KWARGS))
    target_kwargs = {**DNA_KWARGS, "n_stages": 4, "features_per_stage": [4, 8, 16, 32],
                     "kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * 3, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 3,
                     "n_blocks_per_stage": [1] * 4, "n_conv_per_stage_decoder": [1] * 3}
    target = resenc(target_kwargs, in_channels=3, num_classes=2, seed=2)
    report = convert_weights(source, target, ["T1", "T2", "FLAIR"])
    stem = "encoder.stem.convs.0.conv.weight"
    expected = collapse_kernel_axis(spread_input_channels(source.state[stem], 3), 0)
    assert torch.allclose(target.state_dict()[stem], expected)
    adapted = dict(report.adapted)
    assert "input channels adapted" in adapted[stem] and "3 -> 1 (taps summed)" in adapted[stem]
    assert "repeated and divided by 3" in report.channels
    fresh = dict(report.fresh)
    assert fresh["encoder.stages.3.blocks.0.conv1.conv.weight"] == "not in the checkpoint"  # the extra stage
    assert torch.equal(target.state_dict()["encoder.stages.2.blocks.0.conv1.conv.weight"],
                       source.state["encoder.stages.2.blocks.0.conv1.conv.weight"])
    text = format_import_report(report, "Pre-flight report")
    assert "encoder.stages.3" in text and "fresh (nnU-Net's initialisation)" in text and "taps summed" in text


def test_primus_position_embedding_is_resampled_to_the_target_grid():
    from dynamic_network_architectures.architectures.primus import Primus

    from nnunet_mim.core.pos_embed import resize_pos_embed

    def primus(patch, in_channels, seed):
        torch.manual_seed(seed)
        return Primus(in_channels, 48, (8, 8, 8), 2, eva_depth=1, eva_numheads=4, input_shape=patch)

    source_net = primus((32, 32, 32), 1, 1)
    state = {k: v for k, v in source_net.state_dict().items() if not k.startswith("up_projection.")}
    state["decoder.mae_head.weight"] = torch.zeros(3)  # a pretraining decoder: no place in the segmentation net
    checkpoint = nnssl_checkpoint(state, "PrimusM", patch=(32, 32, 32), key_to_encoder="eva",
                                  key_to_stem="down_projection", keys_to_in_proj=["down_projection.proj"],
                                  key_to_lpe="eva.pos_embed")
    source = read_source(checkpoint)
    assert source.family == "primus" and source.prefixes == {"encoder": "eva", "stem": "down_projection",
                                                             "lpe": "eva.pos_embed"}
    target = primus((16, 32, 32), 2, 2)
    report = convert_weights(source, target, grids=([4, 4, 4], [2, 4, 4]))
    expected = resize_pos_embed(state["eva.pos_embed"], [4, 4, 4], [2, 4, 4])
    assert torch.allclose(target.state_dict()["eva.pos_embed"], expected)
    assert "token grid [4, 4, 4] to [2, 4, 4]" in dict(report.adapted)["eva.pos_embed"]
    assert torch.allclose(target.state_dict()["down_projection.proj.weight"],
                          spread_input_channels(state["down_projection.proj.weight"], 2))
    assert report.unused == ["decoder.mae_head.weight"]
    assert all(k.startswith("up_projection.") for k, _ in report.fresh)


def test_swin_ssl_encoder_gets_a_swin_configuration_and_loads_with_adapted_channels(tmp_path):
    from nnunet_mim.architectures.swin_unetr import SwinUNETR, build_monai_swin_unetr

    torch.manual_seed(2)
    monai = build_monai_swin_unetr(1, 14, "merging_legacy", feature_size=12, window_size=4)
    # NVIDIA Swin-UNETR SSL layout: encoder only, no `swinViT.` prefix, MLP as fc1/fc2, under state_dict, DDP prefix
    vit = {f"module.{k[len('swinViT.'):]}".replace(".mlp.linear", ".mlp.fc"): v
           for k, v in monai.state_dict().items() if k.startswith("swinViT.")}
    torch.save({"state_dict": vit, "epoch": 100}, tmp_path / "model_swinvit.pt")
    checkpoint = load_checkpoint(tmp_path / "model_swinvit.pt")
    assert detect_format(checkpoint) == "swin"
    source = read_source(checkpoint)
    assert (source.swin_feature_size, source.swin_window_size, source.in_channels) == (12, 4, 1)
    overrides = configuration_overrides(source, PARENT, "3d_swin_ssl", "nnUNetPlans", patch_size=[32, 32, 64])
    kwargs = overrides["architecture"]["arch_kwargs"]
    assert (kwargs["feature_size"], kwargs["window_size"], kwargs["downsample"]) == (12, 4, "merging_legacy")
    target = SwinUNETR(2, 3, False, **kwargs)
    report = convert_weights(source, target, ["T1", "T2"])
    embed = "encoder.swinViT.patch_embed.proj.weight"
    assert torch.allclose(target.state_dict()[embed], spread_input_channels(monai.state_dict()[embed[8:]], 2))
    assert len(report.loaded) + len(report.adapted) == len(vit) and [k for k, _ in report.adapted] == [embed]
    assert report.fresh and all(k.startswith("decoder.") for k, _ in report.fresh)


def test_nnunet_checkpoint_of_another_plan_with_pretraining_heads_and_channel_names():
    net = resenc(DNA_KWARGS, in_channels=2, seed=4)
    state = {**net.state_dict(), "mim_heads.rec.weight": torch.zeros(2)}
    plans = {"configurations": {"3d_fullres": {
        "spacing": [1.5, 1.0, 1.0], "patch_size": [16, 32, 32], "normalization_schemes": ["ZScoreNormalization"] * 2,
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                         "arch_kwargs": DNA_KWARGS, "_kw_requires_import": ["conv_op", "norm_op", "nonlin"]}}}}
    checkpoint = {"network_weights": {f"module.{k}": v for k, v in state.items()}, "trainer_name": "HybridMIMPretrainer",
                  "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": "all",
                                "dataset_json": {"channel_names": {"0": "T1", "1": "FLAIR"}}}}
    source = read_source(checkpoint)
    assert source.format == "nnunet" and source.channel_names == ["T1", "FLAIR"] and source.in_channels == 2
    assert source.spacing == [1.5, 1.0, 1.0] and source.architecture["arch_kwargs"] == DNA_KWARGS
    target = resenc(DNA_KWARGS, in_channels=2, seed=5)
    report = convert_weights(source, target, ["FLAIR", "T1"])  # the same channels, in the other order
    stem = "encoder.stem.convs.0.conv.weight"
    assert torch.equal(target.state_dict()[stem], state[stem].flip(1)) and "by name" in report.channels
    assert report.pretraining_only == ["mim_heads.rec.weight"] and not report.fresh


# ---- configuration and warnings ------------------------------------------------------------------------------------

PARENT = {"patch_size": [20, 40, 40], "batch_size": 2, "spacing": [2.0, 2.0, 2.0],
          "normalization_schemes": ["CTNormalization"]}


def test_configuration_takes_the_checkpoints_network_spacing_and_patch():
    source = read_source(nnssl_checkpoint(resenc(DNA_KWARGS).state_dict(), arch_kwargs=DNA_KWARGS,
                                          patch=(18, 30, 30)))
    overrides = configuration_overrides(source, PARENT, "3d_imported", "nnUNetPlans")
    assert overrides["patch_size"] == [20, 32, 32]  # rounded up to the total stride 4
    assert overrides["architecture"]["arch_kwargs"]["features_per_stage"] == [4, 8, 16]
    assert overrides["spacing"] == [1.0, 1.0, 1.0] and overrides["data_identifier"] == "nnUNetPlans_3d_imported"
    kept = configuration_overrides(source, PARENT, "3d_imported", "nnUNetPlans", patch_size=[16, 16, 16],
                                   spacing="target")
    assert "spacing" not in kept and "data_identifier" not in kept and kept["patch_size"] == [16, 16, 16]
    plain = read_source({"state_dict": resenc(DNA_KWARGS).state_dict()})
    with pytest.raises(ValueError, match="--into"):
        configuration_overrides(plain, PARENT, "x", "nnUNetPlans")


def test_normalisation_and_spacing_warnings():
    source = read_source(nnssl_checkpoint(resenc(DNA_KWARGS).state_dict(), arch_kwargs=DNA_KWARGS))
    warnings = plan_warnings(source, ["CTNormalization"], [0.8, 0.8, 3.0])
    assert len(warnings) == 2 and "ZScoreNormalization" in warnings[0] and "CT intensities" in warnings[0]
    assert "kept" in warnings[0] and "SPACING" in warnings[1]
    assert plan_warnings(source, ["ZScoreNormalization"], [1.0, 1.0, 1.0]) == []


# ---- end to end ----------------------------------------------------------------------------------------------------

CONFIG = "3d_nnssl_tiny"
FINETUNE = "nnUNetTrainerMIMFinetune"


@pytest.mark.e2e
def test_import_nnssl_resenc_then_finetune_and_predict(tiny_workspace, tmp_path):
    ws = tiny_workspace
    import json

    plans = json.loads((ws.preprocessed / f"Dataset{TINY_ID}_Tiny" / "nnUNetPlans.json").read_text())
    spacing = plans["configurations"]["3d_fullres"]["spacing"]
    kwargs = {**DNA_KWARGS, "n_stages": 4, "features_per_stage": [4, 8, 16, 16], "kernel_sizes": [[3, 3, 3]] * 4,
              "strides": [[1, 1, 1]] + [[2, 2, 2]] * 3, "n_blocks_per_stage": [1] * 4,
              "n_conv_per_stage_decoder": [1] * 3}
    checkpoint = tmp_path / "checkpoint_final.pth"
    torch.save(nnssl_checkpoint(encoder_only(resenc(kwargs, seed=3).state_dict()), arch_kwargs=kwargs,
                                spacing=spacing, patch=(16, 32, 32)), checkpoint)
    out = ws.run("nnunet_mim", "import-weights", str(checkpoint), "-d", str(TINY_ID), "-c", CONFIG).stdout
    assert "Pre-flight report" in out and "encoder only" in out and "adapted: 0 tensors" in out
    assert re.search(r"fresh \(nnU-Net's initialisation\): \d+ tensors \[decoder\.", out), out
    assert "nnUNetv2_preprocess" not in out  # same spacing: the parent's data is reused
    command = re.search(r"^  (nnUNetv2_train .*)$", out, re.M).group(1).split()
    assert command[:4] == ["nnUNetv2_train", str(TINY_ID), CONFIG, "FOLD"] and command[4:6] == ["-tr", FINETUNE]
    converted = command[command.index("-pretrained_weights") + 1]

    # before training: the network of the new configuration, loaded from the converted file, has the encoder
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_mim.nnunet.weights import load_pretrained_weights_safely

    cm = PlansManager(str(ws.preprocessed / f"Dataset{TINY_ID}_Tiny" / "nnUNetPlans.json")).get_configuration(CONFIG)
    network = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, 1, 4, deep_supervision=True)
    load_pretrained_weights_safely(network, converted)
    state = network.state_dict()
    pretrained = load_checkpoint(checkpoint)["network_weights"]
    assert pretrained and all(torch.equal(state[k], v) for k, v in pretrained.items())

    command[3] = "0"
    train = ws.run(*command, "-device", "cpu", **TRAIN_BUDGET)
    assert "Pre-flight check" in train.stdout and "0 missing, 0 with another shape" in train.stdout
    prediction = tmp_path / "pred"
    ws.run("nnUNetv2_predict", "-i", str(ws.raw / f"Dataset{TINY_ID}_Tiny" / "imagesTs"), "-o", str(prediction),
           "-d", str(TINY_ID), "-c", CONFIG, "-f", "0", "-tr", FINETUNE, "-device", "cpu", "-npp", "1", "-nps", "1",
           "--disable_tta")
    assert len(list(prediction.glob("*.nii.gz"))) == 2


@pytest.mark.e2e
def test_other_formats_through_the_console_scripts_pass_the_preflight_check(tiny_workspace, tmp_path):
    """nnU-Net checkpoint of another plan (2 channels, pretraining heads, DDP prefix), a plain state dict with
    torch.compile's prefix (--into an existing configuration) and NVIDIA-style Swin SSL weights: each is imported with
    the real command, and the converted file passes `nnunet_mim check-weights` against the network nnUNetv2_train
    builds."""
    import json

    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_mim.architectures.swin_unetr import build_monai_swin_unetr

    ws = tiny_workspace
    plans_file = ws.preprocessed / f"Dataset{TINY_ID}_Tiny" / "nnUNetPlans.json"
    spacing = json.loads(plans_file.read_text())["configurations"]["3d_fullres"]["spacing"]

    def imported(checkpoint, *args) -> tuple[str, str]:
        out = ws.run("nnunet_mim", "import-weights", str(checkpoint), "-d", str(TINY_ID), *args).stdout
        command = re.search(r"^  (nnUNetv2_train .*)$", out, re.M).group(1).split()
        return out, command[command.index("-pretrained_weights") + 1]

    def preflight(converted, configuration, trainer) -> str:
        out = ws.run("nnunet_mim", "check-weights", converted, "-d", str(TINY_ID), "-c", configuration, "-tr",
                     trainer).stdout
        assert "OK: the checkpoint fits." in out and " 0 missing, 0 with another shape" in out, out
        return out

    # 1. an nnU-Net (pretraining) checkpoint of another dataset's plans: 2 input channels -> the target's 1
    kwargs = {**DNA_KWARGS, "n_stages": 4, "features_per_stage": [4, 8, 16, 16], "kernel_sizes": [[3, 3, 3]] * 4,
              "strides": [[1, 1, 1]] + [[2, 2, 2]] * 3, "n_blocks_per_stage": [1] * 4,
              "n_conv_per_stage_decoder": [1] * 3}
    net = resenc(kwargs, in_channels=2, seed=6)
    plans = {"configurations": {"3d_fullres": {
        "spacing": spacing, "patch_size": [16, 32, 32], "normalization_schemes": ["ZScoreNormalization"] * 2,
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                         "arch_kwargs": kwargs, "_kw_requires_import": ["conv_op", "norm_op", "nonlin"]}}}}
    torch.save({"network_weights": {f"module.{k}": v for k, v in {**net.state_dict(),
                                                                   "mim_heads.rec.weight": torch.zeros(2)}.items()},
                "trainer_name": "HybridMIMPretrainer",
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": "all",
                              "dataset_json": {"channel_names": {"0": "T1", "1": "T2"}}}}, tmp_path / "nnunet.pth")
    out, converted = imported(tmp_path / "nnunet.pth", "-c", "3d_from_nnunet")
    assert re.search(r"adapted: [1-9]\d* tensors", out) and "input channels" in out, out
    assert "pretraining-only (dropped, as intended)" in out, out
    preflight(converted, "3d_from_nnunet", FINETUNE)

    # 2. a plain state dict (torch.compile prefix) into the existing tiny configuration
    cm = PlansManager(str(plans_file)).get_configuration("3d_tiny")
    tiny = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import, 1, 4, deep_supervision=True)
    torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in tiny.state_dict().items()}}, tmp_path / "plain.pt")
    _, converted = imported(tmp_path / "plain.pt", "--into", "3d_tiny")
    preflight(converted, "3d_tiny", FINETUNE)
    kept = load_checkpoint(converted)["network_weights"]
    assert all(torch.equal(kept[k], v) for k, v in tiny.state_dict().items() if ".seg_layers." not in k)

    # 3. Swin SSL weights (encoder only, NVIDIA layout) -> a new Swin configuration
    monai = build_monai_swin_unetr(1, 14, "merging_legacy", feature_size=12, window_size=4)
    vit = {f"module.{k[len('swinViT.'):]}".replace(".mlp.linear", ".mlp.fc"): v
           for k, v in monai.state_dict().items() if k.startswith("swinViT.")}
    torch.save({"state_dict": vit, "epoch": 100}, tmp_path / "model_swinvit.pt")
    out, converted = imported(tmp_path / "model_swinvit.pt", "-c", "3d_swin_ssl", "--patch", "32", "32", "64")
    assert "nnUNetTrainerSwinUNETR" in out
    preflight(converted, "3d_swin_ssl", "nnUNetTrainerSwinUNETR")
