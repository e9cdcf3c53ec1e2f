"""nnU-Net trainer variants of nnunet_mim (``nnUNetv2_train -tr <name>``); installed as ``nnunet_mim.trainers``.

nnU-Net finds them through ``export nnUNet_extTrainer=$(nnunet_mim ext-path)``.
"""
