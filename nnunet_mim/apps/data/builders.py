"""Build nnU-Net v2 raw datasets and an unlabeled pretraining pool from offline real volumes.

* ``build_deepgm_dataset``: AAL deep grey matter (drawn manually on Colin27) on the Colin27 T1 (mricron-data).
* ``build_mni_tissue_dataset``: WM / GM from the MNI152 2009a probability maps on the MNI152 T1 (nilearn only).
* ``build_unlabeled_pool``: images only, from real T1 volumes other than the labeled dataset's anatomy.

Every labeled case is one real anatomy put through the synthetic variation of ``variation.py`` with its own
seed; train and test seeds come from separate ``SeedSequence`` streams and are written to
``generation_seeds.json`` in the output folder. See documentation/data.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from nnunet_mim.apps.data import sources
from nnunet_mim.apps.data.sources import MissingDataSourceError, Volume
from nnunet_mim.apps.data.variation import SimulatedCase, VariationConfig, get_preset, simulate_case

# AAL names (aal.nii.txt) of the deep grey-matter structures, without the _L/_R suffix
DEEPGM_STRUCTURES: tuple[str, ...] = ("Caudate", "Putamen", "Pallidum", "Thalamus", "Hippocampus", "Amygdala")
# MNI152 region (RAS mm, inclusive) used as the tissue dataset's ROI: about the extent of the AAL deep-GM
# structures on Colin27 (RAS x -39..42, y -41..28, z -29..26), a bit smaller because a rotated box grows more than
# the structures' point cloud, so both datasets get similar fields of view / voxel counts
MNI_TISSUE_ROI_RAS: tuple[tuple[float, float], ...] = ((-37.0, 37.0), (-39.0, 25.0), (-25.0, 25.0))  # x, y, z
# pool crop extents (mm, z/y/x) before margins, same reasoning (deep-GM ROI extent is 56 x 70 x 82)
POOL_ROI_EXTENT_MM: tuple[tuple[float, float], ...] = ((44.0, 56.0), (56.0, 70.0), (66.0, 80.0))
POOL_T1_SOURCES: tuple[str, ...] = ("mni152_t1", "inia19_t1", "colin27_t1")
MIN_CLASS_VOXELS = 5
SEEDS_FILE = "generation_seeds.json"


@dataclass
class LabeledSource:
    """A real image with its label map on the same grid, ready for ``simulate_case``."""

    volume: Volume  # geometry of the source file
    image: np.ndarray  # float32 scaled to ~[0, 1]
    label: np.ndarray  # uint8 consecutive labels 0..K
    labels: dict[str, int]  # nnU-Net dataset.json "labels"
    roi_points_mm: np.ndarray  # (N, 3) source mm (z, y, x)
    anatomy: str
    description: str
    reference: str
    licence: str


# ----------------------------------------------------------------------------------------------- helpers
def normalize_intensity(arr: np.ndarray) -> np.ndarray:
    """float32 copy divided by the 99.5th percentile of the non-zero voxels."""
    arr = arr.astype(np.float32)
    nz = arr[arr > 0]
    return arr / max(float(np.percentile(nz, 99.5)) if nz.size else 1.0, 1e-6)


def case_seeds(seed: int, counts: Sequence[int]) -> list[list[int]]:
    """One independent ``SeedSequence`` stream per group (e.g. train, test); one integer seed per case.

    Raises if any seed is shared within or across groups (the streams make that astronomically unlikely).
    """
    streams = np.random.SeedSequence(seed).spawn(len(counts))
    groups = [[int(c.generate_state(1, np.uint64)[0]) for c in s.spawn(n)] for s, n in zip(streams, counts)]
    flat = [s for g in groups for s in g]
    if len(set(flat)) != len(flat):
        raise RuntimeError("seed collision between generated cases; choose another --seed")
    return groups


def default_raw_folder(raw_folder: str | os.PathLike | None) -> Path:
    """``raw_folder`` or ``$nnUNet_raw``."""
    raw = raw_folder or os.environ.get("nnUNet_raw")
    if not raw:
        raise ValueError("no output folder given and $nnUNet_raw is not set")
    return Path(raw)


def prepare_dataset_folder(raw: Path, dataset_id: int, name: str, overwrite: bool) -> Path:
    """Create ``raw/DatasetXXX_name`` (refusing to clash with another dataset using the same id)."""
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset id must be in 1..999, got {dataset_id}")
    folder = raw / f"Dataset{dataset_id:03d}_{name}"
    clashes = [p for p in raw.glob(f"Dataset{dataset_id:03d}_*") if p.name != folder.name] if raw.is_dir() else []
    if clashes:
        raise FileExistsError(f"dataset id {dataset_id} is already used by {clashes[0]}; pick another id")
    if folder.exists():
        if not overwrite:
            raise FileExistsError(f"{folder} exists; pass overwrite=True (--overwrite) to rebuild it")
        shutil.rmtree(folder)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True)
    return folder


def to_sitk(array: np.ndarray, case: SimulatedCase, volume: Volume) -> sitk.Image:
    """SimpleITK image on the case's output grid, placed in the source's physical frame."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(case.spacing_zyx[::-1])
    img.SetOrigin(volume.index_zyx_to_physical(case.origin_index_zyx))
    img.SetDirection(volume.reference.GetDirection())
    return img


