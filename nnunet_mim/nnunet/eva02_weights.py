"""EVA-02 2D weights -> SAC-ViT encoder: 2D-to-3D inflation from a *local* file (never downloads).

EVA-02's MIM checkpoints also hold the MIM ``mask_token``. It goes to the mask token that masked pretraining actually
uses: the encoder's own ``mask_token`` when it has one, else the ``mim_mask_token`` of a pretraining wrapper
(:class:`~nnunet_mim.architectures.sac_vit.SACViTPretrainNet` subclasses such as token MIM's ``TokenMIMNet``) passed to
:func:`load_eva02_2d_weights`, or loaded on its own with :func:`load_eva02_mask_token`.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from nnunet_mim.architectures.sac_vit import SACViT
from nnunet_mim.core.sac import resample_grid
from nnunet_mim.nnunet.weights import strip_wrapper_prefixes

logger = logging.getLogger(__name__)


class LoadReport(NamedTuple):
    """Keys of the target encoder left at their initial values / checkpoint keys that were not used."""

    missing_keys: list[str]
    unexpected_keys: list[str]


_EVA_RENAMES = (  # original EVA-02 (BEiT-style) names -> timm names (= ours)
    (".mlp.w1.", ".mlp.fc1_g."),
    (".mlp.w2.", ".mlp.fc1_x."),
    (".mlp.w3.", ".mlp.fc2."),
    (".mlp.ffn_ln.", ".mlp.norm."),
    (".attn.inner_attn_ln.", ".attn.norm."),
)
_EVA_SKIP_PREFIXES = ("rope.", "lm_head.", "head.", "fc_norm.", "head_drop.")


def _unwrap_state_dict(sd: dict) -> dict[str, torch.Tensor]:
    for key in ("model_ema", "model", "module", "state_dict"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    return {strip_wrapper_prefixes(k): v for k, v in sd.items()}


def _inflate_patch_kernel(w: torch.Tensor, target_shape: Sequence[int]) -> torch.Tensor:
    """2D patch kernel ``[C, c2, p, p]`` -> ``[C, c, 16, 16, 16]``: bicubic resize, channels, depth repeat / 16.

    Repeating along depth divided by the depth (PUMIT / Zhang et al. 2022 weight inflation) preserves the response
    to depth-constant inputs; channel mismatch (e.g. RGB -> 1) uses PUMIT's ``sum over c2 / c`` repeated ``c`` times.
    """
    c_out, c_in, kd, kh, kw = target_shape
    w = w.float()
    if tuple(w.shape[2:]) != (kh, kw):
        w = F.interpolate(w, size=(kh, kw), mode="bicubic", align_corners=False)
    if w.shape[1] != c_in:
        w = (w.sum(1, keepdim=True) / c_in).expand(-1, c_in, -1, -1)
    return (w / kd).unsqueeze(2).expand(-1, -1, kd, -1, -1).contiguous()


def _inflate_pos_embed(v: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """2D ``[1, (1 +) g*g, C]`` -> ``[1, C, D, H, W]`` (repeated along depth, resampled in-plane) and the cls part."""
    n = v.shape[1]
    g = math.isqrt(n)
    if g * g == n:
        cls_pos = None
    else:
        g = math.isqrt(n - 1)
        if g * g != n - 1:
            raise ValueError(f"2D pos_embed with {n} tokens is not a square grid (with or without a cls token)")
        cls_pos, v = v[:, :1], v[:, 1:]
    grid2d = v.float().reshape(1, g, g, -1).permute(0, 3, 1, 2).unsqueeze(2)  # [1, C, 1, g, g]
    return resample_grid(grid2d, target.shape[2:]), cls_pos


def convert_eva02_2d_state_dict(state_dict: dict, encoder: SACViT) -> dict[str, torch.Tensor]:
    """Map an EVA-02 2D checkpoint (original EVA-02 or timm names) onto :class:`SACViT` keys, inflating 2D tensors.

    Handled: ``patch_embed.proj.weight`` (14x14 -> 16x16 bicubic, RGB -> ``input_channels``, depth inflation),
    ``pos_embed`` (cls part added to ``cls_token``; grid repeated along depth and resampled to ``pos_embed_grid``),
    fused ``attn.qkv.weight`` split, ``q_bias`` / ``v_bias``, ``mlp.w1/w2/w3/ffn_ln``, ``attn.inner_attn_ln``.
    Dropped: RoPE buffers, heads (``head``, ``lm_head``, ``fc_norm``). ``mask_token`` is always passed through (under
    that key); :func:`load_eva02_2d_weights` routes it to the mask token in use.
    """
    sd = _unwrap_state_dict(state_dict)
    own = encoder.state_dict()
    out: dict[str, torch.Tensor] = {}
    cls_pos = None
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor) or k.startswith(_EVA_SKIP_PREFIXES) or ".rope." in k:
            continue
        for a, b in _EVA_RENAMES:
            k = k.replace(a, b)
        if k.endswith(".attn.q_bias") or k.endswith(".attn.v_bias"):
            k = k[: -len("q_bias")] + k[-6] + "_proj.bias"
        if k.endswith(".attn.qkv.weight"):
            for name, part in zip("qkv", v.chunk(3, 0)):
                out[k.replace(".qkv.", f".{name}_proj.")] = part
            continue
        if k == "patch_embed.proj.weight" and v.ndim == 4 and k in own:
            v = _inflate_patch_kernel(v, own[k].shape)
        elif k == "pos_embed" and v.ndim == 3:
            v, cls_pos = _inflate_pos_embed(v, own["pos_embed"])
        out[k] = v
    if cls_pos is not None and "cls_token" in out:
        out["cls_token"] = out["cls_token"] + cls_pos.to(out["cls_token"].dtype)
    return out


def read_eva02_state_dict(path: str | Path) -> dict:
    """Read a local EVA-02 checkpoint: ``.safetensors`` (needs the ``safetensors`` package) or a torch file read with
    ``weights_only=True`` on the CPU. Never downloads; a missing file raises ``FileNotFoundError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"EVA-02 weights not found: {path}. This function never downloads; fetch the checkpoint yourself "
            "(e.g. EVA-02 MIM eva02_B_pt_in21k_p14.pt or timm's eva02_base_patch14_224 weights) and pass its path."
        )
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"{path} is a .safetensors file; install the 'safetensors' package to read it") from e
        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _mask_token_target(model: nn.Module) -> nn.Parameter | None:
    """The mask token masked pretraining of ``model`` uses: the encoder's own, else a wrapper's ``mim_mask_token``."""
    encoder = getattr(model, "encoder", model)
    if isinstance(getattr(encoder, "mask_token", None), nn.Parameter):
        return encoder.mask_token
    if isinstance(getattr(model, "mim_mask_token", None), nn.Parameter):
        return model.mim_mask_token
    return None


