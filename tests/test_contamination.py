"""The contamination check: a pretraining image with the same voxels as a target case is found whatever its name,
format or header; any other image is not. import-unlabeled warns and refuses with --strict (real console script);
the study's check is tested at function level."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import TINY_ID
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_mim.nnunet.contamination import ContaminationError, Overlap, check_pool, check_pool_dataset, \
    find_overlaps
from nnunet_mim.nnunet.unlabeled import group_images

SHAPE = (6, 7, 8)
TARGET = "Dataset690_Toy"


def _volume(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, SHAPE).astype(np.int16)


def _write(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


def _target(raw: Path) -> Path:
    """A toy raw dataset: two training cases, one test case (int16 .nii.gz)."""
    folder = raw / TARGET
    _write(_volume(0), folder / "imagesTr" / "tr_a_0000.nii.gz")
    _write(_volume(1), folder / "imagesTr" / "tr_b_0000.nii.gz")
    _write(_volume(2), folder / "imagesTs" / "ts_a_0000.nii.gz")
    for case in ("tr_a", "tr_b"):
        _write(np.zeros(SHAPE, np.uint8), folder / "labelsTr" / f"{case}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0, "x": 1},
                                                     "numTraining": 2, "file_ending": ".nii.gz"}))
    return folder


def _pool(folder: Path) -> dict[str, list[str]]:
    """Re-saved copies (float32 .nii, other names, spacing and origin) of the test case and of one training case, the
    test case with one voxel changed, and the test case's voxels in another shape."""
    other_header = {"spacing": (0.7, 0.8, 2.0), "origin": (5.0, -3.0, 1.0)}
    _write(_volume(2).astype(np.float32), folder / "scan17_0000.nii", **other_header)
    _write(_volume(0).astype(np.float32), folder / "scan18_0000.nii", **other_header)
    changed = _volume(2)
    changed[0, 0, 0] += 1
    _write(changed, folder / "scan19_0000.nii")
    _write(_volume(2).reshape(SHAPE[::-1]), folder / "scan20_0000.nii")  # same bytes, another shape
    return group_images(str(folder), ".nii", 1)


def test_exact_copies_are_found_whatever_the_file_and_nothing_else(tmp_path):
    target = _target(tmp_path / "raw")
    overlaps = find_overlaps(_pool(tmp_path / "pool"), SimpleITKIO, str(target))
    assert overlaps == [Overlap("scan17", "ts_a", "imagesTs"), Overlap("scan18", "tr_a", "imagesTr")]


def test_warning_by_default_refusal_when_strict(tmp_path, capsys):
    target = _target(tmp_path / "raw")
    pool = _pool(tmp_path / "pool")
    overlaps = check_pool(pool, SimpleITKIO, TARGET, "my pool", raw_root=str(tmp_path / "raw"))
    out = capsys.readouterr().out
    assert len(overlaps) == 2 and "WARNING" in out and "scan17 = ts_a (imagesTs)" in out
    assert "inflates" in out and "semi-supervised" in out and "must be stated" in out
    with pytest.raises(ContaminationError, match=r"(?s)scan17 = ts_a.*fix: delete scan17"):
        check_pool(pool, SimpleITKIO, TARGET, "my pool", strict=True, fix="delete scan17",
                   raw_root=str(tmp_path / "raw"))
    assert target.exists()


def test_cached_digests_are_reused_and_changed_files_hashed_again(tmp_path):
    target = _target(tmp_path / "raw")
    pool_folder = tmp_path / "pool"
    cache = tmp_path / "digests.json"
    first = find_overlaps(_pool(pool_folder), SimpleITKIO, str(target), cache_path=str(cache))
    assert cache.exists() and len(json.loads(cache.read_text())) == 7  # 3 target + 4 pool cases
    changed = _volume(2)
    changed[1, 1, 1] += 5
    _write(changed.astype(np.float32), pool_folder / "scan17_0000.nii")  # no longer a copy
    again = find_overlaps(group_images(str(pool_folder), ".nii", 1), SimpleITKIO, str(target), cache_path=str(cache))
    assert first[0].pool_case == "scan17" and again == [Overlap("scan18", "tr_a", "imagesTr")]


def test_study_pool_check_on_a_raw_dataset_and_on_an_import(tmp_path, capsys):
    from nnunet_mim.apps.pipeline import Pipeline
    from nnunet_mim.apps.study import check_pool as study_check

    raw, preprocessed = tmp_path / "raw", tmp_path / "preprocessed"
    _target(raw)
    pool_images = tmp_path / "pool"
    _write(_volume(2), pool_images / "p1_0000.nii.gz")
    _write(_volume(7), pool_images / "p2_0000.nii.gz")
    # a pool as a raw nnU-Net dataset (imagesTr) ...
    raw_pool = raw / "Dataset691_RawPool"
    shutil.copytree(pool_images, raw_pool / "imagesTr")
    (raw_pool / "dataset.json").write_text((raw / TARGET / "dataset.json").read_text())
    # ... and one made by import-unlabeled (only its dataset.json's mark points at the images)
    imported = preprocessed / "Dataset692_Imported"
    imported.mkdir(parents=True)
    (imported / "dataset.json").write_text(json.dumps({
        **json.loads((raw / TARGET / "dataset.json").read_text()),
        "nnunet_mim_unlabeled_import": {"source_folder": str(pool_images), "plans_from": TARGET}}))
    for name in (TARGET, "Dataset691_RawPool"):
        (preprocessed / name).mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline(tmp_path / "work", "study", "log.txt",
                        folders={"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed)})
    for pool in ("Dataset691_RawPool", "Dataset692_Imported"):
        assert study_check(pipeline, 690, pool) == [Overlap("p1", "ts_a", "imagesTs")]
        assert "inflates" in capsys.readouterr().out
        with pytest.raises(SystemExit, match=r"(?s)p1 = ts_a \(imagesTs\).*--strict"):
            study_check(pipeline, 690, pool, strict=True)
    assert check_pool_dataset("Dataset692_Imported", TARGET, str(raw), str(preprocessed)) == \
        [Overlap("p1", "ts_a", "imagesTs")]


def test_import_unlabeled_warns_about_a_test_case_and_refuses_it_with_strict(tiny_workspace):
    ws = tiny_workspace
    pool = ws.root / "contaminated_pool"
    pool.mkdir()
    test_case = sorted((ws.raw / f"Dataset{TINY_ID}_Tiny" / "imagesTs").iterdir())[0]
    shutil.copy(test_case, pool / "renamed_scan.nii.gz")
    refused = ws.run("nnunet_mim", "import-unlabeled", "-i", str(pool), "-t", str(TINY_ID), "-d", "631", "-c",
                     "3d_fullres", "--strict", check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    case = test_case.name[: -len("_0000.nii.gz")]
    assert f"renamed_scan = {case} (imagesTs)" in refused.stderr and "--strict" in refused.stderr
    assert not list(ws.preprocessed.glob("Dataset631_*"))  # nothing written
    warned = ws.run("nnunet_mim", "import-unlabeled", "-i", str(pool), "-t", str(TINY_ID), "-d", "631", "-c",
                    "3d_fullres")
    assert "WARNING" in warned.stdout and f"renamed_scan = {case} (imagesTs)" in warned.stdout
    assert "inflates" in warned.stdout
    assert len(list((ws.preprocessed / "Dataset631_TinyUnlabeled" / "nnUNetPlans_3d_fullres").glob("*.pkl"))) == 1
