"""Does pretraining help on *your* dataset? A paired, seeded, resumable label-efficiency study.

    # on your own planned nnU-Net dataset (nnUNet_raw / nnUNet_preprocessed exported; imagesTs + labelsTs needed)
    nnunet_mim study -d 4 -c 3d_fullres --weights pretrained=/path/checkpoint_final.pth -o my_study
    # pretrain first (on an unlabeled pool made by `nnunet_mim import-unlabeled`), then the study
    nnunet_mim study -d 4 -c 3d_fullres --pretrain HybridMIMPretrainer --pool 504 -o my_study
    # on the embedded data of the demo (built in --workdir if missing)
    nnunet_mim study --demo-data -o my_study

Design (documentation/results.md shows it on the embedded data):

- **Arms.** ``scratch`` (``--scratch-trainer``, no weights) and one arm per pretrained checkpoint (``--weights
  NAME=PATH[@TRAINER]``, or ``--pretrain``). Every arm of a cell uses the same label subset, the same seed
  (``nnUNet_mim_seed``) and the same budget: the comparison is paired.
- **Cells.** label fraction x seed (default 3 seeds). The label subset of a fraction is drawn with the cell's seed
  from the training cases of nnU-Net's fold 0; subsets of one seed are nested; fold 0's validation cases stay the
  validation set of every cell. Each subset is a fold appended to ``splits_final.json`` (folds 0-4 stay nnU-Net's);
  an identical split already there is reused, so reruns and other studies find the same fold.
- **Outputs.** Every finished run is a JSON record in ``<output>/runs/`` (test metrics per case and class, the
  validation Dice, the per-epoch validation curve, wall time, the exact commands, the digest of the pretrained
  network's weights, the package versions and nnunet_mim's revision); nnU-Net's results and the
  predictions go to ``--workdir`` (default ``<output>/work``), one ``nnUNet_results`` per arm
  (``study_results/<arm>``) and per pretraining (``study_results/<arm>.pretraining``, which keeps its budget and
  refuses another one under the same arm name). Rerunning the same command skips finished runs and
  continues an interrupted training with ``--c``, so a study can grow over several sittings. The report
  (``<output>/study_report.md``, with plots) is rewritten after every run.
- **Statistics.** Per fraction and arm: the paired effect over scratch (mean over seeds of the mean over test cases of
  the difference) for Dice, HD95 and ASSD, with a 95 % two-way (seeds x test cases) bootstrap interval
  (:mod:`nnunet_mim.core.statistics`), per-class Dice, and the iterations each arm needs to reach 90 % of the scratch
  arm's final validation Dice.
- **Pool.** Before ``--pretrain``, the pool's images are compared with the target's imagesTr and imagesTs (exact
  voxel copies, :mod:`nnunet_mim.nnunet.contamination`): a warning lists shared cases, ``--strict`` refuses them.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from nnunet_mim.apps.pipeline import DemoSettings, Pipeline, build_demo_data, dataset_name
from nnunet_mim.core.statistics import CI_METHOD, iterations_to_reach, paired_effect

FIRST_STUDY_FOLD = 5  # folds 0-4 are nnU-Net's own cross-validation
SCRATCH = "scratch"
CONVERGENCE_FRACTION = 0.9  # "iterations to reach 90 % of the scratch arm's final validation Dice"
PAPER_GAIN_POINTS = 3.0  # HybridMIM / PUMIT: pretrained >= scratch + 3 Dice points at the lowest label fraction
MIN_SEEDS_FOR_VERDICT = 3  # a target is called met or not met from 3 seeds on


# ------------------------------------------------------------------------------------------------- design
@dataclass(frozen=True)
class Arm:
    name: str
    trainer: str
    weights: str | None = None  # checkpoint; None: from scratch

    @classmethod
    def parse(cls, text: str, default_trainer: str) -> "Arm":
        """``NAME=PATH[@TRAINER]``."""
        if "=" not in text:
            raise ValueError(f"--weights takes NAME=PATH[@TRAINER], got {text!r}")
        name, rest = text.split("=", 1)
        path, _, trainer = rest.partition("@")
        if name == SCRATCH:
            raise ValueError(f"the arm name {SCRATCH!r} is the baseline's; give the pretrained arm another name")
        return cls(name, trainer or default_trainer, path)


@dataclass(frozen=True)
class Budget:
    epochs: int
    iters: int
    val_iters: int

    @property
    def iterations(self) -> int:
        return self.epochs * self.iters


def label_subset(base: dict, fraction: float, seed: int) -> dict:
    """Training subset of ``fraction`` of fold 0's training cases (at least one), drawn with ``seed``; the subsets of
    one seed are nested. The validation cases are fold 0's. The split names its fraction and seed
    (``nnunet_mim_cell``; nnU-Net reads only ``train`` and ``val``), so that two seeds drawing the same cases (always
    at 100 %) still get folds, and so results folders, of their own."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fractions must be in (0, 1], got {fraction}")
    candidates = sorted(base["train"])
    order = [candidates[i] for i in np.random.RandomState(seed).permutation(len(candidates))]
    return {"train": sorted(order[:max(1, int(round(fraction * len(order))))]), "val": sorted(base["val"]),
            "nnunet_mim_cell": {"fraction": fraction, "seed": seed}}


