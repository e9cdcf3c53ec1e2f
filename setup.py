"""nnunet_mim: self-supervised pretraining (HybridMIM, PUMIT, MAE/SimMIM) inside nnU-Net v2.

``trainers/`` and ``architectures/`` live at the top of the repository (the design card's layout) but install
as ``nnunet_mim.trainers`` and ``nnunet_mim.architectures``; they are never top-level modules.
"""
from setuptools import setup

setup(
    name="nnunet_mim",
    version="0.1.0",
    description="Self-supervised pretraining (HybridMIM, PUMIT, MAE/SimMIM) for nnU-Net v2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "nnunet_mim",
        "nnunet_mim.core",
        "nnunet_mim.core.losses",
        "nnunet_mim.architectures",
        "nnunet_mim.nnunet",
        "nnunet_mim.trainers",
        "nnunet_mim.apps",
        "nnunet_mim.apps.data",
    ],
    package_dir={
        "nnunet_mim": "nnunet_mim",
        "nnunet_mim.trainers": "trainers",
        "nnunet_mim.architectures": "architectures",
    },
    install_requires=[
        # Floors are the versions CI tests (README, "Set-up"; the exact versions are in constraints.txt): older ones
        # may work but are untested, so they are not declared. nnunetv2 2.6 and 2.7 are tested end to end in their
        # own environments (documentation/nnunet_versions.md); everything else at the versions below.
        "torch>=2.14",  # also needs torch.serialization.safe_globals (>= 2.5) for weights_only loading
        "nnunetv2>=2.6,<2.9",  # 2.6 / 2.7: `nnunet_mim register-trainers`; 2.8: nnUNet_extTrainer
        "dynamic-network-architectures>=0.4.4",  # Primus and the weight-key attributes
        "batchgenerators>=0.25",  # nnU-Net's data loading; seeded runs use its ordered MultiThreadedAugmenter
        "batchgeneratorsv2>=0.3",  # nnU-Net's augmentation, which seeded runs seed in every worker
        "SimpleITK>=2.5",
        "numpy>=2.4",  # numpy.dtypes (allow-listed for weights_only loading) needs >= 1.25
        "scipy>=1.17",  # smooth elastic deformations of the offline datasets (nnunet_mim/apps/data/variation.py)
        "matplotlib>=3.11",
        "safetensors>=0.8",  # .safetensors checkpoints (nnunet_mim/nnunet/weights.py)
        # MONAI: SwinUNETR and surface-distance metrics (HD95, ASSD); see documentation/deviations.md
        "monai>=1.6,<1.7",
        # timm: EVA-02 blocks (SwiGLU, sub-LN attention) for SAC-ViT; below 1.1 because SAC-ViT's checkpoint keys
        # follow timm's module names
        "timm>=1.0.22,<1.1",
        "threadpoolctl>=3.8",  # one thread per data-augmentation worker of seeded runs (nnunet_mim/nnunet/seeding.py)
    ],
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3.8"], "data": ["nilearn>=0.10"]},
    package_data={"nnunet_mim": ["ext_trainers/*.py"]},
    entry_points={"console_scripts": ["nnunet_mim=nnunet_mim.apps.cli:main"]},
)
