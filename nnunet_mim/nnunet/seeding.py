"""Seeded nnU-Net runs: the same seed gives the same run on the CPU (up to float non-determinism).

nnU-Net does not seed training. Randomness enters in four places, and a seed has to reach all of them:

1. the network's initialisation and everything the trainer draws in the main process (masks, dropout):
   ``torch``, ``numpy`` and ``random``, seeded by :func:`seed_everything` before the network is built;
2. the data loader's case and crop sampling (``numpy``) and
3. batchgeneratorsv2's augmentation (``torch``), both in the data-augmentation worker processes: each worker is
   seeded with its own seed, derived from the run's seed, the split (train / val), the worker and the DDP rank;
4. the order in which workers deliver batches: nnU-Net's ``NonDetMultiThreadedAugmenter`` hands out whichever
   batch is ready first. A seeded run uses batchgenerators' ``MultiThreadedAugmenter`` instead, which takes the
   workers in turn (same transforms, same data, deterministic order).

With ``nnUNet_n_proc_DA=0`` everything runs in the main process and (1) covers it. Unseeded runs are untouched.
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch
from threadpoolctl import threadpool_limits

#: numpy seeds must fit in 32 bits
_SEED_SPACE = 2 ** 32


def derived_seed(seed: int, *parts: int) -> int:
    """A seed for one consumer (split, worker, rank) of the run seeded with ``seed``; distinct parts give distinct
    streams, the same parts the same stream."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0]) % _SEED_SPACE


def seed_everything(seed: int) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` of this process."""
    random.seed(seed)
    np.random.seed(seed % _SEED_SPACE)
    torch.manual_seed(seed)


class SeededWorkerLoader:
    """nnU-Net's data loader, seeding the worker process it runs in (``torch`` for the augmentation, ``numpy`` and
    ``random`` for sampling) when batchgenerators tells it its worker id."""

    def __init__(self, loader, seeds: list[int]):
        self.loader = loader
        self.seeds = seeds

    def set_thread_id(self, thread_id: int) -> None:
        # one thread per worker, as nnU-Net's own augmenter does: a forked child must not use the intra-op thread
        # pool its parent may have started (OpenMP is not fork-safe; the worker would hang in its first torch op)
        torch.set_num_threads(1)
        threadpool_limits(1)
        seed_everything(self.seeds[thread_id])
        self.loader.set_thread_id(thread_id)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.loader)

    def __getattr__(self, name):
        if name in ("loader", "seeds"):  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)


@contextlib.contextmanager
def seeded_augmenters(trainer_module, seed: int, rank: int = 0) -> Iterator[None]:
    """While active, the augmenters that nnU-Net's ``get_dataloaders`` builds in ``trainer_module`` are seeded and
    deterministic: :class:`SeededWorkerLoader` in batchgenerators' ordered ``MultiThreadedAugmenter``.

    nnU-Net builds data loaders and augmenters inside one method with no hook in between, so the augmenter classes
    are swapped in that method's module for the duration of the call (and restored after it, also on errors).
    """
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter

    original = trainer_module.NonDetMultiThreadedAugmenter
    split = iter(range(2))  # nnU-Net builds the training augmenter first, then the validation one

    def ordered(data_loader, transform, num_processes, num_cached=2, seeds=None, pin_memory=False, wait_time=0.02):
        which = next(split, 1)
        worker_seeds = [derived_seed(seed, rank, which, i) for i in range(num_processes)]
        return MultiThreadedAugmenter(SeededWorkerLoader(data_loader, worker_seeds), transform, num_processes,
                                      num_cached_per_queue=max(2, num_cached // max(num_processes, 1)),
                                      seeds=worker_seeds, pin_memory=pin_memory, wait_time=wait_time)

    trainer_module.NonDetMultiThreadedAugmenter = ordered
    try:
        yield
    finally:
        trainer_module.NonDetMultiThreadedAugmenter = original
