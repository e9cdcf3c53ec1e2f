"""Primus end to end through the real console scripts, on tiny real data, on the CPU:
add-config primus -> nnUNetv2_train -pretrained_weights (a Primus state dict) -> nnUNetv2_predict; a state dict of
another token grid is refused by -pretrained_weights and fits once its position embedding is resized with
resize_pos_embed; a non-Primus configuration gets the command that adds one.

Tiny Primus: embed 48, depth 2, 4 heads (the 3D RoPE needs head widths divisible by 6), 8^3 tokens, patch 16x32x32
(token grid 2x4x4); one epoch of two iterations per run.
"""
from __future__ import annotations

import json

import pytest
import SimpleITK as sitk
import torch

from helpers import TINY_CONFIG, TINY_DATASET, TINY_ID, TRAIN_BUDGET, fold_folder
from nnunet_mim.core.pos_embed import resize_pos_embed
from nnunet_mim.nnunet.primus_plans import PRIMUS_NETWORK_CLASS, primus_configuration

PRIMUS = "3d_primus_tiny"
PRIMUS_32 = "3d_primus_tiny32"  # the same network on a 32^3 patch: token grid 4x4x4
TINY_ARCH = ["--size", "S", "--embed-dim", "48", "--depth", "2", "--num-heads", "4", "--patch-embed-size", "8", "8",
             "8"]
ONE_EPOCH = {**TRAIN_BUDGET, "nnUNet_mim_epochs": "1"}
FINETUNE = "nnUNetTrainerMIMFinetunePrimus"


# ---- the configuration writer on a plain dict (no workspace) ---------------------------------------------------------
def test_configuration_rounds_the_patch_to_whole_tokens_and_names_primus():
    parent = {"patch_size": [20, 37, 60], "batch_size": 2}
    config = primus_configuration(parent, "M", patch_embed_size=[4, 8, 16])
    kw = config["architecture"]["arch_kwargs"]
    assert config["architecture"]["network_class_name"] == PRIMUS_NETWORK_CLASS
    assert config["patch_size"] == kw["input_shape"] == [20, 40, 64]  # nearest multiples per axis
    assert (kw["embed_dim"], kw["eva_depth"], kw["eva_numheads"]) == (864, 16, 12)  # the paper's Primus-M
    assert (kw["drop_path_rate"], kw["init_values"], kw["scale_attn_inner"]) == (0.2, 0.1, True)
    json.dumps(config)  # plans are JSON


@pytest.mark.parametrize("size, extra, match", [
    ("S", {"eva_numheads": 5}, "not divisible"),
    ({"embed_dim": 48, "eva_depth": 2, "eva_numheads": 3}, {}, "divisible by 6"),
    ("B", {"embed_dims": 48}, "no argument"),
    ("X", {}, "one of"),
])
def test_configuration_errors_name_the_fix(size, extra, match):
    with pytest.raises(ValueError, match=match):
        primus_configuration({"patch_size": [64, 64, 64], "batch_size": 2}, size, **extra)
    with pytest.raises(ValueError, match="powers of two"):
        primus_configuration({"patch_size": [64, 64, 64], "batch_size": 2}, "S", patch_embed_size=6)


# ---- end to end -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def primus_configs(tiny_workspace):
    ws = tiny_workspace
    out = ws.run("nnunet_mim", "add-config", "primus", "-d", str(TINY_ID), "-n", PRIMUS, "--patch", "16", "30", "34",
                 *TINY_ARCH).stdout
    assert "patch [16, 32, 32] (requested [16, 30, 34]) -> token grid [2, 4, 4] = 32 tokens" in out, out
    out = ws.run("nnunet_mim", "add-config", "primus", "-d", str(TINY_ID), "-n", PRIMUS_32, "--patch", "32", "32",
                 "32", *TINY_ARCH).stdout
    assert "token grid [4, 4, 4]" in out, out
    return ws


PRETRAINED_POS = 0.5  # a constant position embedding: recognisable after a few finetuning steps


