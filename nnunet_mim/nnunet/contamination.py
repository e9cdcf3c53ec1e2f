"""Contamination check: which pretraining scans are also cases of the target dataset?

Pretraining on a scan that is also a *test* case of the target (``imagesTs``) inflates every test result on that
target. Pretraining on the target's *training* scans (``imagesTr``) is the usual semi-supervised setting, but a
report must say so. ``nnunet_mim import-unlabeled`` and ``nnunet_mim study --pretrain ... --pool ...`` run this
check: they warn by default and refuse with ``--strict``.

Conventions:

- **Identity is voxel content after loading.** A case (all its channels, in channel order) is read with nnU-Net's
  reader for its file ending (:func:`determine_reader_writer_from_dataset_json`, e.g. ``SimpleITKIO``) and
  identified by the SHA-256 of the float32 array's bytes and its shape. File names, formats (``.nii`` vs
  ``.nii.gz``), headers (spacing, origin, direction) and the stored dtype do not matter: a renamed or re-saved copy
  is found. Any change of a voxel value (resampling, cropping, a synthetic augmentation of the same anatomy) makes a
  different image: this is an exact-duplicate check, not a near-duplicate search.
- **Each image is read once** (per call); matching is a dictionary lookup, not a pairwise comparison. A progress bar
  appears from :data:`PROGRESS_MIN_CASES` cases on, worker processes from :data:`PARALLEL_MIN_CASES`. An optional
  JSON cache (``cache_path``) keeps the digests of unchanged files (same path, size and modification time) between
  calls, for commands that are rerun (the study).
- The target's cases are those of ``imagesTr`` (nnU-Net's own listing, so a ``"dataset"`` entry in dataset.json is
  honoured) and ``imagesTs`` under ``nnUNet_raw/<target>``. A pool that is an nnU-Net dataset contributes the cases
  of its ``imagesTr`` (raw), or of the folder it was imported from (``nnunet_mim import-unlabeled``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Sequence

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, load_json

TARGET_FOLDERS = ("imagesTr", "imagesTs")
PROGRESS_MIN_CASES = 20  # a progress bar from this many cases on
PARALLEL_MIN_CASES = 20  # worker processes (their start-up costs more than hashing a few images) from this many on
UNLABELED_IMPORT_KEY = "nnunet_mim_unlabeled_import"  # the mark import-unlabeled leaves in dataset.json


@dataclass(frozen=True, order=True)
class Overlap:
    """Pool case ``pool_case`` has the same voxels as ``target_case`` in the target's ``folder``."""
    pool_case: str
    target_case: str
    folder: str  # "imagesTr" or "imagesTs"


class ContaminationError(ValueError):
    """The pool shares scans with the target and the check is strict (or cannot be done)."""


# ------------------------------------------------------------------------------------------------ digests
def voxel_digest(image_files: Sequence[str], reader_writer_class) -> str:
    """SHA-256 of the loaded case (all channels, float32) and its shape."""
    data, _ = reader_writer_class().read_images(list(image_files))
    data = np.ascontiguousarray(data, dtype=np.float32)
    digest = hashlib.sha256(repr(tuple(data.shape)).encode())
    digest.update(data.tobytes())
    return digest.hexdigest()


def _digest_job(args) -> str:
    return voxel_digest(*args)


def _file_stamp(path: str) -> list:
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def case_digests(cases: dict[str, list[str]], reader_writer_class, what: str = "images", num_processes: int = 1,
                 cache_path: str | None = None) -> dict[str, str]:
    """Case id -> :func:`voxel_digest`, each case read once; cached digests of unchanged files are reused."""
    from tqdm import tqdm

    cache = load_json(cache_path) if cache_path and isfile(cache_path) else {}
    stamps = {case: json.dumps([_file_stamp(f) for f in files]) for case, files in cases.items()}
    out = {case: cache[stamps[case]] for case in cases if stamps[case] in cache}
    todo = [case for case in cases if case not in out]
    bar = tqdm(total=len(todo), desc=f"Hashing {what}", disable=len(todo) < PROGRESS_MIN_CASES)
    jobs = [(cases[case], reader_writer_class) for case in todo]
    if num_processes > 1 and len(todo) >= PARALLEL_MIN_CASES:
        with get_context("spawn").Pool(min(num_processes, len(todo))) as pool:
            for case, digest in zip(todo, pool.imap(_digest_job, jobs)):
                out[case] = digest
                bar.update()
    else:
        for case, job in zip(todo, jobs):
            out[case] = _digest_job(job)
            bar.update()
    bar.close()
    if cache_path and todo:
        cache.update({stamps[case]: out[case] for case in cases})
        tmp = f"{cache_path}.partial"
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, cache_path)
    return out


