"""Dice, HD95 and ASSD (mm) between a folder of predictions and a folder of reference label maps.

Metrics come from MONAI (``compute_dice``, ``compute_hausdorff_distance(percentile=95)``,
``compute_average_surface_distance(symmetric=True)``) with the voxel spacing read by SimpleITK (x, y, z),
reversed to the array order (z, y, x).

Empty-set convention (per case and class; MONAI itself returns nan or inf here, so we never call the
distance functions on an empty mask):

* both empty (``status="both_empty"``): Dice = 1, HD95 = ASSD = null; left out of the HD95/ASSD means.
* exactly one empty (``"pred_empty"`` / ``"ref_empty"``): Dice = 0, HD95 = ASSD = null (infinite distance);
  left out of the HD95/ASSD means but counted, so a class with missed structures shows ``n_pred_empty > 0``.
* otherwise (``"ok"``): all three metrics as MONAI computes them.

Per-class means: Dice over all cases; HD95/ASSD over the "ok" cases only (``n_valid``). Overall means: the
unweighted mean of the per-class means (classes without any valid HD95/ASSD are skipped for those metrics).
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

LabelValue = Union[int, Sequence[int]]
METRICS = ("dice", "hd95", "assd")


# -------------------------------------------------------------------------------------------------- inputs
def read_label_image(path: str | Path) -> tuple[np.ndarray, tuple[float, ...], sitk.Image]:
    """Array (z, y, x), spacing in array order (z, y, x) and the SimpleITK image."""
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), tuple(float(s) for s in img.GetSpacing()[::-1]), img


def case_files(folder: str | Path, file_ending: str = ".nii.gz") -> dict[str, Path]:
    """``case id -> file`` for the image files in a folder (json and other files are ignored)."""
    return {p.name[: -len(file_ending)]: p for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.name.endswith(file_ending)}


def normalize_labels(labels: Mapping | None) -> dict[str, LabelValue] | None:
    """Accept nnU-Net style ``{name: value}`` or ``{value: name}``; drop background and ignore."""
    if labels is None:
        return None
    out: dict[str, LabelValue] = {}
    for k, v in labels.items():
        if isinstance(v, str) and (isinstance(k, int) or str(k).isdigit()):
            k, v = v, int(k)
        if str(k) in ("background", "ignore"):
            continue
        out[str(k)] = tuple(int(i) for i in v) if isinstance(v, (list, tuple)) else int(v)
    if not out:
        raise ValueError("no foreground labels given")
    return out


def load_labels_arg(tokens: Sequence[str] | None) -> dict[str, LabelValue] | None:
    """CLI ``-l``: a dataset.json (its "labels"), a json dict, or tokens ``1 2`` / ``name=1 other=2``."""
    if not tokens:
        return None
    if len(tokens) == 1 and tokens[0].endswith(".json"):
        data = json.loads(Path(tokens[0]).read_text())
        return normalize_labels(data.get("labels", data))
    labels = {}
    for t in tokens:
        name, _, value = t.rpartition("=")
        labels[name or value] = int(value)
    return normalize_labels(labels)


def infer_labels(arrays: Sequence[np.ndarray]) -> dict[str, int]:
    """Every non-zero value found in the given label maps, named by its value."""
    values = sorted({int(v) for a in arrays for v in np.unique(a) if v != 0})
    if not values:
        raise ValueError("no foreground label in any reference or prediction; pass labels explicitly")
    return {str(v): v for v in values}


def check_geometry(pred: sitk.Image, ref: sitk.Image, case: str, tol: float = 1e-4) -> None:
    """Raise on shape or spacing mismatch; warn on origin/direction mismatch."""
    if pred.GetSize() != ref.GetSize():
        raise ValueError(f"{case}: prediction size (x, y, z) {pred.GetSize()} != reference size {ref.GetSize()}")
    if not np.allclose(pred.GetSpacing(), ref.GetSpacing(), rtol=tol, atol=tol):
        raise ValueError(f"{case}: prediction spacing {pred.GetSpacing()} != reference spacing {ref.GetSpacing()}")
    if not (np.allclose(pred.GetOrigin(), ref.GetOrigin(), atol=1e-3)
            and np.allclose(pred.GetDirection(), ref.GetDirection(), atol=1e-4)):
        warnings.warn(f"{case}: origin/direction differ between prediction and reference; "
                      "metrics are computed voxel-wise on the arrays", stacklevel=2)


# ------------------------------------------------------------------------------------------------- metrics
def _mask(arr: np.ndarray, value: LabelValue) -> np.ndarray:
    return np.isin(arr, value) if isinstance(value, tuple) else arr == value


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float]) -> dict:
    """Dice, HD95 and ASSD (mm) of two boolean masks, with the empty-set convention of this module."""
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    yp = torch.from_numpy(np.ascontiguousarray(pred))[None, None].float()
    yr = torch.from_numpy(np.ascontiguousarray(ref))[None, None].float()
    dice = float(compute_dice(yp, yr, include_background=True, ignore_empty=False)[0, 0])
    result = {"dice": dice, "hd95": None, "assd": None, "n_pred": n_pred, "n_ref": n_ref}
    if n_pred == 0 or n_ref == 0:
        result["status"] = "both_empty" if n_pred == n_ref else ("pred_empty" if n_pred == 0 else "ref_empty")
        return result
    spacing = [float(s) for s in spacing_zyx]
    with warnings.catch_warnings():  # MONAI 1.5/1.6 warns about its own internal use of a deprecated argument
        warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
        result["hd95"] = float(compute_hausdorff_distance(yp, yr, include_background=True, percentile=95,
                                                          spacing=spacing)[0, 0])
        result["assd"] = float(compute_average_surface_distance(yp, yr, include_background=True, symmetric=True,
                                                                spacing=spacing)[0, 0])
    result["status"] = "ok"
    return result


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float],
                 labels: Mapping[str, LabelValue]) -> dict[str, dict]:
    """``class name -> binary_metrics`` for one case."""
    return {name: binary_metrics(_mask(pred, v), _mask(ref, v), spacing_zyx) for name, v in labels.items()}


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    return (float(np.mean(values)), float(np.std(values))) if values else (None, None)


def summarize(per_case: Mapping[str, Mapping[str, dict]], labels: Mapping[str, LabelValue]) -> dict:
    """Per-class means (with empty-set counts) and the overall mean over classes."""
    per_class = {}
    for name in labels:
        rows = [per_case[c][name] for c in per_case]
        entry = {"n_cases": len(rows)}
        for status in ("ok", "both_empty", "pred_empty", "ref_empty"):
            entry[f"n_{status}" if status != "ok" else "n_valid"] = sum(r["status"] == status for r in rows)
        for m in METRICS:
            entry[m], entry[f"{m}_std"] = _mean_std([r[m] for r in rows if r[m] is not None])
        per_class[name] = entry
    overall = {m: _mean_std([e[m] for e in per_class.values() if e[m] is not None])[0] for m in METRICS}
    return {"per_class": per_class, "overall": overall}


# ------------------------------------------------------------------------------------------------- driver
def evaluate_folders(pred_folder: str | Path, ref_folder: str | Path, labels: Mapping | None = None,
                     output_file: str | Path | None = None, file_ending: str = ".nii.gz",
                     allow_missing: bool = False, verbose: bool = True) -> tuple[dict, str]:
    """Evaluate every reference case against the prediction with the same file name.

    ``labels``: ``{name: value}`` (nnU-Net dataset.json style, tuples = regions) or None (all non-zero values).
    Missing predictions raise unless ``allow_missing`` (then they are skipped and listed). Predictions without
    a reference always raise. Returns ``(results, table)``; writes ``results`` as JSON to ``output_file``
    (default ``<pred_folder>/evaluation.json``) and prints the table when ``verbose``.
    """
    preds, refs = case_files(pred_folder, file_ending), case_files(ref_folder, file_ending)
    if not refs:
        raise FileNotFoundError(f"no '*{file_ending}' reference files in {ref_folder}")
    extra = sorted(set(preds) - set(refs))
    if extra:
        raise ValueError(f"predictions without a reference in {ref_folder}: {extra[:10]}")
    missing = sorted(set(refs) - set(preds))
    if missing and not allow_missing:
        raise FileNotFoundError(f"{len(missing)} reference cases have no prediction in {pred_folder}: {missing[:10]}")
    loaded = {}
    for case in sorted(set(refs) & set(preds)):
        p_arr, _, p_img = read_label_image(preds[case])
        r_arr, spacing, r_img = read_label_image(refs[case])
        check_geometry(p_img, r_img, case)
        loaded[case] = (p_arr, r_arr, spacing)
    if not loaded:
        raise FileNotFoundError(f"no case of {ref_folder} has a prediction in {pred_folder}")
    labels = normalize_labels(labels) or infer_labels([a for v in loaded.values() for a in v[:2]])
    per_case = {c: case_metrics(p, r, s, labels) for c, (p, r, s) in loaded.items()}
    results = {
        "pred_folder": str(pred_folder), "ref_folder": str(ref_folder),
        "labels": {k: list(v) if isinstance(v, tuple) else v for k, v in labels.items()},
        "convention": "Dice=1 if both empty, 0 if one empty; HD95/ASSD in mm, null when either mask is empty "
                      "(status says which) and excluded from the means; overall = mean of per-class means",
        "missing_predictions": missing,
        **summarize(per_case, labels),
        "per_case": per_case,
    }
    out = Path(output_file) if output_file else Path(pred_folder) / "evaluation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    table = format_table(results)
    if verbose:
        print(table)
        print(f"wrote {out}")
    return results, table


def _fmt(mean: float | None, std: float | None = None, digits: int = 3) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def format_table(results: Mapping) -> str:
    """Readable per-class table (means ± std over cases) with empty-set counts."""
    header = f"{'class':<22}{'Dice':>16}{'HD95 (mm)':>18}{'ASSD (mm)':>18}{'valid':>8}{'pred∅':>7}{'ref∅':>6}{'both∅':>7}"
    lines = [header, "-" * len(header)]
    for name, e in results["per_class"].items():
        lines.append(f"{name[:21]:<22}{_fmt(e['dice'], e['dice_std']):>16}{_fmt(e['hd95'], e['hd95_std'], 2):>18}"
                     f"{_fmt(e['assd'], e['assd_std'], 2):>18}{e['n_valid']:>8}{e['n_pred_empty']:>7}"
                     f"{e['n_ref_empty']:>6}{e['n_both_empty']:>7}")
    o = results["overall"]
    lines += ["-" * len(header),
              f"{'mean over classes':<22}{_fmt(o['dice']):>16}{_fmt(o['hd95'], None, 2):>18}{_fmt(o['assd'], None, 2):>18}",
              f"{len(results['per_case'])} cases; HD95/ASSD averaged over 'valid' cases (both masks non-empty)"]
    if results.get("missing_predictions"):
        lines.append(f"missing predictions (skipped): {results['missing_predictions']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI
def _run_evaluate(args: argparse.Namespace) -> None:
    evaluate_folders(args.pred, args.ref, load_labels_arg(args.labels), args.output, file_ending=args.file_ending,
                     allow_missing=args.allow_missing)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``evaluate -pred DIR -ref DIR [-o JSON] [-l LABELS...]``."""
    p = subparsers.add_parser("evaluate", help="Dice / HD95 / ASSD (mm) of a prediction folder vs references",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-pred", "--pred", required=True, help="folder with <case>.nii.gz predictions")
    p.add_argument("-ref", "--ref", required=True, help="folder with <case>.nii.gz reference label maps")
    p.add_argument("-o", "--output", default=None, help="output json (default <pred>/evaluation.json)")
    p.add_argument("-l", "--labels", nargs="+", default=None,
                   help="dataset.json (uses its 'labels'), or values '1 2 3', or 'name=1 other=2' "
                        "(default: every non-zero value found)")
    p.add_argument("--file-ending", default=".nii.gz")
    p.add_argument("--allow-missing", action="store_true", help="skip reference cases without a prediction")
    p.set_defaults(func=_run_evaluate)
    return p
