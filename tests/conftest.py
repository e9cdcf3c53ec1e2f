"""Shared fixtures: an nnU-Net workspace on tiny real data, and a runner for the real console scripts."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent  # console scripts of the environment the tests run in


@dataclass
class Workspace:
    root: Path
    env: dict = field(default_factory=dict)

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "preprocessed"

    @property
    def results(self) -> Path:
        return self.root / "results"

    def run(self, *cmd: str, check: bool = True, timeout: int = 900, **extra_env) -> subprocess.CompletedProcess:
        """Run a console script (nnUNetv2_*, nnunet_mim) like a user would; show its output if it fails."""
        exe = BIN / cmd[0]
        argv = [str(exe) if exe.exists() else cmd[0], *cmd[1:]]
        env = {**self.env, **{k: str(v) for k, v in extra_env.items()}}
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout (tail) ---\n"
                        f"{proc.stdout[-6000:]}\n--- stderr (tail) ---\n{proc.stderr[-6000:]}")
        return proc

    def popen(self, *cmd: str, **extra_env) -> subprocess.Popen:
        env = {**self.env, **{k: str(v) for k, v in extra_env.items()}}
        return subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, text=True, start_new_session=True, cwd=self.root)


def make_workspace(root: Path) -> Workspace:
    ws = Workspace(root)
    for p in (ws.raw, ws.preprocessed, ws.results):
        p.mkdir(parents=True, exist_ok=True)
    ext = subprocess.run([str(BIN / "nnunet_mim"), "ext-path"], capture_output=True, text=True, check=True)
    ws.env = {**os.environ, "nnUNet_raw": str(ws.raw), "nnUNet_preprocessed": str(ws.preprocessed),
              "nnUNet_results": str(ws.results), "nnUNet_extTrainer": ext.stdout.strip(),
              "nnUNet_def_n_proc": "1", "nnUNet_compile": "false", "OMP_NUM_THREADS": "2",
              "MPLBACKEND": "agg", "PYTHONWARNINGS": "ignore"}
    ws.env.pop("nnUNet_n_proc_DA", None)
    return ws


TINY_ID = 601
TINY_CONFIG = "3d_tiny"
TRAIN_BUDGET = {"nnUNet_n_proc_DA": "0", "nnUNet_mim_epochs": "2", "nnUNet_mim_iters": "2",
                "nnUNet_mim_val_iters": "1"}


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory) -> Workspace:
    """Tiny MNI152 tissue dataset (real anatomy, nilearn), planned and preprocessed, plus a tiny configuration
    inheriting 3d_fullres (4 stages, 8..64 features, patch 16x32x32)."""
    ws = make_workspace(tmp_path_factory.mktemp("nnunet"))
    ws.run("nnunet_mim", "build-data", "mni-tissue", "-d", str(TINY_ID), "-n", "Tiny", "--num-train", "6",
           "--num-test", "2", "--size", "tiny", "--raw", str(ws.raw))
    ws.run("nnUNetv2_plan_and_preprocess", "-d", str(TINY_ID), "-c", "3d_fullres", "-np", "1",
           "--verify_dataset_integrity")
    ws.run("nnunet_mim", "add-config", "small", "-d", str(TINY_ID), "-n", TINY_CONFIG, "--stages", "4",
           "--features", "8", "64", "--patch", "16", "32", "32")
    return ws


TINY_DATASET = f"Dataset{TINY_ID}_Tiny"
TINY_SAC_CONFIG = "3d_sac_vit_tiny"
#: SAC-ViT-S shrunk for CPU tests (``nnunet_mim add-config sac-vit`` arguments)
TINY_SAC_ARCH = ["--embed-dim", "48", "--depth", "4", "--num-heads", "3", "--decoder-channels", "4", "8", "8", "16",
                 "16", "16"]


@pytest.fixture(scope="session")
def sac_vit_workspace(tiny_workspace) -> Workspace:
    """The tiny workspace plus a tiny SAC-ViT configuration ``3d_sac_vit_tiny`` (patch 32^3 -> 2x2x2 tokens)."""
    out = tiny_workspace.run("nnunet_mim", "add-config", "sac-vit", "-d", str(TINY_ID), "-n", TINY_SAC_CONFIG,
                             "--size", "S", "--patch", "32", "32", "32", *TINY_SAC_ARCH).stdout
    assert "DA 0" in out and "token grid [2, 2, 2]" in out, out
    return tiny_workspace


def fold_folder(ws: Workspace, trainer: str, configuration: str, fold: str | int = "all") -> Path:
    """``$nnUNet_results/<tiny dataset>/<trainer>__nnUNetPlans__<configuration>/fold_<fold>``."""
    return ws.results / TINY_DATASET / f"{trainer}__nnUNetPlans__{configuration}" / f"fold_{fold}"


# ---- tiers: `pytest -m "not e2e"` runs the fast tier (toy tensors, no nnU-Net workspace) in about a minute
E2E_FIXTURES = {"tiny_workspace", "sac_vit_workspace"}
E2E_MODULES = {"test_demo"}


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end to end through the real console scripts on tiny data (slow)")


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if E2E_FIXTURES & set(item.fixturenames) or module in E2E_MODULES or module.startswith("test_e2e"):
            item.add_marker(pytest.mark.e2e)
