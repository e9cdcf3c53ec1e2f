"""Our segmentation networks declare dynamic-network-architectures' weight-key attributes (``key_to_encoder``,
``key_to_stem``, ``keys_to_in_proj``, ``key_to_lpe``), which pretraining and weight-adaptation tools read: the keys
must name real parts, and ``keys_to_in_proj`` must be exactly the layers that read the raw input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

IN = 5  # an input-channel count no other dimension has


def _swin():
    from nnunet_mim.architectures.swin_unetr import SwinUNETR

    return SwinUNETR(IN, 3, feature_size=12), (1, IN, 64, 64, 64)


def _sac_vit():
    from nnunet_mim.architectures.sac_vit import SACViTSeg

    return SACViTSeg(IN, 3, (32, 32, 32), da=0, embed_dim=48, depth=4, num_heads=3,
                     decoder_channels=(4, 8, 8, 16, 16, 16)), (1, IN, 32, 32, 32)


def _layers_reading(network: nn.Module, shape) -> set[str]:
    """Names of the leaf modules with parameters that receive the raw input tensor itself."""
    x = torch.randn(*shape)
    seen, hooks = set(), []
    for name, module in network.named_modules():
        if not list(module.children()) and any(True for _ in module.parameters(recurse=False)):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=name: seen.add(name) if args and args[0] is x else None))
    with torch.no_grad():
        network.eval()(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("build", [_swin, _sac_vit], ids=["SwinUNETR", "SACViTSeg"])
def test_weight_key_attributes_name_the_real_parts(build):
    network, shape = build()
    network.get_submodule(network.key_to_encoder)
    network.get_submodule(network.key_to_stem)
    assert network.key_to_stem.startswith(network.key_to_encoder)
    for key in network.keys_to_in_proj:
        assert network.get_submodule(key).weight.shape[1] == IN
    assert set(network.keys_to_in_proj) == _layers_reading(network, shape)
    if network.key_to_lpe is not None:
        assert network.key_to_lpe in network.state_dict()
