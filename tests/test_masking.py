"""Two-level masking: grid derivation, mask/label alignment by sub-volume, explicit voxel masks; token-mask counts."""
import math
from fractions import Fraction

import pytest
import torch

from nnunet_mim.core.masking import (apply_mask, count_and_location_labels, derive_grid, patch_mask_to_voxels,
                                random_token_mask, sample_two_level_mask, subvolume_features)


def test_grid_follows_bottleneck_stride():
    grid = derive_grid((32, 48, 48), (8, 8, 8))
    assert grid.grid_shape == (4, 6, 6) and grid.subvolume == (8, 8, 8) and grid.mask_patch == (4, 4, 4)
    assert grid.num_patches == 4 * 6 * 6 * 8
    paper = derive_grid((96, 96, 96), (32, 32, 32))  # HybridMIM: 3^3 sub-volumes of 32^3, 16^3 patches
    assert paper.grid_shape == (3, 3, 3) and paper.mask_patch == (16, 16, 16) and paper.num_patches == 216


def test_grid_pools_unit_stride_axes():
    grid = derive_grid((8, 64, 64), (1, 16, 16))
    assert grid.pool == (2, 1, 1) and grid.subvolume == (2, 16, 16) and grid.mask_patch == (1, 8, 8)


def test_grid_error_says_what_would_work():
    with pytest.raises(ValueError) as e:
        derive_grid((36, 48, 48), (8, 8, 8))
    assert "patch edge 36" in str(e.value) and "32" in str(e.value) and "40" in str(e.value)
    with pytest.raises(ValueError, match="odd"):
        derive_grid((24, 48, 48), (1, 8, 8), pool=(3, 1, 1))


def test_mask_count_matches_official_rule():
    grid = derive_grid((96, 96, 96), (32, 32, 32))
    mask = sample_two_level_mask(5, grid, 0.4)
    assert mask.shape == (5, 3, 3, 3, 2, 2, 2) and mask.dtype == torch.bool
    # official: len_keep = int(216 * 0.6) = 129 -> 87 masked
    assert (mask.flatten(1).sum(1) == 87).all()


def test_voxel_mask_and_labels_align_by_subvolume():
    grid = derive_grid((16, 24, 32), (8, 8, 8))  # 2 x 3 x 4 sub-volumes, 4^3 patches
    mask = torch.zeros(1, *grid.grid_shape, 2, 2, 2, dtype=torch.bool)
    mask[0, 1, 2, 3, 1, 0, 1] = True  # sub-volume (1,2,3), patch (d=1, h=0, w=1)
    mask[0, 0, 0, 0, 0, 0, 0] = True
    mask[0, 0, 0, 0, 1, 1, 1] = True
    voxels = patch_mask_to_voxels(mask, grid)
    assert voxels.shape == (1, 1, 16, 24, 32)
    expected = torch.zeros(16, 24, 32, dtype=torch.bool)
    expected[12:16, 16:20, 28:32] = True
    expected[0:4, 0:4, 0:4] = True
    expected[4:8, 4:8, 4:8] = True
    assert torch.equal(voxels[0, 0], expected)
    counts, locations = count_and_location_labels(mask)
    assert counts.shape == (1, 24) and locations.shape == (1, 24, 8)
    assert counts[0, 0] == 2 and counts[0, (1 * 3 + 2) * 4 + 3] == 1 and counts.sum() == 3
    assert locations[0, 0].tolist() == [1, 0, 0, 0, 0, 0, 0, 1]
    assert locations[0, (1 * 3 + 2) * 4 + 3].tolist() == [0, 0, 0, 0, 0, 1, 0, 0]  # (1*2+0)*2+1 = 5


