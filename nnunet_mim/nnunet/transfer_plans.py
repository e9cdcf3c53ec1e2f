"""Give a pretraining dataset the plans of the finetuning target, and preprocess it again with them.

A pretrained network fits its finetuning target only if both were planned alike (spacing, normalisation, patch,
network). nnU-Net's ``nnUNetv2_move_plans_between_datasets -s SOURCE -t TARGET`` does this, but "target" there is the
dataset that *receives* the plans: the pretraining data, not the finetuning target. Here the roles are named:

    nnunet_mim transfer-plans --from 4 --to 512 -c 3d_fullres
    # plans of Dataset004_X (finetuning target) -> Dataset512_Y (pretraining data)

Conventions:

- ``--from``: the labelled finetuning target, planned (``nnUNet_preprocessed/<from>/<plans>.json``). ``--to``: the
  pretraining dataset that receives the plans (written as ``<plans name>.json``, by default the same identifier).
- Plans are moved by nnU-Net's own ``move_plans_between_datasets`` (dataset name, plans name, data identifiers,
  image reader of the receiving dataset). A dataset made by ``nnunet_mim import-unlabeled`` has no raw folder,
  which that function needs; for it the same fields are set here.
- The receiving dataset is preprocessed again for the given configurations: with nnU-Net's ``preprocess_dataset``
  when it is a labelled raw dataset, with the unlabeled preprocessor of :mod:`.unlabeled` when it has no labels (an
  import of ``nnunet_mim import-unlabeled``, or a raw dataset without ``labelsTr``). Unlabeled datasets keep the
  import mark in their dataset.json (segmentation trainers refuse them) and take the target's labels and
  fingerprint, as an import does.
- Its images are compared with the target's imagesTr and imagesTs first (:mod:`.contamination`): shared scans are
  listed in a warning, or refused with ``strict``.
- Existing plans of the receiving dataset are replaced only with ``overwrite``; the previous file is kept as
  ``<plans>.json.bak`` (as ``nnunet_mim add-config`` does). Preprocessed data of other configurations, made with the
  old plans, is reported as stale.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Sequence

from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, load_json, maybe_mkdir_p, \
    save_json
from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_mim.nnunet.contamination import UNLABELED_IMPORT_KEY, check_pool, reader_for
from nnunet_mim.nnunet.plans import plans_path
from nnunet_mim.nnunet.unlabeled import group_images, preprocess_unlabeled, unlabeled_dataset_json

LABELLED, UNLABELED_RAW, UNLABELED_IMPORT = "labelled nnU-Net dataset", "raw dataset without labels", \
    "nnunet_mim import-unlabeled dataset"


@dataclass(frozen=True)
class Receiver:
    """The dataset that receives the plans: its name, kind, own dataset.json and images (case -> files)."""
    name: str
    kind: str
    dataset_json: dict
    images: dict[str, list[str]]
    images_folder: str


def dataset_id(name: str) -> int:
    """``Dataset512_Pool`` -> 512."""
    return int(name[len("Dataset"):].split("_", 1)[0])


def roles(source_name: str, receiving_name: str) -> str:
    return f"plans of {source_name} (finetuning target) -> {receiving_name} (pretraining data)"


def _dataset_name(dataset: str | int, role: str, fix: str) -> str:
    try:
        return maybe_convert_to_dataset_name(dataset)
    except RuntimeError:
        raise FileNotFoundError(f"{role} dataset {dataset} is in neither nnUNet_raw nor nnUNet_preprocessed: {fix}") \
            from None


def source_plans_file(source: str | int, plans_identifier: str) -> str:
    """The finetuning target's plans; it must be planned and labelled."""
    name = _dataset_name(source, "--from", f"give the planned, labelled finetuning target (then run "
                                          f"nnUNetv2_plan_and_preprocess -d {source} if needed)")
    try:
        path = plans_path(name, plans_identifier)
    except FileNotFoundError:
        raise FileNotFoundError(f"{name} has no plans {plans_identifier}.json yet: run nnUNetv2_plan_and_preprocess "
                                f"-d {source} first (or give its plans identifier with -p).") from None
    dataset_json_file = join(str(nnUNet_preprocessed), name, "dataset.json")
    imported = load_json(dataset_json_file).get(UNLABELED_IMPORT_KEY) if isfile(dataset_json_file) else None
    if imported:
        raise ValueError(f"{name} is an unlabeled pretraining dataset (made by nnunet_mim import-unlabeled); --from "
                         f"takes the labelled finetuning target, e.g. --from {imported.get('plans_from')}.")
    return path


