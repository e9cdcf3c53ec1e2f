"""``nnunet_mim`` command line: the few commands nnU-Net itself does not have.

    nnunet_mim ext-path                       print the value for `export nnUNet_extTrainer=...`
    nnunet_mim add-config small ...           add a small configuration inheriting 3d_fullres
    nnunet_mim add-config swin ...            add a SwinUNETR configuration inheriting 3d_fullres
    nnunet_mim add-config sac-vit ...         add a SAC-ViT configuration inheriting 3d_fullres
    nnunet_mim add-config unet ...            nnU-Net's default U-Net re-planned for another patch size
    nnunet_mim import-unlabeled ...           unlabeled images -> pretraining dataset with a target's plans
    nnunet_mim check-weights ...              pre-flight check of a checkpoint against a target's network
    nnunet_mim build-data ...                 offline real-scan nnU-Net datasets (documentation/data.md)
    nnunet_mim evaluate ...                   Dice, HD95, ASSD of a prediction folder
    nnunet_mim demo / study / benchmark ...   the README demo, the label-efficiency study, step benchmarks
"""
from __future__ import annotations

import argparse
import os
import sys


def ext_trainer_path() -> str:
    """Folder to put in ``nnUNet_extTrainer`` (holds only the trainer index module)."""
    import nnunet_mim

    return os.path.join(os.path.dirname(os.path.abspath(nnunet_mim.__file__)), "ext_trainers")


def _ext_path(args) -> None:
    print(ext_trainer_path())


def _add_config(args) -> None:
    from nnunet_mim.plans import add_small_configuration, describe

    add_small_configuration(args.dataset, args.name, args.parent, args.plans, args.stages, tuple(args.features),
                            args.patch, args.batch_size)
    print("Added", describe(args.dataset, args.name, args.plans))


def _add_sac_vit_config(args) -> None:
    from nnunet_mim.architectures.sac_vit import add_sac_vit_configuration

    overrides = {k: v for k, v in (("embed_dim", args.embed_dim), ("depth", args.depth),
                                   ("num_heads", args.num_heads), ("decoder_channels", args.decoder_channels))
                 if v is not None}
    if args.grad_checkpointing:
        overrides["grad_checkpointing"] = True
    _, text = add_sac_vit_configuration(args.dataset, args.name, args.parent, args.plans, args.size, args.patch,
                                        args.batch_size, **overrides)
    print("Added", text)


def _add_swin_config(args) -> None:
    from nnunet_mim.plans import add_swin_configuration

    try:
        config = add_swin_configuration(args.dataset, args.name, args.parent, args.plans, args.feature_size,
                                        args.patch, args.batch_size, args.downsample, args.window_size,
                                        args.use_checkpoint, args.use_v2)
    except ValueError as e:
        raise SystemExit(f"nnunet_mim add-config swin: {e}")
    if args.patch is not None and list(args.patch) != config["patch_size"]:
        print(f"Patch {args.patch} rounded to {config['patch_size']} (SwinUNETR needs multiples of 32)")
    print(f"Added {args.name}: SwinUNETR feature_size {args.feature_size}, downsample {args.downsample}, patch "
          f"{config['patch_size']}, batch {config['batch_size']}, data of {args.parent}. Train with "
          f"`nnUNetv2_train {args.dataset} {args.name} FOLD -tr nnUNetTrainerSwinUNETR`, pretrain with "
          f"`-tr HybridMIMPretrainerSwin` (documentation/swin.md)")


def _add_unet_config(args) -> None:
    from nnunet_mim.plans import add_unet_configuration, describe

    add_unet_configuration(args.dataset, args.name, args.patch, args.parent, args.plans, args.batch_size)
    print("Added", describe(args.dataset, args.name, args.plans))


def _import_unlabeled(args) -> None:
    from nnunet_mim.unlabeled import import_unlabeled

    import_unlabeled(args.input, args.target, args.dataset_id, args.name, args.configurations, args.plans,
                     args.num_processes, args.overwrite)


