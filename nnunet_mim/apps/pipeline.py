"""Shared steps of the demo and the study: run console scripts as a user would, and build the embedded data.

:class:`Pipeline` runs each step as a subprocess (a stock nnU-Net command or one of ours), echoes its progress lines,
keeps its full output in a log, and skips steps whose outputs exist, so that a killed run resumes where it stopped.
:func:`build_demo_data` builds, plans and preprocesses the embedded real-scan datasets (documentation/data.md).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PROGRESS = re.compile(r"(Epoch \d+$|train_loss|val_loss|Pseudo dice|Epoch time|Mean Validation Dice|"
                      r"Pre-flight check|HybridMIM on|Preprocessing|done with|Error|error|Traceback)")


@dataclass(frozen=True)
class DemoSettings:
    workdir: str = "demo_output"
    dataset_id: int = 501
    pool_id: int = 511
    num_train: int = 20
    num_test: int = 10
    pool_cases: int = 40
    size: str = "demo"
    configuration: str = "3d_small"
    stages: int = 4
    features: tuple[int, int] = (16, 128)
    patch: tuple[int, int, int] | None = None  # None: the parent 3d_fullres patch
    scratch_trainer: str = "nnUNetTrainerMIMScratchAdamW"
    finetune_trainer: str = "nnUNetTrainerMIMFinetuneAdamW"
    pretrain_epochs: int = 24
    pretrain_iters: int = 25
    finetune_epochs: int = 30
    finetune_iters: int = 25
    val_iters: int = 5
    seed: int = 0
    processes: int = 2


QUICK = DemoSettings(workdir="demo_output_quick", num_train=5, num_test=2, pool_cases=3, size="tiny",
                     features=(8, 64), patch=(16, 32, 32), pretrain_epochs=1, pretrain_iters=2, finetune_epochs=1,
                     finetune_iters=2, val_iters=1, processes=1)


class Pipeline:
    """Console scripts in an nnU-Net workspace ``root`` (``nnUNet_raw``, ``nnUNet_preprocessed`` and
    ``nnUNet_results`` below it unless ``folders`` names others)."""

    def __init__(self, root: str | Path, tag: str, log_name: str, processes: int = 2,
                 folders: dict[str, str] | None = None):
        self.root = Path(root).resolve()
        self.tag = tag
        self.log_path = self.root / log_name
        self.processes = processes
        self.folders = {"nnUNet_raw": str(self.root / "nnUNet_raw"),
                        "nnUNet_preprocessed": str(self.root / "nnUNet_preprocessed"),
                        "nnUNet_results": str(self.root / "nnUNet_results"), **(folders or {})}
        self.t0 = time.time()
        self.log = None

    def __enter__(self) -> "Pipeline":
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "a")
        return self

    def __exit__(self, *exc) -> None:
        self.log.close()

    @property
    def env(self) -> dict:
        from nnunet_mim import ext_trainer_path

        return {**os.environ, **self.folders, "nnUNet_extTrainer": ext_trainer_path(),
                "nnUNet_def_n_proc": str(self.processes), "nnUNet_compile": "false", "MPLBACKEND": "agg"}

    @property
    def raw(self) -> Path:
        return Path(self.folders["nnUNet_raw"])

    @property
    def preprocessed(self) -> Path:
        return Path(self.folders["nnUNet_preprocessed"])

    @property
    def results(self) -> Path:
        return Path(self.folders["nnUNet_results"])

    def say(self, text: str) -> None:
        line = f"[{self.tag} {time.time() - self.t0:7.0f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def run(self, *cmd: str, **extra_env) -> str:
        """Run a console script of this environment, echo its progress lines, keep its full output in the log."""
        self.say("$ " + " ".join(cmd) + (" (" + " ".join(f"{k}={v}" for k, v in extra_env.items()) + ")"
                                         if extra_env else ""))
        exe = Path(sys.executable).parent / cmd[0]
        proc = subprocess.Popen([str(exe) if exe.exists() else cmd[0], *cmd[1:]], env={**self.env, **extra_env},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=self.root)
        output = []
        for line in proc.stdout:
            output.append(line)
            self.log.write(line)
            if PROGRESS.search(line):
                print("    " + line.rstrip()[-150:], flush=True)
        if proc.wait() != 0:
            self.log.flush()
            raise RuntimeError(f"{cmd[0]} failed (exit {proc.returncode}); see {self.log_path}:\n"
                               + "".join(output[-30:]))
        return "".join(output)

    def budget(self, epochs: int, iters: int, val_iters: int, seed: int | None = None) -> dict:
        """Environment of a shortened (and optionally seeded) training run."""
        env = {"nnUNet_mim_epochs": str(epochs), "nnUNet_mim_iters": str(iters),
               "nnUNet_mim_val_iters": str(val_iters), "nnUNet_n_proc_DA": str(self.processes)}
        return env if seed is None else {**env, "nnUNet_mim_seed": str(seed)}

    def results_folder(self, dataset: str, trainer: str, configuration: str, plans: str = "nnUNetPlans",
                       results: str | Path | None = None) -> Path:
        """nnU-Net's output folder of a training (under ``results``, an ``nnUNet_results``; default this workspace's)."""
        return Path(results or self.results) / dataset / f"{trainer}__{plans}__{configuration}"

    def train(self, dataset: str | int, configuration: str, fold: str | int, trainer: str, results: Path,
              weights: str | Path | None = None, **env) -> Path:
        """``nnUNetv2_train``, skipped when ``checkpoint_final.pth`` exists and continued with ``--c`` when only
        ``checkpoint_latest.pth`` does (a killed run resumes). Returns the final checkpoint."""
        folder = results / f"fold_{fold}"
        final = folder / "checkpoint_final.pth"
        if final.exists():
            return final
        resume = (folder / "checkpoint_latest.pth").exists()
        self.run("nnUNetv2_train", str(dataset), configuration, str(fold), "-tr", trainer, "-device", "cpu",
                 *(("--c",) if resume else ("-pretrained_weights", str(weights)) if weights else ()), **env)
        return final

    def predict(self, dataset: str | int, name: str, configuration: str, fold: str | int, trainer: str,
                out: Path, **env) -> Path:
        """``nnUNetv2_predict`` of the dataset's ``imagesTs`` into ``out``, skipped when a previous call finished it."""
        done = out / ".prediction_complete"
        if not done.exists():
            self.run("nnUNetv2_predict", "-i", str(self.raw / name / "imagesTs"), "-o", str(out), "-d", str(dataset),
                     "-c", configuration, "-f", str(fold), "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1",
                     "--disable_progress_bar", **env)
            done.touch()
        return out


