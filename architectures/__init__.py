"""Networks that nnU-Net plans can name; installed as ``nnunet_mim.architectures``."""