def build_network_for(dataset: str, configuration: str, plans_identifier: str = "nnUNetPlans",
                      trainer: str = "nnUNetTrainer"):
    """The segmentation network that ``nnUNetv2_train`` would build for this dataset/configuration/trainer."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_mim.plans import dataset_folder, plans_path

    plans_manager = PlansManager(plans_path(dataset, plans_identifier))
    configuration_manager = plans_manager.get_configuration(configuration)
    dataset_json = load_json(join(dataset_folder(dataset), "dataset.json"))
    trainer_class = recursive_find_trainer_class_by_name(trainer)
    return trainer_class.build_network_architecture(
        plans_manager, configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, False)


def _check_weights(args) -> None:
    from nnunet_mim.weights import compare_state_dicts, format_report, load_checkpoint, state_dict_of

    network = build_network_for(args.dataset, args.configuration, args.plans, args.trainer)
    report = compare_state_dicts(state_dict_of(load_checkpoint(args.checkpoint)), network)
    print(format_report(report, args.checkpoint))
    ok = report.ok and not report.channel_mismatch
    print("OK: the checkpoint fits." if ok else "NOT compatible.")
    sys.exit(0 if ok else 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet_mim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ext-path", help="print the folder for `export nnUNet_extTrainer=...`")
    p.set_defaults(func=_ext_path)

    p = sub.add_parser("add-config", help="add a derived configuration to a dataset's plans")
    kinds = p.add_subparsers(dest="kind", required=True)
    s = kinds.add_parser("small", help="smaller network and patch (CPU demos, tests), same preprocessed data")
    s.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    s.add_argument("-n", "--name", default="3d_small", help="new configuration name (default 3d_small)")
    s.add_argument("--parent", default="3d_fullres")
    s.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    s.add_argument("--stages", type=int, default=4)
    s.add_argument("--features", type=int, nargs=2, default=(16, 128), metavar=("FIRST", "MAX"))
    s.add_argument("--patch", type=int, nargs=3, default=None)
    s.add_argument("--batch-size", type=int, default=None)
    s.set_defaults(func=_add_config)
    s = kinds.add_parser("swin", help="MONAI SwinUNETR on the parent's preprocessed data; patch rounded to "
                                      "multiples of 32")
    s.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    s.add_argument("-n", "--name", default="3d_swin", help="new configuration name (default 3d_swin)")
    s.add_argument("--parent", default="3d_fullres")
    s.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    s.add_argument("--feature-size", type=int, default=48, help="Swin embedding width, multiple of 12 (default 48)")
    s.add_argument("--patch", type=int, nargs=3, default=None, help="patch size (default: the parent's), rounded")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--downsample", choices=("mergingv2", "merging_legacy", "merging"), default="mergingv2",
                   help="patch merging; merging_legacy for NVIDIA/HybridMIM Swin weights (MONAI<=1.4 layer)")
    s.add_argument("--window-size", type=int, default=7)
    s.add_argument("--use-checkpoint", action="store_true", help="gradient checkpointing in the Swin stages")
    s.add_argument("--use-v2", action="store_true", help="SwinUNETR-v2 (residual conv block before each stage)")
    s.set_defaults(func=_add_swin_config)
    s = kinds.add_parser("sac-vit", help="SAC-ViT (PUMIT) network on the parent's preprocessed data; patch rounded to "
                                         "the token size, DA from the plan spacing")
    s.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    s.add_argument("-n", "--name", default="3d_sac_vit", help="new configuration name (default 3d_sac_vit)")
    s.add_argument("--parent", default="3d_fullres")
    s.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    s.add_argument("--size", choices=("S", "B", "L"), default="B", help="preset (default B)")
    s.add_argument("--patch", type=int, nargs=3, default=None, help="patch size (default: the parent's), rounded")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--embed-dim", type=int, default=None, help="override the preset (small CPU runs)")
    s.add_argument("--depth", type=int, default=None, help="override the preset")
    s.add_argument("--num-heads", type=int, default=None, help="override the preset")
    s.add_argument("--decoder-channels", type=int, nargs=6, default=None, help="6 U-Net decoder widths, levels 0..5")
    s.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing in the ViT blocks")
    s.set_defaults(func=_add_sac_vit_config)
    s = kinds.add_parser("unet", help="nnU-Net's default U-Net re-planned for another patch size (same-patch "
                                      "comparisons, e.g. the sac_vit benchmark)")
    s.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    s.add_argument("-n", "--name", required=True, help="new configuration name")
    s.add_argument("--patch", type=int, nargs=3, required=True)
    s.add_argument("--parent", default="3d_fullres")
    s.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    s.add_argument("--batch-size", type=int, default=None)
    s.set_defaults(func=_add_unet_config)

    p = sub.add_parser("import-unlabeled", help="unlabeled images -> pretraining dataset with a target's plans")
    p.add_argument("-i", "--input", required=True, help="folder of images (any format nnU-Net reads)")
    p.add_argument("-t", "--target", required=True, help="target (finetuning) dataset id or name, planned already")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="id of the new pretraining dataset")
    p.add_argument("-n", "--name", default=None, help="name of the new dataset (default <target>Unlabeled)")
    p.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"])
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-np", "--num-processes", type=int, default=int(os.environ.get("nnUNet_def_n_proc", 1)))
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_import_unlabeled)

    p = sub.add_parser("check-weights", help="pre-flight check of a pretrained checkpoint against a target")
    p.add_argument("checkpoint")
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainer", help="trainer that will finetune (builds the net)")
    p.set_defaults(func=_check_weights)

    from nnunet_mim import benchmark, demo, evaluation, study
    from nnunet_mim.data import builders

    for module in (builders, evaluation, demo, study, benchmark):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
