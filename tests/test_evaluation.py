"""Tests for nnunet_mim.apps.evaluation on hand-made volumes with hand-computed Dice / HD95 / ASSD."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mim.apps.evaluation import add_parser, binary_metrics, evaluate_folders, load_labels_arg

SPACING_XYZ = (0.7, 0.9, 2.5)  # anisotropic; array order (z, y, x) -> (2.5, 0.9, 0.7)


def write(folder: Path, name: str, arr: np.ndarray, spacing_xyz=SPACING_XYZ) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing_xyz)
    sitk.WriteImage(img, str(folder / f"{name}.nii.gz"))


def empty(shape=(20, 12, 12)) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint8)


def test_plate_shift_along_slice_axis():
    """1-voxel-thick plates k slices apart: every surface distance is k * s_z, Dice 0."""
    ref, pred = empty(), empty()
    ref[5, 3:8, 3:8] = 1
    pred[8, 3:8, 3:8] = 1
    m = binary_metrics(pred == 1, ref == 1, (2.5, 0.9, 0.7))
    assert m["status"] == "ok" and m["dice"] == pytest.approx(0.0)
    assert m["hd95"] == pytest.approx(3 * 2.5) and m["assd"] == pytest.approx(3 * 2.5)


def test_plate_shift_in_plane_x_uses_x_spacing():
    """Same along x (array axis 2): distances are k * s_x = 2 * 0.7 mm, proving the (x,y,z)->(z,y,x) flip."""
    ref, pred = empty(), empty()
    ref[4:9, 3:8, 4] = 1
    pred[4:9, 3:8, 6] = 1
    m = binary_metrics(pred == 1, ref == 1, (2.5, 0.9, 0.7))
    assert m["hd95"] == pytest.approx(1.4) and m["assd"] == pytest.approx(1.4)


def test_column_shift_known_distances(tmp_path):
    """1x1 column of n=10 voxels shifted by k=2 slices (s_z = 2.5 mm), through the folder API.

    All voxels are surface voxels. Each direction has distances {5.0, 2.5, 0 x 8}:
    Dice = 2*8/20 = 0.8; ASSD = 2*(5+2.5)/20 = 0.75 mm;
    HD95 = linear 95th percentile of the sorted 10 values = 2.5 + 0.55 * (5 - 2.5) = 3.875 mm.
    """
    ref, pred = empty(), empty()
    ref[3:13, 6, 6] = 1
    pred[5:15, 6, 6] = 1
    write(tmp_path / "ref", "case1", ref)
    write(tmp_path / "pred", "case1", pred)
    (tmp_path / "pred" / "plans.json").write_text("{}")  # nnU-Net prediction folders hold json files too
    results, table = evaluate_folders(tmp_path / "pred", tmp_path / "ref", {"background": 0, "col": 1},
                                      output_file=tmp_path / "out.json", verbose=False)
    m = results["per_case"]["case1"]["col"]
    assert m["dice"] == pytest.approx(0.8, abs=1e-6)
    assert m["assd"] == pytest.approx(0.75, abs=1e-5)
    assert m["hd95"] == pytest.approx(3.875, abs=1e-5)
    assert results["per_class"]["col"]["dice"] == pytest.approx(0.8, abs=1e-6)
    assert "col" in table and "0.800" in table
    on_disk = json.loads((tmp_path / "out.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert on_disk["per_case"]["case1"]["col"]["hd95"] == pytest.approx(3.875, abs=1e-5)


def test_cube_shift_dice_and_max_distance():
    """Cube of side 6 shifted 2 slices: Dice = 4/6; no surface distance exceeds 2 * 2.5 mm."""
    ref, pred = empty(), empty()
    ref[4:10, 3:9, 3:9] = 1
    pred[6:12, 3:9, 3:9] = 1
    m = binary_metrics(pred == 1, ref == 1, (2.5, 0.9, 0.7))
    assert m["dice"] == pytest.approx(4 / 6, abs=1e-6)
    assert 0 < m["assd"] < m["hd95"] <= 5.0 + 1e-6


def test_identical_is_perfect():
    ref = empty()
    ref[4:10, 3:9, 3:9] = 1
    m = binary_metrics(ref == 1, ref == 1, (2.5, 0.9, 0.7))
    assert (m["dice"], m["hd95"], m["assd"], m["status"]) == (pytest.approx(1.0), 0.0, 0.0, "ok")


def test_empty_set_conventions(tmp_path):
    """both empty -> Dice 1, distances null; one empty -> Dice 0, null; nulls excluded from means, counted."""
    box = empty()
    box[4:10, 3:9, 3:9] = 1
    cases = {"both": (empty(), empty()), "predempty": (empty(), box), "refempty": (box, empty()), "ok": (box, box)}
    for name, (p, r) in cases.items():
        write(tmp_path / "pred", name, p)
        write(tmp_path / "ref", name, r)
    results, _ = evaluate_folders(tmp_path / "pred", tmp_path / "ref", {"box": 1}, verbose=False)
    pc = results["per_case"]
    assert pc["both"]["box"] == {"dice": 1.0, "hd95": None, "assd": None, "n_pred": 0, "n_ref": 0,
                                 "status": "both_empty"}
    assert pc["predempty"]["box"]["status"] == "pred_empty" and pc["predempty"]["box"]["dice"] == 0.0
    assert pc["refempty"]["box"]["status"] == "ref_empty" and pc["refempty"]["box"]["hd95"] is None
    c = results["per_class"]["box"]
    assert (c["n_valid"], c["n_both_empty"], c["n_pred_empty"], c["n_ref_empty"]) == (1, 1, 1, 1)
    assert c["dice"] == pytest.approx((1 + 0 + 0 + 1) / 4)
    assert c["hd95"] == 0.0 and c["assd"] == 0.0  # only the "ok" case counts


def test_shape_and_spacing_mismatch(tmp_path):
    write(tmp_path / "ref", "a", empty((20, 12, 12)))
    write(tmp_path / "pred", "a", empty((20, 12, 13)))
    with pytest.raises(ValueError, match="size"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", {"x": 1}, verbose=False)
    write(tmp_path / "pred", "a", empty((20, 12, 12)), spacing_xyz=(0.7, 0.9, 3.0))
    with pytest.raises(ValueError, match="spacing"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", {"x": 1}, verbose=False)


def test_missing_and_extra_cases(tmp_path):
    a = empty()
    a[5:8, 5:8, 5:8] = 1
    for n in ("a", "b"):
        write(tmp_path / "ref", n, a)
    write(tmp_path / "pred", "a", a)
    with pytest.raises(FileNotFoundError, match="no prediction"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", verbose=False)
    results, table = evaluate_folders(tmp_path / "pred", tmp_path / "ref", allow_missing=True, verbose=False)
    assert results["missing_predictions"] == ["b"] and list(results["per_case"]) == ["a"]
    assert results["labels"] == {"1": 1}  # inferred from the data
    write(tmp_path / "pred", "zzz", a)
    with pytest.raises(ValueError, match="without a reference"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", allow_missing=True, verbose=False)


def test_regions_and_labels_arg(tmp_path):
    ref = empty()
    ref[4:10, 3:9, 3:9] = 1
    ref[6:8, 5:7, 5:7] = 2
    pred = ref.copy()
    pred[pred == 2] = 1  # whole structure right, inner class wrong
    write(tmp_path / "ref", "a", ref)
    write(tmp_path / "pred", "a", pred)
    ds = tmp_path / "dataset.json"
    ds.write_text(json.dumps({"labels": {"background": 0, "outer": 1, "inner": 2}}))
    assert load_labels_arg([str(ds)]) == {"outer": 1, "inner": 2}
    assert load_labels_arg(["outer=1", "2"]) == {"outer": 1, "2": 2}
    results, _ = evaluate_folders(tmp_path / "pred", tmp_path / "ref", {"whole": (1, 2), "inner": 2}, verbose=False)
    assert results["per_case"]["a"]["whole"]["dice"] == pytest.approx(1.0)
    assert results["per_case"]["a"]["inner"]["status"] == "pred_empty"


def test_cli_parser(tmp_path, capsys):
    a = empty()
    a[5:8, 5:8, 5:8] = 1
    write(tmp_path / "ref", "a", a)
    write(tmp_path / "pred", "a", a)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", "-pred", str(tmp_path / "pred"), "-ref", str(tmp_path / "ref"),
                              "-o", str(tmp_path / "e.json"), "-l", "thing=1"])
    args.func(args)
    assert json.loads((tmp_path / "e.json").read_text())["per_class"]["thing"]["dice"] == pytest.approx(1.0)
    assert "thing" in capsys.readouterr().out
