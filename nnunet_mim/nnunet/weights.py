"""Safe loading of pretrained weights and the pre-flight compatibility report.

Everything here loads with ``torch.load(..., weights_only=True, map_location="cpu")`` (or safetensors):
a checkpoint written on a GPU machine can be checked and loaded on a CPU-only one, and a third-party
file cannot run code. nnU-Net checkpoints also hold numpy scalars/arrays in their logs; only those numpy
reconstruction helpers are allow-listed.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn

SEGMENTATION_KEYS = (".seg_layers.",)  # what nnU-Net's load_pretrained_weights never transfers
PRETRAINING_ONLY_PREFIXES = ("mim_heads.", "mim_", "tokenizer.")  # pretext heads: never in a segmentation net
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile
OUTER_PREFIXES = ("model.",)  # a LightningModule's / training wrapper's attribute: stripped only when every key has it


def is_segmentation_head(key: str) -> bool:
    """Whether a parameter / state-dict key belongs to the segmentation layers (1x1x1 heads, ``.seg_layers.``)."""
    return any(s in key for s in SEGMENTATION_KEYS)


def freeze_all_but(module: nn.Module, part: str) -> tuple[int, int]:
    """Set ``requires_grad`` so that only ``part`` trains: ``"heads"`` (:func:`is_segmentation_head`), ``"decoder"``
    (names starting with ``decoder.``) or ``"all"``. Returns (trained, total) parameter counts."""
    if part not in ("heads", "decoder", "all"):
        raise ValueError(f"part must be 'heads', 'decoder' or 'all', got {part!r}")
    trained = total = 0
    for name, p in module.named_parameters():
        trains = is_segmentation_head(name) if part == "heads" else name.startswith("decoder.")
        p.requires_grad_(part == "all" or trains)
        trained += p.numel() if p.requires_grad else 0
        total += p.numel()
    if trained == 0:
        raise RuntimeError(f"no parameter of {type(module).__name__} matches {part!r} (heads are named "
                           f"'*{SEGMENTATION_KEYS[0]}*', the decoder 'decoder.*')")
    return trained, total


def strip_wrapper_prefixes(key: str, prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> str:
    """``module._orig_mod.encoder.x`` -> ``encoder.x``: the key without the wrappers' prefixes, in any order."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def unwrap(network: nn.Module) -> nn.Module:
    """The network inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    module = network.module if hasattr(network, "module") else network
    return getattr(module, "_orig_mod", module)


def _numpy_safe_globals() -> list:
    from numpy import dtypes

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    return [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype] + [
        getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint file safely on the CPU (``weights_only=True``; ``.safetensors`` via safetensors)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Pretrained weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return {"network_weights": load_file(path, device="cpu")}
    if os.path.getsize(path) == 0:
        raise RuntimeError(f"{path} is empty (0 bytes): the copy or the save that made it did not finish. Re-copy "
                           f"the file (or take checkpoint_best.pth / checkpoint_latest.pth of the same run).")
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if not (zipfile.is_zipfile(path) or _is_complete_pickle(path)):  # damaged, or another format
                raise RuntimeError(f"{path} is not a readable checkpoint: the file is truncated or corrupt, or not a "
                                   f"PyTorch file. Re-copy it (and compare its size with the original).") from e
            # a pickle of arbitrary objects: refuse, say why
            raise RuntimeError(f"{path} cannot be loaded with torch.load(weights_only=True): {e}\n"
                               f"Only plain tensors/containers (nnU-Net checkpoints, state_dicts) are accepted. "
                               f"Re-save the weights as a state_dict or a .safetensors file.") from e
        except Exception as e:  # truncated zip, garbage, a file of another format
            raise RuntimeError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]}): the file "
                               f"is truncated or corrupt, or not a PyTorch file. Re-copy it (and compare its size "
                               f"with the original).") from e


def _is_complete_pickle(path: str) -> bool:
    """Whether the file is one whole pickle stream (read opcode by opcode, nothing executed)."""
    import pickletools

    try:
        with open(path, "rb") as f:
            for _ in pickletools.genops(f):
                pass
        return True
    except Exception:  # noqa: BLE001 - any parse failure means: not a complete pickle
        return False


def state_dict_of(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The network state_dict inside an nnU-Net checkpoint (``network_weights``), a ``state_dict``/``model``
    entry, or a plain state_dict; DDP/compile prefixes are stripped, and :data:`OUTER_PREFIXES` when all keys
    have it."""
    for key in ("network_weights", "state_dict", "model"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    state = {}
    for k, v in checkpoint.items():
        if isinstance(v, torch.Tensor):
            state[strip_wrapper_prefixes(k)] = v
    if not state:
        raise ValueError("The checkpoint holds no tensors: is it a network checkpoint?")
    return strip_outer_prefix(state)


def weights_digest(path: str | os.PathLike) -> str:
    """16 hex digits of SHA-256 over the network weights of a checkpoint (names, dtypes, shapes and values, in name
    order): the identity of the *model*. Two files with the same weights have the same digest although nnU-Net
    checkpoints also hold timestamps and optimizer state, so a pretraining redone with the same seed, or a checkpoint
    re-saved, is recognised as the same model."""
    h = hashlib.sha256()
    state = state_dict_of(load_checkpoint(path))
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{state[name].dtype}|{tuple(state[name].shape)}|".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def strip_outer_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model.encoder.x`` -> ``encoder.x`` when *every* key starts with the same :data:`OUTER_PREFIXES` entry (a
    network kept as ``self.model`` of a training wrapper); a network with its own ``model`` child among others keeps
    its keys."""
    for prefix in OUTER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {strip_wrapper_prefixes(k[len(prefix):]): v for k, v in state.items()}
    return dict(state)


def input_projection_key(network: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """Key of the first convolution's weight (the one whose shape encodes the input channels)."""
    for candidate in getattr(network, "keys_to_in_proj", ()):
        if f"{candidate}.weight" in state:
            return f"{candidate}.weight"
    for k, v in state.items():
        if k.endswith("weight") and v.ndim >= 4:
            return k
    return None


