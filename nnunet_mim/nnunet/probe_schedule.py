"""The downstream probe during pretraining: a segmentation signal every N epochs, drawn in progress.png.

    export nnUNet_mim_probe_every=25 nnUNet_mim_probe_dataset=4     # probe after every 25th epoch and at the end
    nnUNetv2_train 504 3d_fullres all -tr HybridMIMPretrainer

Conventions:

- Epochs count from 0. A probe is due after epoch ``e`` when ``(e + 1) % every == 0``, and after the last epoch.
- The probe is ``nnunet_mim probe`` (documentation/results.md, "The downstream probe") on the weights of that epoch,
  on the labelled dataset ``nnUNet_mim_probe_dataset`` with the pretraining's configuration name (the same network;
  ``nnunet_mim import-unlabeled`` gives the pool the target's plans). ``nnUNet_mim_probe_part`` chooses what trains
  (``decoder``, the default, or ``heads``), ``nnUNet_mim_probe_budget`` its length (``EPOCHSxITERS``).
- Each probe's pretrained arm has its own folder, ``<fold folder>/probe/epoch_XXXX``; the random arm is the same for
  every epoch (same seed, cases and budget) and is trained once, in ``<fold folder>/probe/random``.
- A probe that fails at run time (a full disk, a crash of the probe's training) logs a warning and leaves a gap in
  the curve: the pretraining goes on. A wrong setting is refused before the first epoch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from nnunet_mim.nnunet import settings

PROBE_PARTS = ("decoder", "heads")


@dataclass(frozen=True)
class ProbeSchedule:
    every: int
    dataset: str
    part: str = "decoder"
    epochs: int = 8
    iters: int = 25

    def due(self, epoch: int, num_epochs: int) -> bool:
        return (epoch + 1) % self.every == 0 or epoch == num_epochs - 1


def probe_schedule_from_environment() -> ProbeSchedule | None:
    """The schedule the environment asks for, or None when ``nnUNet_mim_probe_every`` is unset."""
    every = settings.read("nnUNet_mim_probe_every")
    if not every:
        return None
    dataset = settings.read("nnUNet_mim_probe_dataset")
    if dataset is None:
        raise settings.SettingError(
            "nnUNet_mim_probe_every is set but nnUNet_mim_probe_dataset is not: export the labelled dataset the probe "
            "trains on (e.g. `export nnUNet_mim_probe_dataset=4`), or `unset nnUNet_mim_probe_every`.")
    part = settings.read("nnUNet_mim_probe_part") or "decoder"
    epochs, iters = settings.read("nnUNet_mim_probe_budget") or (8, 25)
    return ProbeSchedule(every, str(dataset), part, epochs, iters)


def check_probe_target(schedule: ProbeSchedule, configuration: str) -> None:
    """Refuse, before training, a probe dataset that is not planned or lacks the pretraining's configuration."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        name = maybe_convert_to_dataset_name(schedule.dataset)
    except RuntimeError:
        name = None
    plans = Path(str(nnUNet_preprocessed)) / name / "nnUNetPlans.json" if name else None
    if plans is None or not plans.is_file():
        raise settings.SettingError(
            f"nnUNet_mim_probe_dataset={schedule.dataset!r}: no planned dataset of that id or name in "
            f"nnUNet_preprocessed ({nnUNet_preprocessed}). Give the labelled target dataset, planned and preprocessed.")
    available = json.loads(plans.read_text())["configurations"]
    if configuration not in available:
        raise settings.SettingError(
            f"nnUNet_mim_probe_dataset={schedule.dataset!r}: {name} has no configuration {configuration!r} (it has "
            f"{sorted(available)}); the probe needs the pretraining's network. Add the same configuration to it "
            f"(`nnunet_mim add-config ... -d {schedule.dataset} -n {configuration}`) or pretrain on a pool imported "
            f"with its plans (`nnunet_mim import-unlabeled -t {schedule.dataset}`).")


def run_probe(schedule: ProbeSchedule, checkpoint: str, configuration: str, folder: str, epoch: int,
              seed: int | None = None) -> dict:
    """Run ``nnunet_mim probe`` on ``checkpoint`` (the weights after ``epoch``); return its ``probe.json``."""
    out = Path(folder) / f"epoch_{epoch:04d}"
    exe = Path(sys.executable).parent / "nnunet_mim"
    cmd = [str(exe) if exe.exists() else "nnunet_mim", "probe", checkpoint, "-d", schedule.dataset, "-c",
           configuration, "--part", schedule.part, "--epochs", str(schedule.epochs), "--iters", str(schedule.iters),
           "--seed", str(seed or 0), "--processes", str(max(1, int(os.environ.get("nnUNet_n_proc_DA") or 2))),
           "--random-results", str(Path(folder) / "random"), "-o", str(out)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode}:\n{proc.stdout[-3000:]}")
    return json.loads((out / "probe.json").read_text())
