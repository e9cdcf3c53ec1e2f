"""What differs between the supported nnunetv2 releases (2.6.x, 2.7, 2.8), in one place.

Conventions:

- Our code is written against nnU-Net 2.7+'s ``build_network_architecture(plans_manager, configuration_manager,
  num_input_channels, num_output_channels, enable_deep_supervision=True)``. A trainer defines it once, decorated with
  :class:`network_builder`, and every supported release can call it, on the class and on an instance.
- nnunetv2 2.6 calls it with the architecture fields instead of the managers: ``(architecture_class_name,
  arch_init_kwargs, arch_init_kwargs_req_import, num_input_channels, num_output_channels, enable_deep_supervision)``.
  From a trainer instance (training) the adapter substitutes the trainer's own plans and configuration managers
  (they hold that architecture); on the class (2.6's ``nnUNetv2_predict``) it passes ``plans_manager=None`` (as
  nnU-Net's own tests do) and a configuration manager that holds only the architecture: a builder that also needs,
  say, the patch size gets an error that says so.
- Networks of the plans are built with :func:`build_planned_network` (nnU-Net's own ``get_network_from_plans``,
  identical in every release), never through ``nnUNetTrainer.build_network_architecture``, whose signature differs.
- Code that calls a trainer's builder itself (``nnunet_mim check-weights``) goes through
  :func:`call_build_network_architecture`, which passes the arguments the way the installed release's predictor does,
  and finds trainers with :func:`find_trainer_class`, the installed release's own search.

Imports nothing heavy at module level: the nnunetv2 imports are inside the functions.
"""
from __future__ import annotations

import functools
import inspect
from importlib import metadata

#: parameters of the 2.7+ builder signature, after the owner (class or trainer)
BUILDER_PARAMETERS = ("plans_manager", "configuration_manager", "num_input_channels", "num_output_channels",
                      "enable_deep_supervision")
#: parameters of the 2.6 builder signature
LEGACY_BUILDER_PARAMETERS = ("architecture_class_name", "arch_init_kwargs", "arch_init_kwargs_req_import",
                             "num_input_channels", "num_output_channels", "enable_deep_supervision")


def nnunet_version() -> str:
    """The installed nnunetv2's version, from its package metadata (some releases have no ``__version__``)."""
    return metadata.version("nnunetv2")


def version_tuple(version: str) -> tuple[int, ...]:
    """``"2.6.4"`` -> ``(2, 6, 4)``; stops at the first part that is not a number (``"2.8.0rc1"`` -> ``(2, 8)``)."""
    parts = []
    for part in version.split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


class _ArchitectureOnly(dict):
    """The part of a plans / configuration dict that nnunetv2 2.6 passes to the builder on the class; any other key
    raises an error naming the way out."""

    def __init__(self, data: dict, builder: str):
        super().__init__(data)
        self.builder = builder

    def __missing__(self, key):
        raise RuntimeError(
            f"{self.builder} needs the configuration's {key!r}, but nnunetv2 {nnunet_version()} passes only the "
            f"network architecture when it builds the network on the trainer class (nnUNetv2_predict). Predict with "
            f"the segmentation trainer you finetuned (e.g. -tr nnUNetTrainerMIMFinetune), or use nnunetv2 >= 2.7, "
            f"which passes the whole configuration.")


def knows_only_the_architecture(configuration_manager) -> bool:
    """Whether a configuration manager is the architecture-only one of nnunetv2 2.6's call on the class (checks
    that compare the architecture with the data fields cannot run then)."""
    return isinstance(getattr(configuration_manager, "configuration", None), _ArchitectureOnly)


def architecture_only_configuration(architecture_class_name: str, arch_init_kwargs: dict,
                                    arch_init_kwargs_req_import, builder: str):
    """A ``ConfigurationManager`` that holds only an architecture (nnunetv2 2.6's call on the class); reading
    anything else raises an error that names ``builder`` and the way out."""
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    architecture = {"network_class_name": architecture_class_name, "arch_kwargs": arch_init_kwargs,
                    "_kw_requires_import": list(arch_init_kwargs_req_import)}
    return ConfigurationManager(_ArchitectureOnly({"architecture": architecture}, builder))


#: nnunetv2 2.6's builder signature, for reading the arguments of its calls
LEGACY_SIGNATURE = inspect.Signature(
    [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in LEGACY_BUILDER_PARAMETERS[:-1]]
    + [inspect.Parameter(LEGACY_BUILDER_PARAMETERS[-1], inspect.Parameter.POSITIONAL_OR_KEYWORD, default=True)])


def _managers_form(args: tuple, kwargs: dict, owner, instance) -> tuple[tuple, dict]:
    """The arguments of one call in the 2.7+ form, whichever form they came in."""
    legacy = (args and isinstance(args[0], str)) or "architecture_class_name" in kwargs
    if not legacy:
        return args, kwargs
    bound = LEGACY_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    own = getattr(instance, "configuration_manager", None)
    if own is not None and own.network_arch_class_name == a["architecture_class_name"]:
        managers = (instance.plans_manager, own)
    else:
        managers = (None, architecture_only_configuration(a["architecture_class_name"], a["arch_init_kwargs"],
                                                          a["arch_init_kwargs_req_import"], owner.__name__))
    return (*managers, a["num_input_channels"], a["num_output_channels"], a["enable_deep_supervision"]), {}


