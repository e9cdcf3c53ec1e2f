"""nnU-Net's progress.png with one more panel: the curves of each pretraining loss component.

nnunetv2 2.7+ logs through a ``MetaLogger`` whose ``local_logger`` holds the values and draws progress.png; in 2.6
``trainer.logger`` is that logger itself (``nnUNetLogger``). :func:`local_logger` and :func:`install_local_logger`
hide the difference.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

try:  # nnunetv2 >= 2.7
    from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402
except ImportError:  # nnunetv2 2.6: the trainer's logger is the local logger
    from nnunetv2.training.logging.nnunet_logger import nnUNetLogger as LocalLogger  # noqa: E402


def local_logger(trainer):
    """The logger that holds a trainer's values and draws its progress.png."""
    return getattr(trainer.logger, "local_logger", trainer.logger)


def install_local_logger(trainer, logger) -> None:
    """Make ``logger`` the one that holds the trainer's values and draws its progress.png."""
    if hasattr(trainer.logger, "local_logger"):
        trainer.logger.local_logger = logger
    else:
        trainer.logger = logger


#: per-epoch lists of the downstream probe during pretraining (NaN in epochs without a probe)
PROBE_KEYS = ("probe_dice", "probe_random_dice")


class ComponentLocalLogger(LocalLogger):
    """nnU-Net's LocalLogger plus ``train_<name>`` / ``val_<name>`` lists for each loss component and the
    :data:`PROBE_KEYS` lists.

    nnU-Net's own three panels are drawn unchanged (the "pseudo dice" of a pretrainer is a stand-in, see
    ``trainers/base.py``); a fourth panel shows the components on a log scale, and a fifth the downstream probe's
    Dice when a probe ran (:mod:`nnunet_mim.nnunet.probe_schedule`).
    """

    def __init__(self, components: Sequence[str], verbose: bool = False):
        super().__init__(verbose)
        self.components = tuple(components)
        for name in self.component_keys() + list(PROBE_KEYS):
            self.my_fantastic_logging[name] = []

    def get_value(self, key: str, step: int | None):
        """The value logged at ``step`` (all of them for ``None``); nnunetv2 2.6's logger lacks this method."""
        values = self.my_fantastic_logging[key]
        return values if step is None else values[step]

    def component_keys(self) -> list[str]:
        return [f"{split}_{c}" for split in ("train", "val") for c in self.components]

    def load_checkpoint(self, checkpoint: dict):
        super().load_checkpoint(checkpoint)
        # checkpoints of older runs may lack a list: NaN for their epochs keeps every list one entry per epoch
        epochs = len(self.my_fantastic_logging.get("epoch_end_timestamps", []))
        for name in self.component_keys() + list(PROBE_KEYS):
            values = self.my_fantastic_logging.setdefault(name, [])
            values.extend([float("nan")] * (epochs - len(values)))

    def plot_progress_png(self, output_folder: str):
        super().plot_progress_png(output_folder)
        epoch = min(len(v) for v in self.my_fantastic_logging.values())
        if epoch == 0:
            return
        if self.components:
            self.plot_components(f"{output_folder}/progress.png", epoch)
        self.plot_probe(f"{output_folder}/progress.png", epoch)

    def plot_components(self, png_path: str, epoch: int) -> None:
        fig, ax = plt.subplots(1, 1, figsize=(30, 14))
        colors = plt.cm.tab10(np.linspace(0, 1, 10))
        for i, c in enumerate(self.components):
            for split, style in (("train", "-"), ("val", "--")):
                values = np.asarray(self.my_fantastic_logging[f"{split}_{c}"][:epoch], dtype=float)
                if np.all(~np.isfinite(values)):
                    continue
                ax.plot(range(epoch), np.abs(values), color=colors[i % 10], ls=style, lw=4, label=f"{split} {c}")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss component (unweighted, log scale)")
        ax.legend(loc="upper right", fontsize=18, ncol=2)
        plt.tight_layout()
        _append_below(png_path, fig)
        plt.close(fig)

    def plot_probe(self, png_path: str, epoch: int) -> None:
        """A fifth panel: the probe's validation Dice against the pretraining epoch, the random body's as a line."""
        pretrained = np.asarray(self.my_fantastic_logging["probe_dice"][:epoch], dtype=float)
        random = np.asarray(self.my_fantastic_logging["probe_random_dice"][:epoch], dtype=float)
        done = np.isfinite(pretrained)
        if not done.any():
            return
        fig, ax = plt.subplots(1, 1, figsize=(30, 14))
        ax.plot(np.flatnonzero(done), pretrained[done], "o-", color="tab:green", lw=4, ms=14,
                label="probe Dice, pretrained body")
        if np.isfinite(random).any():
            ax.axhline(float(np.nanmean(random)), color="tab:gray", ls="--", lw=4, label="probe Dice, random body")
        ax.set_xlim(0, max(1, epoch))  # a point at the last epoch stays inside the frame
        ax.set_xlabel("epoch")
        ax.set_ylabel("downstream probe: validation Dice")
        ax.legend(loc="best", fontsize=18)  # the curve may end low or high
        plt.tight_layout()
        _append_below(png_path, fig)
        plt.close(fig)


def _append_below(png_path: str, fig) -> None:
    """Append ``fig`` below the image at ``png_path`` (nnU-Net's progress.png), rescaled to its width."""
    top = plt.imread(png_path)
    fig.set_size_inches(top.shape[1] / fig.dpi, top.shape[1] / fig.dpi * 14 / 30)
    fig.canvas.draw()
    bottom = np.asarray(fig.canvas.buffer_rgba(), dtype=np.float32) / 255.0
    if top.shape[2] == 3:
        top = np.concatenate([top, np.ones_like(top[..., :1])], axis=2)
    width = top.shape[1]
    bottom = bottom[:, :width] if bottom.shape[1] >= width else np.pad(
        bottom, ((0, 0), (0, width - bottom.shape[1]), (0, 0)), constant_values=1.0)
    plt.imsave(png_path, np.concatenate([top, bottom], axis=0))
