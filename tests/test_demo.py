"""The README's main job in --quick mode through the real console script, killed halfway and run again."""
import json
import os
import signal
import time

from helpers import make_workspace


def test_demo_quick_resumes_after_a_kill(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    workdir = tmp_path / "demo"
    first = ws.popen("nnunet_mim", "demo", "--quick", "--workdir", str(workdir))
    deadline = time.time() + 1200
    pretrained = []
    while time.time() < deadline and first.poll() is None and not pretrained:
        pretrained = list(workdir.glob("nnUNet_results/*/HybridMIMPretrainer__*/fold_all/checkpoint_final.pth"))
        time.sleep(1)
    assert pretrained, "the demo did not finish its pretraining step"
    os.killpg(first.pid, signal.SIGKILL)  # killed during the finetuning steps
    first.wait()
    stamp = pretrained[0].stat().st_mtime_ns
    assert not (workdir / "demo_summary.json").exists()

    proc = ws.run("nnunet_mim", "demo", "--quick", "--workdir", str(workdir), timeout=1500)
    assert pretrained[0].stat().st_mtime_ns == stamp  # the finished pretraining is kept, not redone
    assert "-tr HybridMIMPretrainer" not in proc.stdout and "build-data" not in proc.stdout
    summary = json.loads((workdir / "demo_summary.json").read_text())
    assert set(summary["overall"]) == {"scratch", "pretrained"}
    for arm in summary["overall"].values():
        assert 0.0 <= arm["dice"] <= 1.0
    assert (workdir / "demo_result.png").stat().st_size > 10_000
    assert "scratch Dice" in proc.stdout and "pretrained Dice" in proc.stdout and "[demo" in proc.stdout
