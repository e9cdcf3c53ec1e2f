"""Additive 3D RoPE (PUMIT appendix "Additive 3D RoPE"): frequencies, timm layout, relativity, 2D equivalence,
reversibility / minimum-gap experiment."""
import math

import pytest
import torch
from timm.layers import RotaryEmbeddingCat
from timm.models.eva import EvaAttention, EvaBlock

from nnunet_mim.core.rope import AdditiveRoPE3d, apply_rope, grid_positions, rope_frequencies


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _rotate(x: torch.Tensor, rope: AdditiveRoPE3d, pos) -> torch.Tensor:
    emb = rope.embed_positions(torch.tensor(pos), dtype=torch.float64)
    return apply_rope(x, emb)


def test_official_frequencies_head_dim_64():
    omega_d, omega_h, omega_w = rope_frequencies(64)
    k = torch.arange(16, dtype=torch.float64)
    assert torch.allclose(omega_h, 10000 ** (-2 * k / 32))
    assert torch.allclose(omega_w, 10000 ** (-2 * k / 32))
    assert torch.allclose(omega_d, 2333 ** (-(2 * k + 1) / 32))


def test_angles_and_layout():
    rope = AdditiveRoPE3d(64)
    omega_d, omega_h, omega_w = rope_frequencies(64)
    d, h, w = 3, 5, 7
    theta = rope.angles(torch.tensor([d, h, w]))
    assert torch.allclose(theta[:16], h * omega_h + d * omega_d)
    assert torch.allclose(theta[16:], w * omega_w + d * omega_d)
    emb = rope.embed_positions(torch.tensor([d, h, w]), dtype=torch.float64)
    assert emb.shape == (128,)
    sin, cos = emb.chunk(2)  # timm apply_rot_embed_cat: cat([sin, cos]); pairs interleaved
    assert torch.allclose(sin[0::2], theta.sin()) and torch.allclose(sin[1::2], theta.sin())
    assert torch.allclose(cos[0::2], theta.cos()) and torch.allclose(cos[1::2], theta.cos())
    # pair (x0, x1) rotated by theta_0: (x0 cos - x1 sin, x1 cos + x0 sin)
    x = torch.randn(64, dtype=torch.float64)
    y = apply_rope(x, emb)
    c, s = theta[0].cos(), theta[0].sin()
    assert torch.allclose(y[:2], torch.stack([x[0] * c - x[1] * s, x[1] * c + x[0] * s]))


def test_grid_embedding_and_keep_idx():
    rope = AdditiveRoPE3d(32)
    grid = (2, 3, 4)
    emb = rope(grid)
    pos = grid_positions(grid)
    assert emb.shape == (24, 64) and pos[5].tolist() == [0, 1, 1]  # raster order, w fastest
    assert torch.allclose(emb, rope.embed_positions(pos))
    keep = torch.tensor([[0, 5, 23], [7, 7, 1]])
    sub = rope(grid, keep_idx=keep)
    assert sub.shape == (2, 1, 3, 64)
    assert torch.equal(sub[1, 0, 0], emb[7]) and torch.equal(sub[0, 0, 2], emb[23])


@pytest.mark.parametrize("head_dim", [64, 32, 48])
def test_relativity(head_dim):
    """<R(p) q, R(p') k> depends only on p - p' (eq. 10-12, 15-16)."""
    rope = AdditiveRoPE3d(head_dim)
    q, k = torch.randn(2, head_dim, dtype=torch.float64)
    for offset in [(1, 2, -3), (4, 0, 0), (0, -5, 7)]:
        dots = []
        for p in [(0, 0, 0), (3, 5, 7), (11, 2, 9), (-2, 13, 1)]:
            p2 = tuple(a - b for a, b in zip(p, offset))
            dots.append((_rotate(q, rope, p) * _rotate(k, rope, p2)).sum())
        dots = torch.stack(dots)
        assert torch.allclose(dots, dots[0].expand_as(dots), atol=1e-10), dots


def test_rotation_preserves_norm():
    rope = AdditiveRoPE3d(64)
    x = torch.randn(10, 64, dtype=torch.float64)
    y = apply_rope(x, rope.embed_positions(torch.randint(0, 20, (10, 3)), dtype=torch.float64))
    assert torch.allclose(x.norm(dim=-1), y.norm(dim=-1))


@pytest.mark.parametrize("grid2d", [(4, 5), (7, 3)])
def test_equals_eva02_2d_rope_at_depth_zero(grid2d):
    """With d = 0 the embedding is EVA-02's 2D RoPE (timm RotaryEmbeddingCat, token units)."""
    ours = AdditiveRoPE3d(64)((1, *grid2d))
    timm_rope = RotaryEmbeddingCat(64, in_pixels=False, feat_shape=list(grid2d))
    assert torch.allclose(ours, timm_rope.get_embed(), atol=1e-5)


