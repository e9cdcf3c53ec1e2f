"""The README's main job in --quick mode through the real console script, and the study's split logic."""
import json

from conftest import make_workspace

from nnunet_mim.apps.study import FIRST_STUDY_FOLD, label_fraction_splits


def test_demo_quick(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    proc = ws.run("nnunet_mim", "demo", "--quick", "--workdir", str(tmp_path / "demo"), timeout=1500)
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert set(summary["overall"]) == {"scratch", "pretrained"}
    for arm in summary["overall"].values():
        assert 0.0 <= arm["dice"] <= 1.0
    assert (tmp_path / "demo" / "demo_result.png").stat().st_size > 10_000
    assert "scratch Dice" in proc.stdout and "pretrained Dice" in proc.stdout and "[demo" in proc.stdout


def test_label_fraction_splits_are_nested_with_a_fixed_validation_set():
    cases = [f"c{i:02d}" for i in range(20)]
    base = [{"train": cases[4:], "val": cases[:4]}] + [{"train": [], "val": []}] * 4
    splits = label_fraction_splits(base, [0.2, 0.4, 0.6, 1.0])
    study = splits[FIRST_STUDY_FOLD:]
    assert splits[:FIRST_STUDY_FOLD] == base and [len(s["train"]) for s in study] == [3, 6, 10, 16]
    for small, large in zip(study, study[1:]):
        assert set(small["train"]) < set(large["train"])
    assert all(s["val"] == cases[:4] and not set(s["train"]) & set(s["val"]) for s in study)
    assert label_fraction_splits(base, [0.2])[FIRST_STUDY_FOLD] == study[0]  # deterministic
