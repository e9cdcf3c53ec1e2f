"""Locate and load the real volumes the dataset builders start from. Nothing here downloads anything.

Two offline sources are used:

* the Debian package ``mricron-data`` (Colin27 T1 ``ch2.nii.gz``, the AAL atlas ``aal.nii.gz`` drawn on it, the
  macaque INIA19 T1 ``inia19-t1-brain.nii.gz``). It is looked up, in this order, in ``$NNUNET_MIM_MRICRON_DIR``,
  ``/usr/share/mricron/templates`` and
  ``${NNUNET_MIM_DATA_CACHE:-~/.cache/nnunet_mim}/mricron-data/usr/share/mricron/templates`` (where
  ``scripts/install_data_sources.sh`` unpacks it without root).
* the PyPI wheel ``nilearn`` (MNI ICBM152 2009a T1 template and its GM/WM probability maps, shipped inside the
  wheel in ``nilearn/datasets/data``). Found via the installed package path, without importing nilearn.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_mim.nnunet import settings

MRICRON_ENV_VAR = settings.setting("nnUNet_mim_mricron_dir").name
CACHE_ENV_VAR = settings.setting("nnUNet_mim_data_cache").name
SYSTEM_MRICRON_DIR = Path("/usr/share/mricron/templates")
INSTALL_SCRIPT = "scripts/install_data_sources.sh"


class MissingDataSourceError(FileNotFoundError):
    """A required offline data source (Debian package or PyPI wheel) is not installed."""


@dataclass(frozen=True)
class SourceSpec:
    """One real volume: where it comes from and what it is."""

    key: str
    package: str  # "mricron-data" (Debian) or "nilearn" (PyPI)
    filename: str
    description: str
    anatomy: str  # subject/template identity: volumes with the same anatomy must not be mixed across roles
    is_label_map: bool = False


SOURCES: dict[str, SourceSpec] = {
    s.key: s
    for s in [
        SourceSpec("colin27_t1", "mricron-data", "ch2.nii.gz",
                   "Colin27 single-subject T1 (average of 27 scans of one man), 1 mm, full head", "colin27"),
        SourceSpec("colin27_aal", "mricron-data", "aal.nii.gz",
                   "AAL atlas (Tzourio-Mazoyer 2002), 116 regions drawn manually on Colin27, 1 mm", "colin27",
                   is_label_map=True),
        SourceSpec("inia19_t1", "mricron-data", "inia19-t1-brain.nii.gz",
                   "INIA19 rhesus macaque T1 template (Rohlfing 2012), brain-extracted, 0.5 mm", "inia19"),
        SourceSpec("mni152_t1", "nilearn", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                   "MNI ICBM152 2009a symmetric T1 template (non-linear average of 152 adults), "
                   "skull-stripped, 1 mm", "mni152"),
        SourceSpec("mni152_gm", "nilearn", "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                   "MNI ICBM152 2009a grey-matter probability map (uint8, p = value / 255)", "mni152",
                   is_label_map=True),
        SourceSpec("mni152_wm", "nilearn", "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
                   "MNI ICBM152 2009a white-matter probability map (uint8, p = value / 255)", "mni152",
                   is_label_map=True),
    ]
}


def cache_dir() -> Path:
    """The user cache directory used by ``scripts/install_data_sources.sh``."""
    return Path(settings.read(CACHE_ENV_VAR) or str(Path.home() / ".cache" / "nnunet_mim"))


def mricron_candidate_dirs() -> list[Path]:
    """Directories searched for mricron-data templates, in priority order."""
    dirs = []
    if settings.read(MRICRON_ENV_VAR):
        dirs.append(Path(settings.read(MRICRON_ENV_VAR)))
    dirs.append(SYSTEM_MRICRON_DIR)
    dirs.append(cache_dir() / "mricron-data" / "usr" / "share" / "mricron" / "templates")
    return dirs


def find_mricron_dir() -> Path | None:
    """First candidate directory that holds the mricron-data templates we use, or None."""
    needed = [s.filename for s in SOURCES.values() if s.package == "mricron-data"]
    for d in mricron_candidate_dirs():
        if all((d / f).is_file() for f in needed):
            return d
    return None


def mricron_available() -> bool:
    """Whether mricron-data can be found."""
    return find_mricron_dir() is not None


def _missing_mricron_message() -> str:
    searched = "\n  ".join(str(d) for d in mricron_candidate_dirs())
    return (
        "The Debian package 'mricron-data' (Colin27 ch2.nii.gz, AAL aal.nii.gz, INIA19 inia19-t1-brain.nii.gz) "
        f"was not found. Searched:\n  {searched}\n"
        "Install it with 'sudo apt-get install mricron-data', or without root run "
        f"'bash {INSTALL_SCRIPT}' (apt-get download + dpkg-deb -x into the cache dir), "
        f"or point ${MRICRON_ENV_VAR} at a folder containing the templates. nnunet_mim never downloads data itself."
    )


def require_mricron_dir() -> Path:
    """The mricron-data template folder; raises MissingDataSourceError with install instructions if absent."""
    d = find_mricron_dir()
    if d is None:
        raise MissingDataSourceError(_missing_mricron_message())
    return d


def find_nilearn_data_dir() -> Path | None:
    """``<site-packages>/nilearn/datasets/data`` of the installed nilearn wheel (not imported), or None."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    needed = [s.filename for s in SOURCES.values() if s.package == "nilearn"]
    return d if all((d / f).is_file() for f in needed) else None