def receiver(dataset: str | int) -> Receiver:
    """What kind of dataset receives the plans, and where its images are."""
    name = _dataset_name(dataset, "--to", "create it first (an nnU-Net raw dataset, or nnunet_mim import-unlabeled)")
    raw = join(str(nnUNet_raw), name) if nnUNet_raw else None
    if raw is not None and isfile(join(raw, "dataset.json")):
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

        own = load_json(join(raw, "dataset.json"))
        files = get_filenames_of_train_images_and_targets(raw, own)
        if not files:
            raise FileNotFoundError(f"{raw}/imagesTr has no '*{own['file_ending']}' image.")
        images = {case: list(entry["images"]) for case, entry in files.items()}
        kind = LABELLED if all(isfile(entry["label"]) for entry in files.values()) else UNLABELED_RAW
        return Receiver(name, kind, own, images, join(raw, "imagesTr"))
    preprocessed_json = join(str(nnUNet_preprocessed), name, "dataset.json")
    own = load_json(preprocessed_json) if isfile(preprocessed_json) else {}
    if not own.get(UNLABELED_IMPORT_KEY):
        raise FileNotFoundError(f"{name} has no {raw or '$nnUNet_raw/' + name}/dataset.json and was not made by "
                                f"nnunet_mim import-unlabeled; nothing to preprocess with the new plans.")
    folder = own[UNLABELED_IMPORT_KEY]["source_folder"]
    if not isdir(folder):
        raise FileNotFoundError(f"{name} was imported from {folder}, which is not there any more: restore it to "
                                f"preprocess {name} again.")
    cases = group_images(folder, own["file_ending"], len(own["channel_names"]))
    return Receiver(name, UNLABELED_IMPORT, own, cases, folder)


def check_channels(source_json: dict, receiving: Receiver, source_name: str) -> None:
    """Plans fit only images with the same number of input channels; other channel names are only reported."""
    theirs, ours = source_json["channel_names"], receiving.dataset_json["channel_names"]
    if len(theirs) != len(ours):
        raise ValueError(f"{source_name} has {len(theirs)} input channel(s) {dict(theirs)}, {receiving.name} "
                         f"{len(ours)} {dict(ours)}: plans only transfer between datasets with the same channels, in "
                         f"the same order.")
    if list(map(str, theirs.values())) != list(map(str, ours.values())):
        print(f"Note: channel names differ ({dict(theirs)} vs {dict(ours)}); {source_name}'s normalisation is applied "
              f"to {receiving.name}'s channels in order.")


def moved_plans(source_plans: dict, receiving: Receiver, source_identifier: str, receiving_identifier: str) -> dict:
    """What nnU-Net's ``move_plans_between_datasets`` writes, for a receiving dataset without a raw folder."""
    plans = {**source_plans, "dataset_name": receiving.name, "plans_name": receiving_identifier}
    plans["configurations"] = {c: dict(cfg) for c, cfg in source_plans["configurations"].items()}
    if receiving_identifier != source_identifier:
        for cfg in plans["configurations"].values():
            if "data_identifier" in cfg:
                old = cfg["data_identifier"]
                cfg["data_identifier"] = (receiving_identifier + old[len(source_identifier):]
                                          if old.startswith(source_identifier) else f"{receiving_identifier}_{old}")
    example = next(iter(receiving.images.values()))[0]
    plans["image_reader_writer"] = reader_for(receiving.dataset_json, example).__name__
    return plans


def data_identifiers(plans: dict, configurations: Sequence[str]) -> dict[str, str]:
    """Data identifier -> first configuration that uses it (configurations sharing data are preprocessed once)."""
    manager = PlansManager(plans)
    out: dict[str, str] = {}
    for c in configurations:
        out.setdefault(manager.get_configuration(c).data_identifier, c)
    return out


def stale_data(plans: dict, folder: str, fresh: Sequence[str]) -> dict[str, str]:
    """Data folders of other configurations of ``plans`` that exist but were made before the transfer."""
    manager = PlansManager(plans)
    stale = {}
    for c in manager.available_configurations:
        identifier = manager.get_configuration(c).data_identifier
        if identifier not in fresh and identifier not in stale and isdir(join(folder, identifier)):
            stale[identifier] = c
    return stale


