"""Every environment variable nnunet_mim reads: one registry with its name, meaning, default and reader.

Conventions:

- Names follow nnU-Net's style: ``nnUNet_mim_<what>``. Older names still work as aliases (the new name wins when both
  are set).
- Variables are read lazily, when the code that needs them runs, never at import time: one bad value breaks only the
  command that uses it, with an error that names the variable and the fix.
- The README's settings table is generated from :data:`SETTINGS` (``nnunet_mim settings --markdown``); a test keeps
  the two in sync.

Settings that change what a run computes (``resume_relevant``) are stored in the trainers' checkpoints, so that
``--c`` in another shell can warn about, or refuse, a changed value.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping


class SettingError(ValueError):
    """A malformed environment variable (the message names it and says what it accepts)."""


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError("a positive integer")
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise ValueError("a non-negative integer")
    return int(text)


def _text(text: str) -> str:
    return text


def _probe_part(text: str) -> str:
    if text not in ("decoder", "heads"):
        raise ValueError("'decoder' or 'heads'")
    return text


def _epochs_x_iters(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError("EPOCHSxITERS with two positive integers, e.g. 8x25")
    return int(parts[0]), int(parts[1])


@dataclass(frozen=True)
class Setting:
    name: str
    meaning: str
    default: str  # what happens when unset, in words
    reader: str  # who reads it
    parse: Callable[[str], object] = _text
    aliases: tuple[str, ...] = ()
    resume_relevant: bool = False  # stored in checkpoints and compared on --c

    def raw(self, environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
        """``(variable, value)`` of the first of name/aliases that is set and non-empty, else None."""
        environ = os.environ if environ is None else environ
        for variable in (self.name, *self.aliases):
            value = environ.get(variable)
            if value is not None and value.strip() != "":
                return variable, value.strip()
        return None

    def read(self, environ: Mapping[str, str] | None = None):
        """The parsed value, or None when unset. Raises :class:`SettingError` naming the variable."""
        found = self.raw(environ)
        if found is None:
            return None
        variable, value = found
        try:
            return self.parse(value)
        except ValueError as e:
            raise SettingError(f"{variable}={value!r} is not valid: it must be {e}. Fix or unset it "
                               f"(`unset {variable}`). Meaning: {self.meaning}") from None


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("nnUNet_mim_epochs", "number of epochs of a run (shortens demos, tests and studies)",
            "the trainer's own (nnU-Net: 1000, pretrainers: their paper's)", "our trainers", _positive_int,
            resume_relevant=True),
    Setting("nnUNet_mim_iters", "training iterations per epoch", "250 (nnU-Net's)", "our trainers", _positive_int,
            resume_relevant=True),
    Setting("nnUNet_mim_val_iters", "validation iterations per epoch", "50 (nnU-Net's)", "our trainers",
            _positive_int, resume_relevant=True),
    Setting("nnUNet_mim_save_every", "epochs between checkpoint_latest.pth writes", "the trainer's own (50 or 10)",
            "our trainers", _positive_int, resume_relevant=True),
    Setting("nnUNet_mim_seed", "seed of torch, numpy, random, the data-loader workers and augmentation; same seed, "
            "same run on CPU (up to float non-determinism)", "unseeded, like nnU-Net", "our trainers",
            _non_negative_int, resume_relevant=True),
    Setting("nnUNet_mim_probe_every", "run the downstream probe on the pretraining's weights every N epochs (and at "
            "the end) and draw its Dice in progress.png", "no probe during pretraining", "our pretrainers",
            _positive_int),
    Setting("nnUNet_mim_probe_dataset", "labelled dataset (id or name) the probe during pretraining trains on; it "
            "needs the pretraining's configuration", "required with nnUNet_mim_probe_every", "our pretrainers"),
    Setting("nnUNet_mim_probe_part", "what the probe during pretraining trains: `decoder` (encoder frozen) or "
            "`heads` (encoder and decoder frozen)", "decoder", "our pretrainers", _probe_part),
    Setting("nnUNet_mim_probe_budget", "length of each probe during pretraining, EPOCHSxITERS", "8x25",
            "our pretrainers", _epochs_x_iters),
    Setting("nnUNet_mim_tokenizer", "stage-1 visual tokenizer for token MIM: a checkpoint file or fold folder "
            "(`random`: untrained, benchmarks only)", "found by convention (same dataset, plans, configuration)",
            "TokenMIMPretrainer", resume_relevant=True),
    Setting("nnUNet_mim_eva02_weights", "local EVA-02 2D checkpoint that initialises the SAC-ViT encoder",
            "no EVA-02 initialisation", "SAC-ViT trainers"),
    Setting("nnUNet_mim_vgg16_weights", "local torchvision VGG16 state dict for the tokenizer's perceptual loss",
            "perceptual loss off", "VisualTokenizerTrainer", resume_relevant=True),
    Setting("nnUNet_mim_lpips_weights", "local LPIPS lin-layer weights for the perceptual loss",
            "uniform channel weights", "VisualTokenizerTrainer", resume_relevant=True),
    Setting("nnUNet_mim_mricron_dir", "folder with the mricron-data templates (Colin27, AAL, INIA19)",
            "/usr/share/mricron/templates, then the data cache", "nnunet_mim build-data",
            aliases=("NNUNET_MIM_MRICRON_DIR",)),
    Setting("nnUNet_mim_data_cache", "user cache of the offline data sources", "~/.cache/nnunet_mim",
            "nnunet_mim build-data, scripts/install_data_sources.sh", aliases=("NNUNET_MIM_DATA_CACHE",)),
    Setting("nnUNet_def_n_proc", "nnU-Net's default number of processes; also ours for import-unlabeled and "
            "transfer-plans -np", "nnU-Net's (8); ours: 8 as well",
            "nnU-Net, nnunet_mim import-unlabeled, transfer-plans", _positive_int),
)}


def setting(name: str) -> Setting:
    return SETTINGS[name]


def read(name: str, environ: Mapping[str, str] | None = None):
    """The parsed value of registered variable ``name`` (or an alias), None when unset."""
    return SETTINGS[name].read(environ)


def resume_snapshot(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The raw values of the settings that change a run, as stored in checkpoints."""
    out = {}
    for s in SETTINGS.values():
        if s.resume_relevant:
            found = s.raw(environ)
            out[s.name] = None if found is None else found[1]
    return out


def markdown_table() -> str:
    rows = ["| variable | meaning | when unset | read by |", "|---|---|---|---|"]
    for s in SETTINGS.values():
        name = f"`{s.name}`" + "".join(f" (or `{a}`)" for a in s.aliases)
        rows.append(f"| {name} | {s.meaning} | {s.default} | {s.reader} |")
    return "\n".join(rows)
