"""HybridMIMModel: state_dict compatibility, dropout views, head shapes, backward."""
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunet_mim.hybridmim import HybridMIMModel


def _unet(cls=PlainConvUNet, out=1):
    common = dict(conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU)
    if cls is PlainConvUNet:
        return cls(1, 4, (8, 16, 32, 32), nn.Conv3d, 3, [1, 2, 2, 2], 2, out, 2, **common)
    return cls(1, 4, (8, 16, 32, 32), nn.Conv3d, 3, [1, 2, 2, 2], (1, 1, 1, 1), out, 1, **common)


@pytest.mark.parametrize("cls", [PlainConvUNet, ResidualEncoderUNet])
def test_state_dict_is_network_plus_heads(cls):
    net = _unet(cls)
    keys = set(net.state_dict())
    model = HybridMIMModel(net, (16, 32, 32))
    mkeys = set(model.state_dict())
    assert keys <= mkeys and all(k.startswith("mim_heads.") for k in mkeys - keys)
    seg = _unet(cls, out=3)  # the finetuning network: only seg layers differ in shape
    for k, v in seg.state_dict().items():
        if ".seg_layers." not in k:
            assert model.state_dict()[k].shape == v.shape


def test_outputs_and_backward():
    model = HybridMIMModel(_unet(), (16, 32, 32)).train()
    x = torch.randn(2, 1, 16, 32, 32)
    out = model(x)
    n_sub = 2 * 4 * 4
    assert out.count_logits.shape == (2, n_sub, 9) and out.location_logits.shape == (2, n_sub, 8)
    assert out.reconstruction.shape[2:] == tuple(s.stop - s.start for s in model.region_slices())
    assert out.projection.shape == (2, 384) and not out.projection_second_view.requires_grad
    (out.reconstruction.mean() + out.count_logits.mean() + out.location_logits.mean() + out.projection.mean()
     ).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for n, p in trainable)  # DDP-safe: no unused trainable parameter
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {
        f"decoder.seg_layers.{i}.{w}" for i in (0, 1) for w in ("weight", "bias")}


def test_views_differ_only_by_dropout():
    model = HybridMIMModel(_unet(), (16, 32, 32), encoder_dropout=0.1)
    x = torch.randn(2, 1, 16, 32, 32)
    model.train()
    out = model(x)
    assert not torch.allclose(out.projection, out.projection_second_view)
    model.eval()
    out = model(x)
    assert torch.allclose(out.projection, out.projection_second_view)


def test_rejects_networks_without_encoder_decoder():
    with pytest.raises(TypeError, match="cannot be pretrained with HybridMIM"):
        HybridMIMModel(nn.Conv3d(1, 1, 3), (16, 32, 32))