def test_same_depth_pairs_match_2d():
    """Relative depth 0 (any absolute d): attention logits equal the 2D ones (appendix, 'Additive 3D RoPE')."""
    rope = AdditiveRoPE3d(64)
    q, k = torch.randn(2, 64, dtype=torch.float64)
    for (h1, w1), (h2, w2) in [((0, 0), (3, 4)), ((5, 1), (2, 2))]:
        ref = (_rotate(q, rope, (0, h1, w1)) * _rotate(k, rope, (0, h2, w2))).sum()
        for d in (1, 6, 17):
            got = (_rotate(q, rope, (d, h1, w1)) * _rotate(k, rope, (d, h2, w2))).sum()
            assert torch.allclose(got, ref, atol=1e-10)


def test_works_inside_timm_eva_attention():
    """Our embedding plugs into timm's EvaAttention (prefix token left unrotated)."""
    attn = EvaAttention(32, num_heads=2, qkv_fused=False, num_prefix_tokens=1, scale_norm=False).eval()
    rope = AdditiveRoPE3d(16)
    x = torch.randn(2, 1 + 12, 32)
    y = attn(x, rope=rope((2, 2, 3)))
    assert y.shape == x.shape and torch.isfinite(y).all()


def _rope_only_attention_outputs(module, x: torch.Tensor, rope: AdditiveRoPE3d, positions: torch.Tensor):
    return module(x, rope=rope.embed_positions(positions, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["attention", "block"])
def test_relativity_inside_eva_attention(kind):
    """Inside timm's EvaAttention / EvaBlock (as SAC-ViT uses them), with RoPE the only position signal: moving every
    token by the same (d, h, w) offset leaves the output unchanged, so the attention logits of any two tokens depend on
    their relative position only; moving tokens relative to each other changes it."""
    if kind == "attention":
        module = EvaAttention(32, num_heads=2, qkv_fused=False, num_prefix_tokens=0, scale_norm=False)
    else:
        module = EvaBlock(32, num_heads=2, qkv_bias=True, qkv_fused=False, mlp_ratio=8 / 3, swiglu_mlp=True,
                          scale_mlp=True, num_prefix_tokens=0)
    module = module.double().eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # q / v biases start at 0: make them count
    rope = AdditiveRoPE3d(16)
    pos = grid_positions((2, 3, 4))
    x = torch.randn(2, len(pos), 32, dtype=torch.float64)
    with torch.no_grad():
        ref = _rope_only_attention_outputs(module, x, rope, pos)
        for offset in [(1, 0, 0), (0, 2, -3), (5, -7, 11), (40, 100, -60)]:
            shifted = _rope_only_attention_outputs(module, x, rope, pos + torch.tensor(offset))
            assert torch.allclose(shifted, ref, atol=1e-9), (offset, (shifted - ref).abs().max())
        # not vacuous: a non-rigid move (depth stretched, or tokens exchanging places) changes the output
        stretched = _rope_only_attention_outputs(module, x, rope, pos * torch.tensor([3, 1, 1]))
        shuffled = _rope_only_attention_outputs(module, x, rope, pos[torch.randperm(len(pos))])
    assert (stretched - ref).abs().max() > 1e-3 and (shuffled - ref).abs().max() > 1e-3


def _min_gaps(rope: AdditiveRoPE3d, grid, pairs) -> torch.Tensor:
    theta = rope.angles(grid_positions(grid)) % (2 * math.pi)
    return torch.stack([theta[:, i].sort().values.diff().min() for i in pairs])


def test_minimum_gap_experiment():
    """Appendix 'Experiment': per rotation pair i, delta_i = min gap between sorted angles (mod 2 pi) over all
    positions (w length 1). The grid sizes are blank in our text extraction; a 3D grid d x h = 8 x 16 against a 2D
    grid h = 16 reproduces the quoted mean ratio delta_2D / delta_3D = 26.30 (over the 16 h-pairs)."""
    rope = AdditiveRoPE3d(64)
    g3 = _min_gaps(rope, (8, 16, 1), range(16))
    g2 = _min_gaps(rope, (1, 16, 1), range(16))
    assert (g2 / g3).mean().item() == pytest.approx(26.30, abs=5e-3)
    # all 128 positions get distinct angles in every pair (reversibility); smallest gaps ~7e-6 .. 2e-2 rad,
    # i.e. a few float32 ulps at these angle magnitudes
    assert g3.min().item() > 5e-6 and g3.max().item() < 2e-2


def test_rejects_head_dim_not_divisible_by_4():
    with pytest.raises(ValueError):
        AdditiveRoPE3d(30)
