"""The study protocol: splits, pairing, records, resume, report; end to end on tiny data through the console script."""
from __future__ import annotations

import json

import pytest

from helpers import TINY_CONFIG, TINY_ID, TRAIN_BUDGET, fold_folder
from nnunet_mim.apps.study import FIRST_STUDY_FOLD, fold_of, label_subset

CASES = [f"c{i:02d}" for i in range(20)]
BASE = {"train": CASES[4:], "val": CASES[:4]}


def test_label_subsets_are_nested_per_seed_with_a_fixed_validation_set():
    for seed in (0, 1):
        subsets = [label_subset(BASE, f, seed) for f in (0.2, 0.4, 0.6, 1.0)]
        assert [len(s["train"]) for s in subsets] == [3, 6, 10, 16]
        for small, large in zip(subsets, subsets[1:]):
            assert set(small["train"]) < set(large["train"])
        assert all(s["val"] == CASES[:4] and not set(s["train"]) & set(s["val"]) for s in subsets)
    assert label_subset(BASE, 0.2, 0) == label_subset(BASE, 0.2, 0)  # deterministic
    assert label_subset(BASE, 0.2, 0) != label_subset(BASE, 0.2, 1)  # another seed, another subset
    with pytest.raises(ValueError):
        label_subset(BASE, 0.0, 0)


def test_a_cell_keeps_its_fold_and_seeds_never_share_one():
    splits = [BASE] * 5
    a = fold_of(splits, label_subset(BASE, 0.2, 0))
    b = fold_of(splits, label_subset(BASE, 0.4, 0))
    assert (a, b) == (FIRST_STUDY_FOLD, FIRST_STUDY_FOLD + 1)
    assert fold_of(splits, label_subset(BASE, 0.2, 0)) == a and len(splits) == FIRST_STUDY_FOLD + 2
    # at 100 % every seed draws the same cases, yet each seed trains in a fold (a results folder) of its own
    full = [fold_of(splits, label_subset(BASE, 1.0, seed)) for seed in (0, 1, 2)]
    assert len(set(full)) == 3 and all(splits[f]["train"] == sorted(BASE["train"]) for f in full)
    # a split of an earlier version (no cell tag) is adopted once, by the first cell that has its cases
    old = [BASE] * 5 + [{k: v for k, v in label_subset(BASE, 1.0, 0).items() if k != "nnunet_mim_cell"}]
    assert fold_of(old, label_subset(BASE, 1.0, 0)) == 5 and fold_of(old, label_subset(BASE, 1.0, 1)) == 6


@pytest.fixture(scope="module")
def study(tiny_workspace, tmp_path_factory):
    ws = tiny_workspace
    ws.run("nnUNetv2_train", str(TINY_ID), TINY_CONFIG, "all", "-tr", "HybridMIMPretrainer", "-device", "cpu",
           **TRAIN_BUDGET)
    checkpoint = fold_folder(ws, "HybridMIMPretrainer", TINY_CONFIG) / "checkpoint_final.pth"
    out = tmp_path_factory.mktemp("study")
    # two arms with one checkpoint and one trainer: nnU-Net would give them one results folder
    cmd = ["nnunet_mim", "study", "-d", str(TINY_ID), "-c", TINY_CONFIG, "--weights", f"mim={checkpoint}",
           f"twin={checkpoint}",
           "--fractions", "0.5", "--seeds", "0", "1", "--epochs", "2", "--iters", "2", "--val-iters", "1",
           "--processes", "1", "-o", str(out / "report")]
    first = ws.run(*cmd)
    return ws, cmd, out, first


