"""``nnunet_mim`` command line: the few commands nnU-Net itself does not have.

    nnunet_mim ext-path                       print the value for `export nnUNet_extTrainer=...`
    nnunet_mim register-trainers              make the trainers visible to nnunetv2 2.6 / 2.7 (2.8: ext-path)
    nnunet_mim unregister-trainers            remove that registration again
    nnunet_mim add-config small ...           add a small configuration inheriting 3d_fullres
    nnunet_mim add-config swin ...            add a SwinUNETR configuration inheriting 3d_fullres
    nnunet_mim add-config sac-vit ...         add a SAC-ViT configuration inheriting 3d_fullres
    nnunet_mim add-config primus ...          add a Primus configuration inheriting 3d_fullres
    nnunet_mim add-config unet ...            nnU-Net's default U-Net re-planned for another patch size
    nnunet_mim import-unlabeled ...           unlabeled images -> pretraining dataset with a target's plans
    nnunet_mim transfer-plans ...             a target's plans -> an existing pretraining dataset, re-preprocessed
    nnunet_mim check-weights ...              pre-flight check of a checkpoint against a target's network
    nnunet_mim convert-swin ...               third-party SwinUNETR weights -> a -pretrained_weights file
    nnunet_mim import-weights ...             any pretrained checkpoint -> a configuration + -pretrained_weights file
    nnunet_mim settings                       the environment variables nnunet_mim reads, and their values
    nnunet_mim build-data ...                 offline real-scan nnU-Net datasets (documentation/data.md)
    nnunet_mim evaluate ...                   Dice, HD95, ASSD of a prediction folder
    nnunet_mim demo / study / probe ...       the README demo, the label-efficiency study, the downstream probe
    nnunet_mim benchmark ...                  step time and memory, side by side
"""
from __future__ import annotations

import argparse
import sys


def _config_kind(kinds, kind: str, default_name: str, help: str) -> argparse.ArgumentParser:
    """An ``add-config`` kind with the arguments every kind shares (dataset, new name, parent, plans)."""
    s = kinds.add_parser(kind, help=help)
    s.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    s.add_argument("-n", "--name", default=default_name, help=f"new configuration name (default {default_name})")
    s.add_argument("--parent", default="3d_fullres")
    s.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    return s


def _ext_path(args) -> None:
    from nnunet_mim import ext_trainer_path

    print(ext_trainer_path())


def _register_trainers(args) -> None:
    from nnunet_mim.nnunet.registration import register

    try:
        print(register(force=args.force).message)
    except PermissionError as e:
        raise SystemExit(f"nnunet_mim register-trainers: cannot write into nnU-Net's trainer folder ({e}); run it "
                         f"with the rights to change this Python environment.") from None


def _unregister_trainers(args) -> None:
    from nnunet_mim.nnunet.registration import unregister

    try:
        print(unregister().message)
    except PermissionError as e:
        raise SystemExit(f"nnunet_mim unregister-trainers: cannot remove the file ({e}); run it with the rights to "
                         f"change this Python environment.") from None


def _add_config(args) -> None:
    from nnunet_mim.nnunet.plans import add_small_configuration, describe

    add_small_configuration(args.dataset, args.name, args.parent, args.plans, args.stages, tuple(args.features),
                            args.patch, args.batch_size, overwrite=args.overwrite)
    print("Added", describe(args.dataset, args.name, args.plans))


def _add_sac_vit_config(args) -> None:
    from nnunet_mim.nnunet.sac_vit_plans import add_sac_vit_configuration

    overrides = {k: v for k, v in (("embed_dim", args.embed_dim), ("depth", args.depth),
                                   ("num_heads", args.num_heads), ("decoder_channels", args.decoder_channels))
                 if v is not None}
    if args.grad_checkpointing:
        overrides["grad_checkpointing"] = True
    _, text = add_sac_vit_configuration(args.dataset, args.name, args.parent, args.plans, args.size, args.patch,
                                        args.batch_size, overwrite=args.overwrite, **overrides)
    print("Added", text)


