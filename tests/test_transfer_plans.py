"""`nnunet_mim transfer-plans` end to end: the target's plans reach the pretraining dataset, which is preprocessed
again with them (a labelled raw dataset through nnU-Net's preprocessing, an unlabeled import through ours); existing
plans are replaced only with --overwrite, and kept as .bak."""
from __future__ import annotations

import json

from helpers import TINY_DATASET, TINY_ID

TARGET = TINY_DATASET
COARSER = 1.5  # the "own" plans of the unlabeled pool: a coarser spacing than the target's


def _plans(ws, dataset: str, name: str = "nnUNetPlans.json") -> dict:
    return json.loads((ws.preprocessed / dataset / name).read_text())


def _without_name(plans: dict) -> dict:
    return {k: v for k, v in plans.items() if k != "dataset_name"}


def _resampled_shape(ws, dataset: str, spacing) -> tuple[tuple, tuple]:
    """(stored data shape, the shape nnU-Net's resampling gives at ``spacing``) of one preprocessed case."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    plans = _plans(ws, dataset)
    data_folder = ws.preprocessed / dataset / plans["configurations"]["3d_fullres"]["data_identifier"]
    ds = nnUNetDatasetBlosc2(str(data_folder))
    data, _, _, props = ds.load_case(ds.identifiers[0])
    original = [props["spacing"][i] for i in plans["transpose_forward"]]
    expected = compute_new_shape(props["shape_after_cropping_and_before_resampling"], original, spacing)
    return tuple(data.shape[1:]), tuple(int(s) for s in expected)


def test_transfer_plans_to_a_labelled_raw_dataset(tiny_workspace):
    ws = tiny_workspace
    ws.run("nnunet_mim", "build-data", "mni-tissue", "-d", "621", "-n", "Other", "--num-train", "2", "--num-test",
           "0", "--size", "tiny", "--seed", "7", "--raw", str(ws.raw))
    out = ws.run("nnunet_mim", "transfer-plans", "--from", str(TINY_ID), "--to", "621", "-c", "3d_fullres").stdout
    assert f"plans of {TARGET} (finetuning target) -> Dataset621_Other (pretraining data)" in out
    received = _plans(ws, "Dataset621_Other")
    assert received["dataset_name"] == "Dataset621_Other"
    assert _without_name(received) == _without_name(_plans(ws, TARGET))
    data = ws.preprocessed / "Dataset621_Other" / "nnUNetPlans_3d_fullres"
    assert len(list(data.glob("*.pkl"))) == 2 and len(list(data.glob("*_seg.b2nd"))) == 2
    stored, expected = _resampled_shape(ws, "Dataset621_Other", received["configurations"]["3d_fullres"]["spacing"])
    assert stored == expected


def test_transfer_plans_to_an_unlabeled_import(tiny_workspace):
    ws = tiny_workspace
    name = "Dataset622_Pool"
    # the pool first gets plans of its own (a coarser spacing), as if it had been planned separately, and its data
    # is preprocessed with them
    coarse = _plans(ws, TARGET)
    coarse["plans_name"] = "nnUNetPlansCoarse"
    coarse["configurations"]["3d_fullres"]["spacing"] = [s * COARSER for s in
                                                         coarse["configurations"]["3d_fullres"]["spacing"]]
    variant = ws.preprocessed / TARGET / "nnUNetPlansCoarse.json"
    variant.write_text(json.dumps(coarse, indent=1))
    pool = ws.root / "transfer_pool"
    ws.run("nnunet_mim", "build-data", "pool", "-o", str(pool), "--num-cases", "2", "--size", "tiny")
    ws.run("nnunet_mim", "import-unlabeled", "-i", str(pool), "-t", str(TINY_ID), "-d", "622", "-n", "Pool", "-c",
           "3d_fullres", "-p", "nnUNetPlansCoarse")
    variant.unlink()
    plans_file = ws.preprocessed / name / "nnUNetPlans.json"
    own = {**json.loads((ws.preprocessed / name / "nnUNetPlansCoarse.json").read_text()), "plans_name": "nnUNetPlans"}
    plans_file.write_text(json.dumps(own, indent=1))
    (ws.preprocessed / name / "nnUNetPlansCoarse.json").unlink()
    stored, expected = _resampled_shape(ws, name, own["configurations"]["3d_fullres"]["spacing"])
    assert stored == expected  # precondition: the pool's data follows its own plans
    before = plans_file.read_text()

    refused = ws.run("nnunet_mim", "transfer-plans", "--from", str(TINY_ID), "--to", "622", check=False)
    assert refused.returncode != 0 and "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    assert plans_file.read_text() == before and not (plans_file.parent / "nnUNetPlans.json.bak").exists()

    out = ws.run("nnunet_mim", "transfer-plans", "--from", str(TINY_ID), "--to", "622", "-c", "3d_fullres",
                 "--overwrite").stdout
    assert f"plans of {TARGET} (finetuning target) -> {name} (pretraining data)" in out
    received, target = _plans(ws, name), _plans(ws, TARGET)
    assert _without_name(received) == _without_name(target)
    assert (plans_file.parent / "nnUNetPlans.json.bak").read_text() == before
    # the data was made again with the target's spacing, not the pool's own
    stored, expected = _resampled_shape(ws, name, target["configurations"]["3d_fullres"]["spacing"])
    _, with_old_plans = _resampled_shape(ws, name, own["configurations"]["3d_fullres"]["spacing"])
    assert stored == expected and stored != with_old_plans
    dataset_json = json.loads((plans_file.parent / "dataset.json").read_text())
    assert dataset_json["nnunet_mim_unlabeled_import"]["plans_from"] == TARGET  # still refused by segmentation trainers
    assert dataset_json["labels"] == json.loads((ws.preprocessed / TARGET / "dataset.json").read_text())["labels"]


def test_transfer_plans_errors_name_the_fix(tiny_workspace):
    ws = tiny_workspace
    ws.run("nnunet_mim", "build-data", "mni-tissue", "-d", "623", "-n", "Unplanned", "--num-train", "2",
           "--num-test", "0", "--size", "tiny", "--raw", str(ws.raw))
    unplanned = ws.run("nnunet_mim", "transfer-plans", "--from", "623", "--to", str(TINY_ID), check=False)
    assert unplanned.returncode != 0 and "run nnUNetv2_plan_and_preprocess -d 623 first" in unplanned.stderr
    same = ws.run("nnunet_mim", "transfer-plans", "--from", str(TINY_ID), "--to", str(TINY_ID), check=False)
    assert same.returncode != 0 and "--to is the pretraining dataset" in same.stderr
    for run in (unplanned, same):
        assert "Traceback" not in run.stderr
