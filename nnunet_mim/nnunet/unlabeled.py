"""Import a folder of unlabeled images as a pretraining dataset preprocessed exactly like a target dataset.

HybridMIM's "generic mode": pretrain on unlabeled scans with the *target's* plans (spacing, intensity
normalisation, patch and network), then finetune on the target. nnU-Net's fingerprinting needs labels;
we skip it: the new dataset gets a copy of the target's plans, dataset.json and fingerprint, and every
image goes through the target configuration's own preprocessor (transpose, crop to non-zero, normalise
with the target's intensity statistics, resample to the target spacing). No dummy labels are asked of
the user; the stored segmentation is nnU-Net's "no label" map (-1 outside the non-zero crop, 0 inside).
Scans that are also cases of the target (imagesTr, imagesTs) are reported first (:mod:`.contamination`).

    nnunet_mim import-unlabeled -i scans/ -t 4 -d 504 -c 3d_fullres
    nnUNetv2_train 504 3d_fullres all -tr HybridMIMPretrainer
    nnUNetv2_train 4 3d_fullres 0 -pretrained_weights $nnUNet_results/Dataset504_.../checkpoint_final.pth
"""
from __future__ import annotations

import os
import re
import shutil
import warnings
from collections import defaultdict
from multiprocessing import get_context
from typing import Sequence

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isdir, join, load_json, maybe_mkdir_p, save_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_mim.nnunet.plans import dataset_folder, plans_path

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def group_images(folder: str, file_ending: str, num_channels: int) -> dict[str, list[str]]:
    """Map case id -> one file per channel. ``case_0000.nii.gz`` style names (nnU-Net's) are required for
    several channels; with one channel, plain ``case.nii.gz`` names are accepted too."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(file_ending))
    if not files:
        raise FileNotFoundError(f"No '*{file_ending}' image in {folder} (the target dataset's file_ending).")
    cases: dict[str, dict[int, str]] = defaultdict(dict)
    for f in files:
        stem = f[: -len(file_ending)]
        m = CHANNEL_SUFFIX.match(stem)
        if m:
            cases[m["case"]][int(m["channel"])] = join(folder, f)
        elif num_channels == 1:
            cases[stem][0] = join(folder, f)
        else:
            raise ValueError(f"{f}: with {num_channels} channels every image must be named <case>_XXXX{file_ending}")
    grouped = {}
    for case, channels in cases.items():
        if sorted(channels) != list(range(num_channels)):
            raise ValueError(f"Case {case!r} has channels {sorted(channels)}; the target dataset expects "
                             f"{list(range(num_channels))} ({num_channels} channel(s), _0000 ... in order).")
        grouped[case] = [channels[c] for c in range(num_channels)]
    return grouped


def check_raw_image(image_files: Sequence[str], reader_writer) -> None:
    """Refuse non-finite voxels in the raw image (CT normalisation clips them away, so the preprocessed data alone
    would not show them); warn about a constant channel (nothing to learn from, and z-scoring divides by ~0)."""
    raw, _ = reader_writer.read_images(list(image_files))
    if not np.isfinite(raw).all():
        bad = int((~np.isfinite(raw)).sum())
        raise ValueError(f"{image_files}: {bad} voxel(s) of the raw image are NaN or infinite; fix or drop this scan "
                         f"(normalisation may hide them, pretraining would learn from corrupted values).")
    for c, channel in enumerate(raw):
        if float(channel.max()) == float(channel.min()):
            warnings.warn(f"{image_files[c] if c < len(image_files) else image_files}: channel {c} is constant "
                          f"({float(channel.min())}); it carries nothing to pretrain on. Drop it unless that is "
                          f"intended.", stacklevel=2)


def unlabeled_preprocessor_class(base: type) -> type:
    """The target configuration's preprocessor, run without a label map."""

    class UnlabeledPreprocessor(base):
        def run_case(self, image_files, seg_file, plans_manager, configuration_manager, dataset_json):
            check_raw_image(image_files, plans_manager.image_reader_writer_class())
            data, seg, properties = super().run_case(image_files, None, plans_manager, configuration_manager,
                                                     dataset_json)
            if not np.isfinite(data).all():
                raise ValueError(f"{image_files}: the preprocessed image has NaN/inf values; fix or drop this scan "
                                 f"(pretraining on it would produce non-finite losses).")
            label_manager = plans_manager.get_label_manager(dataset_json)
            keys = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
            properties["class_locations"] = {k if not isinstance(k, list) else tuple(k): [] for k in keys}
            return data, seg, properties

    UnlabeledPreprocessor.__name__ = f"Unlabeled{base.__name__}"
    return UnlabeledPreprocessor


def _preprocess_one(args) -> str:
    preprocessor_cls, output_truncated, files, plans, configuration, dataset_json = args
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    unlabeled_preprocessor_class(preprocessor_cls)(verbose=False).run_case_save(
        output_truncated, files, None, plans_manager, configuration_manager, dataset_json)
    return output_truncated


