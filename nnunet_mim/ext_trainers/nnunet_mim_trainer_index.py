"""nnU-Net's entry into nnunet_mim's trainers. Not a package module: nnU-Net imports it.

nnunetv2 2.8 finds trainers outside its own folder only through ``nnUNet_extTrainer``, and imports the
files there as *top-level* modules. Pointing it at ``nnunet_mim/trainers`` would import our trainers a
second time under other names (``hybridmim`` instead of ``nnunet_mim.trainers.hybridmim``): two copies of
every class, and relative imports break. This folder holds only this index, which imports the real
modules under their package names and re-exports their trainer classes, so the class nnU-Net gets *is*
``nnunet_mim.trainers.<module>.<Class>``. ``nnunet_mim ext-path`` prints this folder.
"""
import importlib
import pkgutil

import nnunet_mim.trainers as _package
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as _Base

for _info in pkgutil.iter_modules(_package.__path__):
    _module = importlib.import_module(f"{_package.__name__}.{_info.name}")
    for _name, _obj in vars(_module).items():
        if isinstance(_obj, type) and issubclass(_obj, _Base) and _obj.__module__ == _module.__name__:
            globals()[_name] = _obj
