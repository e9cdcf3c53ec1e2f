"""Fixtures (the tiny nnU-Net workspaces) and the test tiers. Shared helpers and constants are in helpers.py."""
from __future__ import annotations

import os

import pytest

from helpers import (TINY_CONFIG, TINY_ID, TINY_SAC_ARCH, TINY_SAC_CONFIG, Workspace, make_workspace,
                     threads_per_test_process)


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


@pytest.fixture(scope="session")
def sac_vit_workspace(tiny_workspace) -> Workspace:
    """The tiny workspace plus a tiny SAC-ViT configuration ``3d_sac_vit_tiny`` (patch 32^3 -> 2x2x2 tokens)."""
    out = tiny_workspace.run("nnunet_mim", "add-config", "sac-vit", "-d", str(TINY_ID), "-n", TINY_SAC_CONFIG,
                             "--size", "S", "--patch", "32", "32", "32", *TINY_SAC_ARCH).stdout
    assert "DA 0" in out and "token grid [2, 2, 2]" in out, out
    return tiny_workspace


# ---- tiers: `pytest -m "not e2e"` runs the fast tier (toy tensors, no nnU-Net workspace) in about a minute
E2E_FIXTURES = {"tiny_workspace", "sac_vit_workspace"}
E2E_MODULES = {"test_demo"}


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end to end through the real console scripts on tiny data (slow)")
    if "PYTEST_XDIST_WORKER" in os.environ:  # a worker of `pytest -n N` (run_tests.sh): its share of the cores
        threads = threads_per_test_process()
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for every process it starts
        import torch

        torch.set_num_threads(threads)


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if E2E_FIXTURES & set(item.fixturenames) or module in E2E_MODULES or module.startswith("test_e2e"):
            item.add_marker(pytest.mark.e2e)