def write_case(images_dir: Path, labels_dir: Path | None, case_id: str, case: SimulatedCase, volume: Volume) -> None:
    """Write ``<case_id>_0000.nii.gz`` (and ``<case_id>.nii.gz`` label map) with identical geometry."""
    sitk.WriteImage(to_sitk(case.image, case, volume), str(images_dir / f"{case_id}_0000.nii.gz"), True)
    if labels_dir is not None and case.label is not None:
        sitk.WriteImage(to_sitk(case.label, case, volume), str(labels_dir / f"{case_id}.nii.gz"), True)


def check_classes_present(label: np.ndarray, num_classes: int, case_id: str) -> None:
    """Raise if a foreground class has fewer than MIN_CLASS_VOXELS voxels (nnU-Net dislikes empty classes)."""
    counts = np.bincount(label.ravel(), minlength=num_classes + 1)
    missing = [c for c in range(1, num_classes + 1) if counts[c] < MIN_CLASS_VOXELS]
    if missing:
        raise RuntimeError(f"case {case_id}: classes {missing} have < {MIN_CLASS_VOXELS} voxels "
                           f"(counts {counts.tolist()}); try another seed or a larger size preset")


def _box_corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.array([[(lo, hi)[i][0], (lo, hi)[j][1], (lo, hi)[k][2]]
                     for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=float)


# ------------------------------------------------------------------------------------------ labeled sources
def deepgm_source(split_hemispheres: bool = False) -> LabeledSource:
    """Colin27 T1 with the AAL caudate, putamen, pallidum, thalamus, hippocampus and amygdala.

    Labels: merged hemispheres 1..6 in DEEPGM_STRUCTURES order; split: 2k-1 = left, 2k = right.
    """
    vol, aal = sources.load_volume("colin27_t1"), sources.load_volume("colin27_aal")
    if vol.array.shape != aal.array.shape or not np.allclose(vol.spacing_zyx, aal.spacing_zyx):
        raise RuntimeError("ch2.nii.gz and aal.nii.gz are not on the same grid; unexpected mricron-data version")
    names = sources.parse_aal_names()
    lut = np.zeros(256, dtype=np.uint8)
    labels = {"background": 0}
    for k, struct in enumerate(DEEPGM_STRUCTURES):
        for h, side in enumerate(("L", "R")):
            aal_name = f"{struct}_{side}"
            if aal_name not in names:
                raise RuntimeError(f"{aal_name} not found in aal.nii.txt")
            new = 2 * k + 1 + h if split_hemispheres else k + 1
            lut[names[aal_name]] = new
            labels[f"{struct.lower()}_{'left' if side == 'L' else 'right'}" if split_hemispheres
                   else struct.lower()] = new
    label = lut[aal.array]
    return LabeledSource(
        volume=vol, image=normalize_intensity(vol.array), label=label, labels=labels,
        roi_points_mm=np.argwhere(label > 0) * np.array(vol.spacing_zyx), anatomy="colin27",
        description="AAL deep grey matter on the Colin27 T1 (mricron-data), synthetic pose/spacing/bias/noise "
                    "variation of one real anatomy (nnunet_mim build-data deepgm)",
        reference="Holmes et al. 1998 (Colin27); Tzourio-Mazoyer et al. 2002 (AAL); Debian package mricron-data",
        licence="mricron-data: Debian copyright file lists BSD-3-clause (Chris Rorden) for the package; "
                "AAL and Colin27 upstream terms apply (cite the papers)",
    )


def mni_tissue_source() -> LabeledSource:
    """MNI152 2009a T1 with labels 1 = WM (p_wm > 0.5), 2 = GM (p_gm > 0.5 and not WM), 0 otherwise."""
    vol = sources.load_volume("mni152_t1")
    gm, wm = sources.load_volume("mni152_gm").array, sources.load_volume("mni152_wm").array
    p_gm, p_wm = gm.astype(np.float32) / 255.0, wm.astype(np.float32) / 255.0
    label = np.zeros(vol.array.shape, dtype=np.uint8)
    label[p_gm > 0.5] = 2
    label[p_wm > 0.5] = 1
    lo_hi = []
    for corner in _box_corners(*np.array(MNI_TISSUE_ROI_RAS).T):  # RAS x, y, z corners
        lps = (-corner[0], -corner[1], corner[2])
        lo_hi.append(vol.physical_to_index_zyx(lps) * np.array(vol.spacing_zyx))
    return LabeledSource(
        volume=vol, image=normalize_intensity(vol.array), label=label,
        labels={"background": 0, "white_matter": 1, "grey_matter": 2},
        roi_points_mm=np.array(lo_hi), anatomy="mni152",
        description="WM/GM from the MNI ICBM152 2009a probability maps (thresholded at 0.5) on the MNI152 T1 "
                    "(nilearn wheel), synthetic pose/spacing/bias/noise variation (nnunet_mim build-data mni-tissue)",
        reference="Fonov et al. 2009/2011, Collins et al. 1999 (ICBM152 2009a); nilearn",
        licence="ICBM152 2009a: McConnell Brain Imaging Centre copyright, free use with notice; nilearn BSD-3-clause",
    )


# ----------------------------------------------------------------------------------------------- builders
def _build_labeled(src: LabeledSource, dataset_id: int, name: str, num_train: int, num_test: int,
                   size: str, seed: int, raw_folder: str | os.PathLike | None, overwrite: bool,
                   cfg: VariationConfig, prefix: str) -> Path:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    if num_train < 1 or num_test < 0:
        raise ValueError("need num_train >= 1 and num_test >= 0")
    preset = get_preset(size)
    folder = prepare_dataset_folder(default_raw_folder(raw_folder), dataset_id, name, overwrite)
    train_seeds, test_seeds = case_seeds(seed, [num_train, num_test])
    assert not set(train_seeds) & set(test_seeds), "train and test cases must not share random transforms"
    num_classes = max(src.labels.values())
    record = {"root_seed": seed, "size": preset.name, "anatomy": src.anatomy, "cases": {}}
    for split, seeds, img_dir, lbl_dir in (("train", train_seeds, "imagesTr", "labelsTr"),
                                           ("test", test_seeds, "imagesTs", "labelsTs")):
        for i, case_seed in enumerate(seeds):
            case_id = f"{prefix}_{'tr' if split == 'train' else 'ts'}{i:03d}"
            case = simulate_case(src.image, src.label, src.volume.spacing_zyx, src.roi_points_mm,
                                 np.random.default_rng(case_seed), preset, cfg)
            check_classes_present(case.label, num_classes, case_id)
            write_case(folder / img_dir, folder / lbl_dir, case_id, case, src.volume)
            record["cases"][case_id] = {"split": split, "seed": case_seed, "shape_zyx": list(case.image.shape),
                                        **case.params.as_dict()}
    record["train_seeds"], record["test_seeds"] = train_seeds, test_seeds
    (folder / SEEDS_FILE).write_text(json.dumps(record, indent=1))
    generate_dataset_json(
        str(folder), {0: "T1"}, dict(src.labels), num_train, ".nii.gz", dataset_name=folder.name,
        description=src.description, reference=src.reference, license=src.licence,
        converted_by="nnunet_mim build-data", numTest=num_test, source_anatomy=src.anatomy, size_preset=preset.name,
    )
    return folder


def build_deepgm_dataset(dataset_id: int = 501, name: str = "DeepGM", num_train: int = 20, num_test: int = 10,
                         size: str = "demo", seed: int = 0, split_hemispheres: bool = False,
                         raw_folder: str | os.PathLike | None = None, overwrite: bool = False,
                         cfg: VariationConfig = VariationConfig()) -> Path:
    """AAL deep grey matter on Colin27 (needs mricron-data): 6 classes, or 12 with ``split_hemispheres``.

    Returns the dataset folder ``<raw_folder or $nnUNet_raw>/DatasetXXX_<name>``.
    """
    return _build_labeled(deepgm_source(split_hemispheres), dataset_id, name, num_train, num_test, size, seed,
                          raw_folder, overwrite, cfg, prefix="deepgm")


def build_mni_tissue_dataset(dataset_id: int = 502, name: str = "MNITissue", num_train: int = 20,
                             num_test: int = 10, size: str = "demo", seed: int = 0,
                             raw_folder: str | os.PathLike | None = None, overwrite: bool = False,
                             cfg: VariationConfig = VariationConfig()) -> Path:
    """WM/GM on the MNI152 T1 (needs only the nilearn wheel); labels 1 = white matter, 2 = grey matter."""
    return _build_labeled(mni_tissue_source(), dataset_id, name, num_train, num_test, size, seed,
                          raw_folder, overwrite, cfg, prefix="mnitissue")


def pool_sources(exclude_anatomies: Sequence[str] = ("colin27",),
                 source_keys: Sequence[str] | None = None) -> list[str]:
    """Available T1 sources for the pool, minus excluded anatomies (warns when mricron-data is missing)."""
    keys = [k for k in (source_keys or POOL_T1_SOURCES) if sources.SOURCES[k].anatomy not in exclude_anatomies]
    if not sources.mricron_available() and any(sources.SOURCES[k].package == "mricron-data" for k in keys):
        warnings.warn("mricron-data not found: the unlabeled pool is built from the nilearn MNI152 T1 only "
                      f"(no INIA19 macaque / Colin27). Run 'bash {sources.INSTALL_SCRIPT}' for more variety.",
                      stacklevel=3)
    keys = [k for k in keys if sources.source_available(k)]
    if not keys:
        raise MissingDataSourceError(
            f"no pool source left after excluding anatomies {list(exclude_anatomies)}; install mricron-data "
            f"(bash {sources.INSTALL_SCRIPT}) and/or nilearn")
    return keys


def _pool_roi(image: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Corners (source mm) of a random box of deep-GM-like extent centred near the middle of the head."""
    fg = np.argwhere(image[::2, ::2, ::2] > 0.15) * 2
    lo, hi = fg.min(0) * spacing, fg.max(0) * spacing
    centre = (lo + hi) / 2 + rng.uniform(-0.15, 0.15, 3) * (hi - lo)
    extent = np.array([rng.uniform(*r) for r in POOL_ROI_EXTENT_MM])
    return _box_corners(centre - extent / 2, centre + extent / 2)


def build_unlabeled_pool(out_folder: str | os.PathLike, num_cases: int = 40, size: str = "demo", seed: int = 0,
                         exclude_anatomies: Sequence[str] = ("colin27",), source_keys: Sequence[str] | None = None,
                         overwrite: bool = False, cfg: VariationConfig = VariationConfig()) -> Path:
    """Images only (``<case>_0000.nii.gz``) from real T1 volumes other than the labeled anatomy.

    Default sources: MNI152 T1 (nilearn) and the INIA19 macaque T1 (mricron-data); Colin27 is excluded
    because it is the anatomy of the deep-GM dataset (pass ``exclude_anatomies=("mni152",)`` for a pool
    to go with the MNI tissue dataset). Cases cycle through the sources; crops have a deep-GM-like field
    of view and the same spacing presets, so they are comparable in size to the labeled cases.
    """
    keys = pool_sources(exclude_anatomies, source_keys)
    out = Path(out_folder)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to rebuild it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    preset = get_preset(size)
    (seeds,) = case_seeds(seed, [num_cases])
    record = {"root_seed": seed, "size": preset.name, "sources": keys,
              "excluded_anatomies": list(exclude_anatomies), "cases": {}}
    prepared = {}
    for i, case_seed in enumerate(seeds):
        key = keys[i % len(keys)]
        if key not in prepared:
            vol = sources.load_volume(key)
            prepared[key] = (vol, normalize_intensity(vol.array))
        vol, image = prepared[key]
        rng = np.random.default_rng(case_seed)
        roi = _pool_roi(image, np.array(vol.spacing_zyx), rng)
        case = simulate_case(image, None, vol.spacing_zyx, roi, rng, preset, cfg)
        case_id = f"pool_{sources.SOURCES[key].anatomy}_{i:04d}"
        write_case(out, None, case_id, case, vol)
        record["cases"][case_id] = {"source": key, "seed": case_seed, "shape_zyx": list(case.image.shape),
                                    **case.params.as_dict()}
    (out / "pool_generation.json").write_text(json.dumps(record, indent=1))
    return out


# ---------------------------------------------------------------------------------------------------- CLI
def _timed(fn, *args, **kwargs) -> Path:
    t0 = time.time()
    path = fn(*args, **kwargs)
    print(f"wrote {path} in {time.time() - t0:.1f} s")
    return path


def _run_build(args: argparse.Namespace) -> None:
    if args.what == "pool":
        _timed(build_unlabeled_pool, args.output, num_cases=args.num_cases, size=args.size, seed=args.seed,
               exclude_anatomies=tuple(args.exclude_anatomy), overwrite=args.overwrite)
        return
    common = dict(num_train=args.num_train, num_test=args.num_test, size=args.size, seed=args.seed,
                  raw_folder=args.raw, overwrite=args.overwrite)
    if args.what == "deepgm":
        _timed(build_deepgm_dataset, args.dataset_id or 501, args.name or "DeepGM",
               split_hemispheres=args.split_hemispheres, **common)
    else:
        _timed(build_mni_tissue_dataset, args.dataset_id or 502, args.name or "MNITissue", **common)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``build-data {deepgm,mni-tissue,pool}``."""
    p = subparsers.add_parser("build-data", help="build the offline real-scan datasets (no downloads)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    for what, hlp in (("deepgm", "AAL deep grey matter on Colin27 (needs mricron-data)"),
                      ("mni-tissue", "WM/GM on MNI152 (nilearn only)")):
        s = sub.add_parser(what, help=hlp)
        s.add_argument("-d", "--dataset-id", type=int, default=None, help="default 501 (deepgm) / 502 (mni-tissue)")
        s.add_argument("-n", "--name", default=None, help="default DeepGM / MNITissue")
        s.add_argument("--num-train", type=int, default=20)
        s.add_argument("--num-test", type=int, default=10)
        s.add_argument("--raw", default=None, help="nnU-Net raw folder (default $nnUNet_raw)")
        if what == "deepgm":
            s.add_argument("--split-hemispheres", action="store_true", help="12 classes (left/right) instead of 6")
    s = sub.add_parser("pool", help="unlabeled pretraining images (MNI152 + INIA19 macaque by default)")
    s.add_argument("-o", "--output", required=True, help="folder for <case>_0000.nii.gz")
    s.add_argument("--num-cases", type=int, default=40)
    s.add_argument("--exclude-anatomy", nargs="*", default=["colin27"], choices=["colin27", "mni152", "inia19"],
                   help="anatomies not to use (default colin27, the deep-GM dataset's subject)")
    for s in sub.choices.values():
        s.add_argument("--size", default="demo", choices=["tiny", "demo", "full"])
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run_build)
    return p
