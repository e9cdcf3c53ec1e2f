"""PUMIT's universal visual tokenizer (Luo et al., arXiv 2312.07630, "Universal Visual Tokenizer" and "Visual
Tokenizer Details"): SAC convolutional encoder / decoder with soft tokens, and the SAC patch discriminator.

* :class:`SACTokenizerEncoder` -- SAC conv k=s=4 (level 0), k=s=2 (level 2), k=s=2 (level 3), each followed by a
  channel LayerNorm + GELU (total stride 16 in-plane and ``16 >> DA`` in depth: exactly the SAC-ViT token grid), then
  two 3x3x3 SAC conv + GroupNorm(8) + LeakyReLU at the token level (official ``SimpleVQTokenizer`` layout).
* :class:`SoftQuantizer` -- logits ``Linear(C -> K)``, ``p = softmax(logits)``; the soft token is the expectation
  of the codebook embeddings, ``z_q = sum_k p_k e_k = p @ E`` (paper eq. 1). No sampling, no straight-through.
* :class:`SACTokenizerDecoder` -- two 3x3x3 SAC convs at the token level, two x2 SAC transposed-conv upsamplings
  (each + 3x3x3 SAC conv + GroupNorm + LeakyReLU) and a k=s=4 SAC transposed conv back to the input channels.
* :class:`SACPatchDiscriminator` -- 3 x (3x3x3 SAC conv stride 2 + GroupNorm + LeakyReLU), a 3x3x3 conv block and a
  3x3x3 conv to one logit per patch (official ``SimplePatchDiscriminator``).
* :class:`VisualTokenizerNet` -- the stage-1 pretraining network: tokenizer + discriminator in one forward.

Everything is plain tensors + an ``int`` DA (see ``nnunet_mim/core/sac.py``). Intensities: nnU-Net's normalised image is
reconstructed as is (the official tokenizer sees ``2x - 1`` of [0, 1]-scaled RGB; documentation/pumit.md).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from nnunet_mim.architectures.sac_vit import TOKEN_SIZE, _SACSequential
from nnunet_mim.core.sac import SACConv3d, SACConvTranspose3d, sac_token_size

__all__ = [
    "TokenizerConfig",
    "ChannelLayerNorm",
    "SACTokenizerEncoder",
    "SoftQuantizer",
    "SACTokenizerDecoder",
    "TokenizerOutput",
    "VisualTokenizer",
    "SACPatchDiscriminator",
]


@dataclass(frozen=True)
class TokenizerConfig:
    """Everything needed to rebuild a :class:`VisualTokenizer` (stored in stage-1 checkpoints)."""

    in_channels: int = 1
    channels: tuple[int, int, int] = (128, 256, 512)
    num_embeddings: int = 1024  # codebook size K (paper: 1024)
    embedding_dim: int = 512  # codebook embedding dimension (paper: 512)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(d["channels"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TokenizerConfig:
        return cls(int(d["in_channels"]), tuple(int(c) for c in d["channels"]), int(d["num_embeddings"]),
                   int(d["embedding_dim"]))


def _groups(channels: int, preferred: int) -> int:
    return math.gcd(channels, preferred)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a ``[B, C, ...]`` map (official ``LayerNormNd``)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


def _conv_gn_lrelu(c_in: int, c_out: int, level: int) -> _SACSequential:
    return _SACSequential(
        SACConv3d(c_in, c_out, 3, padding=1, level=level),
        nn.GroupNorm(_groups(c_out, 8), c_out),
        nn.LeakyReLU(0.01, inplace=True),
    )


class SACTokenizerEncoder(nn.Module):
    """Image ``[B, C_in, D, H, W]`` -> feature map at the token grid ``[B, c3, D / (16 >> DA), H / 16, W / 16]``."""

    def __init__(self, in_channels: int, channels: Sequence[int] = (128, 256, 512)):
        super().__init__()
        c1, c2, c3 = (int(c) for c in channels)
        self.down = _SACSequential(
            SACConv3d(in_channels, c1, 4, stride=4, level=0), ChannelLayerNorm(c1), nn.GELU(),
            SACConv3d(c1, c2, 2, stride=2, level=2), ChannelLayerNorm(c2), nn.GELU(),
            SACConv3d(c2, c3, 2, stride=2, level=3), ChannelLayerNorm(c3), nn.GELU(),
        )
        self.blocks = _SACSequential(_conv_gn_lrelu(c3, c3, 4), _conv_gn_lrelu(c3, c3, 4))

    def forward(self, x: torch.Tensor, da: int) -> torch.Tensor:
        return self.blocks(self.down(x, da), da)


class SoftQuantizer(nn.Module):
    """Soft token (paper eq. 1): ``p = softmax(W z + b)`` over K codebook entries, embedding ``z_q = p @ E``.

    The codebook ``E`` is ``embedding.weight`` ``[K, D]`` (init U(-1/K, 1/K) as the official code). Softmax and the
    expectation run in float32 (log-probabilities feed the regulariser and stage 2's targets).
    """

    def __init__(self, dim: int, num_embeddings: int = 1024, embedding_dim: int = 512):
        super().__init__()
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.proj = nn.Linear(dim, num_embeddings)
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, C, d, h, w]`` -> token logits ``[B, N, K]`` (raster order, as SAC-ViT tokens)."""
        return self.proj(z.flatten(2).transpose(1, 2)).float()

    def embed(self, probs: torch.Tensor) -> torch.Tensor:
        """Soft-token embedding ``E_{p}[e] = p @ E``: ``[..., K]`` -> ``[..., D]``."""
        return probs @ self.embedding.weight.float()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(z_q [B, D, d, h, w], logits [B, N, K], probs [B, N, K])``."""
        logits = self.logits(z)
        probs = logits.softmax(-1)
        zq = self.embed(probs).to(z.dtype)
        return zq.transpose(1, 2).unflatten(2, z.shape[2:]), logits, probs


class SACTokenizerDecoder(nn.Module):
    """Soft-token embeddings at the token grid -> image ``[B, C_out, D, H, W]``.

    Not invariant to the degree of anisotropy (unlike the encoder): where a SAC transposed conv keeps the depth
    resolution it sums its kernel over depth, where the isotropic network on a depth-stretched volume followed by
    depth averaging would average. A decoder trained at one DA therefore reconstructs at another DA with a different
    scale (relative to DA 0: 2x at DA 1, 4x at DA 2; at DA 3-4 about 4x and no longer a pure rescaling). Only the
    encoder (the MIM targets) transfers across DAs (documentation/pumit.md, section 9).
    """

    def __init__(self, out_channels: int, channels: Sequence[int] = (128, 256, 512), embedding_dim: int = 512):
        super().__init__()
        c1, c2, c3 = (int(c) for c in channels)
        self.blocks = _SACSequential(_conv_gn_lrelu(embedding_dim, c3, 4), _conv_gn_lrelu(c3, c3, 4))
        self.up = _SACSequential(
            SACConvTranspose3d(c3, c2, 2, level=4), _conv_gn_lrelu(c2, c2, 3),
            SACConvTranspose3d(c2, c1, 2, level=3), _conv_gn_lrelu(c1, c1, 2),
        )
        self.out = SACConvTranspose3d(c1, out_channels, 4, level=2)

    def forward(self, zq: torch.Tensor, da: int) -> torch.Tensor:
        return self.out(self.up(self.blocks(zq, da), da), da)


class TokenizerOutput(NamedTuple):
    reconstruction: torch.Tensor  # [B, C, D, H, W]
    logits: torch.Tensor  # [B, N, K] float32
    probs: torch.Tensor  # [B, N, K] float32
    grid: tuple[int, int, int]  # token grid (d, h, w)


class VisualTokenizer(nn.Module):
    """SAC encoder -> soft quantizer -> SAC decoder. ``da`` is fixed at construction (from the plans' spacing) and
    can be overridden per call; the state dict does not depend on it (universal tokenizer)."""

    def __init__(self, config: TokenizerConfig, da: int = 0):
        super().__init__()
        self.config = config
        self.da = int(da)
        c = config
        self.encoder = SACTokenizerEncoder(c.in_channels, c.channels)
        self.quantize = SoftQuantizer(c.channels[2], c.num_embeddings, c.embedding_dim)
        self.decoder = SACTokenizerDecoder(c.in_channels, c.channels, c.embedding_dim)

    @property
    def num_embeddings(self) -> int:
        return self.config.num_embeddings

    def token_size(self, da: int | None = None) -> tuple[int, int, int]:
        return sac_token_size(self.da if da is None else da, TOKEN_SIZE)

    def token_grid(self, spatial_shape: Sequence[int], da: int | None = None) -> tuple[int, int, int]:
        """Token grid of an input of ``spatial_shape``, from the encoder's effective SAC strides (shapes only)."""
        return _strided_output_shape(self.encoder, spatial_shape, self.da if da is None else da)

    def _check(self, x: torch.Tensor, da: int) -> None:
        t = self.token_size(da)
        if any(s % k for s, k in zip(x.shape[2:], t)):
            raise ValueError(f"tokenizer input {tuple(x.shape[2:])} is not divisible by its token size {t} (DA {da})")

    def encode(self, x: torch.Tensor, da: int | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Token logits ``[B, N, K]`` (float32) and the token grid."""
        da = self.da if da is None else da
        self._check(x, da)
        z = self.encoder(x, da)
        return self.quantize.logits(z), tuple(z.shape[2:])  # type: ignore[return-value]

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor, da: int | None = None) -> torch.Tensor:
        """Soft tokens ``[B, N, K]`` (probabilities, float32) -- stage 2's targets."""
        return self.encode(x, da)[0].softmax(-1)

    def forward(self, x: torch.Tensor, da: int | None = None) -> TokenizerOutput:
        da = self.da if da is None else da
        self._check(x, da)
        z = self.encoder(x, da)
        zq, logits, probs = self.quantize(z)
        return TokenizerOutput(self.decoder(zq, da), logits, probs, tuple(z.shape[2:]))  # type: ignore[arg-type]


def _strided_output_shape(encoder: SACTokenizerEncoder, spatial_shape: Sequence[int], da: int
                          ) -> tuple[int, int, int]:
    """Output grid of the encoder's strided convolutions, from shapes only (no data touched)."""
    shape = [int(s) for s in spatial_shape]
    for m in encoder.down:
        if isinstance(m, SACConv3d):
            w, stride, padding = m.effective_params(da)
            k = w.shape[2:]
            shape = [(s + 2 * p - kk) // st + 1 for s, p, kk, st in zip(shape, padding, k, stride)]
    return tuple(shape)  # type: ignore[return-value]


class SACPatchDiscriminator(nn.Module):
    """PatchGAN-style discriminator from SAC convs: one logit per patch ``[B, 1, d, h, w]`` (hinge GAN)."""

    def __init__(self, in_channels: int, channels: Sequence[int] = (128, 256, 512)):
        super().__init__()
        layers = []
        c_prev = in_channels
        for level, c in enumerate(channels):
            layers += [SACConv3d(c_prev, c, 3, stride=2, padding=1, level=level), nn.GroupNorm(_groups(c, 16), c),
                       nn.LeakyReLU(0.2, inplace=True)]
            c_prev = c
        n = len(channels)
        layers += [SACConv3d(c_prev, c_prev, 3, padding=1, level=n), nn.GroupNorm(_groups(c_prev, 16), c_prev),
                   nn.LeakyReLU(0.2, inplace=True), SACConv3d(c_prev, 1, 3, padding=1, level=n)]
        self.main = _SACSequential(*layers)

    def forward(self, x: torch.Tensor, da: int = 0) -> torch.Tensor:
        return self.main(x, da)


class VisualTokenizerNet(nn.Module):
    """Stage-1 network: ``tokenizer`` (encoder, soft quantizer, decoder) + ``mim_discriminator`` + the gate's EMA.

    One forward returns everything both players need, so a single backward trains both (DDP-friendly: every
    parameter gets a gradient from one forward): the discriminator scores ``x`` and ``x_rec.detach()`` for its
    hinge loss, and scores ``x_rec`` a second time with *detached* parameters (``functional_call``) for the
    generator's adversarial term, so that term reaches the tokenizer only. This equals the official alternating
    G-step / D-step on the same ``x_rec``.
    """

    def __init__(self, tokenizer: VisualTokenizer, discriminator: SACPatchDiscriminator):
        super().__init__()
        self.tokenizer = tokenizer
        self.mim_discriminator = discriminator
        self.register_buffer("mim_gan_ema", torch.tensor(float("nan")))  # disc-loss EMA, saved with the weights

    @property
    def da(self) -> int:
        return self.tokenizer.da

    def forward(self, x: torch.Tensor):
        out = self.tokenizer(x)
        rec = out.reconstruction
        d = self.mim_discriminator
        logits_real = d(x, self.da)
        logits_fake = d(rec.detach(), self.da)
        frozen = {n: p.detach() for n, p in d.named_parameters()}
        logits_fake_for_g = functional_call(d, frozen, (rec, self.da))
        return out, logits_real, logits_fake, logits_fake_for_g