@dataclass
class WeightReport:
    """What transfers from a pretrained state_dict into a network (segmentation layers excluded)."""

    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the network, not in the checkpoint
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # key, checkpoint, network
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, unknown to the network
    pretraining_only: list[str] = field(default_factory=list)  # pretext heads, expected to be dropped
    input_channels: tuple[int, int] | None = None  # (checkpoint, network)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.shape_mismatch

    @property
    def channel_mismatch(self) -> bool:
        return self.input_channels is not None and self.input_channels[0] != self.input_channels[1]


def compare_state_dicts(pretrained: Mapping[str, torch.Tensor], network: nn.Module,
                        skip: Iterable[str] = SEGMENTATION_KEYS) -> WeightReport:
    """Compare ``pretrained`` with ``network.state_dict()`` key by key and shape by shape."""
    skip = tuple(skip)
    target = network.state_dict()
    report = WeightReport()
    for k, v in target.items():
        if any(s in k for s in skip):
            continue
        if k not in pretrained:
            report.missing.append(k)
        elif tuple(pretrained[k].shape) != tuple(v.shape):
            report.shape_mismatch.append((k, tuple(pretrained[k].shape), tuple(v.shape)))
        else:
            report.matched.append(k)
    for k in pretrained:
        if k not in target:
            (report.pretraining_only if k.startswith(PRETRAINING_ONLY_PREFIXES) else report.unexpected).append(k)
    key = input_projection_key(network, target)
    if key is not None and key in pretrained and pretrained[key].ndim == target[key].ndim:
        report.input_channels = (int(pretrained[key].shape[1]), int(target[key].shape[1]))
    return report


def format_report(report: WeightReport, source: str, limit: int = 20) -> str:
    """Human-readable report with the fix for each kind of mismatch."""
    lines = [f"Pre-flight check of {source}: {len(report.matched)} tensors transfer, "
             f"{len(report.missing)} missing, {len(report.shape_mismatch)} with another shape, "
             f"{len(report.unexpected)} unknown to the target network, "
             f"{len(report.pretraining_only)} pretraining-only (dropped, as intended)."]
    if report.channel_mismatch:
        ck, net = report.input_channels
        lines.append(f"INPUT CHANNELS: the checkpoint was trained on {ck} input channel(s), the target dataset has "
                     f"{net}. Pretrain on images with the same channels (modalities, in the same order) as the "
                     f"target's dataset.json channel_names.")
    if report.missing:
        lines.append("Missing in the checkpoint (key):")
        lines += [f"  {k}" for k in report.missing[:limit]] + ([f"  ... and {len(report.missing) - limit} more"]
                                                              if len(report.missing) > limit else [])
    if report.shape_mismatch:
        lines.append("Shape mismatch (key: checkpoint -> target network):")
        lines += [f"  {k}: {a} -> {b}" for k, a, b in report.shape_mismatch[:limit]]
        if len(report.shape_mismatch) > limit:
            lines.append(f"  ... and {len(report.shape_mismatch) - limit} more")
    if report.unexpected and not report.ok:
        lines.append(f"Unknown to the target network: {report.unexpected[:limit]}")
    if not report.ok:
        lines.append(
            "How to fix: the checkpoint was made for another architecture or other plans. Pretrain with the "
            "target's plans: for unlabeled data use `nnunet_mim import-unlabeled` (it copies the target's plans), "
            "for another labeled dataset use `nnUNetv2_move_plans_between_datasets -s TARGET -t PRETRAIN -sp "
            "nnUNetPlans -tp nnUNetPlans` and preprocess it, then pretrain with the same configuration "
            "(-c) as you finetune with. Check with `nnunet_mim check-weights`.")
    return "\n".join(lines)


def load_pretrained_weights_safely(network: nn.Module, fname: str, verbose: bool = False) -> WeightReport:
    """Drop-in for nnU-Net's ``load_pretrained_weights``: pre-flight check first, ``weights_only`` loading.

    Raises ``RuntimeError`` with the full report on any missing key, shape or input-channel mismatch;
    otherwise loads every matching tensor except the segmentation layers.
    """
    module = unwrap(network)
    pretrained = state_dict_of(load_checkpoint(fname))
    report = compare_state_dicts(pretrained, module)
    text = format_report(report, fname)
    if not report.ok or report.channel_mismatch:
        raise RuntimeError(text)
    print(text)
    state = module.state_dict()
    state.update({k: pretrained[k].to(state[k].dtype) for k in report.matched})
    module.load_state_dict(state)
    if verbose:
        print("Transferred:", *report.matched, sep="\n  ")
    return report
