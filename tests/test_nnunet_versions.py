"""The supported nnunetv2 releases: registration for 2.6 / 2.7, and each older release end to end.

Fast tier: ``register`` / ``unregister`` on a scratch folder (marker, idempotence, refusal of foreign files, what the
registered module exports), and the 2.8 message. Nothing is ever written into this environment's nnunetv2.

End to end (e2e), per release in :data:`RELEASES`: ``scripts/nnunet_version_env.sh`` makes ``.venv-nnunet-<version>``
(cached between runs; it shares this environment's packages, only nnunetv2 is that release), our trainers are
registered into *its* nnunetv2, and its console scripts pretrain HybridMIM, finetune from the checkpoint and predict on
the tiny dataset (planned and preprocessed by the main environment: the preprocessed format is the same since 2.6);
then the registration is removed. 2.8 (this environment) is covered by the rest of the suite. The environment needs
a package registry once: without one these tests skip and say so; any other failure fails.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

from helpers import TINY_CONFIG, TINY_ID, TRAIN_BUDGET, Workspace, fold_folder
from nnunet_mim import ext_trainer_path
from nnunet_mim.nnunet import registration
from nnunet_mim.nnunet.registration import MARKER, MODULE_NAME, register, unregister

ROOT = Path(__file__).resolve().parents[1]
#: the older releases tested end to end (the last 2.6.x, and 2.7.0); 2.8.1 is the environment of the suite
RELEASES = ("2.6.4", "2.7.0")
#: one epoch of two iterations, one validation iteration
BUDGET = {**TRAIN_BUDGET, "nnUNet_mim_epochs": "1"}
#: what pip prints when it cannot reach the package registry
UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
               "Name or service not known", "Network is unreachable", "ProxyError", "ConnectTimeoutError",
               "Read timed out", "Connection refused")


# ---- registration on a scratch folder ----------------------------------------------------------------------------
def test_register_writes_one_marked_module_and_is_idempotent(tmp_path):
    first = register(tmp_path, force=True)
    path = tmp_path / f"{MODULE_NAME}.py"
    assert first.changed and Path(first.path) == path
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert path.read_text().splitlines()[0] == MARKER
    again = register(tmp_path, force=True)
    assert not again.changed and "already registered" in again.message
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / f"{MODULE_NAME}.cpython-311.pyc").write_bytes(b"")
    (tmp_path / "__pycache__" / "nnUNetTrainer.cpython-311.pyc").write_bytes(b"")
    gone = unregister(tmp_path)
    assert gone.changed and not path.exists()
    assert [p.name for p in (tmp_path / "__pycache__").iterdir()] == ["nnUNetTrainer.cpython-311.pyc"]
    assert not unregister(tmp_path).changed


def test_foreign_files_are_never_touched(tmp_path):
    path = tmp_path / f"{MODULE_NAME}.py"
    path.write_text("# someone else's trainers\n")
    with pytest.raises(FileExistsError, match="not written by nnunet_mim"):
        register(tmp_path, force=True)
    with pytest.raises(FileExistsError, match="left untouched"):
        unregister(tmp_path)
    assert path.read_text() == "# someone else's trainers\n"


def test_registered_module_re_exports_the_index_classes(tmp_path):
    import nnunet_mim.trainers.finetune as finetune
    import nnunet_mim.trainers.hybridmim as hybridmim

    register(tmp_path, force=True)
    spec = importlib.util.spec_from_file_location("registered_for_test", tmp_path / f"{MODULE_NAME}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.HybridMIMPretrainer is hybridmim.HybridMIMPretrainer  # one class, whichever road finds it
    assert module.nnUNetTrainerMIMFinetune is finetune.nnUNetTrainerMIMFinetune
    assert not hasattr(module, "nnUNetTrainer")  # nnU-Net's own classes stay nnU-Net's to find


@pytest.mark.skipif(registration.needs_registration(), reason="the installed nnunetv2 predates nnUNet_extTrainer")
def test_on_2_8_nnUNet_extTrainer_is_the_route(tmp_path):
    outcome = register(tmp_path)
    assert not outcome.changed and not list(tmp_path.iterdir())
    assert "export nnUNet_extTrainer=$(nnunet_mim ext-path)" in outcome.message and "--force" in outcome.message
    cli = subprocess.run([str(Workspace(tmp_path).bin / "nnunet_mim"), "register-trainers"], capture_output=True,
                         text=True, check=True)
    assert "nothing was registered" in cli.stdout
    assert not Path(registration.module_path()).exists()


# ---- each older release, end to end --------------------------------------------------------------------------------
def release_environment(version: str) -> Path:
    """``.venv-nnunet-<version>`` (made once, then reused); skips only when the package registry is unreachable."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "nnunet_version_env.sh"), version], capture_output=True,
                          text=True, cwd=ROOT, timeout=900)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        if any(sign in output for sign in UNREACHABLE):
            pytest.skip(f"nnunetv2 {version} could not be installed: the package registry is unreachable "
                        f"({output.strip().splitlines()[-1]})")
        pytest.fail(f"scripts/nnunet_version_env.sh {version} failed:\n{output[-6000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(params=RELEASES)
def release_workspace(request, tiny_workspace, tmp_path_factory):
    """The tiny dataset seen through another release's console scripts, with its own results folder and our
    trainers registered into that release's nnunetv2 (removed afterwards)."""
    version = request.param
    venv = release_environment(version)
    root = tmp_path_factory.mktemp(f"nnunet-{version}")
    (root / "raw").symlink_to(tiny_workspace.raw)
    (root / "preprocessed").symlink_to(tiny_workspace.preprocessed)
    (root / "results").mkdir()
    env = {**tiny_workspace.env, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results")}
    env.pop("nnUNet_extTrainer")  # 2.6 and 2.7 do not read it: registration is the only road
    ws = Workspace(root, env, bin=venv / "bin")
    found = ws.run("python", "-c", "import importlib.metadata as m, nnunetv2; print(m.version('nnunetv2'), "
                                   "nnunetv2.__file__)").stdout.split()
    assert found[0] == version and found[1].startswith(str(venv)), found
    registered = ws.run("nnunet_mim", "register-trainers").stdout  # (already registered: a run that was killed)
    assert "Registered" in registered or "already registered" in registered, registered
    yield ws, version
    assert "Unregistered" in ws.run("nnunet_mim", "unregister-trainers").stdout


@pytest.mark.e2e
def test_pretrain_finetune_predict_on_older_release(release_workspace):
    ws, version = release_workspace
    ws.run("nnUNetv2_train", str(TINY_ID), TINY_CONFIG, "all", "-tr", "HybridMIMPretrainer", "-device", "cpu",
           **BUDGET)
    checkpoint = fold_folder(ws, "HybridMIMPretrainer", TINY_CONFIG) / "checkpoint_final.pth"
    assert checkpoint.is_file() and (checkpoint.parent / "progress.png").is_file()

    out = ws.run("nnUNetv2_train", str(TINY_ID), TINY_CONFIG, "0", "-tr", "nnUNetTrainerMIMFinetune", "-device", "cpu",
                 "-pretrained_weights", str(checkpoint), **BUDGET).stdout
    assert "tensors transfer, 0 missing, 0 with another shape" in out and "pretraining-only (dropped" in out
    finetuned = fold_folder(ws, "nnUNetTrainerMIMFinetune", TINY_CONFIG, 0)
    assert (finetuned / "checkpoint_final.pth").is_file() and (finetuned / "validation" / "summary.json").is_file()

    images = ws.raw / f"Dataset{TINY_ID}_Tiny" / "imagesTs"
    ws.run("nnUNetv2_predict", "-i", str(images), "-o", str(ws.root / "predictions"), "-d", str(TINY_ID), "-c",
           TINY_CONFIG, "-f", "0", "-tr", "nnUNetTrainerMIMFinetune", "-device", "cpu", "-npp", "1", "-nps", "1")
    cases = sorted(p.name.replace("_0000.nii.gz", ".nii.gz") for p in images.glob("*_0000.nii.gz"))
    assert cases and sorted(p.name for p in (ws.root / "predictions").glob("*.nii.gz")) == cases, version


@pytest.mark.e2e
def test_both_roads_on_2_8_lead_to_one_class(tmp_path):
    """Registered (``--force``) and ``nnUNet_extTrainer`` at once on 2.8: nnU-Net finds one class, ours; its own
    trainers (searched past our module) are still found."""
    venv = release_environment("2.8.1")
    ws = Workspace(tmp_path, {**os.environ, "nnUNet_extTrainer": ext_trainer_path(), "PYTHONWARNINGS": "ignore"},
                   bin=venv / "bin")
    assert "Registered" in ws.run("nnunet_mim", "register-trainers", "--force").stdout
    try:
        code = ("import sys; from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f;"
                "import nnunet_mim.trainers.hybridmim as h;"
                "assert f('HybridMIMPretrainer') is h.HybridMIMPretrainer;"
                "assert f('nnUNetTrainer_5epochs').__module__.startswith('nnunetv2.');"
                "assert 'nnunetv2.training.nnUNetTrainer.nnunet_mim_trainers' in sys.modules; print('one class')")
        assert "one class" in ws.run("python", "-c", code).stdout
    finally:
        ws.run("nnunet_mim", "unregister-trainers")
