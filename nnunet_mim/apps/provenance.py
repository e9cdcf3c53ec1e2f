"""What produced a result: the machine, the versions of the packages that decide the numbers, and this package's code.

Seeded runs repeat bit for bit only with the same code and the same package versions (a new release of the
augmentation or of nnU-Net can draw its random numbers in another order). Reports and study records carry these
facts so that a result that does not repeat can be traced to what changed.
"""
from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

#: the installed packages whose versions can change a training run's numbers
RESULT_PACKAGES = ("torch", "nnunetv2", "dynamic_network_architectures", "batchgeneratorsv2", "batchgenerators",
                   "acvl_utils", "numpy", "scipy", "blosc2", "SimpleITK", "monai", "timm")


def machine_description(device) -> str:
    """``"<CPU or GPU model>, <cores>, <torch threads>; torch <version>; Python <version>"``."""
    import torch

    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        hw = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                  platform.processor()) + f", {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{hw}; torch {torch.__version__}; Python {platform.python_version()}"


def package_versions(packages: tuple[str, ...] = RESULT_PACKAGES) -> dict[str, str]:
    """Installed version of each package (``"not installed"`` when absent)."""
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def code_revision(path: str | Path | None = None) -> str | None:
    """The git commit of the checkout that holds this package (``"<commit>+modified"`` when tracked files differ
    from it); ``None`` for an installed copy outside a git checkout."""
    folder = Path(path) if path else Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+modified" if dirty.stdout.strip() else "")


def environment() -> dict:
    """Everything above, for a record: ``{"python", "packages", "nnunet_mim_revision"}``."""
    return {"python": platform.python_version(), "packages": package_versions(), "nnunet_mim_revision": code_revision()}