def test_every_arm_of_a_cell_shares_fold_seed_and_budget(study):
    _, _, out, first = study
    records = [json.loads(p.read_text()) for p in sorted((out / "report" / "runs").glob("*.json"))]
    assert len(records) == 6 and "run 6 of 6" in first.stdout and "left" in first.stdout
    # every arm trains its own models, also an arm that shares trainer and checkpoint with another
    assert first.stdout.count("-pretrained_weights") == 4 and first.stdout.count("$ nnUNetv2_predict") == 6
    for seed in (0, 1):
        pair = [r for r in records if r["seed"] == seed]
        assert {r["arm"] for r in pair} == {"scratch", "mim", "twin"}
        assert len({r["fold"] for r in pair}) == 1 and len({json.dumps(r["train_cases"]) for r in pair}) == 1
        assert all(f"nnUNet_mim_seed={seed}" in r["commands"][0] for r in pair)
    assert {r["fold"] for r in records if r["seed"] == 0} != {r["fold"] for r in records if r["seed"] == 1}
    # different seeds, different runs (not one model evaluated twice)
    assert records[0]["curve"] != next(r for r in records if r["arm"] == records[0]["arm"] and r["seed"] != records[0]["seed"])["curve"]
    r = records[0]
    assert len(r["curve"]["ema_pseudo_dice"]) == 2 and r["validation_dice"] is not None
    # what made the run: the model (by its weights) and the software
    from importlib import metadata

    from nnunet_mim.nnunet.weights import weights_digest

    mim = next(r for r in records if r["arm"] == "mim")
    assert mim["weights_digest"] == weights_digest(mim["weights"])
    assert mim["environment"]["packages"]["nnunetv2"] == metadata.version("nnunetv2")
    assert set(r["test"]["per_case"]) and 0 <= r["test"]["overall"]["dice"] <= 1


def test_report_has_the_paired_effect_with_its_interval_and_plots(study):
    _, _, out, _ = study
    report = (out / "report" / "study_report.md").read_text()
    assert "two-way (seeds x test cases) paired percentile bootstrap" in report
    row = next(line for line in report.splitlines() if line.startswith("| 50% | mim |"))
    assert row.count("[") >= 1 and "| 2 |" in row  # effect [CI], 2 seeds
    assert "Paper targets" in report and "nnUNet_mim_seed=0" in report
    from importlib import metadata

    assert f"software of the runs: torch {metadata.version('torch')}" in report
    for png in ("study_dice_vs_labels.png", "study_convergence.png"):
        assert (out / "report" / png).stat().st_size > 5_000


def test_rerun_resumes_finished_and_interrupted_runs(study):
    ws, cmd, out, _ = study
    runs = out / "report" / "runs"
    again = ws.run(*cmd)
    assert "6 already done" in again.stdout and "nnUNetv2_train" not in again.stdout
    # an interrupted run: no record, and only checkpoint_latest.pth -> the study continues it with --c
    record = next(runs.glob("scratch__*s1.json"))
    fold = json.loads(record.read_text())["fold"]
    record.unlink()
    folder = out / "report" / "work" / "study_results" / "scratch" / f"Dataset{TINY_ID}_Tiny" / \
        f"nnUNetTrainerMIMScratchAdamW__nnUNetPlans__{TINY_CONFIG}" / f"fold_{fold}"
    (folder / "checkpoint_final.pth").rename(folder / "checkpoint_latest.pth")
    resumed = ws.run(*cmd)
    assert "run 1 of 1: scratch" in resumed.stdout and " --c" in resumed.stdout
    assert record.exists() and (folder / "checkpoint_final.pth").exists()


def test_records_made_with_other_weights_are_set_aside(tmp_path):
    import torch

    from nnunet_mim.apps.study import Arm, Budget, Study, file_digest
    from nnunet_mim.nnunet.weights import weights_digest

    def checkpoint(path, weight, started):
        torch.save({"network_weights": {"conv.weight": torch.full((2, 2), weight)}, "logging": {"start": [started]}},
                   path)
        return path

    said = []
    first = checkpoint(tmp_path / "first.pth", 1.0, 100.0)
    same_model = checkpoint(tmp_path / "same_model.pth", 1.0, 200.0)  # pretraining redone: other timestamps
    other_model = checkpoint(tmp_path / "other_model.pth", 1.5, 100.0)
    assert file_digest(first) != file_digest(same_model)
    study = Study(1, "3d_x", [], [0.2], [0], Budget(1, 1, 1), tmp_path / "out",
                  pipeline=type("P", (), {"say": staticmethod(said.append)})(), command="")
    study.runs_dir.mkdir(parents=True)
    records = {
        "pretrained__f020__s0.json": {"weights_sha256": "0123456789abcdef"},  # older record, another file
        "pretrained__f020__s1.json": {"weights_sha256": file_digest(same_model)},  # older record, this very file
        "pretrained__f020__s2.json": {"weights_sha256": file_digest(first), "weights_digest": weights_digest(first)},
        "pretrained__f060__s0.json": {"weights_sha256": file_digest(other_model),
                                      "weights_digest": weights_digest(other_model)},
        "scratch__f020__s0.json": {"weights_sha256": None, "weights_digest": None},
    }
    for name, record in records.items():
        (study.runs_dir / name).write_text(json.dumps(record))
    study.set_aside_stale_records(Arm("pretrained", "T", str(same_model)))
    assert sorted(p.name for p in study.runs_dir.glob("*.json")) == [
        "pretrained__f020__s1.json", "pretrained__f020__s2.json", "scratch__f020__s0.json"]
    assert sorted(p.name for p in (study.runs_dir / "stale").glob("*.json")) == [
        "pretrained__f020__s0.json", "pretrained__f060__s0.json"]
    assert len(said) == 2 and all("other weights" in s for s in said)