def nilearn_available() -> bool:
    """Whether the nilearn wheel with its bundled MNI152 files is installed."""
    return find_nilearn_data_dir() is not None


def require_nilearn_data_dir() -> Path:
    """The nilearn bundled-data folder; raises MissingDataSourceError with install instructions if absent."""
    d = find_nilearn_data_dir()
    if d is None:
        raise MissingDataSourceError(
            "The PyPI package 'nilearn' (which ships the MNI ICBM152 2009a T1/GM/WM files in "
            "nilearn/datasets/data) is not installed in this Python environment. Install it with "
            f"'pip install nilearn' (or 'pip install nnunet_mim[data]', or run 'bash {INSTALL_SCRIPT}')."
        )
    return d


def source_path(key: str) -> Path:
    """Path of a registered source volume (raises MissingDataSourceError if its package is missing)."""
    spec = SOURCES[key]
    root = require_mricron_dir() if spec.package == "mricron-data" else require_nilearn_data_dir()
    return root / spec.filename


def source_available(key: str) -> bool:
    """Whether a registered source volume can be loaded."""
    return (mricron_available() if SOURCES[key].package == "mricron-data" else nilearn_available())


@dataclass(frozen=True)
class Volume:
    """A loaded volume. ``array`` is in SimpleITK array order (z, y, x); ``spacing_zyx`` in mm."""

    key: str
    array: np.ndarray
    spacing_zyx: tuple[float, float, float]
    reference: sitk.Image  # 1x1x1 image carrying the source file's origin, direction and spacing

    def index_zyx_to_physical(self, index_zyx: np.ndarray) -> tuple[float, float, float]:
        """Physical (LPS, mm) point of a continuous (z, y, x) voxel index of this volume."""
        return self.reference.TransformContinuousIndexToPhysicalPoint([float(v) for v in index_zyx[::-1]])

    def physical_to_index_zyx(self, point_lps: tuple[float, float, float]) -> np.ndarray:
        """Continuous (z, y, x) voxel index of a physical (LPS, mm) point."""
        return np.array(self.reference.TransformPhysicalPointToContinuousIndex(point_lps))[::-1]


@functools.lru_cache(maxsize=8)
def load_volume(key: str) -> Volume:
    """Read a registered source volume (cached; arrays are read-only)."""
    img = sitk.ReadImage(str(source_path(key)))
    arr = sitk.GetArrayFromImage(img)
    arr.setflags(write=False)
    ref = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    ref.SetSpacing(img.GetSpacing())
    ref.SetOrigin(img.GetOrigin())
    ref.SetDirection(img.GetDirection())
    spacing_zyx = tuple(float(s) for s in img.GetSpacing()[::-1])
    return Volume(key, arr, spacing_zyx, ref)


def parse_aal_names(path: Path | None = None) -> dict[str, int]:
    """AAL region name -> label index, read from ``aal.nii.txt`` (lines ``<index> <name> <code>``)."""
    path = path or require_mricron_dir() / "aal.nii.txt"
    names = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[parts[1]] = int(parts[0])
    return names