def build_primus(ws, configuration: str):
    """The network nnUNetv2_train builds for ``configuration`` (in this process; nnU-Net's paths are not needed)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_mim.trainers.primus import nnUNetTrainerMIMFinetunePrimus

    folder = ws.preprocessed / TINY_DATASET
    plans = PlansManager(json.loads((folder / "nnUNetPlans.json").read_text()))
    heads = plans.get_label_manager(json.loads((folder / "dataset.json").read_text())).num_segmentation_heads
    return nnUNetTrainerMIMFinetunePrimus.build_network_architecture(plans, plans.get_configuration(configuration),
                                                                     1, heads)


@pytest.fixture(scope="module")
def pretrained(primus_configs):
    """A Primus state dict for the 16x32x32 configuration (token grid 2x4x4), with a constant position embedding."""
    state = build_primus(primus_configs, PRIMUS).state_dict()
    assert state["eva.pos_embed"].shape == (1, 32, 48)
    state["eva.pos_embed"] = torch.full_like(state["eva.pos_embed"], PRETRAINED_POS)
    path = primus_configs.root / "primus_grid244.pth"
    torch.save({"network_weights": state}, path)
    return path


@pytest.fixture(scope="module")
def finetuned(primus_configs, pretrained):
    proc = primus_configs.run("nnUNetv2_train", str(TINY_ID), PRIMUS, "0", "-tr", FINETUNE, "-pretrained_weights",
                              str(pretrained), "-device", "cpu", **ONE_EPOCH)
    return proc, fold_folder(primus_configs, FINETUNE, PRIMUS, 0)


def test_plans_entry(primus_configs):
    plans = json.loads((primus_configs.preprocessed / TINY_DATASET / "nnUNetPlans.json").read_text())
    config = plans["configurations"][PRIMUS]
    assert config["inherits_from"] == "3d_fullres" and config["patch_size"] == [16, 32, 32]
    assert config["architecture"]["network_class_name"] == PRIMUS_NETWORK_CLASS
    assert config["architecture"]["arch_kwargs"]["input_shape"] == [16, 32, 32]


def test_finetune_recipe_and_pretrained_weights(finetuned):
    proc, fold = finetuned
    assert "Pre-flight check" in proc.stdout and "0 missing, 0 with another shape" in proc.stdout
    assert "token grid [2, 4, 4] = 32 tokens" in proc.stdout and "no deep supervision" in proc.stdout
    assert "WARNING" not in proc.stdout  # weights were loaded
    ck = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    group = ck["optimizer_state"]["param_groups"][0]
    assert "amsgrad" in group and tuple(group["betas"]) == (0.9, 0.98) and group["weight_decay"] == 0.05
    # the pretrained embedding was loaded and moved by at most two small AdamW steps (a fresh one is ~N(0, 0.02))
    assert (ck["network_weights"]["eva.pos_embed"] - PRETRAINED_POS).abs().max() < 1e-2
    assert json.loads((fold / "debug.json").read_text())["enable_deep_supervision"] == "False"
    assert (fold / "validation" / "summary.json").is_file()  # nnU-Net's sliding-window validation ran


def test_predict(primus_configs, finetuned):
    ws = primus_configs
    out = ws.root / "predictions_primus"
    ws.run("nnUNetv2_predict", "-i", str(ws.raw / TINY_DATASET / "imagesTs"), "-o", str(out), "-d", str(TINY_ID),
           "-c", PRIMUS, "-f", "0", "-tr", FINETUNE, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta")
    predicted = sorted(out.glob("*.nii.gz"))
    assert len(predicted) == 2
    for p in predicted:
        ref = sitk.ReadImage(str(ws.raw / TINY_DATASET / "labelsTs" / p.name))
        assert sitk.ReadImage(str(p)).GetSize() == ref.GetSize()


def test_another_token_grid_needs_the_position_embedding_resized(primus_configs, pretrained):
    ws = primus_configs
    run = ws.run("nnUNetv2_train", str(TINY_ID), PRIMUS_32, "0", "-tr", FINETUNE, "-pretrained_weights",
                 str(pretrained), "-device", "cpu", check=False, **ONE_EPOCH)
    assert run.returncode != 0
    assert "eva.pos_embed: (1, 32, 48) -> (1, 64, 48)" in run.stdout + run.stderr
    state = torch.load(pretrained, map_location="cpu", weights_only=True)["network_weights"]
    state["eva.pos_embed"] = resize_pos_embed(state["eva.pos_embed"], (2, 4, 4), (4, 4, 4))
    converted = ws.root / "primus_grid444.pth"
    torch.save({"network_weights": state}, converted)
    ok = ws.run("nnunet_mim", "check-weights", str(converted), "-d", str(TINY_ID), "-c", PRIMUS_32, "-tr", FINETUNE)
    assert "OK: the checkpoint fits." in ok.stdout
    build_primus(ws, PRIMUS_32).load_state_dict(state)  # strict


def test_a_unet_configuration_gets_the_command_that_adds_primus(primus_configs):
    with pytest.raises(RuntimeError, match=f"nnunet_mim add-config primus -d {TINY_DATASET}"):
        build_primus(primus_configs, TINY_CONFIG)
