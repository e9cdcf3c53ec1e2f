"""``nnunet_mim transfer-plans``: the plans of the finetuning target for the pretraining dataset, with named roles.

    nnunet_mim transfer-plans --from 4 --to 512 -c 3d_fullres
    # plans of Dataset004_X (finetuning target) -> Dataset512_Y (pretraining data); 512 is preprocessed again
    nnUNetv2_train 512 3d_fullres all -tr HybridMIMPretrainer
    nnUNetv2_train 4 3d_fullres 0 -tr nnUNetTrainerMIMFinetune -pretrained_weights .../checkpoint_final.pth

The same as nnU-Net's ``nnUNetv2_move_plans_between_datasets -s 4 -t 512 -sp nnUNetPlans`` followed by
``nnUNetv2_preprocess -d 512`` (or our unlabeled preprocessor for a dataset without labels), with the direction
spelled out, a refusal to replace existing plans without ``--overwrite`` (a ``.bak`` is kept), the contamination
check of the pretraining images against the target's (``--strict`` refuses shared scans) and errors that name the
fix. See documentation/plans_transfer.md.
"""
from __future__ import annotations

import argparse


def _run(args) -> None:
    from nnunet_mim.nnunet import settings

    num_processes = args.num_processes or settings.read("nnUNet_def_n_proc") or 8  # before nnU-Net reads it

    from nnunet_mim.nnunet.transfer_plans import transfer_plans

    try:  # ContaminationError is a ValueError
        transfer_plans(args.source, args.to, args.plans, args.configurations, num_processes, args.overwrite,
                       args.plans_name, strict=args.strict)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"nnunet_mim transfer-plans: {e}") from None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("transfer-plans", help="the plans of the finetuning target -> a pretraining dataset, "
                                                     "preprocessed again", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, metavar="TARGET",
                   help="labelled finetuning target (id or name) whose plans are used; planned already")
    p.add_argument("--to", required=True, metavar="PRETRAIN",
                   help="pretraining dataset (id or name) that receives the plans: an nnU-Net raw dataset or one made "
                        "by nnunet_mim import-unlabeled")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier of the target (default nnUNetPlans)")
    p.add_argument("--plans-name", default=None,
                   help="plans identifier written for the pretraining dataset (default: the same as -p)")
    p.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"],
                   help="configurations to preprocess the pretraining dataset for (default 3d_fullres)")
    p.add_argument("-np", "--num-processes", type=int, default=None,
                   help="preprocessing processes (default: $nnUNet_def_n_proc, else 8, as nnU-Net's commands)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing plans of the pretraining dataset (the previous file is kept as .bak)")
    p.add_argument("--strict", action="store_true",
                   help="refuse pretraining images that are also cases of the target (imagesTr, imagesTs); default: "
                        "a warning")
    p.set_defaults(func=_run)
