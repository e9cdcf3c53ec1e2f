"""HybridMIMModel: state_dict compatibility, dropout views, head shapes, backward."""
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunet_mim.architectures.hybridmim import HybridMIMModel


def _unet(cls=PlainConvUNet, out=1):
    common = dict(conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU)
    if cls is PlainConvUNet:
        return cls(1, 4, (8, 16, 32, 32), nn.Conv3d, 3, [1, 2, 2, 2], 2, out, 2, **common)
    return cls(1, 4, (8, 16, 32, 32), nn.Conv3d, 3, [1, 2, 2, 2], (1, 1, 1, 1), out, 1, **common)


@pytest.mark.parametrize("cls", [PlainConvUNet, ResidualEncoderUNet])
def test_state_dict_is_network_plus_heads(cls):
    net = _unet(cls)
    keys = set(net.state_dict())
    model = HybridMIMModel(net, (16, 32, 32))
    mkeys = set(model.state_dict())
    assert keys <= mkeys and all(k.startswith("mim_heads.") for k in mkeys - keys)
    seg = _unet(cls, out=3)  # the finetuning network: only seg layers differ in shape
    for k, v in seg.state_dict().items():
        if ".seg_layers." not in k:
            assert model.state_dict()[k].shape == v.shape


def test_outputs_and_backward():
    model = HybridMIMModel(_unet(), (16, 32, 32)).train()
    x = torch.randn(2, 1, 16, 32, 32)
    out = model(x)
    n_sub = 2 * 4 * 4
    assert out.count_logits.shape == (2, n_sub, 9) and out.location_logits.shape == (2, n_sub, 8)
    assert out.reconstruction.shape[2:] == tuple(s.stop - s.start for s in model.region_slices())
    assert out.projection.shape == (2, 384) and not out.projection_second_view.requires_grad
    (out.reconstruction.mean() + out.count_logits.mean() + out.location_logits.mean() + out.projection.mean()
     ).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for n, p in trainable)  # DDP-safe: no unused trainable parameter
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {
        f"decoder.seg_layers.{i}.{w}" for i in (0, 1) for w in ("weight", "bias")}


def test_views_differ_only_by_dropout():
    model = HybridMIMModel(_unet(), (16, 32, 32), encoder_dropout=0.1)
    x = torch.randn(2, 1, 16, 32, 32)
    model.train()
    out = model(x)
    assert not torch.allclose(out.projection, out.projection_second_view)
    model.eval()
    out = model(x)
    assert torch.allclose(out.projection, out.projection_second_view)


def test_rejects_networks_without_encoder_decoder():
    with pytest.raises(TypeError, match="cannot be pretrained with HybridMIM"):
        HybridMIMModel(nn.Conv3d(1, 1, 3), (16, 32, 32))


def _ddp_step(rank, world, port, queue):
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nnunet_mim.core.losses.contrastive import nt_xent

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DDP(HybridMIMModel(_unet(), (16, 32, 32)))  # find_unused_parameters=False, like nnU-Net
    torch.manual_seed(rank + 1)
    x = torch.randn(1, 1, 16, 32, 32)  # one sample per rank: the negatives come from the other rank
    out = model(x)
    loss = out.reconstruction.pow(2).mean() + out.count_logits.mean() + out.location_logits.mean() + \
        nt_xent(out.projection, out.projection_second_view)
    loss.backward()
    grads = {n: p.grad.flatten()[:5].tolist() for n, p in model.module.named_parameters() if p.grad is not None}
    queue.put((rank, grads))
    dist.destroy_process_group()


def test_ddp_step_synchronises_every_trained_parameter():
    import socket

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_ddp_step, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    grads = dict(queue.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    trainable = {n for n, p in HybridMIMModel(_unet(), (16, 32, 32)).named_parameters() if p.requires_grad}
    assert set(grads[0]) == trainable  # no unused parameter, heads included
    for name in trainable:
        assert torch.allclose(torch.tensor(grads[0][name]), torch.tensor(grads[1][name]), atol=1e-6), name


def test_paper_grid_gives_32_voxel_subvolumes_where_the_plan_allows():
    from nnunet_mim.core.masking import derive_grid
    from nnunet_mim.core.masking import paper_subvolume_cells

    assert paper_subvolume_cells((96, 96, 96), (16, 16, 16)) == (2, 2, 2)
    grid = derive_grid((96, 96, 96), (16, 16, 16), paper_subvolume_cells((96, 96, 96), (16, 16, 16)))
    assert grid.subvolume == (32, 32, 32) and grid.mask_patch == (16, 16, 16) and grid.grid_shape == (3, 3, 3)
    assert derive_grid((96, 96, 96), (16, 16, 16), "paper") == grid  # what the trainer setting "paper" asks for
    # an axis whose patch is no multiple of 32 keeps the default (one bottleneck cell per sub-volume)
    assert paper_subvolume_cells((28, 56, 64), (4, 8, 8)) == (1, 1, 4)
    assert paper_subvolume_cells((96, 96, 96), (32, 32, 32)) == (1, 1, 1)  # SwinUNETR: one token is 32^3 already


def test_the_pretrainer_masks_the_papers_geometry_by_default():
    """Built as nnU-Net builds it (class-level build_network_architecture from a configuration): on a stride-8 plan
    with a 32 x 64 x 64 patch the default masks 32^3 sub-volumes in 16^3 patches; _cellGrid keeps one bottleneck cell."""
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    from nnunet_mim.trainers.hybridmim import HybridMIMPretrainer, HybridMIMPretrainer_cellGrid

    unet = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 4, "features_per_stage": [4, 8, 8, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
                            "kernel_sizes": [[3, 3, 3]] * 4, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 3,
                            "n_conv_per_stage": [1] * 4, "n_conv_per_stage_decoder": [1] * 3, "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    config = ConfigurationManager({"patch_size": [32, 64, 64], "architecture": unet, "batch_size": 2})
    paper = HybridMIMPretrainer.build_network_architecture(None, config, 1, 1, False).grid
    assert (paper.subvolume, paper.mask_patch, paper.grid_shape) == ((32, 32, 32), (16, 16, 16), (1, 2, 2))
    cells = HybridMIMPretrainer_cellGrid.build_network_architecture(None, config, 1, 1, False).grid
    assert (cells.subvolume, cells.mask_patch, cells.grid_shape) == ((8, 8, 8), (4, 4, 4), (4, 8, 8))


def test_table4_ablations_exist_for_both_backbones_and_keep_the_right_terms():
    import nnunet_mim.trainers.hybridmim as unet
    import nnunet_mim.trainers.swin as swin

    expected = {"recOnly": {"reconstruction"}, "recCount": {"reconstruction", "count"},
                "recCountLocation": {"reconstruction", "count", "location"},
                "recPerception": {"reconstruction", "count", "location", "consistency"}}
    full = unet.HybridMIMPretrainer.loss_weights
    for module, family in ((unet, "HybridMIMPretrainer"), (swin, "HybridMIMPretrainerSwin")):
        for name, kept in expected.items():
            cls = getattr(module, f"{family}_{name}")
            assert cls.family == family
            assert {k for k, w in cls.loss_weights.items() if w > 0} == kept
            assert all(cls.loss_weights[k] == full[k] for k in kept)  # the full method's weights where kept
