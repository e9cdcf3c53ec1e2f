"""Learning-rate schedules: warmup, decay, and identical curves after a resume."""
import pytest
import torch

from nnunet_mim.core.schedules import FunctionalLRSchedule, warmup_cosine, warmup_poly


def test_warmup_cosine_shape():
    lrs = [warmup_cosine(s, 100, 10, 1e-4) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[9] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-6


def test_warmup_poly_matches_nnunet_after_warmup():
    assert warmup_poly(0, 1000, 50, 1e-2) == pytest.approx(2e-4)
    assert warmup_poly(50, 1000, 50, 1e-2) == pytest.approx(1e-2)
    assert warmup_poly(525, 1000, 50, 1e-2) == pytest.approx(1e-2 * 0.5 ** 0.9)


def test_resume_continues_on_the_same_curve():
    def run(start_epoch, epochs):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([{"params": [p]}, {"params": [], "lr_scale": 0.5}], lr=1.0)
        sched = FunctionalLRSchedule(opt, lambda s: warmup_cosine(s, 40, 4, 1.0), iterations_per_epoch=4)
        out = []
        for e in range(start_epoch, epochs):
            sched.step(e)
            for i in range(4):
                sched.step_iteration(e, i)
                out.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
        return out

    full = run(0, 10)
    assert run(6, 10) == full[24:]
    assert all(b == pytest.approx(a * 0.5) for a, b in full)
