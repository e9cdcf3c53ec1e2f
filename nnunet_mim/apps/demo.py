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
import time
from dataclasses import asdict, replace
from pathlib import Path

from nnunet_mim.apps.pipeline import QUICK, DemoSettings, Pipeline, build_demo_data

class Demo:
    """The README's main job: every step resumes (finished steps are skipped, a killed training continues with --c)."""

    def __init__(self, settings: DemoSettings):
        self.s = settings
        self.p = Pipeline(settings.workdir, "demo", "demo_log.txt", settings.processes)
        self.root = self.p.root

    def main(self) -> dict:
        with self.p:
            self.p.say(f"settings: {asdict(self.s)}")
            target, pool = build_demo_data(self.p, self.s)
            pretrained = self.pretrain(pool)
            runs = {"scratch": self.finetune(target, self.s.scratch_trainer),
                    "pretrained": self.finetune(target, self.s.finetune_trainer, pretrained)}
            summary = self.evaluate(target, runs)
            self.p.say(f"done in {time.time() - self.p.t0:.0f} s. Outputs in {self.root}")
        return summary

    def pretrain(self, pool: str) -> Path:
        s = self.s
        return self.p.train(s.pool_id, s.configuration, "all", "HybridMIMPretrainer",
                            self.p.results_folder(pool, "HybridMIMPretrainer", s.configuration),
                            **self.p.budget(s.pretrain_epochs, s.pretrain_iters, s.val_iters, s.seed))

    def finetune(self, target: str, trainer: str, pretrained: Path | None = None) -> Path:
        s = self.s
        self.p.train(s.dataset_id, s.configuration, 0, trainer, self.p.results_folder(target, trainer, s.configuration),
                     pretrained, **self.p.budget(s.finetune_epochs, s.finetune_iters, s.val_iters, s.seed))
        return self.p.predict(s.dataset_id, target, s.configuration, 0, trainer, self.root / "predictions" / trainer)

    def evaluate(self, target: str, runs: dict[str, Path]) -> dict:
        from nnunet_mim.apps.evaluation import evaluate_folders

        ref = self.p.raw / target / "labelsTs"
        labels = json.loads((self.p.raw / target / "dataset.json").read_text())["labels"]
        results = {}
        for name, folder in runs.items():
            self.p.say(f"evaluating {name}")
            results[name], table = evaluate_folders(folder, ref, labels, self.root / f"evaluation_{name}.json",
                                                    verbose=False)
            self.p.log.write(f"{name}\n{table}\n")
        table = comparison_table(results)
        picture = save_comparison_picture(self.root / "demo_result.png", self.p.raw / target, runs)
        summary = {"settings": asdict(self.s), "dataset": target, "overall": {k: v["overall"] for k, v in
                                                                              results.items()},
                   "per_class_dice": {k: {c: e["dice"] for c, e in v["per_class"].items()}
                                      for k, v in results.items()}, "picture": str(picture),
                   "wall_time_s": round(time.time() - self.p.t0)}
        (self.root / "demo_summary.json").write_text(json.dumps(summary, indent=1))
        (self.root / "demo_table.txt").write_text(table + "\n")
        print("\n" + table + "\n", flush=True)
        self.p.say(f"picture: {picture}")
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