def fold_of(splits: list[dict], split: dict) -> int:
    """Index of ``split`` in ``splits`` at or after :data:`FIRST_STUDY_FOLD`, appended if absent (in place). An entry
    with the same cases but no cell tag (written by an earlier version) is adopted and tagged."""
    def same_cases(entry):
        return sorted(entry["train"]) == split["train"] and sorted(entry["val"]) == split["val"]

    for i in range(FIRST_STUDY_FOLD, len(splits)):
        if same_cases(splits[i]) and splits[i].get("nnunet_mim_cell") == split["nnunet_mim_cell"]:
            return i
    for i in range(FIRST_STUDY_FOLD, len(splits)):
        if same_cases(splits[i]) and "nnunet_mim_cell" not in splits[i]:
            splits[i] = {**splits[i], "nnunet_mim_cell": split["nnunet_mim_cell"]}
            return i
    splits.append(split)
    return len(splits) - 1


def load_or_create_splits(dataset_folder: Path) -> list[dict]:
    """The dataset's ``splits_final.json``, or the 5-fold split nnU-Net would create for it."""
    path = dataset_folder / "splits_final.json"
    if path.exists():
        return json.loads(path.read_text())
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    config = json.loads((dataset_folder / "nnUNetPlans.json").read_text())["configurations"]
    data = str(dataset_folder / config["3d_fullres"]["data_identifier"])
    return generate_crossval_split(sorted(infer_dataset_class(data).get_identifiers(data)), seed=12345, n_splits=5)


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def mean_dice_per_case(evaluation: dict, metric: str = "dice") -> dict[str, float]:
    """``case -> mean over classes`` of a metric of ``nnunet_mim evaluate``'s per-case table (NaN when no class has
    a value, e.g. HD95 of a case whose structures were all missed)."""
    out = {}
    for case, classes in evaluation["per_case"].items():
        values = [v[metric] for v in classes.values() if v[metric] is not None]
        out[case] = float(np.mean(values)) if values else math.nan
    return out


def arm_results(workdir: Path, arm: str) -> Path:
    """``nnUNet_results`` of one arm's runs. nnU-Net names a results folder by dataset, trainer, plans and
    configuration only, so two arms finetuned with the same trainer (two checkpoints, or one pool at two pretraining
    budgets) would otherwise share a folder, and the second would silently reuse the first one's models."""
    return Path(workdir) / "study_results" / arm


def pretraining_results(workdir: Path, arm: str) -> Path:
    """``nnUNet_results`` of the ``--pretrain`` run of an arm: one pretraining per arm name."""
    return Path(workdir) / "study_results" / f"{arm}.pretraining"


def check_pretraining_budget(folder: Path, settings: dict) -> None:
    """Write the pretraining's settings into ``folder`` on the first call; refuse when a later call asks for other
    settings under the same arm name (its checkpoint would be reused under a budget it was not trained with)."""
    path = folder / "study_pretraining.json"
    if path.exists():
        before = json.loads(path.read_text())
        if before != settings:
            raise SystemExit(f"nnunet_mim study: the arm {settings['arm']!r} was pretrained with {before}, not "
                             f"{settings}; give the new pretraining its own --pretrain-name (or delete {folder})")
        return
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(settings, indent=1))