# ------------------------------------------------------------------------------------------------ cases
def reader_for(dataset_json: dict, example_file: str | None = None):
    """nnU-Net's reader class for a dataset (its file ending, or ``overwrite_image_reader_writer``)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    return determine_reader_writer_from_dataset_json(dataset_json, example_file, allow_nonmatching_filename=True,
                                                     verbose=False)


def target_cases(raw_dataset_folder: str) -> dict[str, dict[str, list[str]]]:
    """``{"imagesTr": {case: files}, "imagesTs": {case: files}}`` of an nnU-Net raw dataset (imagesTs may be empty)."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from nnunet_mim.nnunet.unlabeled import group_images

    dataset_json = load_json(join(raw_dataset_folder, "dataset.json"))
    train = {case: list(entry["images"]) for case, entry in
             get_filenames_of_train_images_and_targets(raw_dataset_folder, dataset_json).items()}
    test_folder = join(raw_dataset_folder, "imagesTs")
    has_test = isdir(test_folder) and any(f.endswith(dataset_json["file_ending"]) for f in os.listdir(test_folder))
    test = group_images(test_folder, dataset_json["file_ending"], len(dataset_json["channel_names"])) \
        if has_test else {}
    return {"imagesTr": train, "imagesTs": test}


def find_overlaps(pool_cases: dict[str, list[str]], pool_reader_class, target_raw_folder: str,
                  num_processes: int = 1, cache_path: str | None = None) -> list[Overlap]:
    """Every (pool case, target case, folder) with identical voxel content, sorted by pool case."""
    dataset_json = load_json(join(target_raw_folder, "dataset.json"))
    by_digest: dict[str, list[tuple[str, str]]] = {}
    for folder, cases in target_cases(target_raw_folder).items():
        if not cases:
            continue
        reader = reader_for(dataset_json, next(iter(cases.values()))[0])
        for case, digest in case_digests(cases, reader, f"{os.path.basename(target_raw_folder)}/{folder}",
                                         num_processes, cache_path).items():
            by_digest.setdefault(digest, []).append((folder, case))
    pool = case_digests(pool_cases, pool_reader_class, "pool images", num_processes, cache_path)
    return sorted(Overlap(case, target_case, folder) for case, digest in pool.items()
                  for folder, target_case in by_digest.get(digest, []))


def describe_overlaps(overlaps: Sequence[Overlap], num_pool_cases: int, pool_label: str, target_name: str) -> str:
    """The cases, and what each kind of overlap means for results on the target."""
    shared = sorted({o.pool_case for o in overlaps})
    lines = [f"{len(shared)} of {num_pool_cases} pretraining case(s) ({pool_label}) have the same voxels as cases of "
             f"{target_name}:"]
    lines += [f"  {o.pool_case} = {o.target_case} ({o.folder})" for o in overlaps]
    folders = {o.folder for o in overlaps}
    if "imagesTs" in folders:
        lines.append(f"imagesTs overlap: these test cases would be seen during pretraining, which inflates every test "
                     f"result on {target_name}. Remove them from the pretraining data.")
    if "imagesTr" in folders:
        lines.append("imagesTr overlap: pretraining on the target's training scans is the usual semi-supervised "
                     "setting, but it must be stated when reporting results.")
    return "\n".join(lines)