def _add_primus_config(args) -> None:
    from nnunet_mim.nnunet.primus_plans import add_primus_configuration

    overrides = {k: v for k, v in (("embed_dim", args.embed_dim), ("eva_depth", args.depth),
                                   ("eva_numheads", args.num_heads)) if v is not None}
    try:
        _, text = add_primus_configuration(args.dataset, args.name, args.parent, args.plans, args.size, args.patch,
                                           args.batch_size, args.patch_embed_size, overwrite=args.overwrite,
                                           **overrides)
    except ValueError as e:
        raise SystemExit(f"nnunet_mim add-config primus: {e}")
    print("Added", text)


def _add_swin_config(args) -> None:
    from nnunet_mim.architectures.swin_unetr import SWIN_DIVISOR, SWIN_FEATURE_SIZE, SWIN_WINDOW_SIZE
    from nnunet_mim.nnunet.plans import add_swin_configuration

    args.feature_size = args.feature_size or SWIN_FEATURE_SIZE
    try:
        config = add_swin_configuration(args.dataset, args.name, args.parent, args.plans, args.feature_size,
                                        args.patch, args.batch_size, args.downsample,
                                        args.window_size or SWIN_WINDOW_SIZE, args.use_checkpoint, args.use_v2,
                                        overwrite=args.overwrite)
    except ValueError as e:
        raise SystemExit(f"nnunet_mim add-config swin: {e}")
    if args.patch is not None and list(args.patch) != config["patch_size"]:
        print(f"Patch {args.patch} rounded to {config['patch_size']} (SwinUNETR needs multiples of {SWIN_DIVISOR})")
    print(f"Added {args.name}: SwinUNETR feature_size {args.feature_size}, downsample {args.downsample}, patch "
          f"{config['patch_size']}, batch {config['batch_size']}, data of {args.parent}. Train with "
          f"`nnUNetv2_train {args.dataset} {args.name} FOLD -tr nnUNetTrainerSwinUNETR`, pretrain with "
          f"`-tr HybridMIMPretrainerSwin` (documentation/swin.md)")


def _add_unet_config(args) -> None:
    from nnunet_mim.nnunet.plans import add_unet_configuration, describe

    add_unet_configuration(args.dataset, args.name, args.patch, args.parent, args.plans, args.batch_size,
                           overwrite=args.overwrite)
    print("Added", describe(args.dataset, args.name, args.plans))


def _import_unlabeled(args) -> None:
    from nnunet_mim.nnunet import settings

    num_processes = args.num_processes or settings.read("nnUNet_def_n_proc") or 8  # before nnU-Net reads it

    from nnunet_mim.nnunet.contamination import ContaminationError
    from nnunet_mim.nnunet.unlabeled import import_unlabeled

    try:
        import_unlabeled(args.input, args.target, args.dataset_id, args.name, args.configurations, args.plans,
                         num_processes, args.overwrite, strict=args.strict)
    except ContaminationError as e:
        raise SystemExit(f"nnunet_mim import-unlabeled: {e}") from None


def _check_weights(args) -> None:
    from nnunet_mim.nnunet.networks import build_network_for
    from nnunet_mim.nnunet.weights import compare_state_dicts, format_report, load_checkpoint, state_dict_of

    network = build_network_for(args.dataset, args.configuration, args.plans, args.trainer)
    try:
        checkpoint = load_checkpoint(args.checkpoint)
    except (RuntimeError, FileNotFoundError) as e:  # corrupt, empty, unsafe or missing: the message says which
        print(f"NOT loadable: {e}")
        sys.exit(1)
    report = compare_state_dicts(state_dict_of(checkpoint), network)
    print(format_report(report, args.checkpoint))
    ok = report.ok and not report.channel_mismatch
    print("OK: the checkpoint fits." if ok else "NOT compatible.")
    sys.exit(0 if ok else 1)


def _settings(args) -> None:
    from nnunet_mim.nnunet import settings

    if args.markdown:
        print(settings.markdown_table())
        return
    for s in settings.SETTINGS.values():
        found = s.raw()
        value = "(unset)" if found is None else f"{found[1]!r}" + (f" (from {found[0]})" if found[0] != s.name else "")
        print(f"{s.name:<28} {value:<30} {s.meaning}")


