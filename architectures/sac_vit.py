"""SAC-ViT: PUMIT's universal ViT (Luo et al., arXiv 2312.07630) as an nnU-Net v2 segmentation network.

* :class:`SACViT` -- encoder: SAC patch embedding (16x16 in-plane, ``16 >> DA`` in depth, sum-pooled kernel;
  section "Universal ViT"), learnable absolute position embedding stored at a reference grid and resampled to the
  token grid, timm ``EvaBlock`` (EVA-02: SwiGLU, sub-LN, q/v bias, SDPA attention) with our additive 3D RoPE
  (appendix "Additive 3D RoPE"), learnable mask token (SimMIM/BEiT) and a visible-subset path (MAE).
* :class:`SACViTSeg` -- encoder + :class:`SACViTDecoder`: 4 ViT layers -> x4 / x2 / x1 / x1/2 pyramid (transposed
  convs / max-pooling with DA-adapted depth stride, section "Segmentation Experiments", EVA-02/ViTDet simple
  pyramid), a plain U-Net decoder and a full-resolution conv stem (official ``FullResAdapter``), nnU-Net deep
  supervision and ``.seg_layers.`` naming.
EVA-02 2D weights: :mod:`nnunet_mim.nnunet.eva02_weights`; plans writers: :mod:`nnunet_mim.nnunet.sac_vit_plans`.

See documentation/pumit.md for design decisions and deviations.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.layers import trunc_normal_
from timm.models.eva import EvaBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from nnunet_mim.core.rope import PUMIT_ROPE_BASES, AdditiveRoPE3d
from nnunet_mim.core.sac import (
    SACConv3d,
    SACConvTranspose3d,
    SACMaxPool3d,
    degree_of_anisotropy,
    level_strides,
    resample_grid,
    sac_token_size,
)

__all__ = [
    "TOKEN_SIZE",
    "NUM_LEVELS",
    "SAC_VIT_PRESETS",
    "default_out_indices",
    "valid_patch_sizes",
    "SACPatchEmbed",
    "SACViT",
    "SACViTDecoder",
    "SACViTSeg",
    "sac_vit_s",
    "sac_vit_b",
    "sac_vit_l",
    "sac_vit_arch_kwargs",
    "SAC_VIT_NETWORK_CLASS",
    "SACViTPretrainNet",
]


#: in-plane token size of the SAC patch embedding (paper: 16)
TOKEN_SIZE = 16
#: levels of the segmentation pyramid: full res (0), 1/2, 1/4 (x4), 1/8 (x2), 1/16 (x1 = tokens), 1/32 (x1/2)
NUM_LEVELS = 6

SAC_VIT_PRESETS: dict[str, dict[str, int]] = {
    "S": dict(embed_dim=384, depth=12, num_heads=6),
    "B": dict(embed_dim=768, depth=12, num_heads=12),
    "L": dict(embed_dim=1024, depth=24, num_heads=16),
}


def default_out_indices(depth: int) -> list[int]:
    """``[d/3-1, d/2-1, 2d/3-1, d-1]``: official ``[3, 5, 7, 11]`` (depth 12) and ``[7, 11, 15, 23]`` (depth 24)."""
    return [max(depth // 3 - 1, 0), max(depth // 2 - 1, 0), max(2 * depth // 3 - 1, 0), depth - 1]


def valid_patch_sizes(patch_size: Sequence[int], da: int) -> list[tuple[int, int, int]]:
    """The nearest patch sizes divisible by the token size (per axis: round down and up)."""
    token = sac_token_size(da, TOKEN_SIZE)
    lo = tuple(max(t, (p // t) * t) for p, t in zip(patch_size, token))
    hi = tuple(-(-p // t) * t for p, t in zip(patch_size, token))
    return [lo] if lo == hi else [lo, hi]


def _check_patch_size(patch_size: Sequence[int], da: int) -> None:
    token = sac_token_size(da, TOKEN_SIZE)
    if len(patch_size) != 3 or any(p % t or p < t for p, t in zip(patch_size, token)):
        options = " or ".join(str(p) for p in valid_patch_sizes(patch_size, da)) if len(patch_size) == 3 else "-"
        raise ValueError(
            f"SAC-ViT with DA={da} needs every axis of the patch size to be a positive multiple of the token size "
            f"{token} (depth 16 >> DA, 16, 16); got {tuple(patch_size)}. Nearest valid patch sizes: {options}."
        )


def _resolve_da(da: int | None, spacing: Sequence[float] | None) -> int:
    if da is None and spacing is None:
        raise ValueError("give either da (degree of anisotropy) or spacing (z, y, x)")
    if spacing is not None:
        from_spacing = degree_of_anisotropy(spacing)
        if da is not None and int(da) != from_spacing:
            raise ValueError(f"da={da} contradicts spacing {tuple(spacing)} (DA {from_spacing})")
        return from_spacing
    if not 0 <= int(da) <= 5:
        raise ValueError(f"da must be in 0..5, got {da}")
    return int(da)


# ----------------------------------------------------------------------------------------------------------------
# encoder
# ----------------------------------------------------------------------------------------------------------------
class SACPatchEmbed(nn.Module):
    """SAC patch embedding: a k=s=16 SAC conv (depth ``16 >> DA`` with sum-pooled kernel; PUMIT "Universal ViT")."""

    def __init__(self, input_channels: int, embed_dim: int):
        super().__init__()
        self.proj = SACConv3d(input_channels, embed_dim, TOKEN_SIZE, stride=TOKEN_SIZE, level=0)

    def forward(self, x: torch.Tensor, da: int) -> torch.Tensor:
        return self.proj(x, da)


class SACViT(nn.Module):
    """EVA-02 ViT with SAC patch embedding and additive 3D RoPE (PUMIT "Transformer Architecture").

    Token order is raster ``(d, h, w)`` (w fastest). ``num_prefix_tokens`` (1 with a cls token) prefix tokens come
    first; they get no position embedding and no RoPE.

    ``mask_token_pos_embed`` (also a plain attribute, settable after construction): where a ``token_mask`` replaces
    patch tokens by the mask token, ``True`` (default) adds the absolute position embedding to the mask token as well
    (BEiT / SimMIM / EVA-02 MIM); ``False`` adds it to the visible tokens only, so a masked position's input is the bare
    mask token and its position reaches it through RoPE alone (official PUMIT MIM code). Not stored in state dicts.
    """

    def __init__(
        self,
        input_channels: int,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 8 / 3,
        da: int = 0,
        drop_path_rate: float = 0.0,
        pos_embed_grid: Sequence[int] = (8, 8, 8),
        rope_bases: Sequence[float] = PUMIT_ROPE_BASES,
        use_cls_token: bool = True,
        use_mask_token: bool = True,
        scale_attn_inner: bool = False,
        grad_checkpointing: bool = False,
        mask_token_pos_embed: bool = True,
    ):
        super().__init__()
        if embed_dim % num_heads or (embed_dim // num_heads) % 4:
            raise ValueError(f"embed_dim/num_heads must be an integer divisible by 4, got {embed_dim}/{num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.da = int(da)
        self.grad_checkpointing = grad_checkpointing
        self.mask_token_pos_embed = bool(mask_token_pos_embed)
        self.num_prefix_tokens = 1 if use_cls_token else 0

        self.patch_embed = SACPatchEmbed(input_channels, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_cls_token else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_mask_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *(int(g) for g in pos_embed_grid)))
        self.rope = AdditiveRoPE3d(embed_dim // num_heads, rope_bases)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth decay rule
        self.blocks = nn.ModuleList([
            EvaBlock(
                dim=embed_dim,
                num_heads=num_heads,
                qkv_bias=True,
                qkv_fused=False,
                mlp_ratio=mlp_ratio,
                swiglu_mlp=True,
                scale_mlp=True,
                scale_attn_inner=scale_attn_inner,
                num_prefix_tokens=self.num_prefix_tokens,
                drop_path=dpr[i],
            )
            for i in range(depth)
        ])
        for blk in self.blocks:
            blk.attn.fused_attn = True  # always F.scaled_dot_product_attention (flash / mem-efficient kernels)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        """EVA-02 / timm ``Eva`` initialisation (trunc-normal 0.02 linears, depth-rescaled output projections)."""
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for i, blk in enumerate(self.blocks):
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (i + 1)))
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            if p is not None:
                trunc_normal_(p, std=0.02)

    def token_grid(self, spatial_shape: Sequence[int], da: int | None = None) -> tuple[int, int, int]:
        """Token grid ``(d, h, w)`` for an input of ``spatial_shape`` (raises if not divisible by the token size)."""
        da = self.da if da is None else da
        _check_patch_size(spatial_shape, da)
        t = sac_token_size(da, TOKEN_SIZE)
        return tuple(s // k for s, k in zip(spatial_shape, t))  # type: ignore[return-value]

    def embed(
        self, x: torch.Tensor, da: int | None = None, token_mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Patch tokens ``[B, N, C]`` with the absolute position embedding added, and the grid.

        With ``token_mask`` the masked tokens are replaced by the mask token; it gets the position embedding too when
        :attr:`mask_token_pos_embed` is true (BEiT order: substitute, then add), else it enters bare (official PUMIT
        MIM: position embedding on the visible tokens only, RoPE still rotates every token inside attention).
        ``mask_token`` (``[1, 1, C]``) overrides :attr:`mask_token`: pretraining wrappers keep their mask token outside
        the encoder (a ``mim_`` key that the segmentation network does not have).
        """
        da = self.da if da is None else da
        self.token_grid(x.shape[2:], da)
        x = self.patch_embed(x, da)
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        pos = resample_grid(self.pos_embed, grid).flatten(2).transpose(1, 2)
        if token_mask is None:
            return x + pos, grid  # type: ignore[return-value]
        mask_token = self.mask_token if mask_token is None else mask_token
        if mask_token is None:
            raise ValueError("token_mask given but the model was built with use_mask_token=False")
        if token_mask.shape != x.shape[:2]:
            raise ValueError(f"token_mask must be [B, N] = {tuple(x.shape[:2])}, got {tuple(token_mask.shape)}")
        masked = token_mask.unsqueeze(-1)
        if self.mask_token_pos_embed:
            return torch.where(masked, mask_token.to(x.dtype), x) + pos, grid  # type: ignore[return-value]
        return torch.where(masked, mask_token.to(x.dtype), x + pos), grid  # type: ignore[return-value]

    def _run_blocks(
        self, x: torch.Tensor, rope: torch.Tensor, stop: int, keep: Sequence[int] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        states = []
        for i, blk in enumerate(self.blocks[:stop]):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, rope, use_reentrant=False)
            else:
                x = blk(x, rope=rope)
            if i in keep:
                states.append(x)
        return x, states

    def _prepend_prefix(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls_token is None:
            return x
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], 1)

    def forward_features(
        self,
        x: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        visible_idx: torch.Tensor | None = None,
        da: int | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm tokens ``[B, P + N, C]`` (P prefix tokens first).

        ``token_mask`` (bool ``[B, N]``): masked tokens are replaced by the mask token, with or without the position
        embedding (:attr:`mask_token_pos_embed`; PUMIT "MIM Pre-training"). ``visible_idx`` (long ``[B, K]``, indices
        into the N raster-ordered grid tokens): only those tokens are encoded (MAE); RoPE and position embedding follow
        their positions and the output is ``[B, P + K, C]`` in ``visible_idx`` order. ``mask_token``: see :meth:`embed`.
        """
        tokens, grid = self.embed(x, da, token_mask, mask_token)
        if visible_idx is not None:
            tokens = tokens.gather(1, visible_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        rope = self.rope(grid, keep_idx=visible_idx, device=tokens.device)
        out, _ = self._run_blocks(self._prepend_prefix(tokens), rope, len(self.blocks))
        return self.norm(out)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Sequence[int],
        da: int | None = None,
        token_mask: torch.Tensor | None = None,
        norm: bool = True,
    ) -> list[torch.Tensor]:
        """Outputs of blocks ``indices`` as maps ``[B, C, d, h, w]`` (prefix tokens dropped).

        ``norm=True`` applies the final LayerNorm to each (timm ``forward_intermediates`` convention). Blocks after
        ``max(indices)`` are not run.
        """
        tokens, grid = self.embed(x, da, token_mask)
        rope = self.rope(grid, device=tokens.device)
        _, states = self._run_blocks(self._prepend_prefix(tokens), rope, max(indices) + 1, keep=set(indices))
        by_index = dict(zip(sorted(set(indices)), states))
        maps = []
        for i in indices:
            s = by_index[i][:, self.num_prefix_tokens:]
            if norm:
                s = self.norm(s)
            maps.append(s.transpose(1, 2).unflatten(2, grid))
        return maps

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(x, token_mask=token_mask)


# ----------------------------------------------------------------------------------------------------------------
# decoder
# ----------------------------------------------------------------------------------------------------------------
class _SACSequential(nn.Sequential):
    """``nn.Sequential`` that passes ``da`` to the SAC layers it contains."""

    def forward(self, x: torch.Tensor, da: int = 0) -> torch.Tensor:  # type: ignore[override]
        for m in self:
            x = m(x, da) if isinstance(m, _TAKES_DA) else m(x)
        return x


_TAKES_DA = (SACConv3d, SACConvTranspose3d, SACMaxPool3d, _SACSequential)


def _conv_norm_act(c_in: int, c_out: int, level: int, stride: int = 1) -> _SACSequential:
    """3x3x3 SAC conv + InstanceNorm + LeakyReLU (nnU-Net defaults)."""
    return _SACSequential(
        SACConv3d(c_in, c_out, 3, stride=stride, padding=1, level=level),
        nn.InstanceNorm3d(c_out, eps=1e-5, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class _UpStage(nn.Module):
    """U-Net decoder stage: SAC transposed conv (x2) -> crop to skip -> concat -> 2 x conv-IN-LReLU at ``level``."""

    def __init__(self, c_in: int, c_out: int, c_skip: int, level: int):
        super().__init__()
        self.up = SACConvTranspose3d(c_in, c_out, 2, level=level + 1)
        self.convs = _SACSequential(
            _conv_norm_act(c_out + c_skip, c_out, level), _conv_norm_act(c_out, c_out, level),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor, da: int) -> torch.Tensor:
        x = self.up(x, da)[:, :, : skip.shape[2], : skip.shape[3], : skip.shape[4]]
        return self.convs(torch.cat([x, skip], 1), da)


class SACViTDecoder(nn.Module):
    """Simple pyramid + plain U-Net decoder + full-resolution stem (PUMIT "Segmentation Experiments").

    Levels ``n = 0..5`` have in-plane stride ``2**n`` and depth stride ``2**max(n - DA, 0)``. The ViT features (token
    level 4) give levels 2..5 (x4: 2 transposed convs, x2: 1, x1: identity, x1/2: max-pool); a conv stem on the raw
    image gives levels 0..1. ``seg_layers[i]`` predicts at level ``4 - i`` (lowest resolution first, as nnU-Net's
    ``UNetDecoder``); with ``deep_supervision`` the outputs are returned highest resolution first.
    """

    def __init__(
        self,
        input_channels: int,
        embed_dim: int,
        num_classes: int,
        channels: Sequence[int] = (32, 64, 128, 256, 512, 512),
        deep_supervision: bool = False,
    ):
        super().__init__()
        if len(channels) != NUM_LEVELS:
            raise ValueError(f"decoder channels need {NUM_LEVELS} entries (levels 0..5), got {len(channels)}")
        if embed_dim % 4:
            raise ValueError("embed_dim must be divisible by 4")
        c = [int(v) for v in channels]
        d = embed_dim
        self.deep_supervision = deep_supervision
        self.pyramid = nn.ModuleList([
            _SACSequential(  # x4 (level 2)
                SACConvTranspose3d(d, d // 2, 2, level=4),
                nn.InstanceNorm3d(d // 2, affine=True),
                nn.GELU(),
                SACConvTranspose3d(d // 2, d // 4, 2, level=3),
            ),
            _SACSequential(SACConvTranspose3d(d, d // 2, 2, level=4)),  # x2 (level 3)
            _SACSequential(),  # x1 (level 4)
            _SACSequential(SACMaxPool3d(level=4)),  # x1/2 (level 5)
        ])
        self.laterals = nn.ModuleList([
            nn.Conv3d(ci, co, 1) for ci, co in zip((d // 4, d // 2, d, d), c[2:])
        ])
        self.stem = nn.ModuleList([
            _SACSequential(_conv_norm_act(input_channels, c[0], 0), _conv_norm_act(c[0], c[0], 0)),
            _SACSequential(_conv_norm_act(c[0], c[1], 0, stride=2), _conv_norm_act(c[1], c[1], 1)),
        ])
        # stages[i] / seg_layers[i] work at level 4 - i
        self.stages = nn.ModuleList([_UpStage(c[n + 1], c[n], c[n], n) for n in range(NUM_LEVELS - 2, -1, -1)])
        self.seg_layers = nn.ModuleList([nn.Conv3d(c[n], num_classes, 1) for n in range(NUM_LEVELS - 2, -1, -1)])

    def forward(self, features: Sequence[torch.Tensor], x: torch.Tensor, da: int) -> torch.Tensor | list[torch.Tensor]:
        """``features``: 4 token maps ``[B, C, d, h, w]``; ``x``: the raw input image."""
        skips = [lat(branch(f, da)) for f, branch, lat in zip(features, self.pyramid, self.laterals)]
        s0 = self.stem[0](x, da)
        s1 = self.stem[1](s0, da)
        skips = [s0, s1] + skips  # levels 0..5
        y = skips[-1]
        outputs = []
        for i, stage in enumerate(self.stages):
            y = stage(y, skips[NUM_LEVELS - 2 - i], da)
            if self.deep_supervision or i == len(self.stages) - 1:
                outputs.append(self.seg_layers[i](y))
        return outputs[::-1] if self.deep_supervision else outputs[-1]


# ----------------------------------------------------------------------------------------------------------------
# segmentation network
# ----------------------------------------------------------------------------------------------------------------
class SACViTSeg(nn.Module):
    """SAC-ViT encoder + pyramid / U-Net decoder for nnU-Net (output at input resolution).

    Plans usage: ``network_class_name = "nnunet_mim.architectures.sac_vit.SACViTSeg"`` with the arch kwargs from
    :func:`sac_vit_arch_kwargs`; nnU-Net passes ``input_channels``, ``num_classes`` and ``deep_supervision``.
    nnU-Net 2.8 reads ``pool_op_kernel_sizes`` from ``arch_kwargs['strides']``; it must equal
    :attr:`pool_op_kernel_sizes` (checked here) so that the deep-supervision targets match the 5 outputs (levels
    0..4, highest resolution first).
    """

    def __init__(
        self,
        input_channels: int,
        num_classes: int,
        patch_size: Sequence[int],
        da: int | None = None,
        spacing: Sequence[float] | None = None,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 8 / 3,
        out_indices: Sequence[int] | None = None,
        decoder_channels: Sequence[int] = (32, 64, 128, 256, 512, 512),
        deep_supervision: bool = False,
        drop_path_rate: float = 0.0,
        pos_embed_grid: Sequence[int] = (8, 8, 8),
        rope_bases: Sequence[float] = PUMIT_ROPE_BASES,
        use_cls_token: bool = True,
        use_mask_token: bool = False,
        scale_attn_inner: bool = False,
        grad_checkpointing: bool = False,
        strides: Sequence[Sequence[int]] | None = None,
    ):
        super().__init__()
        self.da = _resolve_da(da, spacing)
        if strides is not None and [list(s) for s in strides] != self.pool_op_kernel_sizes:
            raise ValueError(
                f"strides {[list(s) for s in strides]} do not match this network's pyramid for DA={self.da}: "
                f"{self.pool_op_kernel_sizes} (nnU-Net reads pool_op_kernel_sizes from arch_kwargs['strides'])"
            )
        self.patch_size = tuple(int(p) for p in patch_size)
        _check_patch_size(self.patch_size, self.da)
        if math.prod(p // t for p, t in zip(self.patch_size, sac_token_size(self.da, TOKEN_SIZE))) < 2:
            raise ValueError(
                f"patch size {self.patch_size} gives a single token at DA={self.da}; the decoder's InstanceNorm at the "
                "token level needs at least 2 tokens"
            )
        self.out_indices = list(default_out_indices(depth) if out_indices is None else out_indices)
        if len(self.out_indices) != 4 or any(not 0 <= i < depth for i in self.out_indices):
            raise ValueError(f"out_indices must be 4 block indices in [0, {depth}), got {self.out_indices}")
        self.encoder = SACViT(
            input_channels,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            da=self.da,
            drop_path_rate=drop_path_rate,
            pos_embed_grid=pos_embed_grid,
            rope_bases=rope_bases,
            use_cls_token=use_cls_token,
            use_mask_token=use_mask_token,
            scale_attn_inner=scale_attn_inner,
            grad_checkpointing=grad_checkpointing,
        )
        self.decoder = SACViTDecoder(input_channels, embed_dim, num_classes, decoder_channels, deep_supervision)
        self.decoder.apply(_he_init)
        # dynamic-network-architectures' weight-key attributes (read by pretraining / weight-adaptation tools):
        # the encoder, the stem, every layer that reads the raw input, the learnable position embedding
        self.key_to_encoder = "encoder"
        self.key_to_stem = "encoder.patch_embed"
        self.keys_to_in_proj = ("encoder.patch_embed.proj", "decoder.stem.0.0.0")
        self.key_to_lpe = "encoder.pos_embed"

    @property
    def pool_op_kernel_sizes(self) -> list[list[int]]:
        """Per-level pooling factors (nnU-Net plans format) of the 6-level pyramid for this DA."""
        return level_strides(self.da, NUM_LEVELS)

    @property
    def deep_supervision_scales(self) -> list[list[float]]:
        """nnU-Net's ``1 / cumprod(pool_op_kernel_sizes)[:-1]``: scale of each deep-supervision output."""
        scales, acc = [], [1, 1, 1]
        for s in self.pool_op_kernel_sizes[:-1]:
            acc = [a * b for a, b in zip(acc, s)]
            scales.append([1 / a for a in acc])
        return scales

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        features = self.encoder.forward_intermediates(x, self.out_indices, token_mask=token_mask, norm=True)
        return self.decoder(features, x, self.da)


def sac_vit_arch_kwargs(
    patch_size: Sequence[int], spacing: Sequence[float], size: str = "B", **overrides,
) -> dict:
    """JSON-serialisable nnU-Net ``arch_kwargs`` for :class:`SACViTSeg` (preset ``size`` in S / B / L), including
    the ``strides`` entry nnU-Net uses as ``pool_op_kernel_sizes``."""
    da = degree_of_anisotropy(spacing)
    _check_patch_size(patch_size, da)
    kwargs = {
        "patch_size": [int(p) for p in patch_size],
        "spacing": [float(s) for s in spacing],
        **SAC_VIT_PRESETS[size],
        "strides": level_strides(da, NUM_LEVELS),
    }
    kwargs.update(overrides)
    return kwargs


#: ``network_class_name`` of SAC-ViT configurations in nnU-Net plans
SAC_VIT_NETWORK_CLASS = f"{__name__}.SACViTSeg"


class SACViTPretrainNet(nn.Module):
    """Base of the SAC-ViT pretraining networks (token MIM, MAE, SimMIM, SimCLR).

    Holds the ``encoder`` and ``decoder`` of a :class:`SACViTSeg` under the same names, so its state dict is the
    segmentation network's plus pretraining-only ``mim_*`` entries: a pretraining checkpoint loads into the supervised
    SAC-ViT configuration with nnU-Net's own ``-pretrained_weights`` loader (every non-``.seg_layers.`` key present,
    same shapes). The U-Net decoder takes no part in these pretext tasks: it is frozen (``requires_grad=False``, so
    DDP and the optimiser ignore it) and keeps its initialisation, which finetuning therefore starts from exactly as a
    fresh network would. Subclasses add ``mim_*`` modules and a ``forward``.
    """

    def __init__(self, seg: SACViTSeg):
        super().__init__()
        self.encoder = seg.encoder
        self.decoder = seg.decoder
        self.decoder.requires_grad_(False)
        self.da = seg.da
        self.patch_size = seg.patch_size
        self.embed_dim = seg.encoder.embed_dim

    @property
    def token_size(self) -> tuple[int, int, int]:
        return sac_token_size(self.da, TOKEN_SIZE)

    def token_grid(self, spatial_shape: Sequence[int] | None = None) -> tuple[int, int, int]:
        return self.encoder.token_grid(self.patch_size if spatial_shape is None else spatial_shape, self.da)

    def patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Drop the prefix (cls) tokens of an encoder output."""
        return tokens[:, self.encoder.num_prefix_tokens:]


def _he_init(m: nn.Module) -> None:
    """nnU-Net ``InitWeights_He(1e-2)`` for the convolutional decoder."""
    if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(m.weight, a=1e-2)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _preset(name: str, kwargs: dict) -> SACViTSeg:
    return SACViTSeg(**{**SAC_VIT_PRESETS[name], **kwargs})


def sac_vit_s(**kwargs) -> SACViTSeg:
    """SAC-ViT-S: embed 384, depth 12, heads 6 (EVA-02-S sizes)."""
    return _preset("S", kwargs)


def sac_vit_b(**kwargs) -> SACViTSeg:
    """SAC-ViT-B: embed 768, depth 12, heads 12 (PUMIT / EVA-02-B)."""
    return _preset("B", kwargs)


def sac_vit_l(**kwargs) -> SACViTSeg:
    """SAC-ViT-L: embed 1024, depth 24, heads 16 (EVA-02-L); default out_indices [7, 11, 15, 23]."""
    return _preset("L", kwargs)
