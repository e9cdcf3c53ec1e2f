"""The label-efficiency study: finetuning at label fractions, from scratch and from pretrained weights.

    nnunet_mim study label-efficiency                       # reuses demo_output/ (data, plans, pretraining)
    nnunet_mim study label-efficiency --fractions 0.2 1.0 --epochs 10

HybridMIM (Fig. 4) and PUMIT (Table 4) ask whether pretraining helps when labels are scarce. For each
label fraction this runs the same finetuning recipe twice (``nnUNetTrainerMIMScratchAdamW`` and
``nnUNetTrainerMIMFinetuneAdamW -pretrained_weights``) with the same budget, predicts the held-out test cases and
evaluates them. Label fractions are extra folds appended to nnU-Net's ``splits_final.json`` (folds 0-4 stay
nnU-Net's own 5-fold split): one fixed validation set (fold 0's), nested training subsets drawn with a fixed
seed from the remaining cases. The results go to ``documentation/results.md`` with the commands, machine, wall
time and a plot of Dice against label fraction.
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from nnunet_mim.apps.demo import Demo, DemoSettings

FIRST_STUDY_FOLD = 5


def label_fraction_splits(splits: list[dict], fractions: list[float], seed: int = 0) -> list[dict]:
    """nnU-Net splits with one fold per fraction appended after ``splits`` (nested subsets, fixed val set)."""
    val = sorted(splits[0]["val"])
    candidates = sorted(splits[0]["train"])
    order = [candidates[i] for i in np.random.RandomState(seed).permutation(len(candidates))]
    extra = [{"train": sorted(order[:max(1, int(round(f * len(order))))]), "val": val} for f in fractions]
    return list(splits[:FIRST_STUDY_FOLD]) + extra


class LabelEfficiencyStudy(Demo):
    def __init__(self, settings: DemoSettings, fractions: list[float], output: Path):
        super().__init__(settings)
        self.fractions = fractions
        self.output = output

    def write_splits(self, target: str) -> list[dict]:
        from nnunetv2.utilities.crossval_split import generate_crossval_split

        folder = self.root / "nnUNet_preprocessed" / target
        path = folder / "splits_final.json"
        if path.exists():
            splits = json.loads(path.read_text())
        else:  # what nnU-Net would create for fold 0..4
            keys = sorted(p.name[:-len(".b2nd")] for p in (folder / "nnUNetPlans_3d_fullres").glob("*.b2nd")
                          if not p.name.endswith("_seg.b2nd"))
            splits = generate_crossval_split(keys, seed=12345, n_splits=5)
        splits = label_fraction_splits(splits, self.fractions)
        path.write_text(json.dumps(splits, indent=1))
        return splits

    def main(self) -> dict:
        self.root.mkdir(parents=True, exist_ok=True)
        rows = []
        with open(self.root / "study_log.txt", "a") as self.log:
            target = self.build_data()
            splits = self.write_splits(target)
            pretrained = self.pretrain(target)
            for i, fraction in enumerate(self.fractions):
                fold = FIRST_STUDY_FOLD + i
                n = len(splits[fold]["train"])
                for arm, trainer, weights in (("scratch", self.s.scratch_trainer, None),
                                              ("pretrained", self.s.finetune_trainer, pretrained)):
                    t0 = time.time()
                    out = self.train_and_predict(target, trainer, fold, weights)
                    metrics = self.evaluate_run(target, out)
                    rows.append({"fraction": fraction, "n_train": n, "arm": arm, "fold": fold,
                                 "wall_s": round(time.time() - t0), **metrics})
                    self.say(f"fraction {fraction:.0%} ({n} cases) {arm}: Dice {metrics['dice']:.3f}")
                    (self.root / "study_results.json").write_text(json.dumps(rows, indent=1))
            report = self.write_report(target, rows)
            self.say(f"study done in {time.time() - self.t0:.0f} s; report: {report}")
        return {"rows": rows}

    def train_and_predict(self, target: str, trainer: str, fold: int, weights: Path | None) -> Path:
        folder = self.results_folder(target, trainer) / f"fold_{fold}"
        if not (folder / "checkpoint_final.pth").exists():
            self.run("nnUNetv2_train", str(self.s.dataset_id), self.s.configuration, str(fold), "-tr", trainer,
                     "-device", "cpu", *(("-pretrained_weights", str(weights)) if weights else ()),
                     **self.budget(self.s.finetune_epochs, self.s.finetune_iters))
        out = self.root / "predictions" / f"{trainer}_fold{fold}"
        self.run("nnUNetv2_predict", "-i", str(self.root / "nnUNet_raw" / target / "imagesTs"), "-o", str(out),
                 "-d", str(self.s.dataset_id), "-c", self.s.configuration, "-f", str(fold), "-tr", trainer,
                 "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar")
        return out

    def evaluate_run(self, target: str, predictions: Path) -> dict:
        from nnunet_mim.apps.evaluation import evaluate_folders

        raw = self.root / "nnUNet_raw" / target
        labels = json.loads((raw / "dataset.json").read_text())["labels"]
        results, _ = evaluate_folders(predictions, raw / "labelsTs", labels, predictions / "evaluation.json",
                                      verbose=False)
        return {k: results["overall"][k] for k in ("dice", "hd95", "assd")}

    def write_report(self, target: str, rows: list[dict]) -> Path:
        import matplotlib

        matplotlib.use("agg")
        import matplotlib.pyplot as plt

        from nnunet_mim.apps.benchmark import machine_description

        import torch

        plot = self.output.with_name("results_label_efficiency.png")
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, style in (("scratch", "o--"), ("pretrained", "s-")):
            pts = sorted((r["fraction"], r["dice"]) for r in rows if r["arm"] == arm)
            ax.plot([100 * f for f, _ in pts], [d for _, d in pts], style, label=arm)
        ax.set_xlabel("labelled training cases (%)")
        ax.set_ylabel("mean Dice on the test cases")
        ax.set_title(f"{target}: label efficiency")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=100)
        plt.close(fig)

        s = self.s
        table = ["| labels | cases | arm | Dice | HD95 (mm) | ASSD (mm) | wall time (s) |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            table.append(f"| {r['fraction']:.0%} | {r['n_train']} | {r['arm']} | {r['dice']:.3f} | "
                         f"{r['hd95']:.2f} | {r['assd']:.2f} | {r['wall_s']} |")
        by = {(r["fraction"], r["arm"]): r["dice"] for r in rows}
        lines = [
            "# Results: label efficiency of HybridMIM pretraining on the embedded data", "",
            f"Written by `nnunet_mim study label-efficiency` on {datetime.date.today().isoformat()}; "
            f"machine: {machine_description(torch.device('cpu'))}; total wall time "
            f"{time.time() - self.t0:.0f} s (including data, planning and pretraining unless reused).", "",
            f"- dataset: `{target}` ({s.num_train} training cases, {s.num_test} test cases, size preset "
            f"`{s.size}`), configuration `{s.configuration}` (small U-Net inheriting 3d_fullres, see "
            f"`nnunet_mim add-config small`)",
            f"- pretraining: `nnUNetv2_train {s.pool_id} {s.configuration} all -tr HybridMIMPretrainer` on the "
            f"unlabeled pool ({s.pool_cases} cases), {s.pretrain_epochs} epochs x {s.pretrain_iters} iterations",
            f"- finetuning, per fraction (fold {FIRST_STUDY_FOLD}+i of `splits_final.json`), same budget for both "
            f"arms ({s.finetune_epochs} epochs x {s.finetune_iters} iterations): "
            f"`nnUNetv2_train {s.dataset_id} {s.configuration} FOLD -tr {s.scratch_trainer}` and "
            f"`nnUNetv2_train {s.dataset_id} {s.configuration} FOLD -tr {s.finetune_trainer} "
            f"-pretrained_weights <pretraining checkpoint_final.pth>`",
            "- prediction: `nnUNetv2_predict -i imagesTs ... -f FOLD`; evaluation: `nnunet_mim evaluate` "
            "(mean over classes of the per-class means over test cases)", "",
            *table, "", f"![Dice against label fraction]({plot.name})", "",
            "Paper targets: pretrained >= scratch + 3 Dice points at 20 % labels; pretrained with 60 % labels >= "
            "scratch with 100 %."]
        if (0.2, "pretrained") in by and (0.2, "scratch") in by:
            gap = 100 * (by[(0.2, "pretrained")] - by[(0.2, "scratch")])
            lines.append(f"Measured: at 20 % labels pretrained - scratch = {gap:+.1f} Dice points.")
        if (0.6, "pretrained") in by and (1.0, "scratch") in by:
            lines.append(f"Measured: pretrained at 60 % = {by[(0.6, 'pretrained')]:.3f} vs scratch at 100 % = "
                         f"{by[(1.0, 'scratch')]:.3f}.")
        text = "\n".join(lines) + "\n"
        marker = "<!-- analysis -->"  # everything after it is hand-written analysis: keep it
        old = self.output.read_text() if self.output.exists() else ""
        if marker in old:
            text += "\n" + marker + old.split(marker, 1)[1]
        self.output.write_text(text)
        return self.output


def _run(args) -> None:
    settings = DemoSettings(workdir=args.workdir)
    overrides = {k: v for k, v in (("finetune_epochs", args.epochs), ("finetune_iters", args.iters),
                                   ("pretrain_epochs", args.pretrain_epochs)) if v is not None}
    LabelEfficiencyStudy(replace(settings, **overrides), args.fractions, Path(args.output)).main()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("study", help="label-efficiency study (writes documentation/results.md)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["label-efficiency"])
    p.add_argument("--workdir", default="demo_output", help="shares data, plans and pretraining with the demo")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.4, 0.6, 1.0])
    p.add_argument("--epochs", type=int, default=None, help="finetuning epochs per run (default: the demo's)")
    p.add_argument("--iters", type=int, default=None, help="iterations per epoch (default: the demo's)")
    p.add_argument("--pretrain-epochs", type=int, default=None)
    p.add_argument("-o", "--output", default="documentation/results.md")
    p.set_defaults(func=_run)
