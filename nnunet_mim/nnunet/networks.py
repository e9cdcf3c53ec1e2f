"""The network (or the initialised trainer) that ``nnUNetv2_train`` would build for a dataset, configuration and
trainer."""
from __future__ import annotations


def build_network_for(dataset: str, configuration: str, plans_identifier: str = "nnUNetPlans",
                      trainer: str = "nnUNetTrainer"):
    """The segmentation network that ``nnUNetv2_train`` would build for this dataset/configuration/trainer."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_mim.nnunet.plans import dataset_folder, plans_path
    from nnunet_mim.nnunet.versions import call_build_network_architecture, find_trainer_class

    plans_manager = PlansManager(plans_path(dataset, plans_identifier))
    configuration_manager = plans_manager.get_configuration(configuration)
    dataset_json = load_json(join(dataset_folder(dataset), "dataset.json"))
    return call_build_network_architecture(
        find_trainer_class(trainer), plans_manager, configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, False)


def initialized_trainer(trainer_class: type, dataset: str | int, configuration: str, fold: str | int = "all",
                        plans_identifier: str = "nnUNetPlans", seed: int | None = None):
    """An initialised ``trainer_class`` on the CPU, constructed as ``nnUNetv2_train`` constructs it (the plans with
    ``continue_training`` False, the dataset's ``dataset.json``), seeded like ``nnUNet_mim_seed`` when ``seed`` is
    given: for measurements that draw batches or run the network outside a training."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json

    from nnunet_mim.nnunet.plans import dataset_folder, plans_path

    plans = {**load_json(plans_path(dataset, plans_identifier)), "continue_training": False}
    trainer = trainer_class(plans, configuration, fold, load_json(join(dataset_folder(dataset), "dataset.json")),
                            torch.device("cpu"))
    if seed is not None:
        trainer.seed = seed
    trainer.initialize()
    return trainer


def require_network(plans_manager, configuration_manager, network_class: type, trainer: str,
                    add_config_kind: str | None = None, configuration: str | None = None) -> None:
    """The one check for "this trainer needs this network": raise ``RuntimeError`` with the commands that add a
    fitting configuration (``nnunet_mim add-config <add_config_kind>``, default name ``3d_<kind>``) when
    ``configuration_manager`` builds another class than ``network_class`` (or a subclass)."""
    import pydoc

    class_name = configuration_manager.network_arch_class_name
    built = pydoc.locate(class_name)
    if isinstance(built, type) and issubclass(built, network_class):
        return
    where = f"configuration '{configuration}'" if configuration else "this configuration"
    dataset, plans = (plans_manager.dataset_name, plans_manager.plans_name) if plans_manager else ("DATASET",
                                                                                                  "nnUNetPlans")
    fix = ""
    if add_config_kind:
        name = "3d_" + add_config_kind.replace("-", "_")
        fix = (f" Add such a configuration to the plans (it inherits 3d_fullres's preprocessed data) and train that "
               f"one:\n    nnunet_mim add-config {add_config_kind} -d {dataset} -p {plans}   # -> configuration "
               f"{name}\n    nnUNetv2_train {dataset} {name} FOLD -tr {trainer} -p {plans}")
    raise RuntimeError(f"{trainer} trains {network_class.__name__}, but {where} builds "
                       f"{class_name.split('.')[-1]}.{fix}")
