"""The README's main job in --quick mode through the real console script."""
import json

from conftest import make_workspace


def test_demo_quick(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    proc = ws.run("nnunet_mim", "demo", "--quick", "--workdir", str(tmp_path / "demo"), timeout=1500)
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert set(summary["overall"]) == {"scratch", "pretrained"}
    for arm in summary["overall"].values():
        assert 0.0 <= arm["dice"] <= 1.0
    assert (tmp_path / "demo" / "demo_result.png").stat().st_size > 10_000
    assert "scratch Dice" in proc.stdout and "pretrained Dice" in proc.stdout and "[demo" in proc.stdout