def trainer_name(owner) -> str:
    """The class name of a builder's ``owner`` (a trainer class or a trainer)."""
    return (owner if isinstance(owner, type) else type(owner)).__name__


class network_builder:
    """Decorator for a trainer's ``build_network_architecture`` that every supported nnunetv2 can call.

    Write the builder as ``def build_network_architecture(owner, plans_manager, configuration_manager,
    num_input_channels, num_output_channels, enable_deep_supervision=True)``. ``owner`` is the trainer when nnU-Net
    calls it on an instance (training: a builder may use what the trainer has loaded, e.g. TokenMIMPretrainer's
    tokenizer) and the class when it is called on the class (nnU-Net's predictor, ``nnunet_mim check-weights``): a
    builder must then work from class attributes and the plans alone. Subclasses inherit it like a classmethod.

    The callable it returns shows the 2.7+ signature to ``inspect.signature`` (2.7 and 2.8 check for
    ``plans_manager`` and pass the managers) and accepts 2.6's architecture fields too (see the module docstring).
    """

    def __init__(self, build):
        self.build = build
        functools.update_wrapper(self, build)
        parameters = list(inspect.signature(build).parameters.values())[1:]
        names = tuple(p.name for p in parameters)
        if names != BUILDER_PARAMETERS:
            raise TypeError(f"{build.__qualname__} must take (owner, {', '.join(BUILDER_PARAMETERS)}), not "
                            f"{names}")
        self.signature = inspect.Signature(parameters)

    def __get__(self, instance, owner=None):
        owner = type(instance) if owner is None else owner
        target = owner if instance is None else instance

        def build_network_architecture(*args, **kwargs):
            args, kwargs = _managers_form(args, kwargs, owner, instance)
            return self.build(target, *args, **kwargs)

        build_network_architecture.__signature__ = self.signature
        build_network_architecture.__doc__ = self.build.__doc__
        build_network_architecture.__qualname__ = f"{owner.__name__}.build_network_architecture"
        return build_network_architecture


def build_planned_network(configuration_manager, num_input_channels: int, num_output_channels: int,
                          enable_deep_supervision: bool = True):
    """The network the plans name, built as ``nnUNetTrainer.build_network_architecture`` builds it in every release
    (``get_network_from_plans`` with ``allow_init=True``)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(configuration_manager.network_arch_class_name,
                                  configuration_manager.network_arch_init_kwargs,
                                  configuration_manager.network_arch_init_kwargs_req_import,
                                  num_input_channels, num_output_channels, allow_init=True,
                                  deep_supervision=enable_deep_supervision)


def call_build_network_architecture(trainer_class, plans_manager, configuration_manager, num_input_channels: int,
                                    num_output_channels: int, enable_deep_supervision: bool = False):
    """Build ``trainer_class``'s network on the class, passing the arguments in the form its signature takes (the
    installed predictor's rule: managers when the signature has ``plans_manager``, else the architecture fields)."""
    build = trainer_class.build_network_architecture
    if "plans_manager" in inspect.signature(build).parameters:
        return build(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                     enable_deep_supervision=enable_deep_supervision)
    return build(configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
                 configuration_manager.network_arch_init_kwargs_req_import, num_input_channels, num_output_channels,
                 enable_deep_supervision=enable_deep_supervision)


def find_trainer_class(name: str):
    """The trainer class ``nnUNetv2_train -tr name`` would use: 2.8 searches nnU-Net's trainer folder and
    then ``nnUNet_extTrainer``; 2.6 and 2.7 only the trainer folder (``nnunet_mim register-trainers``).
    Raises ``RuntimeError`` with the way to make our trainers visible when the name is not found."""
    import os

    try:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    except ImportError:  # 2.6, 2.7
        recursive_find_trainer_class_by_name = None
    if recursive_find_trainer_class_by_name is not None:
        try:
            return recursive_find_trainer_class_by_name(name)
        except RuntimeError as e:
            if os.environ.get("nnUNet_extTrainer"):
                raise
            raise RuntimeError(f"{e}\nnnunet_mim's trainers are found through nnUNet_extTrainer, which is not set: "
                               f"`export nnUNet_extTrainer=$(nnunet_mim ext-path)`.") from None

    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    folder = os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer")
    found = recursive_find_python_class(folder, name, "nnunetv2.training.nnUNetTrainer")
    if found is None:
        raise RuntimeError(f"Trainer {name} is not in {folder}. nnunetv2 {nnunet_version()} finds trainers "
                           f"only there: make nnunet_mim's visible with `nnunet_mim register-trainers`.")
    return found
