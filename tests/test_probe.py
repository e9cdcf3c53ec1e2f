"""The downstream probe: frozen parameters stay frozen; the command runs both arms through nnU-Net."""
from __future__ import annotations

import json

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from helpers import TINY_CONFIG, TINY_ID, TRAIN_BUDGET, fold_folder
from nnunet_mim.nnunet.weights import freeze_all_but
from nnunet_mim.trainers.probe import probe_trainer_for


def _unet():
    return PlainConvUNet(1, 3, (4, 8, 16), torch.nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 3, (1, 1),
                         conv_bias=True, norm_op=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU,
                         deep_supervision=False)


@pytest.mark.parametrize("part", ["heads", "decoder"])
def test_frozen_parameters_do_not_move_under_adamw_with_weight_decay(part):
    torch.manual_seed(0)
    net = _unet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trained, total = freeze_all_but(net, part)
    assert 0 < trained < total
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(2, 1, 8, 16, 16)).square().mean().backward()
        opt.step()
    after = net.state_dict()
    trainable = {k for k in before if (".seg_layers." in k if part == "heads" else k.startswith("decoder."))}
    assert all(torch.equal(before[k], after[k]) for k in before if k not in trainable)
    assert any(not torch.equal(before[k], after[k]) for k in trainable)


def test_probe_trainer_per_network_family():
    assert probe_trainer_for("dynamic_network_architectures.architectures.unet.PlainConvUNet") == "nnUNetTrainerProbe"
    assert probe_trainer_for("nnunet_mim.architectures.swin_unetr.SwinUNETR", "decoder") == \
        "nnUNetTrainerSwinUNETRProbeDecoder"
    assert probe_trainer_for("nnunet_mim.architectures.sac_vit.SACViTSeg") == "nnUNetTrainerSACViTProbe"


def test_probe_command_end_to_end(tiny_workspace, tmp_path):
    ws = tiny_workspace
    ws.run("nnUNetv2_train", str(TINY_ID), TINY_CONFIG, "all", "-tr", "HybridMIMPretrainer", "-device", "cpu",
           **TRAIN_BUDGET)
    checkpoint = fold_folder(ws, "HybridMIMPretrainer", TINY_CONFIG) / "checkpoint_final.pth"
    out = tmp_path / "probe"
    proc = ws.run("nnunet_mim", "probe", str(checkpoint), "-d", str(TINY_ID), "-c", TINY_CONFIG, "--cases", "2",
                  "--epochs", "1", "--iters", "2", "--processes", "1", "-o", str(out))
    result = json.loads((out / "probe.json").read_text())
    assert result["trainer"] == "nnUNetTrainerProbe" and len(result["train_cases"]) == 2
    assert 0 <= result["pretrained"]["dice"] <= 1 and 0 <= result["random"]["dice"] <= 1
    assert result["difference"] == pytest.approx(result["pretrained"]["dice"] - result["random"]["dice"])
    assert "difference" in proc.stdout
    # through nnU-Net's real training loop, the frozen body still holds the pretrained weights
    pre = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    final = next((out / "pretrained").rglob("checkpoint_final.pth"))
    probed = torch.load(final, map_location="cpu", weights_only=False)["network_weights"]
    body = [k for k in probed if ".seg_layers." not in k]
    assert body and all(torch.equal(probed[k], pre[k]) for k in body)
    assert any(not torch.equal(probed[k], pre[k]) for k in probed if ".seg_layers." in k and k in pre)