def _convert_swin(args) -> None:
    import warnings

    import torch

    from nnunet_mim.architectures.swin_unetr import SwinUNETR
    from nnunet_mim.nnunet.networks import build_network_for
    from nnunet_mim.nnunet.swin_weights import load_third_party_swin_weights

    network = build_network_for(args.dataset, args.configuration, args.plans)
    if not isinstance(network, SwinUNETR):
        raise SystemExit(f"Configuration {args.configuration!r} is not a SwinUNETR configuration "
                         f"({type(network).__name__}); create one with `nnunet_mim add-config swin`.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = load_third_party_swin_weights(network, args.input)
    for w in caught:
        print(f"WARNING: {w.message}")
    torch.save({"network_weights": network.state_dict(), "source": args.input}, args.output)
    print(f"Wrote {args.output}; finetune with nnUNetv2_train {args.dataset} {args.configuration} FOLD "
          f"-tr nnUNetTrainerSwinUNETR -pretrained_weights {args.output}")
    if report.fresh:
        print(f"Note: {len(report.fresh)} tensors are not in {args.input} and start from scratch.")


#: subcommands defined by application modules, imported only when chosen (``ext-path`` must not import torch)
LAZY_COMMANDS = {
    "build-data": "nnunet_mim.apps.data.builders",
    "evaluate": "nnunet_mim.apps.evaluation",
    "demo": "nnunet_mim.apps.demo",
    "study": "nnunet_mim.apps.study",
    "probe": "nnunet_mim.apps.probe",
    "benchmark": "nnunet_mim.apps.benchmark",
    "transfer-plans": "nnunet_mim.apps.transfer_plans",
    "import-weights": "nnunet_mim.apps.import_weights",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; of the application subcommands only ``command``'s module is imported (the others are listed)."""
    parser = argparse.ArgumentParser(prog="nnunet_mim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ext-path", help="print the folder for `export nnUNet_extTrainer=...`")
    p.set_defaults(func=_ext_path)

    p = sub.add_parser("register-trainers", help="nnunetv2 2.6 / 2.7: write one module into nnU-Net's trainer folder "
                                                 "that re-exports our trainers (2.8 uses nnUNet_extTrainer)")
    p.add_argument("--force", action="store_true", help="register on nnunetv2 2.8+ as well (harmless, not needed)")
    p.set_defaults(func=_register_trainers)
    p = sub.add_parser("unregister-trainers", help="remove the module that register-trainers wrote")
    p.set_defaults(func=_unregister_trainers)

    p = sub.add_parser("add-config", help="add a derived configuration to a dataset's plans")
    kinds = p.add_subparsers(dest="kind", required=True)
    s = _config_kind(kinds, "small", "3d_small",
                     "smaller network and patch (CPU demos, tests), same preprocessed data")
    s.add_argument("--stages", type=int, default=4)
    s.add_argument("--features", type=int, nargs=2, default=(16, 128), metavar=("FIRST", "MAX"))
    s.add_argument("--patch", type=int, nargs=3, default=None)
    s.add_argument("--batch-size", type=int, default=None)
    s.set_defaults(func=_add_config)
    s = _config_kind(kinds, "swin", "3d_swin",
                     "MONAI SwinUNETR on the parent's preprocessed data; patch rounded to multiples of 32")
    s.add_argument("--feature-size", type=int, default=None,
                   help="Swin embedding width, multiple of 12 (default 48, Swin-UNETR's)")
    s.add_argument("--patch", type=int, nargs=3, default=None, help="patch size (default: the parent's), rounded")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--downsample", choices=("mergingv2", "merging_legacy", "merging"), default="mergingv2",
                   help="patch merging; merging_legacy for NVIDIA/HybridMIM Swin weights (MONAI<=1.4 layer)")
    s.add_argument("--window-size", type=int, default=None, help="attention window (default 7, Swin-UNETR's)")
    s.add_argument("--use-checkpoint", action="store_true", help="gradient checkpointing in the Swin stages")
    s.add_argument("--use-v2", action="store_true", help="SwinUNETR-v2 (residual conv block before each stage)")
    s.set_defaults(func=_add_swin_config)
    s = _config_kind(kinds, "sac-vit", "3d_sac_vit",
                     "SAC-ViT (PUMIT) network on the parent's preprocessed data; patch rounded to the token size, DA "
                     "from the plan spacing")
    s.add_argument("--size", choices=("S", "B", "L"), default="B", help="preset (default B)")
    s.add_argument("--patch", type=int, nargs=3, default=None, help="patch size (default: the parent's), rounded")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--embed-dim", type=int, default=None, help="override the preset (small CPU runs)")
    s.add_argument("--depth", type=int, default=None, help="override the preset")
    s.add_argument("--num-heads", type=int, default=None, help="override the preset")
    s.add_argument("--decoder-channels", type=int, nargs=6, default=None, help="6 U-Net decoder widths, levels 0..5")
    s.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing in the ViT blocks")
    s.set_defaults(func=_add_sac_vit_config)
    s = _config_kind(kinds, "primus", "3d_primus",
                     "Primus (dynamic-network-architectures) on the parent's preprocessed data; patch rounded to the "
                     "patch embedding size")
    s.add_argument("--size", choices=("S", "B", "M", "L"), default="B", help="the paper's preset (default B)")
    s.add_argument("--patch", type=int, nargs=3, default=None, help="patch size (default: the parent's), rounded")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--patch-embed-size", type=int, nargs=3, default=[8, 8, 8],
                   help="voxels per token and axis, powers of two (default 8 8 8)")
    s.add_argument("--embed-dim", type=int, default=None, help="override the preset (small CPU runs)")
    s.add_argument("--depth", type=int, default=None, help="override the preset")
    s.add_argument("--num-heads", type=int, default=None, help="override the preset")
    s.set_defaults(func=_add_primus_config)
    s = kinds.add_parser("unet", help="nnU-Net's default U-Net re-planned for another patch size (same-patch "
                                      "comparisons, e.g. the sac_vit benchmark)")
    s.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    s.add_argument("-n", "--name", required=True, help="new configuration name")
    s.add_argument("--patch", type=int, nargs=3, required=True)
    s.add_argument("--parent", default="3d_fullres")
    s.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    s.add_argument("--batch-size", type=int, default=None)
    s.set_defaults(func=_add_unet_config)

    for kind in kinds.choices.values():
        kind.add_argument("--overwrite", action="store_true",
                          help="replace an existing configuration of that name (never one of nnU-Net's own)")

    p = sub.add_parser("import-unlabeled", help="unlabeled images -> pretraining dataset with a target's plans")
    p.add_argument("-i", "--input", required=True, help="folder of images (any format nnU-Net reads)")
    p.add_argument("-t", "--target", required=True, help="target (finetuning) dataset id or name, planned already")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="id of the new pretraining dataset")
    p.add_argument("-n", "--name", default=None, help="name of the new dataset (default <target>Unlabeled)")
    p.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"])
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-np", "--num-processes", type=int, default=None,
                   help="preprocessing processes (default: $nnUNet_def_n_proc, else 8, as nnU-Net's commands)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--strict", action="store_true",
                   help="refuse images that are also cases of the target (imagesTr, imagesTs); default: a warning")
    p.set_defaults(func=_import_unlabeled)

    p = sub.add_parser("check-weights", help="pre-flight check of a pretrained checkpoint against a target")
    p.add_argument("checkpoint")
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainer", help="trainer that will finetune (builds the net)")
    p.set_defaults(func=_check_weights)

    p = sub.add_parser("settings", help="the environment variables nnunet_mim reads, with their current values")
    p.add_argument("--markdown", action="store_true", help="the README's table")
    p.set_defaults(func=_settings)

    p = sub.add_parser("convert-swin", help="third-party SwinUNETR weights (NVIDIA SSL, HybridMIM, MONAI) -> a "
                                            "-pretrained_weights file for a Swin configuration",
                       description="Keys the file lacks (e.g. the decoder of an encoder-only checkpoint) keep the "
                                   "fresh initialisation of the target network. Reads the file with "
                                   "weights_only=True; nothing is downloaded.")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-c", "--configuration", default="3d_swin")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.set_defaults(func=_convert_swin)

    import importlib

    for name, module in LAZY_COMMANDS.items():
        if command == name:
            importlib.import_module(module).add_parser(sub)
        else:  # listed in --help, never parsed
            sub.add_parser(name, help=f"see `nnunet_mim {name} -h`")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    from nnunet_mim.nnunet.settings import SettingError

    try:
        args.func(args)
    except (SettingError, FileExistsError) as e:  # a malformed variable, an existing output: the message names the fix
        raise SystemExit(f"nnunet_mim {command}: {e}") from None


if __name__ == "__main__":
    main()
