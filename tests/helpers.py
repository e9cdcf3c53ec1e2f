"""Shared test helpers (imported as ``from helpers import ...``): an nnU-Net workspace on tiny real data, a runner for
the real console scripts, the tiny dataset's constants, and the results-folder rule. Fixtures live in conftest.py."""
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
    bin: Path = BIN  # where the console scripts come from (another environment: tests/test_nnunet_versions.py)

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
        exe = self.bin / cmd[0]
        argv = [str(exe) if exe.exists() else cmd[0], *cmd[1:]]
        env = {**self.env, **{k: str(v) for k, v in extra_env.items()}}
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout (tail) ---\n"
                        f"{proc.stdout[-6000:]}\n--- stderr (tail) ---\n{proc.stderr[-6000:]}")
        return proc

    def popen(self, *cmd: str, **extra_env) -> subprocess.Popen:
        env = {**self.env, **{k: str(v) for k, v in extra_env.items()}}
        return subprocess.Popen([str(self.bin / cmd[0]), *cmd[1:]], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, text=True, start_new_session=True, cwd=self.root)


def threads_per_test_process() -> int:
    """CPU threads for each test process: run_tests.sh runs one pytest-xdist worker per core, and every worker (and the
    console scripts it starts) gets its share of the cores, so that workers do not oversubscribe them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, len(os.sched_getaffinity(0)) // workers)


def make_workspace(root: Path) -> Workspace:
    ws = Workspace(root)
    for p in (ws.raw, ws.preprocessed, ws.results):
        p.mkdir(parents=True, exist_ok=True)
    ext = subprocess.run([str(BIN / "nnunet_mim"), "ext-path"], capture_output=True, text=True, check=True)
    ws.env = {**os.environ, "nnUNet_raw": str(ws.raw), "nnUNet_preprocessed": str(ws.preprocessed),
              "nnUNet_results": str(ws.results), "nnUNet_extTrainer": ext.stdout.strip(),
              "nnUNet_def_n_proc": "1", "nnUNet_compile": "false", "OMP_NUM_THREADS": str(threads_per_test_process()),
              "MPLBACKEND": "agg", "PYTHONWARNINGS": "ignore"}
    ws.env.pop("nnUNet_n_proc_DA", None)
    return ws


TINY_ID = 601
TINY_CONFIG = "3d_tiny"
TRAIN_BUDGET = {"nnUNet_n_proc_DA": "0", "nnUNet_mim_epochs": "2", "nnUNet_mim_iters": "2",
                "nnUNet_mim_val_iters": "1"}


TINY_DATASET = f"Dataset{TINY_ID}_Tiny"
TINY_SAC_CONFIG = "3d_sac_vit_tiny"
#: SAC-ViT-S shrunk for CPU tests (``nnunet_mim add-config sac-vit`` arguments)
TINY_SAC_ARCH = ["--embed-dim", "48", "--depth", "4", "--num-heads", "3", "--decoder-channels", "4", "8", "8", "16",
                 "16", "16"]


#: a SAC-ViT small enough for toy-tensor tests (constructor arguments of SACViTSeg / the pretraining networks)
TINY_VIT = dict(embed_dim=48, depth=4, num_heads=3, decoder_channels=(4, 8, 8, 16, 16, 16))


def fold_folder(ws: Workspace, trainer: str, configuration: str, fold: str | int = "all",
                plans: str = "nnUNetPlans", dataset: str = TINY_DATASET) -> Path:
    """``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>/fold_<fold>`` (nnU-Net's folder rule)."""
    return ws.results / dataset / f"{trainer}__{plans}__{configuration}" / f"fold_{fold}"
