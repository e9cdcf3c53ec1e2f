"""Adapting pretrained convolution weights to another number of input channels or another kernel size.

Conventions: weights are PyTorch convolution weights ``(out_channels, in_channels, *kernel)``; nothing here knows
about networks or checkpoints (the importer in ``nnunet_mim/nnunet/import_weights.py`` decides where each rule
applies). Every rule keeps a stated response of the layer unchanged, and says so in its docstring:

- :func:`spread_input_channels` (no channel names): the response to an image replicated in every input channel is
  the pretrained response to that image (1 channel -> N: repeat and divide by N);
- :func:`map_input_channels` (names known): mapped channels are copied; the others start at zero (the response to
  the mapped channels alone is exactly the pretrained one) or at the mean of the pretrained channels;
- :func:`collapse_kernel_axis`: a kernel of size k along an axis becomes 1 by *summing* the k taps, which keeps the
  response to an input that is constant along that axis (averaging would scale it by 1/k);
- :func:`pad_kernel_axis`: a kernel grows (1 -> 3) by zero taps around the centre, which keeps every response.
"""
from __future__ import annotations

from typing import Sequence

import torch

CHANNEL_DIM = 1  # input channels of a convolution weight
FIRST_KERNEL_DIM = 2  # first spatial dimension of a convolution weight
CHANNEL_FILLS = ("zero", "mean")


def spread_input_channels(weight: torch.Tensor, target_channels: int) -> torch.Tensor:
    """``(out, C, *k)`` -> ``(out, N, *k)``: each new channel is the sum over the C pretrained channels divided by N.

    For C = 1 this is "repeat and divide by N". An image fed identically to all N channels then gives the same
    pre-activation as the same image fed to all C pretrained channels."""
    if target_channels < 1:
        raise ValueError(f"target_channels must be >= 1, got {target_channels}")
    summed = weight.sum(dim=CHANNEL_DIM, keepdim=True)
    repeats = [1] * weight.ndim
    repeats[CHANNEL_DIM] = target_channels
    return summed.repeat(*repeats) / target_channels


def map_input_channels(weight: torch.Tensor, mapping: Sequence[int | None], fill: str = "zero") -> torch.Tensor:
    """``(out, C, *k)`` -> ``(out, len(mapping), *k)``: target channel i copies pretrained channel ``mapping[i]``;
    a ``None`` entry starts at zero (``fill="zero"``: the mapped channels alone reproduce the pretrained response)
    or at the mean over the pretrained channels (``fill="mean"``)."""
    if fill not in CHANNEL_FILLS:
        raise ValueError(f"fill must be one of {CHANNEL_FILLS}, got {fill!r}")
    channels = weight.shape[CHANNEL_DIM]
    for source in mapping:
        if source is not None and not 0 <= source < channels:
            raise ValueError(f"channel mapping {list(mapping)} names channel {source}; the weight has {channels}")
    if fill == "zero":
        unmapped = torch.zeros_like(weight.narrow(CHANNEL_DIM, 0, 1))
    else:
        unmapped = weight.mean(dim=CHANNEL_DIM, keepdim=True)
    parts = [unmapped if s is None else weight.narrow(CHANNEL_DIM, s, 1) for s in mapping]
    return torch.cat(parts, dim=CHANNEL_DIM)


def collapse_kernel_axis(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """Kernel size along spatial ``axis`` (0 = first spatial axis) becomes 1 by summing the taps.

    The response to an input that is constant along ``axis`` is unchanged (away from zero-padded borders): all k taps
    saw the same value, the single tap sees it once with their summed weight."""
    return weight.sum(dim=FIRST_KERNEL_DIM + axis, keepdim=True)


def pad_kernel_axis(weight: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """Kernel size along spatial ``axis`` grows to ``size`` (both odd) with zero taps around the centre: every
    response is unchanged (with nnU-Net's "same" padding)."""
    dim = FIRST_KERNEL_DIM + axis
    extra = size - weight.shape[dim]
    if extra < 0 or extra % 2:
        raise ValueError(f"cannot pad a kernel of size {weight.shape[dim]} to {size} symmetrically")
    shape = list(weight.shape)
    shape[dim] = extra // 2
    zeros = weight.new_zeros(shape)
    return torch.cat([zeros, weight, zeros], dim=dim)


def adapt_kernel(weight: torch.Tensor, kernel: Sequence[int]) -> tuple[torch.Tensor, list[str]]:
    """Bring the spatial kernel of ``weight`` to ``kernel`` axis by axis (k -> 1: :func:`collapse_kernel_axis`;
    smaller odd -> larger odd: :func:`pad_kernel_axis`). Returns the weight and one note per changed axis.

    Raises ``ValueError`` for any other change (e.g. 5 -> 3): there is no rule that keeps a response."""
    source = list(weight.shape[FIRST_KERNEL_DIM:])
    if len(source) != len(kernel):
        raise ValueError(f"kernel {list(kernel)} has {len(kernel)} axes, the weight {len(source)}")
    notes = []
    for axis, (have, want) in enumerate(zip(source, kernel)):
        if have == want:
            continue
        if want == 1:
            weight = collapse_kernel_axis(weight, axis)
            notes.append(f"axis {axis}: {have} -> 1 (taps summed)")
        elif want > have and have % 2 == 1 and want % 2 == 1:
            weight = pad_kernel_axis(weight, axis, want)
            notes.append(f"axis {axis}: {have} -> {want} (zero taps added)")
        else:
            raise ValueError(f"no response-preserving rule for kernel size {have} -> {want} on axis {axis}")
    return weight, notes
