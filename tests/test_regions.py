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


def test_box_start_and_size_on_3_cell_grid():
    """96^3 at stride 32: 2 of 3 cells. Centring on the grid cannot be exact; the leftover cell goes before the box,
    which is the official [32:96]^3 (the paper's "around the image center" as nearly as the grid allows)."""
    centre = region_box((3, 3, 3))
    assert centre.start == (1, 1, 1) and centre.size == (2, 2, 2)
    assert centre.slices_at((32, 32, 32)) == (slice(32, 96),) * 3
    corner = region_box((3, 3, 3), placement="corner")
    assert corner.start == (1, 1, 1) and corner.size == (2, 2, 2)


def test_box_start_and_size_on_4_cell_grid():
    """128^3 at stride 32: round(4 * 2/3) = 3 cells (96 of 128 voxels), one leftover cell before the box."""
    centre = region_box((4, 4, 4))
    assert centre.start == (1, 1, 1) and centre.size == (3, 3, 3)
    assert centre.slices_at((32, 32, 32)) == (slice(32, 128),) * 3
    corner = region_box((4, 4, 4), placement="corner")
    assert corner.start == (1, 1, 1) and corner.size == (3, 3, 3)


def test_box_start_and_size_even_leftover_and_anisotropic_grid():
    six = region_box((6, 6, 6))  # 96^3 at stride 16: 4 of 6 cells, exactly centred -> voxels [16:80]
    assert six.start == (1, 1, 1) and six.size == (4, 4, 4) and six.slices_at((16, 16, 16))[0] == slice(16, 80)
    assert region_box((6, 6, 6), placement="corner").start == (2, 2, 2)
    twelve = region_box((12, 12, 12))  # HybridMIM's UNet bottleneck (stride 8): centred [2:10]; official [4:12]
    assert twelve.start == (2, 2, 2) and twelve.size == (8, 8, 8)
    mixed = region_box((1, 4, 3))  # one cell cannot shrink; per-axis rounding
    assert mixed.start == (0, 1, 1) and mixed.size == (1, 3, 2)
    assert region_box((1, 4, 3), placement="corner").start == (0, 1, 1)
    wide = region_box((2, 5, 7))
    assert wide.size == (1, 3, 5) and wide.start == (1, 1, 1)
    assert region_box((2, 5, 7), placement="corner").start == (1, 2, 2)


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