# ------------------------------------------------------------------------------------------------- study
class Study:
    def __init__(self, dataset: str | int, configuration: str, arms: list[Arm], fractions: list[float],
                 seeds: list[int], budget: Budget, output: Path, pipeline: Pipeline, command: str):
        self.dataset = dataset
        self.configuration = configuration
        self.arms = arms
        self.fractions = sorted(fractions)
        self.seeds = seeds
        self.budget = budget
        self.output = Path(output).resolve()
        self.p = pipeline
        self.command = command
        self.runs_dir = self.output / "runs"

    # ---- splits ---------------------------------------------------------------------------------------------
    def folds(self, name: str) -> dict[tuple[float, int], tuple[int, list[str]]]:
        """``(fraction, seed) -> (fold, training cases)``; writes the new folds into ``splits_final.json``."""
        path = self.p.preprocessed / name / "splits_final.json"
        splits = load_or_create_splits(self.p.preprocessed / name)
        before = json.dumps(splits)
        out = {}
        for seed in self.seeds:
            for fraction in self.fractions:
                split = label_subset(splits[0], fraction, seed)
                out[(fraction, seed)] = (fold_of(splits, split), split["train"])
        if json.dumps(splits) != before or not path.exists():
            atomic_write(path, json.dumps(splits, indent=1))
        return out

    # ---- one run ----------------------------------------------------------------------------------------------
    def record_path(self, arm: Arm, fraction: float, seed: int) -> Path:
        return self.runs_dir / f"{arm.name}__f{round(100 * fraction):03d}__s{seed}.json"

    def run_cell(self, name: str, arm: Arm, fraction: float, seed: int, fold: int, train: list[str]) -> dict:
        t0 = time.time()
        own = {"nnUNet_results": str(arm_results(self.p.root, arm.name))}
        results = self.p.results_folder(name, arm.trainer, self.configuration, results=own["nnUNet_results"])
        env = self.p.budget(self.budget.epochs, self.budget.iters, self.budget.val_iters, seed)
        final = self.p.train(self.dataset, self.configuration, fold, arm.trainer, results, arm.weights, **env, **own)
        train_cmd = (f"nnUNet_mim_seed={seed} nnUNet_mim_epochs={self.budget.epochs} nnUNet_mim_iters="
                     f"{self.budget.iters} nnUNet_mim_val_iters={self.budget.val_iters} nnUNetv2_train {self.dataset} "
                     f"{self.configuration} {fold} -tr {arm.trainer}"
                     + (f" -pretrained_weights {arm.weights}" if arm.weights else ""))
        predictions = self.p.predict(self.dataset, name, self.configuration, fold, arm.trainer,
                                     self.p.root / "predictions" / arm.name / f"{arm.trainer}_fold{fold}", **own)
        from nnunet_mim.apps.evaluation import evaluate_folders
        from nnunet_mim.apps.provenance import environment
        from nnunet_mim.nnunet.weights import load_checkpoint, weights_digest

        labels = json.loads((self.p.raw / name / "dataset.json").read_text())["labels"]
        evaluation, _ = evaluate_folders(predictions, self.p.raw / name / "labelsTs", labels,
                                         predictions / "evaluation.json", verbose=False)
        logging = load_checkpoint(final).get("logging", {})
        validation = results / f"fold_{fold}" / "validation" / "summary.json"
        record = {
            "arm": arm.name, "trainer": arm.trainer, "weights": arm.weights,
            "weights_sha256": file_digest(arm.weights) if arm.weights else None,
            "weights_digest": weights_digest(arm.weights) if arm.weights else None,
            "fraction": fraction, "seed": seed, "fold": fold, "n_train": len(train), "train_cases": train,
            "budget": asdict(self.budget), "configuration": self.configuration, "dataset": name,
            "commands": [train_cmd, f"nnUNetv2_predict -i imagesTs -o {predictions.name} -d {self.dataset} -c "
                                    f"{self.configuration} -f {fold} -tr {arm.trainer}",
                         f"nnunet_mim evaluate -pred {predictions.name} -ref labelsTs"],
            "wall_s": round(time.time() - t0),
            "environment": environment(),
            "test": {"overall": evaluation["overall"], "per_class": evaluation["per_class"],
                     "per_case": evaluation["per_case"]},
            "validation_dice": (json.loads(validation.read_text())["foreground_mean"]["Dice"]
                                if validation.exists() else None),
            "curve": {"pseudo_dice": [float(v) for v in logging.get("mean_fg_dice", [])],
                      "ema_pseudo_dice": [float(v) for v in logging.get("ema_fg_dice", [])],
                      "iterations_per_epoch": self.budget.iters},
        }
        return record

    # ---- the whole study --------------------------------------------------------------------------------------
    def main(self) -> Path:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        name = dataset_name(self.p.preprocessed, self.dataset)
        self.check_records_are_ours(name)
        for arm in self.arms:
            if arm.weights and not Path(arm.weights).is_file():
                raise FileNotFoundError(f"arm {arm.name}: no checkpoint at {arm.weights}")
            self.set_aside_stale_records(arm)
        folds = self.folds(name)
        # lowest label fraction first: the cells that answer the main question finish first
        cells = [(fraction, seed, arm) for fraction in self.fractions for seed in self.seeds for arm in self.arms]
        todo = [c for c in cells if not self.record_path(c[2], c[0], c[1]).exists()]
        self.p.say(f"study of {name} / {self.configuration}: {len(cells)} runs ({len(self.arms)} arms x "
                   f"{len(self.fractions)} fractions x {len(self.seeds)} seeds), {len(cells) - len(todo)} already done")
        started, durations = time.time(), []
        for k, (fraction, seed, arm) in enumerate(todo, 1):
            fold, train = folds[(fraction, seed)]
            elapsed = time.time() - started
            eta = (f", about {_minutes(np.mean(durations) * (len(todo) - k + 1))} left" if durations else "")
            self.p.say(f"run {k} of {len(todo)}: {arm.name}, {fraction:.0%} labels ({len(train)} cases, fold {fold}), "
                       f"seed {seed}; elapsed {_minutes(elapsed)}{eta}")
            t0 = time.time()
            record = self.run_cell(name, arm, fraction, seed, fold, train)
            atomic_write(self.record_path(arm, fraction, seed), json.dumps(record, indent=1))
            durations.append(time.time() - t0)
            val = record["validation_dice"]
            self.p.say(f"  test Dice {record['test']['overall']['dice']:.3f} (validation "
                       f"{'n/a' if val is None else round(val, 3)})")
            self.write_report(name)
        report = self.write_report(name)
        self.p.say(f"study complete: {report}")
        return report

    def check_records_are_ours(self, name: str) -> None:
        """A record's file name says arm, fraction and seed only: records of another dataset or configuration in the
        same ``--output`` would count as this study's finished runs. Refuse instead of skipping runs."""
        for path in sorted(self.runs_dir.glob("*.json")):
            record = json.loads(path.read_text())
            if (record.get("dataset"), record.get("configuration")) != (name, self.configuration):
                raise SystemExit(f"nnunet_mim study: {self.output} holds runs of {record.get('dataset')} / "
                                 f"{record.get('configuration')} ({path.name}), not {name} / {self.configuration}; "
                                 "give this study its own -o")

    def set_aside_stale_records(self, arm: Arm) -> None:
        """Records of ``arm`` made with another model than its checkpoint now (e.g. a pretraining redone with other
        settings) would mix two models in one arm: they move to ``runs/stale/`` and their runs are redone. The model
        is recognised by its network weights (``weights_digest``), not by the file: a pretraining redone with the
        same seed gives the same weights in a new file (other timestamps), and its records stay. Records older than
        ``weights_digest`` are matched by the file's digest (``weights_sha256``)."""
        if not arm.weights:
            return
        from nnunet_mim.nnunet.weights import weights_digest

        digest, file = weights_digest(arm.weights), file_digest(arm.weights)
        for path in sorted(self.runs_dir.glob(f"{arm.name}__*.json")):
            record = json.loads(path.read_text())
            same = (record["weights_digest"] == digest if record.get("weights_digest")
                    else record.get("weights_sha256") == file)
            if not same:
                (self.runs_dir / "stale").mkdir(exist_ok=True)
                path.replace(self.runs_dir / "stale" / path.name)
                made_with = record.get("weights_digest") or f"file {record.get('weights_sha256')}"
                self.p.say(f"WARNING: {path.name} was made with other weights ({made_with}, now {digest}): moved to "
                           f"runs/stale/; the run is redone with the current checkpoint")

    def records(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.runs_dir.glob("*.json"))]

    def write_report(self, name: str) -> Path:
        records = [r for r in self.records() if r["dataset"] == name and r["configuration"] == self.configuration]
        text = render_report(records, self.command, self.output)
        path = self.output / "study_report.md"
        atomic_write(path, text)
        return path


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------- analysis
def paired_tables(records: list[dict], arm: str, fraction: float, metric: str = "dice",
                  scratch_fraction: float | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """``[seeds, cases]`` tables of the arm at ``fraction`` and of scratch at ``scratch_fraction`` (default: the same
    fraction) for the seeds both have, paired by seed and test case."""
    scratch_fraction = fraction if scratch_fraction is None else scratch_fraction
    by = {(r["arm"], r["fraction"], r["seed"]): r for r in records}
    seeds = sorted(s for (a, f, s) in by if a == arm and f == fraction and (SCRATCH, scratch_fraction, s) in by)
    if not seeds:
        return np.zeros((0, 0)), np.zeros((0, 0)), []
    cases = sorted(by[(arm, fraction, seeds[0])]["test"]["per_case"])
    table = {}
    for key in ((arm, fraction), (SCRATCH, scratch_fraction)):
        rows = []
        for s in seeds:
            values = mean_dice_per_case(by[(*key, s)]["test"], metric)
            rows.append([values.get(c, math.nan) for c in cases])
        table[key] = np.array(rows)
    return table[(arm, fraction)], table[(SCRATCH, scratch_fraction)], seeds


def convergence(records: list[dict], arm: str, fraction: float) -> list[tuple[int | None, int | None]]:
    """Per paired seed: iterations the arm and scratch need to reach 90 % of scratch's final (EMA) validation Dice."""
    by = {(r["arm"], r["fraction"], r["seed"]): r for r in records}
    out = []
    for (a, f, s), r in sorted(by.items()):
        if a != arm or f != fraction or (SCRATCH, f, s) not in by:
            continue
        scratch = by[(SCRATCH, f, s)]["curve"]
        if not scratch["ema_pseudo_dice"]:
            continue
        target = CONVERGENCE_FRACTION * scratch["ema_pseudo_dice"][-1]
        out.append((iterations_to_reach(r["curve"]["ema_pseudo_dice"], target, r["curve"]["iterations_per_epoch"]),
                    iterations_to_reach(scratch["ema_pseudo_dice"], target, scratch["iterations_per_epoch"])))
    return out


def _fmt_effect(e, scale: float, digits: int) -> str:
    if e is None or not np.isfinite(e.effect):
        return "n/a"
    return f"{scale * e.effect:+.{digits}f} [{scale * e.low:+.{digits}f}, {scale * e.high:+.{digits}f}]"


def render_report(records: list[dict], command: str, output: Path) -> str:
    arms = list(dict.fromkeys(r["arm"] for r in sorted(records, key=lambda r: r["arm"] != SCRATCH)))
    fractions = sorted({r["fraction"] for r in records})
    lines = ["# Label-efficiency study", "",
             f"Written by `nnunet_mim study` on {datetime.date.today().isoformat()}; machine: {_machine()}.", "",
             f"- command: `{command}`"]
    if not records:
        return "\n".join(lines + ["", "No finished runs yet."]) + "\n"
    r0 = records[0]
    b = r0["budget"]
    lines += [f"- dataset `{r0['dataset']}`, configuration `{r0['configuration']}`; budget per run: "
              f"{b['epochs']} epochs x {b['iters']} iterations ({b['epochs'] * b['iters']} iterations), "
              f"{b['val_iters']} validation iterations per epoch",
              "- arms: " + "; ".join(f"`{a}`: `{next(r['trainer'] for r in records if r['arm'] == a)}`"
                                     + (f" from `{next(r['weights'] for r in records if r['arm'] == a)}`"
                                        if a != SCRATCH else "") for a in arms),
              f"- finished runs: {len(records)}; total wall time {_minutes(sum(r['wall_s'] for r in records))}",
              f"- test metrics: mean over classes per test case, then over cases; effect = pretrained - scratch, "
              f"paired by seed and case (Dice: positive = pretrained better; HD95, ASSD: negative = pretrained "
              f"better); interval: {CI_METHOD}",
              f"- software of the runs: {_software(records)}", ""]
    head = ("| labels | arm | seeds | test Dice (mean ± sd over seeds) | Dice effect, points [95 % CI] | "
            "HD95 effect, mm [95 % CI] | ASSD effect, mm [95 % CI] | validation Dice | iterations to 90 % | "
            "wall time per run |")
    lines += [head, "|" + "---|" * 10]
    summary = {}
    for f in fractions:
        for a in arms:
            rs = [r for r in records if r["arm"] == a and r["fraction"] == f]
            if not rs:
                continue
            dice = [r["test"]["overall"]["dice"] for r in rs]
            val = [r["validation_dice"] for r in rs if r["validation_dice"] is not None]
            effects = {}
            if a != SCRATCH:
                for m in ("dice", "hd95", "assd"):
                    x, y, seeds = paired_tables(records, a, f, m)
                    effects[m] = paired_effect(x, y) if seeds else None
            conv = convergence(records, a, f) if a != SCRATCH else []
            reached = [(p, s) for p, s in conv if p is not None and s is not None]
            conv_text = ("—" if a == SCRATCH else
                         f"{np.mean([p for p, _ in reached]):.0f} vs {np.mean([s for _, s in reached]):.0f} scratch"
                         f" ({np.mean([s / p for p, s in reached]):.2f}x)" if reached else "not reached")
            summary[(f, a)] = effects.get("dice")
            lines.append(f"| {f:.0%} | {a} | {len(rs)} | {np.mean(dice):.3f} ± {np.std(dice):.3f} | "
                         f"{_fmt_effect(effects.get('dice'), 100, 1) if a != SCRATCH else '—'} | "
                         f"{_fmt_effect(effects.get('hd95'), 1, 2) if a != SCRATCH else '—'} | "
                         f"{_fmt_effect(effects.get('assd'), 1, 2) if a != SCRATCH else '—'} | "
                         f"{np.mean(val):.3f} | {conv_text} | {_minutes(np.mean([r['wall_s'] for r in rs]))} |"
                         if val else
                         f"| {f:.0%} | {a} | {len(rs)} | {np.mean(dice):.3f} ± {np.std(dice):.3f} | "
                         f"{_fmt_effect(effects.get('dice'), 100, 1) if a != SCRATCH else '—'} | "
                         f"{_fmt_effect(effects.get('hd95'), 1, 2) if a != SCRATCH else '—'} | "
                         f"{_fmt_effect(effects.get('assd'), 1, 2) if a != SCRATCH else '—'} | n/a | {conv_text} | "
                         f"{_minutes(np.mean([r['wall_s'] for r in rs]))} |")
    lines += ["", "Iterations to 90 %: training iterations until the EMA validation pseudo-Dice (nnU-Net's per-epoch "
              "curve) first reaches 90 % of the scratch arm's final value, mean over the seeds where both arms reach "
              "it; in brackets scratch / pretrained (Chen et al. report 1.40x for MIM pretraining).", ""]
    lines += _targets(summary, fractions, arms, records)
    lines += ["", "## Per-class test Dice (mean over seeds)", ""]
    classes = list(records[0]["test"]["per_class"])
    lines += ["| labels | arm | " + " | ".join(classes) + " |", "|" + "---|" * (len(classes) + 2)]
    for f in fractions:
        for a in arms:
            rs = [r for r in records if r["arm"] == a and r["fraction"] == f]
            if rs:
                lines.append(f"| {f:.0%} | {a} | " + " | ".join(
                    f"{np.mean([r['test']['per_class'][c]['dice'] for r in rs]):.3f}" for c in classes) + " |")
    plots = save_plots(records, output)
    lines += ["", *[f"![{title}]({path.name})" for title, path in plots], "",
              "## Runs", "", "Each run's exact commands are in its record in `runs/`; for example:", "",
              *[f"    {c}" for c in records[0]["commands"]]]
    return "\n".join(lines) + "\n"


def _verdict(met: bool, n_seeds: int) -> str:
    """A paper target is called met or not met only from MIN_SEEDS_FOR_VERDICT seeds on; with fewer, on track or not."""
    if n_seeds >= MIN_SEEDS_FOR_VERDICT:
        return f"target **{'met' if met else 'not met'}**"
    return (f"preliminary, {'on track' if met else 'not on track'} (the protocol asks for {MIN_SEEDS_FOR_VERDICT} "
            "seeds)")


def _targets(summary: dict, fractions: list[float], arms: list[str], records: list[dict]) -> list[str]:
    out = ["Paper targets (HybridMIM, PUMIT): pretrained >= scratch + 3 Dice points at the lowest label fraction, "
           "with a confidence interval that excludes 0; pretrained with 60 % of the labels >= scratch with 100 %."]
    low = fractions[0]
    for a in arms:
        if a == SCRATCH:
            continue
        e = summary.get((low, a))
        if e is not None and np.isfinite(e.effect):
            verdict = _verdict(100 * e.effect >= PAPER_GAIN_POINTS and e.low > 0, e.n_seeds)
            out.append(f"- `{a}` at {low:.0%} labels: {100 * e.effect:+.1f} points [{100 * e.low:+.1f}, "
                       f"{100 * e.high:+.1f}] over {e.n_seeds} seed(s) and {e.n_cases} test cases: {verdict}.")
        x, y, seeds = paired_tables(records, a, 0.6, "dice", scratch_fraction=1.0)
        if seeds:
            e = paired_effect(x, y)
            out.append(f"- `{a}` with 60 % of the labels minus scratch with 100 %: {100 * e.effect:+.1f} points "
                       f"[{100 * e.low:+.1f}, {100 * e.high:+.1f}] over {e.n_seeds} seed(s) and {e.n_cases} test "
                       f"cases (paired by seed and case): {_verdict(e.effect >= 0, e.n_seeds)}.")
    return out


def save_plots(records: list[dict], output: Path) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in sorted(records, key=lambda r: r["arm"] != SCRATCH)))
    fractions = sorted({r["fraction"] for r in records})
    out = []
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, a in enumerate(arms):
        xs, ys, lo, hi = [], [], [], []
        for f in fractions:
            d = [r["test"]["overall"]["dice"] for r in records if r["arm"] == a and r["fraction"] == f]
            if d:
                xs.append(100 * f + (i - (len(arms) - 1) / 2) * 1.2)
                ys.append(np.mean(d))
                lo.append(np.mean(d) - np.min(d))
                hi.append(np.max(d) - np.mean(d))
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o--" if a == SCRATCH else "s-", capsize=4, label=a)
    ax.set_xlabel("labelled training cases (%)")
    ax.set_ylabel("mean test Dice (bars: min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = output / "study_dice_vs_labels.png"
    _save(fig, path)
    out.append(("Dice against label fraction", path))

    fig, axes = plt.subplots(1, len(fractions), figsize=(4.5 * len(fractions), 3.8), squeeze=False)
    for ax, f in zip(axes[0], fractions):
        for a in arms:
            curves = [r["curve"] for r in records
                      if r["arm"] == a and r["fraction"] == f and r["curve"]["ema_pseudo_dice"]]
            if not curves:
                continue
            n = min(len(c["ema_pseudo_dice"]) for c in curves)
            mean = np.mean([c["ema_pseudo_dice"][:n] for c in curves], axis=0)
            ax.plot(np.arange(1, n + 1) * curves[0]["iterations_per_epoch"], mean,
                    "--" if a == SCRATCH else "-", label=f"{a} ({len(curves)} seeds)")
        ax.set_title(f"{f:.0%} labels")
        ax.set_xlabel("training iterations")
        ax.set_ylabel("validation pseudo-Dice (EMA)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = output / "study_convergence.png"
    _save(fig, path)
    out.append(("Validation Dice during finetuning", path))
    return out


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def _software(records: list[dict]) -> str:
    """The package versions and code revisions the records were made with; runs made with different sets are
    listed per set (a seeded run repeats bit for bit only with the same set)."""
    sets: dict[str, int] = {}
    for r in records:
        env = r.get("environment")
        if env is None:
            key = "not recorded (runs written before records held it)"
        else:
            packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v != "not installed")
            key = f"{packages}; Python {env['python']}; nnunet_mim {env.get('nnunet_mim_revision') or 'installed copy'}"
        sets[key] = sets.get(key, 0) + 1
    if len(sets) == 1:
        return next(iter(sets))
    return "; ".join(f"({n} runs) {k}" for k, n in sets.items())


def _machine() -> str:
    import torch

    from nnunet_mim.apps.provenance import machine_description

    return machine_description(torch.device("cpu"))


# ------------------------------------------------------------------------------------------------- command
CONTAMINATION_CACHE = "contamination_digests.json"  # in the work folder: a rerun hashes only new or changed images


def check_pool(pipeline: Pipeline, dataset: str | int, pool_name: str, strict: bool = False) -> list:
    """The contamination check of the pretraining pool against the target's imagesTr and imagesTs
    (:mod:`nnunet_mim.nnunet.contamination`): a warning, or with ``strict`` an exit naming the cases."""
    from nnunet_mim.nnunet.contamination import ContaminationError, check_pool_dataset

    try:
        return check_pool_dataset(pool_name, dataset_name(pipeline.preprocessed, dataset), str(pipeline.raw),
                                  str(pipeline.preprocessed), strict, pipeline.processes,
                                  str(pipeline.root / CONTAMINATION_CACHE))
    except ContaminationError as e:
        raise SystemExit(f"nnunet_mim study: {e}") from None


def _run(args) -> None:
    import shlex
    import sys

    command = "nnunet_mim " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    output = Path(args.output).resolve()
    workdir = Path(args.workdir).resolve() if args.workdir else output / "work"
    demo = DemoSettings(workdir=str(workdir), processes=args.processes)
    if args.demo_data:
        folders = {}
        dataset, configuration, pool = demo.dataset_id, demo.configuration, args.pool or demo.pool_id
    else:
        import os

        missing = [v for v in ("nnUNet_raw", "nnUNet_preprocessed") if not os.environ.get(v)]
        if missing or args.dataset is None:
            raise SystemExit("nnunet_mim study: give -d DATASET with nnUNet_raw and nnUNet_preprocessed exported "
                             "(or --demo-data for the embedded data)")
        folders = {"nnUNet_raw": os.environ["nnUNet_raw"], "nnUNet_preprocessed": os.environ["nnUNet_preprocessed"]}
        dataset, configuration, pool = args.dataset, args.configuration or "3d_fullres", args.pool
    configuration = args.configuration or configuration
    budget = Budget(args.epochs, args.iters, args.val_iters)
    folders["nnUNet_results"] = str(workdir / "nnUNet_results")
    pipeline = Pipeline(workdir, "study", "study_log.txt", args.processes, folders)
    arms = [Arm(SCRATCH, args.scratch_trainer)] + [Arm.parse(w, args.finetune_trainer) for w in args.weights]
    with pipeline:
        if args.demo_data:
            build_demo_data(pipeline, replace(demo, configuration=configuration))
        if args.pretrain:
            if pool is None:
                raise SystemExit("nnunet_mim study --pretrain needs --pool (the unlabeled dataset to pretrain on)")
            pool_name = dataset_name(pipeline.preprocessed, pool)
            check_pool(pipeline, dataset, pool_name, args.strict)
            folder = pretraining_results(workdir, args.pretrain_name)
            check_pretraining_budget(folder, {
                "arm": args.pretrain_name, "trainer": args.pretrain, "pool": pool_name, "configuration": configuration,
                "epochs": args.pretrain_epochs, "iters": args.pretrain_iters, "seed": args.pretrain_seed})
            checkpoint = pipeline.train(pool, configuration, "all", args.pretrain,
                                        pipeline.results_folder(pool_name, args.pretrain, configuration,
                                                                results=folder),
                                        nnUNet_results=str(folder),
                                        **pipeline.budget(args.pretrain_epochs, args.pretrain_iters, args.val_iters,
                                                          args.pretrain_seed))
            arms.append(Arm(args.pretrain_name, args.finetune_trainer, str(checkpoint)))
        if len(arms) == 1:
            raise SystemExit("nnunet_mim study: nothing to compare with scratch; give --weights NAME=CHECKPOINT or "
                             "--pretrain TRAINER --pool DATASET")
        Study(dataset, configuration, arms, args.fractions, args.seeds, budget, output, pipeline, command).main()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("study", help="paired, seeded, resumable label-efficiency study (scratch vs pretrained)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", required=True, help="report, plots and one record per finished run")
    p.add_argument("--workdir", default=None, help="nnU-Net results and predictions (default <output>/work)")
    p.add_argument("-d", "--dataset", default=None, help="labelled target dataset (id or name), planned already")
    p.add_argument("-c", "--configuration", default=None, help="default 3d_fullres (3d_small with --demo-data)")
    p.add_argument("--demo-data", action="store_true",
                   help="the demo's embedded data, built in --workdir when missing (dataset 501, pool 511)")
    p.add_argument("--weights", nargs="*", default=[], metavar="NAME=PATH[@TRAINER]",
                   help="pretrained arms: a checkpoint each, optionally with its finetuning trainer")
    p.add_argument("--pretrain", default=None, metavar="TRAINER",
                   help="pretrain on --pool first (e.g. HybridMIMPretrainer)")
    p.add_argument("--pool", default=None, help="unlabeled pretraining dataset (default with --demo-data: 511)")
    p.add_argument("--pretrain-name", default="pretrained", help="arm name of the --pretrain checkpoint")
    p.add_argument("--strict", action="store_true",
                   help="refuse a --pool that shares images with the target's imagesTr or imagesTs (default: warn)")
    p.add_argument("--pretrain-epochs", type=int, default=DemoSettings.pretrain_epochs)
    p.add_argument("--pretrain-iters", type=int, default=DemoSettings.pretrain_iters)
    p.add_argument("--pretrain-seed", type=int, default=0)
    p.add_argument("--scratch-trainer", default=DemoSettings.scratch_trainer)
    p.add_argument("--finetune-trainer", default=DemoSettings.finetune_trainer)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.2, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=DemoSettings.finetune_epochs, help="finetuning epochs per run")
    p.add_argument("--iters", type=int, default=DemoSettings.finetune_iters, help="iterations per epoch")
    p.add_argument("--val-iters", type=int, default=DemoSettings.val_iters)
    p.add_argument("--processes", type=int, default=2, help="nnUNet_def_n_proc and nnUNet_n_proc_DA of the runs")
    p.set_defaults(func=_run)
