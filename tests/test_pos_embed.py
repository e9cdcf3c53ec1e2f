"""resize_pos_embed: identity on the same grid, affine embeddings stay affine at the right positions (so the axis
order and the token order are right), prefix tokens untouched, clear errors, and it fits Primus's ``eva.pos_embed``."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from nnunet_mim.core.pos_embed import resize_pos_embed

OLD, NEW = (2, 3, 4), (4, 5, 3)  # every axis differs, some grow, one shrinks
SLOPES = torch.tensor([[1.0, -2.0], [10.0, 0.5], [100.0, 3.0]])  # (axis, channel): axes tell apart
OFFSET = torch.tensor([7.0, -1.0])


def affine_embedding(coords_per_axis: list[torch.Tensor]) -> torch.Tensor:
    """(1, N, 2) embedding, value = OFFSET + sum_a SLOPES[a] * coordinate_a, tokens in C order (last axis fastest)."""
    mesh = torch.meshgrid(*coords_per_axis, indexing="ij")
    coords = torch.stack([m.reshape(-1) for m in mesh], dim=1)  # (N, 3), C order
    return (OFFSET.to(coords.dtype) + coords @ SLOPES.to(coords.dtype)).unsqueeze(0)


def source_coordinate(new: int, old: int, clamp: bool) -> torch.Tensor:
    """Where token ``j`` of a ``new``-long axis sits on an ``old``-long one (centres matched: align_corners=False)."""
    x = (torch.arange(new, dtype=torch.float64) + 0.5) * old / new - 0.5
    return x.clamp(0, old - 1) if clamp else x


def test_same_grid_is_identity():
    pe = torch.randn(1, 2 + math.prod(OLD), 8)
    assert resize_pos_embed(pe, OLD, list(OLD), num_prefix_tokens=2) is pe


def test_affine_embedding_stays_affine_at_the_new_positions():
    old_coords = [torch.arange(n, dtype=torch.float64) for n in OLD]
    pe = affine_embedding(old_coords).float()
    out = resize_pos_embed(pe, OLD, NEW).double()
    assert out.shape == (1, math.prod(NEW), 2)
    # everywhere: the affine function at the (clamped) source coordinates
    expected = affine_embedding([source_coordinate(n, o, clamp=True) for n, o in zip(NEW, OLD)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    # inside the old grid's outermost centres: the affine function itself, unclamped
    inside = [(c >= 0) & (c <= o - 1) for c, o in ((source_coordinate(n, o, clamp=False), o)
                                                   for n, o in zip(NEW, OLD))]
    mask = torch.stack(torch.meshgrid(*inside, indexing="ij")).all(0).reshape(-1)
    assert 0 < int(mask.sum()) < mask.numel()  # the test covers both kinds of positions
    exact = affine_embedding([source_coordinate(n, o, clamp=False) for n, o in zip(NEW, OLD)])
    torch.testing.assert_close(out[0, mask], exact[0, mask], rtol=0, atol=1e-4)


def test_upsampling_twice_keeps_the_old_values_between_the_new_ones():
    """Grid 2 -> 4 per axis: new tokens 1 and 2 lie at 1/4 and 3/4 between the old ones (centres matched)."""
    pe = affine_embedding([torch.arange(2.0)] * 3)
    out = resize_pos_embed(pe, (2, 2, 2), (4, 4, 4)).reshape(4, 4, 4, 2)
    grid = affine_embedding([torch.tensor([0.0, 0.0, 0.25, 0.75, 1.0, 1.0])[1:5]] * 3).reshape(4, 4, 4, 2)
    torch.testing.assert_close(out, grid)


def test_prefix_tokens_are_untouched_and_do_not_leak_into_the_grid():
    grid = torch.randn(1, math.prod(OLD), 6)
    prefix = torch.randn(1, 3, 6) * 100
    out = resize_pos_embed(torch.cat([prefix, grid], 1), OLD, NEW, num_prefix_tokens=3)
    assert out.shape == (1, 3 + math.prod(NEW), 6)
    assert torch.equal(out[:, :3], prefix)
    torch.testing.assert_close(out[:, 3:], resize_pos_embed(grid, OLD, NEW))


def test_dtype_is_kept():
    pe = torch.randn(1, math.prod(OLD), 4, dtype=torch.bfloat16)
    assert resize_pos_embed(pe, OLD, NEW).dtype == torch.bfloat16


@pytest.mark.parametrize("shape, prefix, match", [
    ((1, 24, 8), 1, r"\(1, 25, C\)"),  # forgot the register token
    ((1, 25, 8), 0, r"\(1, 24, C\)"),  # a prefix token not declared
    ((24, 8), 0, "needs"),  # batch dimension missing
    ((2, 24, 8), 0, "needs"),
])
def test_wrong_lengths_raise_a_clear_error(shape, prefix, match):
    with pytest.raises(ValueError, match=match) as err:
        resize_pos_embed(torch.zeros(shape), OLD, NEW, num_prefix_tokens=prefix)
    assert "register" in str(err.value)


def test_grids_must_be_3d():
    with pytest.raises(ValueError, match="3 positive token counts"):
        resize_pos_embed(torch.zeros(1, 12, 4), (3, 4), (3, 4))
    with pytest.raises(ValueError, match="new_grid"):
        resize_pos_embed(torch.zeros(1, 24, 4), OLD, (0, 4, 4))


def test_fits_primus_pos_embed():
    """A Primus trained on one patch loads strictly into a Primus of another patch once eva.pos_embed is resized."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from dynamic_network_architectures.architectures.primus import Primus

    def primus(patch):
        torch.manual_seed(0)
        return Primus(1, 24, (8, 8, 8), 2, eva_depth=1, eva_numheads=2, input_shape=patch, num_register_tokens=2)

    small, large = primus((16, 16, 32)), primus((32, 24, 32))
    assert small.key_to_lpe == "eva.pos_embed" and small.eva.num_prefix_tokens == 2
    state = small.state_dict()
    state["eva.pos_embed"] = resize_pos_embed(state["eva.pos_embed"], (2, 2, 4), (4, 3, 4), num_prefix_tokens=2)
    large.load_state_dict(state)  # strict: every other tensor is grid-independent
    assert large(torch.zeros(1, 1, 32, 24, 32)).shape == (1, 2, 32, 24, 32)
