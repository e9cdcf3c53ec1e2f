"""Spatially adaptive convolution (PUMIT SAC section): DA, plain-conv equivalence at DA 0, summed-kernel semantics."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nnunet_mim.core.sac import (
    SACConv3d,
    SACConvTranspose3d,
    SACMaxPool3d,
    degree_of_anisotropy,
    level_strides,
    resample_grid,
    sac_token_size,
    sum_pool_kernel_depth,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize(
    "spacing, da",
    [
        ((1.0, 1.0, 1.0), 0),
        ((0.5, 1.0, 1.0), 0),  # thinner slices than pixels: clipped to ratio 1
        ((1.9, 1.0, 1.0), 0),
        ((2.0, 1.0, 1.0), 1),
        ((3.0, 0.75, 0.75), 2),  # BTCV-like
        ((2.9999999, 0.75, 0.75), 2),  # float noise in stored spacings
        ((5.0, 0.7, 0.6), 3),  # s_xy = min(in-plane) = 0.6 -> ratio 8.33
        ((9.0, 1.62, 1.62), 2),  # CHAOS-like, ratio 5.6
        ((100.0, 1.0, 1.0), 5),  # clipped at 32
        ((32.0, 1.0, 1.0), 5),
    ],
)
def test_degree_of_anisotropy(spacing, da):
    assert degree_of_anisotropy(spacing) == da


def test_degree_of_anisotropy_rejects_bad_spacing():
    with pytest.raises(ValueError):
        degree_of_anisotropy((1.0, 1.0))
    with pytest.raises(ValueError):
        degree_of_anisotropy((0.0, 1.0, 1.0))


def test_token_size_and_level_strides():
    assert sac_token_size(0) == (16, 16, 16)
    assert sac_token_size(2) == (4, 16, 16)
    assert sac_token_size(5) == (1, 16, 16)
    assert level_strides(0, 3) == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    assert level_strides(2, 5) == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 1), (2, 2, 0), (4, 4, 0), (1, 1, 0)])
@pytest.mark.parametrize("level", [0, 2])
def test_sac_conv_isotropic_is_plain_conv(kernel, stride, padding, level):
    sac = SACConv3d(3, 5, kernel, stride=stride, padding=padding, level=level)
    plain = nn.Conv3d(3, 5, kernel, stride=stride, padding=padding)
    plain.load_state_dict(sac.state_dict())  # same parameter names / shapes
    x = torch.randn(2, 3, 8, 8, 8)
    assert torch.allclose(sac(x, da=0), plain(x))
    # nothing pending either when the layer sits at/after the DA level
    assert torch.allclose(sac(x, da=level), plain(x))


@pytest.mark.parametrize("stride, level", [(2, 1), (2, 3), (4, 2)])
def test_sac_transposed_conv_isotropic_is_plain(stride, level):
    sac = SACConvTranspose3d(4, 3, stride, level=level)
    plain = nn.ConvTranspose3d(4, 3, stride, stride=stride)
    plain.load_state_dict(sac.state_dict())
    x = torch.randn(2, 4, 3, 4, 5)
    assert torch.allclose(sac(x, da=0), plain(x), atol=1e-6)


@pytest.mark.parametrize(
    "da, exp_stride, exp_kd, in_shape, out_shape",
    [
        (0, (16, 16, 16), 16, (32, 32, 32), (2, 2, 2)),
        (1, (8, 16, 16), 8, (16, 32, 32), (2, 2, 2)),
        (2, (4, 16, 16), 4, (8, 32, 32), (2, 2, 2)),
        (4, (1, 16, 16), 1, (3, 32, 32), (3, 2, 2)),
        (5, (1, 16, 16), 1, (1, 32, 16), (1, 2, 1)),
    ],
)
def test_sac_patch_embed_shapes_and_strides(da, exp_stride, exp_kd, in_shape, out_shape):
    conv = SACConv3d(1, 4, 16, stride=16, level=0)
    w, s, p = conv.effective_params(da)
    assert s == exp_stride and w.shape[2] == exp_kd and p == (0, 0, 0)
    assert torch.allclose(w.sum(2), conv.weight.sum(2), atol=1e-5)  # sum pooling keeps the depth sum
    assert conv(torch.randn(1, 1, *in_shape), da).shape[2:] == out_shape


def test_sac_conv_downsample_effective_params():
    conv = SACConv3d(2, 2, 3, stride=2, padding=1, level=0)
    w, s, p = conv.effective_params(da=1)
    assert (tuple(w.shape[2:]), s, p) == ((1, 3, 3), (1, 2, 2), (0, 1, 1))
    assert conv(torch.randn(1, 2, 5, 8, 8), da=1).shape[2:] == (5, 4, 4)
    conv1 = SACConv3d(2, 2, 3, stride=2, padding=1, level=1)  # DA reached: isotropic again
    assert conv1.effective_params(da=1)[1] == (2, 2, 2)
    # 3x3x3 stride-1 conv while anisotropic -> 1x3x3
    conv3 = SACConv3d(2, 2, 3, padding=1, level=1)
    w, s, p = conv3.effective_params(da=3)
    assert (tuple(w.shape[2:]), s, p) == ((1, 3, 3), (1, 1, 1), (0, 1, 1))


def test_sac_transposed_effective_params():
    up = SACConvTranspose3d(2, 2, 2, level=1)
    assert up.effective_params(da=1)[1] == (1, 2, 2)  # no depth upsampling left (depth already at input res)
    assert up.effective_params(da=0)[1] == (2, 2, 2)
    assert up(torch.randn(1, 2, 3, 4, 4), da=1).shape[2:] == (3, 8, 8)
    up4 = SACConvTranspose3d(2, 2, 4, level=3)
    w, s = up4.effective_params(da=2)  # one depth upsampling remains -> depth stride 2, kernel depth 2
    assert s == (2, 4, 4) and w.shape[2] == 2
    assert up4(torch.randn(1, 2, 3, 2, 2), da=2).shape[2:] == (6, 8, 8)


@pytest.mark.parametrize("stride", [1, 2])
def test_summed_kernel_equals_2d_conv_per_slice(stride):
    """Anisotropic SAC 3x3x3 conv == 2D conv of every slice with the depth-summed kernel (PUMIT SAC, variant 2)."""
    conv = SACConv3d(3, 4, 3, stride=stride, padding=1, level=0)
    x = torch.randn(2, 3, 4, 8, 8)
    y = conv(x, da=2)
    w2d = conv.weight.sum(2)
    ref = torch.stack([F.conv2d(x[:, :, i], w2d, conv.bias, stride, 1) for i in range(x.shape[2])], 2)
    assert torch.allclose(y, ref, atol=1e-5)


def test_summed_kernel_on_depth_constant_input():
    """Input constant along depth: the isotropic kernel and its depth-summed version agree."""
    conv = SACConv3d(2, 3, 3, padding=1, level=0)
    x2d = torch.randn(1, 2, 1, 6, 6)
    iso = F.conv3d(x2d.expand(-1, -1, 3, -1, -1), conv.weight, conv.bias, 1, (0, 1, 1))  # one interior slice
    assert torch.allclose(conv(x2d, da=1), iso, atol=1e-5)


@pytest.mark.parametrize("da", [1, 2, 3, 4])
def test_patch_embed_equals_isotropic_kernel_on_upsampled_input(da):
    """k=s=16 SAC conv at DA == full 16^3 kernel applied to the input nearest-upsampled in depth by 2**DA."""
    conv = SACConv3d(2, 3, 16, stride=16, level=0)
    x = torch.randn(1, 2, 2 * (16 >> da), 16, 32)
    x_iso = x.repeat_interleave(1 << da, dim=2)
    ref = F.conv3d(x_iso, conv.weight, conv.bias, 16)
    assert torch.allclose(conv(x, da), ref, atol=1e-4)


@pytest.mark.parametrize("stride, level, da, sd", [(2, 1, 1, 1), (4, 3, 2, 2), (4, 2, 2, 1)])
def test_transposed_summed_kernel_equals_depth_sum_of_full_output(stride, level, da, sd):
    """SAC transposed conv == full transposed conv followed by depth sum-pooling (no bias)."""
    up = SACConvTranspose3d(3, 2, stride, bias=False, level=level)
    x = torch.randn(1, 3, 3, 2, 2)
    full = F.conv_transpose3d(x, up.weight, None, stride)
    ref = full.unflatten(2, (x.shape[2] * sd, stride // sd)).sum(3)
    assert up.effective_params(da)[1][0] == sd
    assert torch.allclose(up(x, da), ref, atol=1e-5)


def test_sum_pool_kernel_depth():
    w = torch.arange(8.0).reshape(1, 1, 8, 1, 1)
    assert sum_pool_kernel_depth(w, 2).flatten().tolist() == [6.0, 22.0]
    assert sum_pool_kernel_depth(w, 8) is w
    with pytest.raises(ValueError):
        sum_pool_kernel_depth(w, 3)


def test_sac_maxpool():
    pool = SACMaxPool3d(level=4)
    x = torch.randn(1, 1, 4, 6, 5)
    assert pool(x, da=5).shape[2:] == (4, 3, 3)  # pending: in-plane only, ceil for odd sizes
    assert pool(x, da=4).shape[2:] == (2, 3, 3)


def test_invalid_strides_rejected():
    with pytest.raises(ValueError):
        SACConv3d(1, 1, 3, stride=3)
    with pytest.raises(ValueError):
        SACConv3d(1, 1, 3, stride=(1, 2, 2))
    with pytest.raises(ValueError):  # kernel depth must equal the stride for partial depth reduction
        SACConv3d(1, 1, 3, stride=4, padding=1)(torch.randn(1, 1, 8, 8, 8), da=1)


def test_gradients_and_checkpointing():
    conv = SACConv3d(2, 2, 16, stride=16)
    x = torch.randn(1, 2, 4, 16, 16, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(conv, x, 2, use_reentrant=False)
    y.sum().backward()
    assert conv.weight.grad is not None and x.grad is not None


def test_resample_grid():
    pe = torch.randn(1, 4, 2, 3, 3)
    assert resample_grid(pe, (2, 3, 3)) is pe
    assert resample_grid(pe, (1, 6, 2)).shape == (1, 4, 1, 6, 2)
    const = torch.ones(1, 2, 1, 2, 2)
    assert torch.allclose(resample_grid(const, (4, 5, 3)), torch.ones(1, 2, 4, 5, 3))
