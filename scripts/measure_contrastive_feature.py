"""How different are the images as HybridMIM's contrastive term sees them? The projection reads the global mean of
the bottleneck (Sec. III-D, as in the official code); on nnU-Net's instance-normalised U-Nets that mean hardly depends
on the image, and NT-Xent then sits at its chance level ln(2N - 1).

    nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=... \\
        python scripts/measure_contrastive_feature.py 511 3d_small --batches 3 --seed 0 [--checkpoint checkpoint_final.pth]

Draws training batches through nnU-Net's own data loader and augmentation, as HybridMIMPretrainer does, runs the
encoder (evaluation mode: no feature dropout, no masking) of a random initialisation, or of ``--checkpoint``, and prints
the cosine similarity between the averaged bottlenecks of different patches (minimum, mean), the same for pure
Gaussian noise against the first patch, and what a network would need for the term to learn anything: distinct views.
documentation/hybridmim.md ("The contrastive term is inert") quotes it for the demo data.
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("configuration")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="pretraining checkpoint (default: a random encoder)")
    args = parser.parse_args()

    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_mim.nnunet.networks import initialized_trainer
    from nnunet_mim.nnunet.weights import load_checkpoint
    from nnunet_mim.trainers.hybridmim import HybridMIMPretrainer

    name = maybe_convert_to_dataset_name(args.dataset)
    trainer = initialized_trainer(HybridMIMPretrainer, name, args.configuration, seed=args.seed)
    model = trainer.mim_model
    if args.checkpoint:
        model.load_state_dict(load_checkpoint(args.checkpoint)["network_weights"])
    model.eval()  # feature dropout off: one deterministic view per patch
    loader, _ = trainer.get_dataloaders()
    patches = torch.cat([next(loader)["data"] for _ in range(args.batches)])
    with torch.no_grad():
        features = model.encoder(patches)[-1].flatten(2).mean(-1)  # what the projection reads: [N, C]
        noise = model.encoder(torch.randn_like(patches[:1]))[-1].flatten(2).mean(-1)
    unit = torch.nn.functional.normalize(features, dim=1)
    pairs = [float(unit[i] @ unit[j]) for i, j in itertools.combinations(range(len(unit)), 2)]
    against_noise = float(unit[0] @ torch.nn.functional.normalize(noise, dim=1)[0])
    print(json.dumps({"dataset": name, "configuration": args.configuration, "checkpoint": args.checkpoint,
                      "patches": len(unit), "patch_size": list(patches.shape[2:]), "bottleneck_channels": unit.shape[1],
                      "cosine_between_patches": {"min": min(pairs), "mean": sum(pairs) / len(pairs)},
                      "cosine_patch_vs_noise": against_noise}, indent=1))


if __name__ == "__main__":
    main()
