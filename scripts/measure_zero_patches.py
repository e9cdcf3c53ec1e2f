"""How often is a HybridMIM mask patch all zeros in the network's input (so masking it, which sets it to 0, is
invisible)? Draws training batches through nnU-Net's own data loader and augmentation, as HybridMIMPretrainer does.

    nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=... \
        python scripts/measure_zero_patches.py 511 3d_small --batches 20 --seed 0

Prints the fraction of mask patches (of the HybridMIM two-level grid) whose voxels are all exactly 0, over all
channels, in the batches drawn. documentation/deviations.md ("Masked voxels are 0") quotes it for the demo data.
"""
from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("configuration")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_mim.nnunet.networks import initialized_trainer
    from nnunet_mim.trainers.hybridmim import HybridMIMPretrainer

    name = maybe_convert_to_dataset_name(args.dataset)
    trainer = initialized_trainer(HybridMIMPretrainer, name, args.configuration, seed=args.seed)
    grid = trainer.mim_model.grid
    loader, _ = trainer.get_dataloaders()
    zero, total = 0, 0
    for _ in range(args.batches):
        data = next(loader)["data"]
        b, c = data.shape[:2]
        d, h, w = grid.grid_shape
        pd, ph, pw = grid.mask_patch
        # sub-volume i of an axis covers [i * 2p, (i + 1) * 2p) and splits into 2 patches of p voxels
        x = data.reshape(b, c, d, 2, pd, h, 2, ph, w, 2, pw)
        all_zero = (x == 0).all(dim=(1, 4, 7, 10))  # [B, d, 2, h, 2, w, 2]
        zero += int(all_zero.sum())
        total += all_zero.numel()
    print(json.dumps({"dataset": name, "configuration": args.configuration, "batches": args.batches,
                      "mask_patch_voxels": list(grid.mask_patch), "patches": total, "all_zero_patches": zero,
                      "fraction": zero / total}, indent=1))


if __name__ == "__main__":
    main()
