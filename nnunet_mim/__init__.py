"""nnunet_mim: self-supervised pretraining (HybridMIM, PUMIT, MAE/SimMIM) inside nnU-Net v2.

Layers, each importing only from the ones before it:

- ``nnunet_mim.core``: pure torch math (masking, patches, regions, RoPE, SAC, schedules, losses);
- ``nnunet_mim.architectures``: networks that nnU-Net plans can name (source folder ``architectures/``);
- ``nnunet_mim.nnunet``: glue to nnU-Net (plans writers, weights, settings, unlabeled import, progress);
- ``nnunet_mim.trainers``: nnU-Net trainer variants (source folder ``trainers/``);
- ``nnunet_mim.apps``: the ``nnunet_mim`` command line, demo, study, probe, benchmark, evaluation, data builders.
"""
import os as _os


def ext_trainer_path() -> str:
    """Folder to put in ``nnUNet_extTrainer`` (holds only the trainer index module). Imports nothing heavy."""
    return _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "ext_trainers")
