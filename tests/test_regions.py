"""Partial-region decoding: box placement and crop coordinates at every decoder level."""
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_mim.architectures.hybridmim import HybridMIMModel
from nnunet_mim.core.regions import crop_skips, level_scales, region_box


def test_box_center_and_corner():
    assert region_box((12, 12, 12)).start == (2, 2, 2) and region_box((12, 12, 12)).size == (8, 8, 8)
    corner = region_box((12, 12, 12), placement="corner")  # official: [4:12] -> voxels [32:96] at stride 8
    assert corner.start == (4, 4, 4) and corner.slices_at((8, 8, 8))[0] == slice(32, 96)
    assert region_box((3, 3, 3)).size == (2, 2, 2)  # 64 of 96 voxels at stride 32
    assert region_box((4, 6, 6), 1.0).start == (0, 0, 0)


def test_level_scales_anisotropic():
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert level_scales(strides) == [(4, 8, 8), (4, 4, 4), (2, 2, 2), (1, 1, 1)]


def test_crop_coordinates_at_every_level():
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    scales = level_scales(strides)
    patch = (16, 32, 32)
    box = region_box([p // 4 if i == 0 else p // 8 for i, p in enumerate(patch)])  # bottleneck (4, 4, 4)
    # each level's map holds the input-voxel coordinate of its cells' origin along axis 0/1/2
    total = (4, 8, 8)
    skips = []
    for f in scales:
        cell = [t // s for t, s in zip(total, f)]  # input voxels per cell at this level
        shape = [p // c for p, c in zip(patch, cell)]
        grids = torch.meshgrid(*[torch.arange(n) * c for n, c in zip(shape, cell)], indexing="ij")
        skips.append(torch.stack(grids)[None].float())
    cropped = crop_skips(skips, box, scales)
    start_vox = [s * t for s, t in zip(box.start, total)]
    stop_vox = [(s + z) * t for s, z, t in zip(box.start, box.size, total)]
    for level, c in enumerate(cropped):
        cell = [t // s for t, s in zip(total, scales[level])]
        for axis in range(3):
            coords = c[0, axis]
            assert coords.min() == start_vox[axis], (level, axis)
            assert coords.max() == stop_vox[axis] - cell[axis], (level, axis)


def _pointwise_unet() -> nn.Module:
    """1x1x1 kernels and no normalisation: decoding a crop equals cropping the full decoding."""
    return PlainConvUNet(1, 4, (4, 8, 8, 8), nn.Conv3d, 1, [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], 1, 3, 1,
                         conv_bias=True, nonlin=nn.ReLU)


def test_partial_decoding_equals_crop_of_full_decoding():
    torch.manual_seed(0)
    net = _pointwise_unet()
    model = HybridMIMModel(net, (16, 32, 32), encoder_dropout=0.0).eval()
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        partial = model(x, second_view=False).reconstruction
        full = net.decoder(net.encoder(x))
    region = (slice(None), slice(None), *model.region_slices())
    assert partial.shape[2:] == tuple(s.stop - s.start for s in model.region_slices())
    assert torch.allclose(partial, full[region], atol=1e-6)
