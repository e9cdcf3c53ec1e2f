"""The downstream probe: a pretrained body against a random one, in minutes.

    nnunet_mim probe <checkpoint_final.pth> -d 4 -c 3d_fullres            # heads only (encoder + decoder frozen)
    nnunet_mim probe <checkpoint_final.pth> -d 4 -c 3d_sac_vit --part decoder   # encoder frozen

Trains the probe trainer of the configuration's network (``trainers/probe.py``) twice with the same seed, cases and
budget: once from the checkpoint (``-pretrained_weights``) and once from a random initialisation. The training cases
are a few (``--cases``) of fold 0's training cases, drawn with the seed; the held-out cases are fold 0's validation
cases, on which nnU-Net's own final validation reports the Dice. ``pretrained - random`` is the signal: how much
segmentation-relevant information the pretrained body holds beyond what the light part can learn on its own.
Finished arms are kept: rerunning the command reuses them. Writes ``probe.json`` into ``-o``.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from nnunet_mim.apps.pipeline import Pipeline, dataset_name
from nnunet_mim.apps.study import atomic_write, fold_of, label_subset, load_or_create_splits

DEFAULT_CASES = 3
DEFAULT_EPOCHS = 8
DEFAULT_ITERS = 25


def probe_fold(preprocessed: Path, name: str, cases: int, seed: int) -> tuple[int, list[str]]:
    """A fold with ``cases`` training cases drawn from fold 0's (validation: fold 0's), appended if new."""
    path = preprocessed / name / "splits_final.json"
    splits = load_or_create_splits(preprocessed / name)
    base = splits[0]
    split = {**label_subset(base, min(1.0, cases / len(base["train"])), seed),
             "nnunet_mim_cell": {"probe_cases": cases, "seed": seed}}
    before = json.dumps(splits)
    fold = fold_of(splits, split)
    if json.dumps(splits) != before or not path.exists():
        atomic_write(path, json.dumps(splits, indent=1))
    return fold, split["train"]


def run_probe(p: Pipeline, checkpoint: str, dataset: str, configuration: str, part: str = "heads",
              cases: int = DEFAULT_CASES, epochs: int = DEFAULT_EPOCHS, iters: int = DEFAULT_ITERS, seed: int = 0,
              plans: str = "nnUNetPlans", random_results: str | Path | None = None) -> dict:
    """Both arms; the random one in ``random_results`` (an ``nnUNet_results``; default ``<root>/random``), where a
    finished random arm of the same seed, cases and budget is reused (the probe during pretraining trains it once)."""
    from nnunet_mim.trainers.probe import probe_trainer_for

    name = dataset_name(p.preprocessed, dataset)
    config = json.loads((p.preprocessed / name / f"{plans}.json").read_text())["configurations"]
    network = _network_class(config, configuration)
    trainer = probe_trainer_for(network, part)
    fold, train = probe_fold(p.preprocessed, name, cases, seed)
    env = p.budget(epochs, iters, max(1, iters // 5), seed)
    out = {"checkpoint": checkpoint, "dataset": name, "configuration": configuration, "trainer": trainer,
           "part": part, "fold": fold, "train_cases": train, "seed": seed,
           "budget": {"epochs": epochs, "iters": iters}}
    for arm, weights in (("pretrained", checkpoint), ("random", None)):
        results = Path(random_results) if arm == "random" and random_results else p.root / arm
        folder = p.results_folder(name, trainer, configuration, plans, results=results)
        p.folders["nnUNet_results"] = str(results)
        p.train(dataset, configuration, fold, trainer, folder, weights, **env)
        summary = json.loads((folder / f"fold_{fold}" / "validation" / "summary.json").read_text())
        out[arm] = {"dice": summary["foreground_mean"]["Dice"],
                    "per_class": {k: v["Dice"] for k, v in summary["mean"].items()}}
        p.say(f"probe {arm}: validation Dice {out[arm]['dice']:.3f}")
    out["difference"] = out["pretrained"]["dice"] - out["random"]["dice"]
    return out


def _network_class(config: dict, configuration: str) -> str:
    seen, current = set(), configuration
    while current not in seen:
        seen.add(current)
        entry = config[current]
        if "architecture" in entry:
            return entry["architecture"]["network_class_name"]
        current = entry.get("inherits_from", current)
    raise KeyError(f"configuration {configuration} names no architecture")


def _run(args) -> None:
    for v in ("nnUNet_raw", "nnUNet_preprocessed"):
        if not os.environ.get(v):
            raise SystemExit(f"nnunet_mim probe: export {v} as for any nnU-Net command")
    output = Path(args.output).resolve()
    p = Pipeline(output, "probe", "probe_log.txt", args.processes,
                 {"nnUNet_raw": os.environ["nnUNet_raw"], "nnUNet_preprocessed": os.environ["nnUNet_preprocessed"]})
    with p:
        result = run_probe(p, str(Path(args.checkpoint).resolve()), args.dataset, args.configuration, args.part,
                           args.cases, args.epochs, args.iters, args.seed, args.plans, args.random_results)
        (output / "probe.json").write_text(json.dumps(result, indent=1))
        p.say(f"probe ({result['part']}, {len(result['train_cases'])} training cases, {args.epochs * args.iters} "
              f"iterations): pretrained {result['pretrained']['dice']:.3f}, random {result['random']['dice']:.3f}, "
              f"difference {100 * result['difference']:+.1f} Dice points; {output / 'probe.json'}")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("probe", help="downstream probe: frozen pretrained body vs random body, light part "
                                            "trained on a few cases", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="pretraining (or any nnU-Net) checkpoint of the same configuration")
    p.add_argument("-d", "--dataset", required=True, help="labelled dataset (id or name), planned already")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-o", "--output", default="probe_output", help="probe runs and probe.json (default probe_output)")
    p.add_argument("--part", choices=("heads", "decoder"), default="heads",
                   help="what trains: the segmentation heads (default) or decoder + heads")
    p.add_argument("--cases", type=int, default=DEFAULT_CASES, help="labelled training cases")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--iters", type=int, default=DEFAULT_ITERS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--random-results", default=None, metavar="DIR",
                   help="nnUNet_results of the random arm (default <output>/random); a finished one is reused, so "
                        "probes of several checkpoints with the same seed, cases and budget train it once")
    p.set_defaults(func=_run)
