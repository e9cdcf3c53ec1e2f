"""Tests for the offline real-scan dataset builders (nnunet_mim.apps.data). Fast, CPU, no network.

The MNI152 tests need only the nilearn wheel. Tests needing the Debian package mricron-data skip when it is
not found; run them with NNUNET_MIM_MRICRON_DIR=<...>/usr/share/mricron/templates (or after
scripts/install_data_sources.sh).
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mim.apps.data import builders, sources
from nnunet_mim.apps.data.builders import (build_deepgm_dataset, build_mni_tissue_dataset, build_unlabeled_pool,
                                      case_seeds)

needs_nilearn = pytest.mark.skipif(not sources.nilearn_available(),
                                   reason="nilearn (PyPI) not installed: pip install nilearn")
needs_mricron = pytest.mark.skipif(
    not sources.mricron_available(),
    reason="Debian package mricron-data not found (set NNUNET_MIM_MRICRON_DIR or run "
           "scripts/install_data_sources.sh)")


def read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img


def label_files(folder: Path, sub: str = "labelsTr") -> list[Path]:
    return sorted((folder / sub).glob("*.nii.gz"))


@pytest.fixture(scope="module")
def mni_tiny(tmp_path_factory) -> Path:
    if not sources.nilearn_available():
        pytest.skip("nilearn (PyPI) not installed")
    raw = tmp_path_factory.mktemp("raw")
    return build_mni_tissue_dataset(dataset_id=990, name="MNITissueTest", num_train=4, num_test=2, size="tiny",
                                    seed=123, raw_folder=raw)


def test_case_seeds_disjoint_and_deterministic():
    tr, ts = case_seeds(7, [50, 20])
    assert len(set(tr)) == 50 and len(set(ts)) == 20 and not set(tr) & set(ts)
    assert case_seeds(7, [50, 20]) == [tr, ts]
    assert case_seeds(8, [50, 20])[0] != tr


@needs_nilearn
def test_mni_tiny_is_valid_nnunet_raw_dataset(mni_tiny):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(mni_tiny), num_processes=1)
    ds = json.loads((mni_tiny / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "white_matter": 1, "grey_matter": 2}
    assert ds["channel_names"] == {"0": "T1"} and ds["file_ending"] == ".nii.gz" and ds["numTraining"] == 4
    assert len(list((mni_tiny / "imagesTs").glob("*_0000.nii.gz"))) == 2 and len(label_files(mni_tiny, "labelsTs")) == 2


@needs_nilearn
def test_mni_tiny_seeds_disjoint_and_recorded(mni_tiny):
    rec = json.loads((mni_tiny / builders.SEEDS_FILE).read_text())
    assert not set(rec["train_seeds"]) & set(rec["test_seeds"])
    train_ids = {p.name[:-7] for p in label_files(mni_tiny)}
    assert {c for c, v in rec["cases"].items() if v["split"] == "train"} == train_ids
    assert [rec["cases"][c]["seed"] for c in sorted(train_ids)] == rec["train_seeds"]


@needs_nilearn
def test_mni_tiny_labels_geometry_size_spacing(mni_tiny):
    spacings = []
    for lbl_path in label_files(mni_tiny) + label_files(mni_tiny, "labelsTs"):
        split = "imagesTr" if lbl_path.parent.name == "labelsTr" else "imagesTs"
        lbl, lbl_img = read(lbl_path)
        img, img_img = read(mni_tiny / split / lbl_path.name.replace(".nii.gz", "_0000.nii.gz"))
        assert img.shape == lbl.shape and img_img.GetSpacing() == lbl_img.GetSpacing()
        assert np.allclose(img_img.GetOrigin(), lbl_img.GetOrigin())
        counts = np.bincount(lbl.ravel(), minlength=3)
        assert counts.size == 3 and (counts[1:] >= builders.MIN_CLASS_VOXELS).all()
        assert all(12 <= s <= 48 for s in img.shape) and np.isfinite(img).all() and img.std() > 0
        sx, sy, sz = img_img.GetSpacing()
        assert sz > sx * 1.05 and sx == pytest.approx(sy)  # anisotropic: thick axial slices
        spacings.append((sx, sz))
    assert len(set(spacings)) == len(spacings)  # every case has its own spacing


@needs_nilearn
def test_mni_tiny_is_deterministic(mni_tiny, tmp_path):
    again = build_mni_tissue_dataset(dataset_id=990, name="MNITissueTest", num_train=4, num_test=0, size="tiny",
                                     seed=123, raw_folder=tmp_path)
    for name in ("mnitissue_tr000", "mnitissue_tr003"):
        a, _ = read(mni_tiny / "imagesTr" / f"{name}_0000.nii.gz")
        b, _ = read(again / "imagesTr" / f"{name}_0000.nii.gz")
        assert np.array_equal(a, b)
        assert np.array_equal(read(mni_tiny / "labelsTr" / f"{name}.nii.gz")[0],
                              read(again / "labelsTr" / f"{name}.nii.gz")[0])
    first, _ = read(mni_tiny / "imagesTr" / "mnitissue_tr000_0000.nii.gz")
    other, _ = read(mni_tiny / "imagesTr" / "mnitissue_tr001_0000.nii.gz")
    assert first.shape != other.shape or not np.allclose(first, other)


@needs_nilearn
def test_existing_dataset_needs_overwrite(mni_tiny):
    raw = mni_tiny.parent
    with pytest.raises(FileExistsError, match="overwrite"):
        build_mni_tissue_dataset(dataset_id=990, name="MNITissueTest", num_train=1, num_test=0, size="tiny",
                                 raw_folder=raw)
    with pytest.raises(FileExistsError, match="already used"):
        build_mni_tissue_dataset(dataset_id=990, name="Other", num_train=1, num_test=0, size="tiny", raw_folder=raw)


def _hide_mricron(monkeypatch, tmp_path):
    monkeypatch.delenv(sources.MRICRON_ENV_VAR, raising=False)
    monkeypatch.setenv(sources.CACHE_ENV_VAR, str(tmp_path / "nocache"))
    monkeypatch.setattr(sources, "SYSTEM_MRICRON_DIR", tmp_path / "nosystem")
    sources.load_volume.cache_clear()


def test_missing_mricron_gives_clear_error(monkeypatch, tmp_path):
    _hide_mricron(monkeypatch, tmp_path)
    with pytest.raises(sources.MissingDataSourceError) as err:
        build_deepgm_dataset(raw_folder=tmp_path / "raw", size="tiny", num_train=1, num_test=0)
    assert "mricron-data" in str(err.value) and "install_data_sources.sh" in str(err.value)
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


@needs_nilearn
def test_pool_without_mricron_uses_nilearn_and_warns(monkeypatch, tmp_path):
    _hide_mricron(monkeypatch, tmp_path)
    with pytest.warns(UserWarning, match="mricron-data not found"):
        out = build_unlabeled_pool(tmp_path / "pool", num_cases=2, size="tiny", seed=1)
    files = sorted(p.name for p in out.glob("*.nii.gz"))
    assert files == ["pool_mni152_0000_0000.nii.gz", "pool_mni152_0001_0000.nii.gz"]
    img, _ = read(out / files[0])
    assert all(12 <= s <= 48 for s in img.shape)
    assert not list(out.glob("labels*"))
    with pytest.raises(sources.MissingDataSourceError), pytest.warns(UserWarning):
        build_unlabeled_pool(tmp_path / "pool2", num_cases=1, size="tiny", exclude_anatomies=("mni152",))


def test_cli_parser_registers_build_data(tmp_path):
    parser = argparse.ArgumentParser()
    builders.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["build-data", "mni-tissue", "-d", "7", "--num-train", "2", "--size", "tiny",
                              "--raw", str(tmp_path)])
    assert args.func is builders._run_build and args.dataset_id == 7 and args.size == "tiny"
    args = parser.parse_args(["build-data", "pool", "-o", str(tmp_path / "p"), "--exclude-anatomy", "mni152"])
    assert args.exclude_anatomy == ["mni152"] and args.num_cases == 40


# ------------------------------------------------------------------------------- needs mricron-data
@needs_mricron
def test_aal_indices():
    names = sources.parse_aal_names()
    assert names["Caudate_L"] == 71 and names["Thalamus_R"] == 78
    assert names["Hippocampus_L"] == 37 and names["Amygdala_R"] == 42


@needs_mricron
def test_deepgm_tiny_all_classes_present(tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    folder = build_deepgm_dataset(dataset_id=991, num_train=3, num_test=1, size="tiny", seed=5, raw_folder=tmp_path)
    verify_dataset_integrity(str(folder), num_processes=1)
    ds = json.loads((folder / "dataset.json").read_text())
    assert list(ds["labels"]) == ["background", "caudate", "putamen", "pallidum", "thalamus", "hippocampus",
                                  "amygdala"]
    for p in label_files(folder) + label_files(folder, "labelsTs"):
        counts = np.bincount(read(p)[0].ravel(), minlength=7)
        assert counts.size == 7 and (counts[1:] >= builders.MIN_CLASS_VOXELS).all()


@needs_mricron
def test_deepgm_split_hemispheres(tmp_path):
    folder = build_deepgm_dataset(dataset_id=992, name="DeepGM12", num_train=1, num_test=0, size="tiny",
                                  split_hemispheres=True, raw_folder=tmp_path)
    ds = json.loads((folder / "dataset.json").read_text())
    assert len(ds["labels"]) == 13 and ds["labels"]["caudate_left"] == 1 and ds["labels"]["amygdala_right"] == 12
    lbl = read(label_files(folder)[0])[0]
    assert set(np.unique(lbl)) == set(range(13))


@needs_mricron
def test_pool_with_mricron_excludes_colin(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mricron-data not found" warning here
        out = build_unlabeled_pool(tmp_path / "pool", num_cases=2, size="tiny", seed=3)
    rec = json.loads((out / "pool_generation.json").read_text())
    assert rec["sources"] == ["mni152_t1", "inia19_t1"]
    assert sorted(v["source"] for v in rec["cases"].values()) == ["inia19_t1", "mni152_t1"]