def test_a_pretraining_keeps_its_budget_under_its_arm_name(tmp_path):
    from nnunet_mim.apps.study import check_pretraining_budget

    settings = {"arm": "indomain", "trainer": "HybridMIMPretrainer", "pool": "Dataset512_X", "epochs": 24, "iters": 25}
    check_pretraining_budget(tmp_path, settings)
    check_pretraining_budget(tmp_path, dict(settings))  # the same pretraining again: resumes / reuses
    with pytest.raises(SystemExit, match="its own --pretrain-name"):
        check_pretraining_budget(tmp_path, {**settings, "epochs": 100})


def test_an_output_folder_holds_one_dataset_and_configuration(tmp_path):
    from nnunet_mim.apps.study import Budget, Study

    study = Study(1, "3d_sac_vit", [], [0.2], [0], Budget(1, 1, 1), tmp_path / "out", pipeline=None, command="")
    study.runs_dir.mkdir(parents=True)
    (study.runs_dir / "scratch__f020__s0.json").write_text(json.dumps({"dataset": "Dataset1_X",
                                                                       "configuration": "3d_small"}))
    with pytest.raises(SystemExit, match="its own -o"):  # scratch__f020__s0 would otherwise count as done
        study.check_records_are_ours("Dataset1_X")
    Study(1, "3d_small", [], [0.2], [0], Budget(1, 1, 1), tmp_path / "out", None, "").check_records_are_ours("Dataset1_X")


def _record(arm, fraction, seed, dice_per_case):
    return {"arm": arm, "fraction": fraction, "seed": seed,
            "test": {"per_case": {f"t{i}": {"1": {"dice": d}} for i, d in enumerate(dice_per_case)}}}


def test_the_60_vs_100_target_is_a_paired_interval_and_needs_three_seeds():
    from nnunet_mim.apps.study import _targets

    cases = [0.70, 0.72, 0.74, 0.76]
    scratch = [_record("scratch", 1.0, s, [c + 0.01 * s for c in cases]) for s in range(3)]
    # pretrained at 60 %: 1 point above scratch-at-100 % of the same seed on every case, but scratch at 60 % (same
    # seed) is far below: the target compares with scratch at 100 %, not at 60 %
    ahead = [_record("mim", 0.6, s, [c + 0.01 * s + 0.01 for c in cases]) for s in range(3)]
    low_scratch = [_record("scratch", 0.6, s, [0.1] * 4) for s in range(3)]
    lines = _targets({}, [0.6, 1.0], ["scratch", "mim"], scratch + ahead + low_scratch)
    line = next(x for x in lines if x.startswith("- `mim` with 60 %"))
    assert "+1.0 points [+1.0, +1.0] over 3 seed(s) and 4 test cases" in line and "target **met**" in line
    behind = [_record("mim", 0.6, s, [c + 0.01 * s - 0.02 for c in cases]) for s in range(3)]
    line = next(x for x in _targets({}, [0.6, 1.0], ["scratch", "mim"], scratch + behind)
                if x.startswith("- `mim`"))
    assert "-2.0 points" in line and "target **not met**" in line
    one_seed = _targets({}, [0.6, 1.0], ["scratch", "mim"], scratch + ahead[:1])
    assert any("over 1 seed(s)" in x and "preliminary, on track" in x for x in one_seed)
