"""nnunet_mim: self-supervised pretraining (HybridMIM, PUMIT, MAE/SimMIM) inside nnU-Net v2."""