def transfer_plans(source: str | int, to: str | int, plans_identifier: str = "nnUNetPlans",
                   configurations: Sequence[str] = ("3d_fullres",), num_processes: int = 1, overwrite: bool = False,
                   receiving_plans_identifier: str | None = None, strict: bool = False) -> str:
    """Give ``to`` (pretraining data) the plans of ``source`` (finetuning target) and preprocess it again for
    ``configurations``. Its images are first compared with the target's (:mod:`.contamination`: a warning, or a
    refusal when ``strict``). Returns the path of the receiving dataset's new plans file."""
    receiving_identifier = receiving_plans_identifier or plans_identifier
    source_file = source_plans_file(source, plans_identifier)
    source_plans = load_json(source_file)
    source_name = source_plans["dataset_name"]
    receiving = receiver(to)
    if receiving.name == source_name:
        raise ValueError(f"--from and --to are both {source_name}: --to is the pretraining dataset that receives the "
                         f"plans of the finetuning target --from.")
    missing = [c for c in configurations if c not in source_plans["configurations"]]
    if missing:
        raise ValueError(f"{source_name}'s {plans_identifier}.json has no configuration {missing}; available: "
                         f"{list(source_plans['configurations'])}.")
    source_json = load_json(join(str(nnUNet_preprocessed), source_name, "dataset.json"))
    check_channels(source_json, receiving, source_name)
    folder = join(str(nnUNet_preprocessed), receiving.name)
    path = join(folder, f"{receiving_identifier}.json")
    if isfile(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it (the current file is kept as "
                              f"{path}.bak), or write the transferred plans under another name with --plans-name.")

    check_pool(receiving.images, reader_for(receiving.dataset_json, next(iter(receiving.images.values()))[0]),
               source_name, f"{receiving.name}, from {receiving.images_folder}", strict=strict,
               fix=f"remove these cases from {receiving.images_folder}", num_processes=num_processes)
    print(f"Transferring the {roles(source_name, receiving.name)} [{receiving.kind}], {plans_identifier} -> "
          f"{receiving_identifier}, configurations {list(configurations)}")
    maybe_mkdir_p(folder)
    previous = f"{path}.previous"
    if isfile(path):
        shutil.copyfile(path, previous)
    if receiving.kind == UNLABELED_IMPORT:
        save_json(moved_plans(source_plans, receiving, plans_identifier, receiving_identifier), f"{path}.partial",
                  sort_keys=False)
        os.replace(f"{path}.partial", path)
    else:
        from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import \
            move_plans_between_datasets

        move_plans_between_datasets(source_name, receiving.name, plans_identifier, receiving_identifier)
    plans = load_json(path)
    if isfile(previous):  # a rerun that writes the same plans keeps the backup of the original ones
        if load_json(previous) != plans:
            os.replace(previous, f"{path}.bak")
            print(f"Previous plans kept as {path}.bak")
        else:
            os.remove(previous)
    todo = data_identifiers(plans, configurations)

    if receiving.kind == LABELLED:
        from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

        shutil.copyfile(join(str(nnUNet_raw), receiving.name, "dataset.json"), join(folder, "dataset.json"))
        preprocess_dataset(dataset_id(receiving.name), receiving_identifier, list(todo.values()), [num_processes],
                           verbose=False)
    else:
        dataset_json = {**unlabeled_dataset_json(source_json, len(receiving.images), receiving.images_folder,
                                                 source_name), "file_ending": receiving.dataset_json["file_ending"]}
        save_json(dataset_json, join(folder, "dataset.json"), sort_keys=False)
        fingerprint = join(str(nnUNet_preprocessed), source_name, "dataset_fingerprint.json")
        if isfile(fingerprint):
            shutil.copyfile(fingerprint, join(folder, "dataset_fingerprint.json"))
        preprocess_unlabeled(folder, receiving.images, plans, list(todo.values()), dataset_json, num_processes,
                             source_name)

    stale = stale_data(plans, folder, list(todo))
    if stale:
        everything = list(dict.fromkeys([*todo.values(), *stale.values()]))
        print(f"WARNING: {', '.join(join(folder, s) for s in stale)} was preprocessed with the previous plans and no "
              f"longer matches them: delete it, or run this command again with -c {' '.join(everything)} "
              f"--overwrite.")
    print(f"Done: {roles(source_name, receiving.name)}; {receiving.name} is preprocessed for "
          f"{list(configurations)} in {folder}.")
    ident = "" if receiving_identifier == "nnUNetPlans" else f" -p {receiving_identifier}"
    print(f"Pretrain with `nnUNetv2_train {dataset_id(receiving.name)} {configurations[0]} all -tr "
          f"HybridMIMPretrainer{ident}`, "
          f"then finetune on {source_name} with -pretrained_weights (its checkpoint_final.pth).")
    return path