def dataset_name(preprocessed: Path, dataset: str | int) -> str:
    """``DatasetXXX_Name`` of a dataset given by id or name, from the preprocessed folder (it must be planned)."""
    dataset = str(dataset)
    matches = [d.name for d in sorted(Path(preprocessed).iterdir()) if d.is_dir() and (
        d.name == dataset or (dataset.isdigit() and d.name.startswith(f"Dataset{int(dataset):03d}_")))]
    if len(matches) != 1:
        raise FileNotFoundError(f"dataset {dataset} is not (or not uniquely) in {preprocessed}: plan and preprocess "
                                f"it first (nnUNetv2_plan_and_preprocess -d {dataset})")
    return matches[0]


def build_demo_data(p: Pipeline, s: DemoSettings) -> tuple[str, str]:
    """The labelled target and the unlabeled pool of the demo, planned and preprocessed; ``(target, pool)`` names.
    Every step is skipped when its output exists."""
    from nnunet_mim.apps.data.sources import mricron_available

    raw = p.raw
    if mricron_available():
        kind, name, exclude = "deepgm", "DeepGM", "colin27"
    else:
        p.say("mricron-data not found (bash scripts/install_data_sources.sh installs it): using the MNI152 "
              "WM/GM dataset from nilearn instead of AAL deep grey matter on Colin27")
        kind, name, exclude = "mni-tissue", "MNITissue", "none"
    target = f"Dataset{s.dataset_id:03d}_{name}"
    if not (raw / target / "dataset.json").exists():
        p.run("nnunet_mim", "build-data", kind, "-d", str(s.dataset_id), "-n", name, "--num-train",
              str(s.num_train), "--num-test", str(s.num_test), "--size", s.size, "--seed", str(s.seed),
              "--raw", str(raw))
    pool = p.root / "unlabeled_pool"
    if not pool.exists():
        p.run("nnunet_mim", "build-data", "pool", "-o", str(pool), "--num-cases", str(s.pool_cases),
              "--size", s.size, "--seed", str(s.seed + 1000), "--exclude-anatomy",
              *([exclude] if exclude != "none" else []))
    if not (p.preprocessed / target / "nnUNetPlans.json").exists():
        p.run("nnUNetv2_plan_and_preprocess", "-d", str(s.dataset_id), "-c", "3d_fullres", "-np",
              str(s.processes), "--verify_dataset_integrity")
    if s.configuration not in json.loads((p.preprocessed / target / "nnUNetPlans.json").read_text())["configurations"]:
        p.run("nnunet_mim", "add-config", "small", "-d", str(s.dataset_id), "-n", s.configuration, "--stages",
              str(s.stages), "--features", *map(str, s.features), *(("--patch", *map(str, s.patch))
                                                                     if s.patch else ()))
    pool_name = f"Dataset{s.pool_id:03d}_{name}Pool"
    if not (p.preprocessed / pool_name).exists():
        p.run("nnunet_mim", "import-unlabeled", "-i", str(pool), "-t", str(s.dataset_id), "-d",
              str(s.pool_id), "-n", f"{name}Pool", "-c", "3d_fullres", "-np", str(s.processes))
    return target, pool_name
