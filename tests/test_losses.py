"""Loss values on hand-computed cases, and the NT-Xent negative gather across 2 gloo processes."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nnunet_mim.core.losses.contrastive import nt_xent, nt_xent_chance
from nnunet_mim.core.losses.hybridmim import consistency_loss, count_loss, location_loss
from nnunet_mim.core.losses.reconstruction import masked_l1, masked_mse


def test_masked_mse_counts_only_masked_voxels():
    pred = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    target = torch.tensor([[[0.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[[True, False, True, False]]])
    assert masked_mse(pred, target, mask).item() == pytest.approx((1 + 9) / 2)
    assert masked_l1(pred, target, mask).item() == pytest.approx((1 + 3) / 2)
    two_channels = masked_mse(torch.cat([pred, 2 * pred], 1), torch.zeros(1, 2, 4), mask)
    assert two_channels.item() == pytest.approx((1 + 9 + 4 + 36) / 4)
    assert masked_mse(pred, target, torch.zeros_like(mask)).item() == 0.0


def test_count_and_location_losses_at_uniform_logits():
    assert count_loss(torch.zeros(2, 5, 9), torch.randint(0, 9, (2, 5))).item() == pytest.approx(math.log(9))
    assert location_loss(torch.zeros(2, 5, 8), torch.randint(0, 2, (2, 5, 8)).float()).item() == pytest.approx(
        math.log(2))


def test_consistency_hand_computed():
    # one sub-volume; location logits: 3 confidently masked, 5 confidently visible -> hard count 3
    loc = torch.tensor([[[10.0, 10.0, 10.0, -10, -10, -10, -10, -10]]])
    count = torch.zeros(1, 1, 9)
    count[0, 0, 3] = 2.0
    p = torch.softmax(count[0, 0], 0)
    ce = -math.log(p[3].item())
    expected_count = float((p * torch.arange(9.0)).sum())
    soft_sum = float(torch.sigmoid(loc).sum())
    expected = 0.5 * (ce + (expected_count - soft_sum) ** 2)
    assert consistency_loss(count, loc).item() == pytest.approx(expected, rel=1e-5)


def test_consistency_trains_both_heads():
    loc = torch.randn(2, 4, 8, requires_grad=True)
    count = torch.randn(2, 4, 9, requires_grad=True)
    consistency_loss(count, loc).backward()
    assert loc.grad.abs().sum() > 0 and count.grad.abs().sum() > 0


def _reference_nt_xent(z1, z2, t):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        num = math.exp(float(z[i] @ z[pos]) / t)
        den = sum(math.exp(float(z[i] @ z[j]) / t) for j in range(2 * n) if j != i)
        total += -math.log(num / den)
    return total / (2 * n)


def test_nt_xent_hand_computed():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # anchor 0: pos sim 1, negatives: z1[1] (0), z2[1] (0) -> -log(e^2 / (e^2 + 2))
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(-math.log(math.e ** 2 / (math.e ** 2 + 2)), rel=1e-6)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    assert nt_xent(a, b, 0.5).item() == pytest.approx(_reference_nt_xent(a, b, 0.5), rel=1e-5)


def test_nt_xent_chance_level_is_the_loss_of_views_that_carry_no_information():
    g = torch.Generator().manual_seed(2)
    for n in (2, 3, 5):
        same = torch.randn(1, 8, generator=g).repeat(n, 1)  # every view of every sample is the same vector
        assert nt_xent(same, same.clone(), 0.5).item() == pytest.approx(nt_xent_chance(n), rel=1e-6)
        separated = torch.eye(n, 8)  # each sample its own direction, both views alike: far below chance
        assert nt_xent(separated, separated.clone(), 0.5).item() < 0.5 * nt_xent_chance(n)
    assert nt_xent_chance(2) == pytest.approx(math.log(3))


def test_nt_xent_refuses_batch_of_one():
    with pytest.raises(ValueError, match="at least 2 samples"):
        nt_xent(torch.randn(1, 4), torch.randn(1, 4))


def _ddp_worker(rank, world, port, z1, z2, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    local1 = z1[rank:rank + 1].clone().requires_grad_(True)
    loss = nt_xent(local1, z2[rank:rank + 1], 0.5)
    loss.backward()
    queue.put((rank, loss.item(), local1.grad.tolist()))
    dist.destroy_process_group()


def test_nt_xent_gathers_negatives_across_ranks():
    """2 ranks x 1 sample each == 1 process x 2 samples; each rank's gradient is its local share."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, z1, z2, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (l, gr)) for r, l, gr in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(60)
    ref1 = z1.clone().requires_grad_(True)
    ref = nt_xent(ref1, z2, 0.5)
    ref.backward()
    for r in range(2):
        assert results[r][0] == pytest.approx(ref.item(), rel=1e-5)
        # DDP averages gradients over ranks: the local gradient is world_size x the single-process share
        assert torch.allclose(torch.tensor(results[r][1][0]) / 2, ref1.grad[r], atol=1e-6)


def _uneven_worker(rank, world, port, z1, z2, probs, queue):
    from nnunet_mim.core.losses.contrastive import global_batch_size
    from nnunet_mim.core.losses.tokens import global_mean_distribution

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = slice(0, 2) if rank == 0 else slice(2, 3)  # nnU-Net splits a global batch of 3 over 2 ranks as 2 and 1
    local1 = z1[rows].clone().requires_grad_(True)
    loss = nt_xent(local1, z2[rows], 0.5)
    loss.backward()
    local_p = probs[rows].clone().requires_grad_(True)
    mean = global_mean_distribution(local_p)
    (mean * torch.arange(mean.numel())).sum().backward()
    # numpy copies travel by value (a tensor would be shared memory that dies with this process)
    queue.put((rank, global_batch_size(local1.shape[0]), loss.item(), local1.grad.numpy().copy(),
               mean.detach().numpy().copy(), local_p.grad.numpy().copy()))
    dist.destroy_process_group()


def test_uneven_ddp_batches_equal_the_global_batch():
    """2 gloo ranks with 2 and 1 samples == 1 process with 3: the same loss and global mean on every rank, and local
    gradients that DDP's mean over ranks turns into the single-process gradient."""
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    probs = torch.softmax(torch.randn(3, 4, 5, generator=g), -1)  # [B, tokens, K]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_uneven_worker, args=(r, 2, port, z1, z2, probs, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r[0]: tuple(torch.as_tensor(v) if hasattr(v, 'shape') else v for v in r[1:])
               for r in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(60)
    from nnunet_mim.core.losses.tokens import global_mean_distribution

    ref1 = z1.clone().requires_grad_(True)
    ref = nt_xent(ref1, z2, 0.5)
    ref.backward()
    ref_p = probs.clone().requires_grad_(True)
    ref_mean = global_mean_distribution(ref_p)
    (ref_mean * torch.arange(ref_mean.numel())).sum().backward()
    grads1 = torch.cat([results[0][2], results[1][2]]) / 2  # DDP: mean over the 2 ranks
    gradsp = torch.cat([results[0][4], results[1][4]]) / 2
    for r in (0, 1):
        size, loss, _, mean, _ = results[r]
        assert size == 3 and loss == pytest.approx(ref.item(), rel=1e-5)
        assert torch.allclose(mean, ref_mean.detach(), atol=1e-6)  # every token weighs the same
    assert torch.allclose(grads1, ref1.grad, atol=1e-6) and torch.allclose(gradsp, ref_p.grad, atol=1e-6)
