"""The one-command demo: does HybridMIM pretraining help a segmentation on real scans, on this machine?

    nnunet_mim demo                 # ~30 min on 2 CPU cores
    nnunet_mim demo --quick         # a few minutes: the plumbing only (CI)

Every step is a stock nnU-Net command or one of ours, run as a subprocess exactly as a user would type it:

1. build the data: AAL deep grey matter on Colin27 (or, without mricron-data, WM/GM on MNI152), plus an
   unlabeled pool of other real T1 volumes (``nnunet_mim build-data``);
2. ``nnUNetv2_plan_and_preprocess`` on the labeled dataset, and a small CPU configuration inheriting
   3d_fullres (``nnunet_mim add-config small``);
3. ``nnunet_mim import-unlabeled``: the pool, preprocessed with the target's plans;
4. ``nnUNetv2_train <pool> <cfg> all -tr HybridMIMPretrainer``;
5. ``nnUNetv2_train <target> <cfg> 0 -tr nnUNetTrainerMIMScratchAdamW`` and
   ``... -tr nnUNetTrainerMIMFinetuneAdamW -pretrained_weights <pretrained>``: same recipe (AdamW, for short
   budgets), same budget;
6. ``nnUNetv2_predict`` on the held-out test cases with both models;
7. ``nnunet_mim evaluate``: Dice, HD95, ASSD; a table and a picture (a slice with the ground truth and both
   predictions).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
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


class Demo:
    def __init__(self, settings: DemoSettings):
        self.s = settings
        self.root = Path(settings.workdir).resolve()
        self.t0 = time.time()
        self.log = None

    # ---- plumbing ----------------------------------------------------------------------------------
    @property
    def env(self) -> dict:
        from nnunet_mim import ext_trainer_path

        return {**os.environ, "nnUNet_raw": str(self.root / "nnUNet_raw"),
                "nnUNet_preprocessed": str(self.root / "nnUNet_preprocessed"),
                "nnUNet_results": str(self.root / "nnUNet_results"), "nnUNet_extTrainer": ext_trainer_path(),
                "nnUNet_def_n_proc": str(self.s.processes), "nnUNet_compile": "false", "MPLBACKEND": "agg"}

    def say(self, text: str) -> None:
        line = f"[demo {time.time() - self.t0:7.0f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")

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
            raise RuntimeError(f"{cmd[0]} failed (exit {proc.returncode}); see {self.root / 'demo_log.txt'}:\n"
                               + "".join(output[-30:]))
        return "".join(output)

    # ---- the story ---------------------------------------------------------------------------------
    def main(self) -> dict:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "demo_log.txt", "a") as self.log:
            self.say(f"settings: {asdict(self.s)}")
            target = self.build_data()
            pretrained = self.pretrain(target)
            runs = {"scratch": self.finetune(target, self.s.scratch_trainer),
                    "pretrained": self.finetune(target, self.s.finetune_trainer, pretrained)}
            summary = self.evaluate(target, runs)
            self.say(f"done in {time.time() - self.t0:.0f} s. Outputs in {self.root}")
        return summary

    def build_data(self) -> str:
        from nnunet_mim.apps.data.sources import mricron_available

        s = self.s
        raw = self.root / "nnUNet_raw"
        if mricron_available():
            kind, name, exclude = "deepgm", "DeepGM", "colin27"
        else:
            self.say("mricron-data not found (bash scripts/install_data_sources.sh installs it): using the MNI152 "
                     "WM/GM dataset from nilearn instead of AAL deep grey matter on Colin27")
            kind, name, exclude = "mni-tissue", "MNITissue", "none"
        target = f"Dataset{s.dataset_id:03d}_{name}"
        if not (raw / target / "dataset.json").exists():
            self.run("nnunet_mim", "build-data", kind, "-d", str(s.dataset_id), "-n", name, "--num-train",
                     str(s.num_train), "--num-test", str(s.num_test), "--size", s.size, "--seed", str(s.seed),
                     "--raw", str(raw))
        pool = self.root / "unlabeled_pool"
        if not pool.exists():
            self.run("nnunet_mim", "build-data", "pool", "-o", str(pool), "--num-cases", str(s.pool_cases),
                     "--size", s.size, "--seed", str(s.seed + 1000), "--exclude-anatomy",
                     *([exclude] if exclude != "none" else []))
        if not (self.root / "nnUNet_preprocessed" / target / "nnUNetPlans.json").exists():
            self.run("nnUNetv2_plan_and_preprocess", "-d", str(s.dataset_id), "-c", "3d_fullres", "-np",
                     str(s.processes), "--verify_dataset_integrity")
        self.run("nnunet_mim", "add-config", "small", "-d", str(s.dataset_id), "-n", s.configuration, "--stages",
                 str(s.stages), "--features", *map(str, s.features), *(("--patch", *map(str, s.patch))
                                                                       if s.patch else ()))
        pool_name = f"Dataset{s.pool_id:03d}_{name}Pool"
        if not (self.root / "nnUNet_preprocessed" / pool_name).exists():
            self.run("nnunet_mim", "import-unlabeled", "-i", str(pool), "-t", str(s.dataset_id), "-d",
                     str(s.pool_id), "-n", f"{name}Pool", "-c", "3d_fullres", "-np", str(s.processes))
        self.pool_name = pool_name
        return target

    def budget(self, epochs: int, iters: int) -> dict:
        return {"nnUNet_mim_epochs": str(epochs), "nnUNet_mim_iters": str(iters),
                "nnUNet_mim_val_iters": str(self.s.val_iters), "nnUNet_n_proc_DA": str(self.s.processes)}

    def results_folder(self, dataset: str, trainer: str) -> Path:
        return self.root / "nnUNet_results" / dataset / f"{trainer}__nnUNetPlans__{self.s.configuration}"

    def pretrain(self, target: str) -> Path:
        ck = self.results_folder(self.pool_name, "HybridMIMPretrainer") / "fold_all" / "checkpoint_final.pth"
        if not ck.exists():
            self.run("nnUNetv2_train", str(self.s.pool_id), self.s.configuration, "all", "-tr",
                     "HybridMIMPretrainer", "-device", "cpu",
                     **self.budget(self.s.pretrain_epochs, self.s.pretrain_iters))
        return ck

    def finetune(self, target: str, trainer: str, pretrained: Path | None = None) -> Path:
        folder = self.results_folder(target, trainer)
        if not (folder / "fold_0" / "checkpoint_final.pth").exists():
            self.run("nnUNetv2_train", str(self.s.dataset_id), self.s.configuration, "0", "-tr", trainer,
                     "-device", "cpu", *(("-pretrained_weights", str(pretrained)) if pretrained else ()),
                     **self.budget(self.s.finetune_epochs, self.s.finetune_iters))
        out = self.root / "predictions" / trainer
        self.run("nnUNetv2_predict", "-i", str(self.root / "nnUNet_raw" / target / "imagesTs"), "-o", str(out),
                 "-d", str(self.s.dataset_id), "-c", self.s.configuration, "-f", "0", "-tr", trainer, "-device",
                 "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar")
        return out

    def evaluate(self, target: str, runs: dict[str, Path]) -> dict:
        from nnunet_mim.apps.evaluation import evaluate_folders

        ref = self.root / "nnUNet_raw" / target / "labelsTs"
        labels = json.loads((self.root / "nnUNet_raw" / target / "dataset.json").read_text())["labels"]
        results = {}
        for name, folder in runs.items():
            self.say(f"evaluating {name}")
            results[name], table = evaluate_folders(folder, ref, labels, self.root / f"evaluation_{name}.json",
                                                    verbose=False)
            self.log.write(f"{name}\n{table}\n")
        table = comparison_table(results)
        picture = save_comparison_picture(self.root / "demo_result.png", self.root / "nnUNet_raw" / target,
                                          runs)
        summary = {"settings": asdict(self.s), "dataset": target, "overall": {k: v["overall"] for k, v in
                                                                              results.items()},
                   "per_class_dice": {k: {c: e["dice"] for c, e in v["per_class"].items()}
                                      for k, v in results.items()}, "picture": str(picture),
                   "wall_time_s": round(time.time() - self.t0)}
        (self.root / "demo_summary.json").write_text(json.dumps(summary, indent=1))
        (self.root / "demo_table.txt").write_text(table + "\n")
        print("\n" + table + "\n", flush=True)
        self.say(f"picture: {picture}")
        return summary


def comparison_table(results: dict[str, dict]) -> str:
    """Scratch vs pretrained: Dice / HD95 / ASSD per class and overall."""
    names = list(results)
    classes = list(results[names[0]]["per_class"])
    header = f"{'class':<20}" + "".join(f"{n + ' ' + m:>22}" for m in ("Dice", "HD95 mm", "ASSD mm") for n in names)
    lines = [header, "-" * len(header)]

    def fmt(v, digits):
        return "n/a" if v is None else f"{v:.{digits}f}"

    for c in classes + ["mean"]:
        row = f"{c[:19]:<20}"
        for m, d in (("dice", 3), ("hd95", 2), ("assd", 2)):
            for n in names:
                src = results[n]["overall"] if c == "mean" else results[n]["per_class"][c]
                row += f"{fmt(src[m], d):>22}"
        lines.append(row)
    return "\n".join(lines)


def save_comparison_picture(path: Path, dataset_folder: Path, runs: dict[str, Path]) -> Path:
    """One axial slice of the first test case: image, ground truth and each run's prediction as overlays."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt
    import numpy as np
    import SimpleITK as sitk

    ref_file = sorted((dataset_folder / "labelsTs").glob("*.nii.gz"))[0]
    case = ref_file.name[:-len(".nii.gz")]
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset_folder / "imagesTs" / f"{case}_0000.nii.gz")))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ref_file)))
    preds = {n: sitk.GetArrayFromImage(sitk.ReadImage(str(folder / ref_file.name))) for n, folder in runs.items()}
    z = int(np.argmax((ref > 0).sum((1, 2))))
    panels = [("image", None), ("ground truth", ref)] + [(n, p) for n, p in preds.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4))
    lo, hi = np.percentile(image, [1, 99])
    n_classes = int(max(ref.max(), *(p.max() for p in preds.values())))
    for ax, (title, seg) in zip(axes, panels):
        ax.imshow(image[z], cmap="gray", vmin=lo, vmax=hi)
        if seg is not None:
            ax.imshow(np.ma.masked_equal(seg[z], 0), cmap="tab20", vmin=1, vmax=max(n_classes, 2), alpha=0.55,
                      interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    names = {int(v): k for k, v in json.loads((dataset_folder / "dataset.json").read_text())["labels"].items()
             if isinstance(v, int) and v > 0}
    cmap = plt.get_cmap("tab20")
    handles = [matplotlib.patches.Patch(color=cmap((v - 1) / max(n_classes - 1, 1)), label=name)
               for v, name in sorted(names.items())]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(f"{case}, slice {z}")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _run(args) -> None:
    settings = QUICK if args.quick else DemoSettings()
    overrides = {k: v for k, v in (("workdir", args.workdir), ("pretrain_epochs", args.pretrain_epochs),
                                   ("finetune_epochs", args.finetune_epochs)) if v is not None}
    Demo(replace(settings, **overrides)).main()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="plan, pretrain, finetune, predict and evaluate on the embedded data",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny data and budget: checks the plumbing in minutes")
    p.add_argument("--workdir", default=None, help="output folder (default demo_output[_quick])")
    p.add_argument("--pretrain-epochs", type=int, default=None)
    p.add_argument("--finetune-epochs", type=int, default=None)
    p.set_defaults(func=_run)
