"""Safe loading and the pre-flight report: keys, shapes, channels, GPU-saved checkpoints on a CPU."""
import pickle

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_mim.nnunet.weights import (compare_state_dicts, format_report, load_checkpoint, load_pretrained_weights_safely,
                                state_dict_of, weights_digest)


def _net(in_ch=1, classes=3, features=(8, 16, 32)):
    return PlainConvUNet(in_ch, 3, features, nn.Conv3d, 3, [1, 2, 2], 2, classes, 2, conv_bias=True,
                         norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU)


def _nnunet_like_checkpoint(network, path):
    torch.save({"network_weights": {**network.state_dict(), "mim_heads.count.weight": torch.zeros(9, 32)},
                "logging": {"train_losses": [np.float64(0.5)], "x": [np.array([1.0, 2.0])]},
                "init_args": {"plans": {"a": [1, 2]}, "fold": "all"}, "trainer_name": "HybridMIMPretrainer",
                "current_epoch": 3}, path)


def test_nnunet_checkpoint_loads_with_weights_only(tmp_path):
    _nnunet_like_checkpoint(_net(classes=1), tmp_path / "c.pth")
    ck = load_checkpoint(str(tmp_path / "c.pth"))
    assert ck["trainer_name"] == "HybridMIMPretrainer" and "mim_heads.count.weight" in state_dict_of(ck)


def test_weights_digest_is_the_model_not_the_file(tmp_path):
    from safetensors.torch import save_file

    network = _net(classes=1)
    _nnunet_like_checkpoint(network, tmp_path / "a.pth")
    state = network.state_dict()
    torch.save({"network_weights": {**dict(reversed(list(state.items()))), "mim_heads.count.weight": torch.zeros(9, 32)},
                "logging": {"train_losses": [np.float64(0.7)]}, "current_epoch": 9}, tmp_path / "b.pth")
    assert (tmp_path / "a.pth").read_bytes() != (tmp_path / "b.pth").read_bytes()
    assert weights_digest(tmp_path / "a.pth") == weights_digest(tmp_path / "b.pth")  # other logs, other order
    save_file({**{k: v.clone() for k, v in state.items()}, "mim_heads.count.weight": torch.zeros(9, 32)},
              str(tmp_path / "c.safetensors"))
    assert weights_digest(tmp_path / "c.safetensors") == weights_digest(tmp_path / "a.pth")
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    changed = {**state, key: state[key].clone()}
    changed[key].view(-1)[0] += 1e-6  # one value, barely
    torch.save({"network_weights": {**changed, "mim_heads.count.weight": torch.zeros(9, 32)}}, tmp_path / "d.pth")
    assert weights_digest(tmp_path / "d.pth") != weights_digest(tmp_path / "a.pth")
    torch.save({"network_weights": {**state, "mim_heads.count.weight": torch.zeros(9, 32, dtype=torch.float64)}},
               tmp_path / "e.pth")  # same values, another dtype: another model file
    assert weights_digest(tmp_path / "e.pth") != weights_digest(tmp_path / "a.pth")


def test_arbitrary_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"network_weights": Evil()}, f)
    with pytest.raises(RuntimeError, match="weights_only=True"):
        load_checkpoint(str(tmp_path / "evil.pth"))


def test_report_transfers_everything_but_seg_layers(tmp_path):
    _nnunet_like_checkpoint(_net(classes=1), tmp_path / "c.pth")
    target = _net(classes=4)
    report = load_pretrained_weights_safely(target, str(tmp_path / "c.pth"))
    assert report.ok and not report.missing and report.pretraining_only == ["mim_heads.count.weight"]
    src = _net(classes=1)
    src.load_state_dict(state_dict_of(load_checkpoint(str(tmp_path / "c.pth"))), strict=False)
    for k, v in target.state_dict().items():
        if ".seg_layers." not in k:
            assert torch.equal(v, src.state_dict()[k])


def test_other_architecture_lists_keys_shapes_and_fix(tmp_path):
    _nnunet_like_checkpoint(_net(features=(8, 16, 32)), tmp_path / "c.pth")
    with pytest.raises(RuntimeError) as e:
        load_pretrained_weights_safely(_net(features=(16, 32, 64)), str(tmp_path / "c.pth"))
    text = str(e.value)
    assert "Shape mismatch" in text and "encoder.stages.0.0.convs.0.conv.weight: (8, 1, 3, 3, 3) -> (16, 1, 3, 3, 3)" \
        in text and "How to fix" in text and "import-unlabeled" in text


def test_input_channel_mismatch_is_named(tmp_path):
    _nnunet_like_checkpoint(_net(in_ch=1), tmp_path / "c.pth")
    report = compare_state_dicts(state_dict_of(load_checkpoint(str(tmp_path / "c.pth"))), _net(in_ch=2))
    assert report.input_channels == (1, 2) and report.channel_mismatch
    assert "INPUT CHANNELS: the checkpoint was trained on 1 input channel(s), the target dataset has 2" in \
        format_report(report, "c.pth")


def test_missing_keys_are_listed(tmp_path):
    net = _net()
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("decoder.stages.1")}
    torch.save(state, tmp_path / "partial.pth")
    report = compare_state_dicts(state_dict_of(load_checkpoint(str(tmp_path / "partial.pth"))), net)
    assert not report.ok and all(k.startswith("decoder.stages.1") for k in report.missing)


def test_gpu_saved_checkpoint_loads_on_cpu(tmp_path, monkeypatch):
    """Write storages tagged 'cuda:0' (as a GPU run does); a CPU-only machine must still read them."""
    net = _net(classes=1)
    real_tag = torch.serialization.location_tag
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    _nnunet_like_checkpoint(net, tmp_path / "gpu.pth")
    monkeypatch.setattr(torch.serialization, "location_tag", real_tag)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.pth", weights_only=False)  # what nnU-Net 2.8's loader does
    report = load_pretrained_weights_safely(_net(classes=2), str(tmp_path / "gpu.pth"))
    assert report.ok


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        load_checkpoint("/nonexistent/checkpoint.pth")


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_files_are_told_apart_from_unsafe_pickles(tmp_path, damage):
    good = tmp_path / "good.pth"
    _nnunet_like_checkpoint(_net(classes=1), good)
    data = good.read_bytes()
    bad = tmp_path / "bad.pth"
    bad.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"not a checkpoint at all"}[damage])
    with pytest.raises(RuntimeError) as e:
        load_checkpoint(str(bad))
    assert "Re-copy" in str(e.value) and "Re-save" not in str(e.value)
    assert load_checkpoint(str(good))["trainer_name"] == "HybridMIMPretrainer"  # the good file is untouched