def check_pool(pool_cases: dict[str, list[str]], pool_reader_class, target_name: str, pool_label: str,
               strict: bool = False, fix: str = "remove them from the pretraining data",
               num_processes: int = 1, raw_root: str | None = None, cache_path: str | None = None) -> list[Overlap]:
    """Compare ``pool_cases`` with ``nnUNet_raw/<target_name>``; print a warning listing the overlaps, or raise
    :class:`ContaminationError` (naming the cases and ``fix``) when ``strict``. A target without its raw folder
    cannot be checked: a note, or an error when ``strict``."""
    if raw_root is None:
        from nnunetv2.paths import nnUNet_raw as raw_root
    target_raw = join(str(raw_root), target_name) if raw_root else None
    if target_raw is None or not isfile(join(target_raw, "dataset.json")):
        text = (f"Contamination check skipped: {target_raw or 'nnUNet_raw'} (with dataset.json) is not there, so "
                f"the pretraining data cannot be compared with the cases of {target_name}.")
        if strict:
            raise ContaminationError(f"{text} Export nnUNet_raw to the folder that holds {target_name}, or run "
                                     f"without --strict.")
        print(f"NOTE: {text}")
        return []
    print(f"Contamination check: {len(pool_cases)} pretraining case(s) against {target_name} imagesTr and imagesTs")
    overlaps = find_overlaps(pool_cases, pool_reader_class, target_raw, num_processes, cache_path)
    if not overlaps:
        print(f"Contamination check: none of the {len(pool_cases)} pretraining case(s) is a case of {target_name}.")
        return []
    text = describe_overlaps(overlaps, len(pool_cases), pool_label, target_name)
    if strict:
        raise ContaminationError(f"{text}\nRefused (--strict). To fix: {fix}; or run without --strict to go on with "
                                 f"this warning.")
    print(f"WARNING: {text}", flush=True)
    return overlaps


def dataset_pool_cases(pool_name: str, raw_root: str, preprocessed_root: str
                       ) -> tuple[dict[str, list[str]], type, str]:
    """The images a pretraining dataset was made from: ``(cases, reader class, label)``. Its raw ``imagesTr`` when
    ``nnUNet_raw/<pool_name>`` exists, else the folder recorded by ``nnunet_mim import-unlabeled``."""
    from nnunet_mim.nnunet.unlabeled import group_images

    raw = join(str(raw_root), pool_name)
    if isfile(join(raw, "dataset.json")):
        cases = target_cases(raw)["imagesTr"]
        return cases, reader_for(load_json(join(raw, "dataset.json")),
                                 next(iter(cases.values()))[0] if cases else None), f"{raw}/imagesTr"
    dataset_json_file = join(str(preprocessed_root), pool_name, "dataset.json")
    imported = load_json(dataset_json_file).get(UNLABELED_IMPORT_KEY) if isfile(dataset_json_file) else None
    if not imported:
        raise FileNotFoundError(f"{pool_name}: neither {raw}/dataset.json nor an `nnunet_mim import-unlabeled` "
                                f"dataset.json in {preprocessed_root}; the pretraining images cannot be found.")
    folder = imported["source_folder"]
    if not isdir(folder):
        raise FileNotFoundError(f"{pool_name} was imported from {folder}, which is not there any more.")
    dataset_json = load_json(dataset_json_file)
    cases = group_images(folder, dataset_json["file_ending"], len(dataset_json["channel_names"]))
    return cases, reader_for(dataset_json, next(iter(cases.values()))[0]), folder


def check_pool_dataset(pool_name: str, target_name: str, raw_root: str, preprocessed_root: str,
                       strict: bool = False, num_processes: int = 1, cache_path: str | None = None) -> list[Overlap]:
    """:func:`check_pool` for a pretraining dataset given by name (the study's ``--pool``)."""
    try:
        cases, reader, label = dataset_pool_cases(pool_name, raw_root, preprocessed_root)
    except FileNotFoundError as e:
        if strict:
            raise ContaminationError(f"{e} The pretraining images cannot be compared with {target_name}: restore "
                                     f"them, or run without --strict.") from None
        print(f"NOTE: contamination check skipped: {e}")
        return []
    fix = (f"remove these cases from the images of {pool_name} ({label}) and rebuild it (nnunet_mim import-unlabeled "
           f"... --overwrite, or nnUNetv2_preprocess)")
    return check_pool(cases, reader, target_name, f"{pool_name}, from {label}", strict, fix, num_processes,
                      raw_root, cache_path)