def test_labels_agree_with_the_voxel_mask_of_each_subvolume():
    """Independent derivation: read each sub-volume's 8 octants from the voxel mask."""
    grid = derive_grid((32, 48, 48), (8, 8, 8))
    mask = sample_two_level_mask(3, grid, 0.4, generator=torch.Generator().manual_seed(0))
    voxels = patch_mask_to_voxels(mask, grid)[:, 0]
    counts, locations = count_and_location_labels(mask)
    sv, half = grid.subvolume, grid.mask_patch
    idx = 0
    for i in range(grid.grid_shape[0]):
        for j in range(grid.grid_shape[1]):
            for k in range(grid.grid_shape[2]):
                octants = []
                for a in range(2):
                    for b in range(2):
                        for c in range(2):
                            block = voxels[:, i * sv[0] + a * half[0]:i * sv[0] + (a + 1) * half[0],
                                           j * sv[1] + b * half[1]:j * sv[1] + (b + 1) * half[1],
                                           k * sv[2] + c * half[2]:k * sv[2] + (c + 1) * half[2]]
                            assert (block.all((1, 2, 3)) | ~block.any((1, 2, 3))).all()  # patches are uniform
                            octants.append(block.flatten(1).all(1).float())
                assert torch.equal(torch.stack(octants, 1), locations[:, idx])
                assert torch.equal(torch.stack(octants, 1).sum(1).long(), counts[:, idx])
                idx += 1


def test_subvolume_features_pool_in_raster_order():
    x = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).view(1, 2, 4, 2, 2)
    f = subvolume_features(x, (2, 1, 1))
    assert f.shape == (1, 2 * 2 * 2, 2)
    assert torch.allclose(f[0, 0], x[0, :, 0:2, 0, 0].mean(-1))
    assert torch.allclose(f[0, 7], x[0, :, 2:4, 1, 1].mean(-1))


def test_apply_mask_never_confuses_real_zeros():
    x = torch.zeros(1, 2, 4, 4, 4)  # z-scored data has real zeros
    x[0, 1, 0, 0, 0] = 5.0
    m = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    m[0, 0, 0, 0, 0] = True
    y = apply_mask(x, m, -7.0)
    assert y[0, :, 0, 0, 0].tolist() == [-7.0, -7.0] and (y[0, :, 1:] == 0).all()


# Token masks (MAE / SimMIM / token MIM). The documented rule (documentation/deviations.md, "MIM mask count") masks
# floor(ratio * N) tokens: 118 of 216 at PUMIT's 0.55, where the official PUMIT code (num_visible = int(N (1 - r)))
# masks 119. The expected counts below are worked out by hand from that rule; cases where ratio * N is not an integer
# tell it apart from the official rule (which would give 119, 87, 58, 9, 5, 2 in those rows).
@pytest.mark.parametrize("n, ratio, expected", [
    (216, "0.55", 118),  # PUMIT mask ratio, 6^3 tokens: 118.8 -> 118 (the number the docs quote)
    (216, "0.4", 86),  # 86.4
    (216, "0.75", 162),  # exact: MIM-Med3D MAE, 96^3 / 16^3
    (500, "0.55", 275),  # exact: the official MIM crop of 5 x 10 x 10 tokens
    (105, "0.55", 57),  # 57.75
    (9, "0.9", 8),  # 8.1
    (8, "0.55", 4),  # 4.4
    (3, "0.5", 1),  # 1.5
])
def test_random_token_mask_count_follows_the_documented_rule(n, ratio, expected):
    assert expected == math.floor(Fraction(ratio) * n)  # the table is the documented rule, in exact arithmetic
    m = random_token_mask(6, n, float(ratio), generator=torch.Generator().manual_seed(n))
    assert m.shape == (6, n) and m.dtype == torch.bool
    assert m.sum(1).tolist() == [expected] * 6
    assert len({tuple(row.tolist()) for row in m}) > 1  # random per sample, not one fixed pattern


def test_random_token_mask_rejects_ratio_one():
    with pytest.raises(ValueError):
        random_token_mask(1, 10, 1.0)