def test_probe_during_pretraining_probes_each_epochs_weights_and_trains_the_random_body_once(tiny_workspace, tmp_path):
    ws = tiny_workspace
    results = tmp_path / "results"
    ws.run("nnUNetv2_train", str(TINY_ID), TINY_CONFIG, "all", "-tr", "HybridMIMPretrainer", "-device", "cpu",
           nnUNet_results=str(results), nnUNet_mim_probe_every="1", nnUNet_mim_probe_dataset=str(TINY_ID),
           nnUNet_mim_probe_budget="1x2", **TRAIN_BUDGET)
    folder = results / f"Dataset{TINY_ID}_Tiny" / f"HybridMIMPretrainer__nnUNetPlans__{TINY_CONFIG}" / "fold_all"
    probes = [json.loads((folder / "probe" / f"epoch_{e:04d}" / "probe.json").read_text()) for e in (0, 1)]
    # the random body is trained once and reused: the second probe trains only its pretrained arm
    assert len(list((folder / "probe" / "random").rglob("checkpoint_final.pth"))) == 1
    assert (folder / "probe" / "epoch_0001" / "probe_log.txt").read_text().count("$ nnUNetv2_train") == 1
    assert probes[0]["random"] == probes[1]["random"]
    # each probe froze the weights of its own epoch: the last one those of the final checkpoint, the first others
    final = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    bodies = []
    for e in (0, 1):
        ck = next((folder / "probe" / f"epoch_{e:04d}" / "pretrained").rglob("checkpoint_final.pth"))
        weights = torch.load(ck, map_location="cpu", weights_only=False)["network_weights"]
        bodies.append({k: v for k, v in weights.items() if k.startswith("encoder.")})
    pretrained = final["network_weights"]
    assert bodies[1] and all(torch.equal(v, pretrained[k]) for k, v in bodies[1].items())
    assert any(not torch.equal(v, bodies[1][k]) for k, v in bodies[0].items())
    # the curve is in the checkpoint's log (so --c keeps it) and no probe checkpoint is left behind
    logged = final["logging"]["probe_dice"]
    assert logged == pytest.approx([p["pretrained"]["dice"] for p in probes])
    assert not (folder / "checkpoint_probe.pth").exists()


def test_a_probe_setting_without_its_dataset_is_refused_before_training(tiny_workspace, tmp_path):
    proc = tiny_workspace.run("nnUNetv2_train", str(TINY_ID), TINY_CONFIG, "all", "-tr", "HybridMIMPretrainer",
                              "-device", "cpu", nnUNet_results=str(tmp_path), nnUNet_mim_probe_every="1",
                              nnUNet_mim_probe_dataset="987", check=False, **TRAIN_BUDGET)
    assert proc.returncode != 0 and "nnUNet_mim_probe_dataset='987'" in proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("checkpoint_*.pth"))


def test_the_progress_plot_gets_a_probe_panel_and_old_logs_get_nan_padding(tmp_path):
    import matplotlib.pyplot as plt

    from nnunet_mim.nnunet.progress import ComponentLocalLogger

    def logger_with(probe: list[float]) -> ComponentLocalLogger:
        log = ComponentLocalLogger(["reconstruction"])
        for epoch in range(3):
            for key in log.my_fantastic_logging:
                value = [0.5] if key == "dice_per_class_or_region" else 0.5 + 0.01 * epoch
                log.log(key, probe[epoch] if key.startswith("probe_") else value, epoch)
        return log

    heights = {}
    for name, probe in (("without", [float("nan")] * 3), ("with", [float("nan"), 0.4, 0.6])):
        (tmp_path / name).mkdir()
        logger_with(probe).plot_progress_png(str(tmp_path / name))
        heights[name] = plt.imread(tmp_path / name / "progress.png").shape[0]
    assert heights["with"] > heights["without"]
    # a checkpoint of a run from before the probe existed: its lists are padded, one entry per epoch
    old = logger_with([float("nan")] * 3).get_checkpoint()
    for key in ("probe_dice", "probe_random_dice", "train_reconstruction"):
        del old[key]
    resumed = ComponentLocalLogger(["reconstruction"])
    resumed.load_checkpoint(old)
    assert len(resumed.my_fantastic_logging["probe_dice"]) == 3
    assert len(resumed.my_fantastic_logging["train_reconstruction"]) == 3