def import_unlabeled(images_folder: str, target_dataset: str | int, dataset_id: int, name: str | None = None,
                     configurations: Sequence[str] = ("3d_fullres",), plans_identifier: str = "nnUNetPlans",
                     num_processes: int = 1, overwrite: bool = False, strict: bool = False) -> str:
    """Create ``DatasetXXX_<name>`` in nnUNet_preprocessed from ``images_folder`` with the target's plans.

    Before anything is written, the images are compared with the target's imagesTr and imagesTs
    (:mod:`nnunet_mim.nnunet.contamination`): a warning lists shared scans; ``strict`` refuses them.
    Returns the new dataset's name.
    """
    from nnunet_mim.nnunet.contamination import check_pool

    if not isdir(images_folder):
        raise NotADirectoryError(images_folder)
    target_name = maybe_convert_to_dataset_name(target_dataset)
    target_folder = dataset_folder(target_name)
    plans = load_json(plans_path(target_name, plans_identifier))
    dataset_json = load_json(join(target_folder, "dataset.json"))
    new_name = f"Dataset{int(dataset_id):03d}_{name or target_name.split('_', 1)[1] + 'Unlabeled'}"
    _check_free(int(dataset_id), new_name)
    new_folder = join(str(nnUNet_preprocessed), new_name)
    if isdir(new_folder) and not overwrite:
        raise FileExistsError(f"{new_folder} exists; pass --overwrite to rebuild it.")

    cases = group_images(images_folder, dataset_json["file_ending"], len(dataset_json["channel_names"]))
    plans_manager = PlansManager(plans)
    check_pool(cases, plans_manager.image_reader_writer_class, target_name, images_folder, strict=strict,
               fix=f"delete the files of these cases from {images_folder}, then run the import again",
               num_processes=num_processes)
    if isdir(new_folder):
        shutil.rmtree(new_folder)
    maybe_mkdir_p(new_folder)
    plans["dataset_name"] = new_name
    save_json(plans, join(new_folder, f"{plans_identifier}.json"), sort_keys=False)
    save_json(unlabeled_dataset_json(dataset_json, len(cases), images_folder, target_name),
              join(new_folder, "dataset.json"), sort_keys=False)
    shutil.copy(join(target_folder, "dataset_fingerprint.json"), join(new_folder, "dataset_fingerprint.json"))
    preprocess_unlabeled(new_folder, cases, plans, configurations, dataset_json, num_processes, target_name)
    print(f"Done: {new_name}. Pretrain with `nnUNetv2_train {int(dataset_id)} {configurations[0]} all -tr "
          f"HybridMIMPretrainer` and finetune on {target_name} with -pretrained_weights.")
    return new_name


def unlabeled_dataset_json(target_dataset_json: dict, num_cases: int, images_folder: str, plans_from: str) -> dict:
    """The target's dataset.json (labels, channels, file ending) marked as an unlabeled import of ``images_folder``;
    segmentation trainers refuse datasets with this mark."""
    return {**{k: v for k, v in target_dataset_json.items() if k != "dataset"}, "numTraining": num_cases,
            "nnunet_mim_unlabeled_import": {"source_folder": os.path.abspath(images_folder), "plans_from": plans_from}}


def preprocess_unlabeled(dataset_folder_: str, cases: dict[str, list[str]], plans: dict,
                         configurations: Sequence[str], dataset_json: dict, num_processes: int = 1,
                         plans_from: str | None = None) -> list[str]:
    """Run every case through each configuration's preprocessor without labels, into
    ``dataset_folder_/<data_identifier>`` (emptied first; configurations sharing data are done once). Returns the
    data identifiers written. ``plans_from`` names the dataset the plans were made for (for the progress line)."""
    plans_manager = PlansManager(plans)
    done = []
    for configuration in configurations:
        cm = plans_manager.get_configuration(configuration)
        if cm.data_identifier in done:
            continue
        done.append(cm.data_identifier)
        out = join(dataset_folder_, cm.data_identifier)
        if isdir(out):
            shutil.rmtree(out)
        maybe_mkdir_p(out)
        jobs = [(cm.preprocessor_class, join(out, case), files, plans, configuration, dataset_json)
                for case, files in cases.items()]
        print(f"Preprocessing {len(jobs)} unlabeled case(s) for {configuration} with the plans of "
              f"{plans_from or plans_manager.dataset_name} -> {out}")
        if num_processes > 1:
            with get_context("spawn").Pool(num_processes) as pool:
                for i, _ in enumerate(pool.imap_unordered(_preprocess_one, jobs), 1):
                    print(f"  {i}/{len(jobs)}", flush=True)
        else:
            for i, job in enumerate(jobs, 1):
                _preprocess_one(job)
                print(f"  {i}/{len(jobs)}", flush=True)
    return done


def _check_free(dataset_id: int, new_name: str) -> None:
    try:
        existing = maybe_convert_to_dataset_name(dataset_id)
    except RuntimeError:
        return
    if existing != new_name:
        raise FileExistsError(f"Dataset id {dataset_id} is already used by {existing}; choose another id.")
