"""VQGAN-style losses of PUMIT's visual tokenizer (Luo et al., arXiv 2312.07630, eq. 5): hinge GAN losses, the
discriminator-loss gate, and a pluggable LPIPS perceptual loss that needs user-supplied ImageNet VGG16 weights.

Perceptual loss. LPIPS (Zhang et al. 2018) compares unit-normalised VGG16 activations (relu1_2, relu2_2, relu3_3,
relu4_3, relu5_3) of the two images, weighted per channel by small learned "lin" layers. The VGG16 ImageNet weights
cannot be downloaded here, so the loss is built only from a local file (torchvision's ``vgg16`` state dict; keys
``features.N.*``), read with ``weights_only=True``; the optional LPIPS lin weights (taming-transformers /
``lpips`` package ``vgg.pth``) come from a second local file, otherwise every channel weighs the same (reported).
Without a VGG16 file the perceptual term is OFF -- never replaced by an untrained network.

Input scaling: LPIPS expects images in [-1, 1] and shifts them by ``2 * imagenet_mean - 1`` (then divides by
``2 * imagenet_std``), i.e. the ImageNet normalisation of ``(x + 1) / 2``. The official PUMIT code uses
``1 - 2 * imagenet_mean`` (sign flipped); we use the correct shift.
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16.features
LPIPS_CHANNELS = (64, 128, 256, 512, 512)



# ---------------------------------------------------------------------------------------------------- GAN
def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))`` (VQGAN / official PUMIT)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """``-mean D(x_rec)`` (hinge GAN generator term)."""
    return -logits_fake.mean()


def update_gan_gate(ema: float, disc_loss: float, momentum: float = 0.9, threshold: float = 0.025
                    ) -> tuple[float, bool]:
    """Discriminator-loss gate of eq. 5: the generator's GAN term is included (Iverson bracket) only while the
    discriminator loss is below ``threshold``; official: ``max(EMA_0.9(disc_loss), disc_loss) <= threshold``.

    ``ema`` is NaN before the first update. Returns ``(new_ema, gate_open)``.
    """
    new_ema = disc_loss if math.isnan(ema) else momentum * ema + (1.0 - momentum) * disc_loss
    return new_ema, max(new_ema, disc_loss) <= threshold


# ---------------------------------------------------------------------------------------------- perceptual
def vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` layout (same module indices and state-dict keys), untrained."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU(inplace=False)]
            c_in = int(v)
    return nn.Sequential(*layers)


def _load_state(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    return state


class LPIPSPerceptualLoss(nn.Module):
    """LPIPS distance on 2D images ``[N, C, H, W]`` in roughly [-1, 1] (C = 1 is replicated to RGB; other C are
    compared channel by channel). Frozen; build it with :func:`build_perceptual_loss`."""

    def __init__(self, vgg_state: dict[str, torch.Tensor], lin_state: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.features = vgg16_features()[: LPIPS_TAPS[-1] + 1]
        state = {k[len("features."):] if k.startswith("features.") else k: v for k, v in vgg_state.items()}
        state = {k: v for k, v in state.items() if k.split(".")[0].isdigit() and int(k.split(".")[0]) <= LPIPS_TAPS[-1]}
        missing = set(self.features.state_dict()) - set(state)
        if missing:
            raise ValueError(f"VGG16 weights lack {sorted(missing)[:4]}...: expected torchvision's vgg16 state dict "
                             f"(keys 'features.N.weight' / 'features.N.bias')")
        self.features.load_state_dict(state)
        lins = []
        for i, c in enumerate(LPIPS_CHANNELS):
            w = None
            if lin_state is not None:
                w = next((v for k, v in lin_state.items() if k.startswith(f"lin{i}.") and k.endswith("weight")), None)
                if w is None:
                    raise ValueError(f"LPIPS lin weights lack 'lin{i}.*.weight'")
            lins.append(w.reshape(c).float() if w is not None else torch.full((c,), 1.0 / c))
        self.calibrated = lin_state is not None
        for i, w in enumerate(lins):
            self.register_buffer(f"lin{i}", w)
        # ImageNet normalisation of (x + 1) / 2, i.e. shift 2 * mean - 1 (the official code flips the sign)
        self.register_buffer("shift", torch.tensor([2 * m - 1 for m in IMAGENET_MEAN]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([2 * s for s in IMAGENET_STD]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always frozen, eval mode
        return super().train(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                out.append(unit_normalize(x))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance over the N images (and channels when C is not 1 or 3)."""
        if x.shape[1] not in (1, 3):
            n, c = x.shape[:2]
            return self(x.reshape(n * c, 1, *x.shape[2:]), y.reshape(n * c, 1, *y.shape[2:]))
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        total = x.new_zeros(())
        for i, (a, b) in enumerate(zip(self._taps(x.float()), self._taps(y.float()))):
            w = getattr(self, f"lin{i}").view(1, -1, 1, 1)
            total = total + ((a - b).pow(2) * w).sum(1).mean()
        return total


def unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """``x`` divided by its L2 norm over channels (dim 1). The epsilon sits inside the square root: LPIPS's
    ``x / (sqrt(sum x^2) + eps)`` has a NaN gradient where a feature column is all zero (common after ReLU); this one
    stays finite there and equals it elsewhere up to ~eps / |x|^2."""
    return x * torch.rsqrt(x.pow(2).sum(1, keepdim=True) + eps)


def build_perceptual_loss(vgg16_path: str | None = None, lpips_path: str | None = None
                          ) -> tuple[LPIPSPerceptualLoss | None, str]:
    """The perceptual loss from local files (a torchvision ``vgg16`` state dict, optionally LPIPS lin weights) and
    a one-line status for the training log. ``(None, reason)`` when no VGG16 file is given. Where the paths come
    from (``nnUNet_mim_vgg16_weights`` / ``nnUNet_mim_lpips_weights``) is the trainer's business."""
    if vgg16_path is None:
        return None, ("perceptual loss OFF: it needs ImageNet VGG16 weights, which are never downloaded; set "
                      "nnUNet_mim_vgg16_weights=/path/to/vgg16.pth (torchvision vgg16 state dict) to enable it")
    for p in (vgg16_path, lpips_path):
        if p is not None and not os.path.isfile(p):
            raise FileNotFoundError(f"perceptual-loss weights not found: {p}; fix the path, or unset "
                                    f"nnUNet_mim_vgg16_weights / nnUNet_mim_lpips_weights to train without the "
                                    f"perceptual loss")
    module = LPIPSPerceptualLoss(_load_state(vgg16_path), _load_state(lpips_path) if lpips_path else None)
    lin = f"LPIPS lin weights {lpips_path}" if lpips_path else \
        "uniform channel weights (no LPIPS lin file; set nnUNet_mim_lpips_weights for calibrated LPIPS)"
    return module, f"perceptual loss ON: VGG16 {vgg16_path}, {lin}"


def sample_slices(x: torch.Tensor, y: torch.Tensor, max_slices: int, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, C, D, H, W]`` pair -> 2D slices ``[(B d), C, H, W]`` along depth, at most ``max_slices`` random depths per
    volume (the same depths for both; official ``max_perceptual_slices``)."""
    b, c, d, h, w = x.shape
    if d > max_slices:
        idx = torch.stack([torch.randperm(d, generator=generator)[:max_slices] for _ in range(b)]).to(x.device)
        index = idx.view(b, 1, max_slices, 1, 1).expand(b, c, max_slices, h, w)
        x, y = x.gather(2, index), y.gather(2, index)
        d = max_slices
    return (x.transpose(1, 2).reshape(b * d, c, h, w), y.transpose(1, 2).reshape(b * d, c, h, w))
