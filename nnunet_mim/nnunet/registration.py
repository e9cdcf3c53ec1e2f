"""Make nnunet_mim's trainers visible to nnunetv2 2.6 and 2.7 (``nnunet_mim register-trainers`` /
``unregister-trainers``).

nnunetv2 2.8 finds external trainers through ``nnUNet_extTrainer`` (``export nnUNet_extTrainer=$(nnunet_mim
ext-path)``). 2.6 and 2.7 search only their own trainer folder (``nnunetv2/training/nnUNetTrainer/``, every module,
in alphabetical order, then the subpackages). Registration writes one small module there,
:data:`MODULE_NAME` ``.py``, that loads our trainer index (the file ``nnunet_mim ext-path`` points at) and re-exports
its classes. So the class nnU-Net finds *is* ``nnunet_mim.trainers.<module>.<Class>``, also when ``nnUNet_extTrainer``
is set as well (2.8 searches its folder first and takes the first match: one class, reached by two roads). Trainers
added to nnunet_mim later are found without registering again.

Conventions: the module's first line is :data:`MARKER`; unregistering removes only a file that starts with it (and
its bytecode). Both are idempotent. Nothing heavy is imported here (no torch, no nnunetv2): the folder is found with
``importlib.util.find_spec`` and the version from the package metadata (:mod:`nnunet_mim.nnunet.versions`).
"""
from __future__ import annotations

import glob
import importlib.util
import os
from dataclasses import dataclass

from nnunet_mim.nnunet.versions import nnunet_version, version_tuple

#: the registered module's name inside nnU-Net's trainer folder
MODULE_NAME = "nnunet_mim_trainers"
#: first line of the registered module; only a file that starts with it is ever removed
MARKER = "# nnunet_mim registered trainers: written by `nnunet_mim register-trainers`, removed by " \
         "`nnunet_mim unregister-trainers`"
#: the first nnunetv2 release that finds trainers through nnUNet_extTrainer
EXT_TRAINER_RELEASE = (2, 8)

MODULE_TEXT = MARKER + '''
"""nnunet_mim's trainers for nnU-Net's trainer search (this nnunetv2 searches only this folder).

It loads nnunet_mim's trainer index (``nnunet_mim ext-path``) and re-exports its trainer classes. Remove it with
``nnunet_mim unregister-trainers``.
"""
import importlib.util as _util
import os as _os
import sys as _sys

try:
    from nnunet_mim import ext_trainer_path as _ext_trainer_path
except ModuleNotFoundError as _error:
    raise ImportError(
        f"{__file__} re-exports nnunet_mim's trainers, but nnunet_mim is not installed in this environment "
        f"({_error}). Install it, or delete this file (`nnunet_mim unregister-trainers` does).") from None

_NAME = "nnunet_mim_trainer_index"
_index = _sys.modules.get(_NAME)
if _index is None:
    _spec = _util.spec_from_file_location(_NAME, _os.path.join(_ext_trainer_path(), _NAME + ".py"))
    _index = _util.module_from_spec(_spec)
    _sys.modules[_NAME] = _index
    _spec.loader.exec_module(_index)
globals().update({_k: _v for _k, _v in vars(_index).items() if isinstance(_v, type) and not _k.startswith("_")})
'''


@dataclass
class Outcome:
    """What a (un)registration did: ``changed`` is False when there was nothing to do; ``message`` says it all."""

    changed: bool
    message: str
    path: str


def needs_registration() -> bool:
    """Whether the installed nnunetv2 searches only its own folder (2.6, 2.7), i.e. cannot use nnUNet_extTrainer."""
    return version_tuple(nnunet_version())[:2] < EXT_TRAINER_RELEASE


def trainer_folder() -> str:
    """The installed nnunetv2's trainer folder (``.../nnunetv2/training/nnUNetTrainer``), found without importing."""
    spec = importlib.util.find_spec("nnunetv2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nnunetv2 is not installed in this Python environment: install nnU-Net first.")
    return os.path.join(list(spec.submodule_search_locations)[0], "training", "nnUNetTrainer")


def module_path(folder: str | None = None) -> str:
    return os.path.join(folder or trainer_folder(), MODULE_NAME + ".py")


def is_ours(path: str) -> bool:
    """Whether ``path`` is a module written by :func:`register` (its first line is :data:`MARKER`)."""
    with open(path, encoding="utf-8") as f:
        return f.readline().rstrip("\n") == MARKER


def register(folder: str | None = None, force: bool = False) -> Outcome:
    """Write the registered module into nnU-Net's trainer folder (``folder``: that of the installed nnunetv2).

    On nnunetv2 2.8+ nothing is written unless ``force``: nnUNet_extTrainer is the route there (registering as well
    is harmless: both roads lead to the same classes). An existing file without the marker is never overwritten.
    """
    path = module_path(folder)
    version = nnunet_version()
    if not needs_registration() and not force:
        return Outcome(False, f"nnunetv2 {version} finds external trainers through nnUNet_extTrainer, so nothing "
                              f"was registered; use\n    export nnUNet_extTrainer=$(nnunet_mim ext-path)\n"
                              f"(`nnunet_mim register-trainers --force` registers anyway; harmless, not needed).", path)
    if os.path.exists(path):
        if not is_ours(path):
            raise FileExistsError(f"{path} exists and was not written by nnunet_mim; it was left untouched. Move it "
                                  f"away and run `nnunet_mim register-trainers` again.")
        with open(path, encoding="utf-8") as f:
            if f.read() == MODULE_TEXT:
                return Outcome(False, f"nnunet_mim's trainers are already registered with nnunetv2 {version} "
                                      f"({path}).", path)
    tmp = f"{path}.partial"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(MODULE_TEXT)
    os.replace(tmp, path)
    return Outcome(True, f"Registered nnunet_mim's trainers with nnunetv2 {version}: wrote {path}. nnU-Net's commands "
                         f"now find them (`nnUNetv2_train ... -tr HybridMIMPretrainer`); `nnunet_mim "
                         f"unregister-trainers` removes the file.", path)


def unregister(folder: str | None = None) -> Outcome:
    """Remove the registered module (and its bytecode) from nnU-Net's trainer folder; refuses a file without the
    marker."""
    path = module_path(folder)
    if not os.path.exists(path):
        return Outcome(False, f"Nothing to unregister: {path} does not exist.", path)
    if not is_ours(path):
        raise FileExistsError(f"{path} was not written by nnunet_mim (its first line is not nnunet_mim's marker); "
                              f"it was left untouched.")
    os.remove(path)
    for cached in glob.glob(os.path.join(os.path.dirname(path), "__pycache__", f"{MODULE_NAME}.*.pyc")):
        os.remove(cached)
    return Outcome(True, f"Unregistered nnunet_mim's trainers: removed {path}.", path)
