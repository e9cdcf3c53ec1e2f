"""``nnunet_mim import-weights``: bring a pretrained checkpoint (nnssl / OpenMind, MONAI SwinUNETR, another nnU-Net
dataset or plan, a plain state dict) into a planned nnU-Net dataset (documentation/import_weights.md).

    nnunet_mim import-weights checkpoint_final.pth -d 4 -c 3d_openmind

adds configuration ``3d_openmind`` (the checkpoint's network, its spacing and recommended patch, the target's data
and normalisation), writes the converted weights next to the dataset's plans, prints the pre-flight report and the
stock command to finetune with. ``--into CONFIGURATION`` converts into an existing configuration instead.
"""
from __future__ import annotations

import os
import re

PARENT = "3d_fullres"
DEFAULT_CLASS_TRAINER = "unet"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "import-weights", help="a pretrained checkpoint (nnssl/OpenMind, MONAI Swin, nnU-Net, state dict) -> a "
                               "configuration + a -pretrained_weights file",
        description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="local file (.pth / .pt / .safetensors); read with weights_only=True")
    p.add_argument("-d", "--dataset", required=True, help="target dataset id or name (planned)")
    p.add_argument("-c", "--configuration", default=None,
                   help="name of the new configuration (default 3d_<architecture>, e.g. 3d_resencl)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    p.add_argument("--parent", default=PARENT, help="configuration whose data/normalisation the new one inherits")
    p.add_argument("--into", default=None, metavar="CONFIGURATION",
                   help="convert into this existing configuration instead of adding one (needed for plain state "
                        "dicts; kernels, channels and stages are adapted)")
    p.add_argument("-tr", "--trainer", default=None,
                   help="trainer that will finetune (builds the network; default by architecture: "
                        "nnUNetTrainerMIMFinetune, nnUNetTrainerMIMFinetunePrimus, nnUNetTrainerSwinUNETR)")
    p.add_argument("-o", "--output", default=None,
                   help="converted file (default <nnUNet_preprocessed>/<dataset>/<plans>__<configuration>__"
                        "imported.pth)")
    p.add_argument("--patch", type=int, nargs="+", default=None, help="patch size (default: the checkpoint's "
                                                                      "recommended one, else the parent's)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--spacing", choices=("checkpoint", "target"), default="checkpoint",
                   help="checkpoint: pretraining spacing (new preprocessed data when it differs); target: the "
                        "parent's spacing and data")
    p.add_argument("--channel-map", nargs="+", default=None, metavar="TARGET=SOURCE",
                   help="copy checkpoint channel SOURCE into target channel TARGET (dataset.json channel_names or "
                        "indices); unmapped channels start at --channel-fill")
    p.add_argument("--channel-fill", choices=("zero", "mean"), default="zero",
                   help="start of target channels without a counterpart (default zero: the mapped channels alone "
                        "give the pretrained response)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing configuration / output file")
    p.set_defaults(func=run)


def default_configuration_name(architecture_name: str) -> str:
    return "3d_" + (re.sub(r"[^a-z0-9]+", "", architecture_name.lower()) or "imported")


def family_of(network_class_name: str) -> str:
    """Which default trainer a configuration's network needs."""
    if network_class_name.endswith(".Primus"):
        return "primus"
    if network_class_name.endswith("SwinUNETR"):
        return "swin"
    return DEFAULT_CLASS_TRAINER


def _load(path: str):
    from nnunet_mim.nnunet.weights import load_checkpoint

    try:
        return load_checkpoint(path)
    except RuntimeError as e:
        if "nnssl" in str(e) or "AdaptationPlan" in str(e):
            raise SystemExit(f"{e}\nThis nnssl checkpoint pickled its adaptation plan as an object, which cannot be "
                             f"read safely. Re-save it where nnssl is installed with checkpoint["
                             f"'nnssl_adaptation_plan'] = plan.serialize() (what nnssl's trainers write).") from None
        raise SystemExit(str(e)) from None


def run(args) -> None:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_mim.nnunet.checkpoint_formats import UnknownCheckpointFormat, read_source
    from nnunet_mim.nnunet.import_weights import (DEFAULT_TRAINERS, configuration_overrides, convert_weights,
                                                  format_import_report, plan_warnings)
    from nnunet_mim.nnunet.networks import build_network_for
    from nnunet_mim.nnunet.plans import add_configuration, dataset_folder, plans_path

    try:
        source = read_source(_load(args.checkpoint))
    except UnknownCheckpointFormat as e:
        raise SystemExit(f"nnunet_mim import-weights: {e}") from None
    manager = PlansManager(plans_path(args.dataset, args.plans))
    if args.into:
        if args.into not in manager.available_configurations:
            raise SystemExit(f"--into {args.into}: no such configuration; available: "
                             f"{manager.available_configurations}")
        name, added = args.into, "existing configuration"
    else:
        name = args.configuration or default_configuration_name(source.name)
        parent = manager._internal_resolve_configuration_inheritance(args.parent)
        try:
            overrides = configuration_overrides(source, parent, name, args.plans, args.patch, args.batch_size,
                                                args.spacing)
        except ValueError as e:
            raise SystemExit(f"nnunet_mim import-weights: {e}") from None
        add_configuration(args.dataset, name, overrides, args.parent, args.plans, args.overwrite)
        added = f"new configuration inheriting {args.parent}"
    cm = PlansManager(plans_path(args.dataset, args.plans)).get_configuration(name)
    trainer = args.trainer or DEFAULT_TRAINERS[family_of(cm.network_arch_class_name)]
    output = args.output or join(dataset_folder(args.dataset), f"{args.plans}__{name}__imported.pth")
    if os.path.exists(output) and not args.overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it, or choose another file with -o")
    network = build_network_for(args.dataset, name, args.plans, trainer)
    channel_names = load_json(join(dataset_folder(args.dataset), "dataset.json"))["channel_names"]
    grids = None
    if getattr(network, "key_to_lpe", None) and "patch_embed_size" in cm.network_arch_init_kwargs:
        embed = cm.network_arch_init_kwargs["patch_embed_size"]
        before = source.pretrain_patch_size or cm.patch_size
        grids = ([b // e for b, e in zip(before, embed)], [p // e for p, e in zip(cm.patch_size, embed)])
    try:
        report = convert_weights(source, network, [channel_names[k] for k in sorted(channel_names, key=int)],
                                 args.channel_map, args.channel_fill, grids)
    except ValueError as e:
        raise SystemExit(f"nnunet_mim import-weights: {e}") from None
    report.warnings = plan_warnings(source, cm.normalization_schemes, cm.spacing)
    header = (f"Pre-flight report: {args.checkpoint} ({source.describe()})\n  -> dataset {args.dataset}, "
              f"configuration {name} ({added}: {cm.network_arch_class_name.split('.')[-1]}, patch {cm.patch_size}, "
              f"spacing {[round(float(s), 4) for s in cm.spacing]}, data {cm.data_identifier}), trainer {trainer}")
    print(format_import_report(report, header))
    if not report.loaded and not report.adapted:
        raise SystemExit(f"Nothing in {args.checkpoint} fits configuration {name}: no file written. The checkpoint "
                         f"belongs to another architecture; import it without --into to get a configuration of its "
                         f"own.")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    torch.save({"network_weights": network.state_dict(), "import_source": os.path.abspath(args.checkpoint),
                "import_format": source.format}, output)
    print(f"Wrote {output}")
    print_next_steps(args.dataset, name, args.plans, trainer, output, cm.data_identifier,
                     manager.get_configuration(args.parent).data_identifier if not args.into else cm.data_identifier)


def print_next_steps(dataset, name, plans, trainer, output, data_identifier, parent_identifier) -> None:
    plans_flag = "" if plans == "nnUNetPlans" else f" -p {plans}"
    print("Next:")
    if not os.environ.get("nnUNet_extTrainer") and trainer != "nnUNetTrainer":
        print("  export nnUNet_extTrainer=$(nnunet_mim ext-path)")
    if data_identifier != parent_identifier:
        print(f"  nnUNetv2_preprocess -d {dataset} -c {name} -plans_name {plans} -np 4   # the pretraining spacing "
              f"needs its own preprocessed data")
    print(f"  nnUNetv2_train {dataset} {name} FOLD -tr {trainer}{plans_flag} -pretrained_weights {output}")