def _copy_mask_token(target: nn.Parameter, token: torch.Tensor) -> None:
    if token.numel() != target.numel():
        raise ValueError(f"EVA-02 mask_token {tuple(token.shape)} does not fit the mask token {tuple(target.shape)} "
                         "(wrong size preset?)")
    with torch.no_grad():
        target.copy_(token.reshape(target.shape).to(target.dtype))


def load_eva02_mask_token(model: nn.Module, path: str | Path) -> bool:
    """Copy only EVA-02's MIM ``mask_token`` from a local checkpoint into the mask token ``model`` uses (the encoder's
    ``mask_token``, else the wrapper's ``mim_mask_token``). Returns ``False`` (nothing changed) when the checkpoint has
    no mask token (e.g. timm's EVA-02 weights, which drop it) or the model has none; raises on a size mismatch."""
    token = _unwrap_state_dict(read_eva02_state_dict(path)).get("mask_token")
    target = _mask_token_target(model)
    if not isinstance(token, torch.Tensor) or target is None:
        return False
    _copy_mask_token(target, token)
    return True


def load_eva02_2d_weights(model: nn.Module, path: str | Path, verbose: bool = True) -> LoadReport:
    """Initialise the SAC-ViT encoder of ``model`` from a local EVA-02 2D checkpoint (PUMIT "Implementation Details").

    ``model``: a :class:`SACViT`, or any network holding one as ``encoder`` (:class:`SACViTSeg`, the pretraining
    wrappers). EVA-02's ``mask_token`` goes to the encoder's ``mask_token`` if it has one, else to the network's
    ``mim_mask_token`` (token MIM / SimMIM wrappers); only when neither exists is it reported as unexpected.
    ``path``: ``.safetensors`` (needs the ``safetensors`` package) or a torch file read with ``weights_only=True``.
    Never downloads. Returns the missing / unexpected keys (relative to the encoder); raises on shape mismatches.
    """
    state_dict = read_eva02_state_dict(path)
    encoder = getattr(model, "encoder", model)
    if not isinstance(encoder, SACViT):
        raise TypeError(f"expected a SACViT or a network with a SACViT `encoder`, got {type(model).__name__}")
    converted = convert_eva02_2d_state_dict(state_dict, encoder)
    own = encoder.state_dict()
    wrapper_token = "mask_token" not in own and "mask_token" in converted and _mask_token_target(model) is not None
    mask_token = converted.pop("mask_token") if wrapper_token else None
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in converted.items() if k in own and own[k].shape != v.shape]
    if mask_token is not None and mask_token.numel() != model.mim_mask_token.numel():
        bad.append(f"mask_token: checkpoint {tuple(mask_token.shape)} vs mim_mask_token "
                   f"{tuple(model.mim_mask_token.shape)}")
    if bad:  # checked before anything is loaded
        raise ValueError("EVA-02 weights do not fit this SAC-ViT (wrong size preset?):\n  " + "\n  ".join(bad))
    result = encoder.load_state_dict(converted, strict=False)
    if mask_token is not None:
        _copy_mask_token(model.mim_mask_token, mask_token)
    report = LoadReport(list(result.missing_keys), list(result.unexpected_keys))
    if verbose:
        logger.warning(
            "loaded EVA-02 2D weights from %s: %d tensors%s, missing %s, unexpected %s",
            Path(path), len(converted) - len(report.unexpected_keys),
            " + mask_token -> mim_mask_token" if mask_token is not None else "", report.missing_keys,
            report.unexpected_keys,
        )
    return report
