"""Side-by-side training-step benchmarks of nnunet_mim's trainers (a script, not a test).

    nnunet_mim benchmark hybridmim -d 4 -c 3d_fullres --steps 10

Each case is a real nnU-Net trainer (supervised ``nnUNetTrainer``, ``HybridMIMPretrainer``, ...) built
from the dataset's plans and driven through its own ``train_step`` on a synthetic batch of the plan's
patch and batch size (the step does not depend on image content; data loading is excluded).

- **Time**: all cases live in one process and their steps are *interleaved* (A B C A B C ...), so that
  drift of a shared machine hits every case alike; the median per case is reported.
- **Memory**: the bytes a step holds at its peak, counted exactly and device-independently as
  *activations saved for backward* (``torch.autograd.graph.saved_tensors_hooks``, unique storages,
  parameters excluded) plus *training state* (parameters, gradients, optimiser moments). On CUDA the
  allocator's peak (``torch.cuda.max_memory_allocated``, each case in a fresh process) is reported too.
  (The CPU resident set size is not used: allocator caching and thread pools swamp the differences.)

Results are written to ``-o`` (default ``benchmarks.md`` in the current folder; the section of the suite is
replaced) with the command, machine, date, the table and the ratios against their targets.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from nnunet_mim.apps.provenance import machine_description


@dataclass(frozen=True)
class Case:
    """One benchmarked step: a trainer on a configuration (``None``: the suite's configuration)."""

    label: str
    trainer: str
    configuration: str | None = None
    plans: str | None = None
    mode: str = "train"  # "train" (one train_step) or "predict" (sliding-window prediction of one volume)


@dataclass(frozen=True)
class Ratio:
    numerator: str
    denominator: str
    metric: str  # "time" or "memory"
    target: float | None  # the ratio should be <= target (None: informational)


@dataclass(frozen=True)
class Suite:
    cases: tuple[Case, ...]
    ratios: tuple[Ratio, ...]
    description: str


SUITES: dict[str, Suite] = {
    "hybridmim": Suite(
        cases=(Case("supervised nnUNetTrainer", "nnUNetTrainer"),
               Case("HybridMIM partial region", "HybridMIMPretrainer"),
               Case("HybridMIM full region", "HybridMIMPretrainer_fullRegion"),
               Case("HybridMIM partial region, no contrastive view", "HybridMIMPretrainer_recPerception")),
        ratios=(Ratio("HybridMIM partial region", "HybridMIM full region", "time", 0.60),
                Ratio("HybridMIM partial region", "supervised nnUNetTrainer", "time", 1.15),
                Ratio("HybridMIM partial region", "supervised nnUNetTrainer", "memory", 1.2)),
        description="HybridMIM: one training step on the same planned network and patch.",
    ),
    "sac_vit": Suite(
        cases=(Case("U-Net train", "nnUNetTrainer"),
               Case("SAC-ViT-B train", "nnUNetTrainerSACViT", "3d_sac_vit"),
               Case("U-Net predict", "nnUNetTrainer", mode="predict"),
               Case("SAC-ViT-B predict", "nnUNetTrainerSACViT", "3d_sac_vit", mode="predict")),
        ratios=(Ratio("SAC-ViT-B predict", "U-Net predict", "time", 1.5),
                Ratio("SAC-ViT-B train", "U-Net train", "time", 2.0)),
        description="SAC-ViT: SAC-ViT-B (`3d_sac_vit`, `nnunet_mim add-config sac-vit -d D --patch P`) "
                    "against nnU-Net's default U-Net re-planned for the same patch (`-c`, made with `nnunet_mim "
                    "add-config unet -d D -n NAME --patch P`): one training step each, and sliding-window prediction "
                    "of a volume twice the patch per axis (27 windows, no mirroring). Targets: prediction <= 1.5x; "
                    "the training-step ratio has no target (2x is informational). `--profile` "
                    "adds the attention time (SDPA forward op, backward autograd node).",
    ),
    "swin": Suite(
        cases=(Case("supervised SwinUNETR", "nnUNetTrainerSwinUNETR"),
               Case("HybridMIM-Swin partial region", "HybridMIMPretrainerSwin"),
               Case("HybridMIM-Swin full region", "HybridMIMPretrainerSwin_fullRegion")),
        ratios=(Ratio("HybridMIM-Swin partial region", "HybridMIM-Swin full region", "time", 0.65),
                Ratio("HybridMIM-Swin partial region", "HybridMIM-Swin full region", "memory", 0.65),
                Ratio("HybridMIM-Swin partial region", "supervised SwinUNETR", "time", 1.2),
                Ratio("HybridMIM-Swin partial region", "supervised SwinUNETR", "memory", 1.2)),
        description="SwinUNETR: one training step of supervised SwinUNETR (AdamW, deep supervision) and "
                    "of HybridMIM on the same Swin network, with partial-region and full-patch decoding. Run it on a "
                    "Swin configuration: `nnunet_mim add-config swin -d D` then `-c 3d_swin`. Targets: "
                    "partial/full <= 0.65x, HybridMIM-Swin/supervised <= 1.2x.",
    ),
    "pumit": Suite(
        cases=(Case("SAC-ViT-B supervised", "nnUNetTrainerSACViT"),
               Case("PUMIT stage 1: visual tokenizer + discriminator", "VisualTokenizerTrainer"),
               Case("PUMIT stage 2: token MIM", "TokenMIMPretrainer")),
        ratios=(Ratio("PUMIT stage 1: visual tokenizer + discriminator", "SAC-ViT-B supervised", "time", None),
                Ratio("PUMIT stage 1: visual tokenizer + discriminator", "SAC-ViT-B supervised", "memory", None),
                Ratio("PUMIT stage 2: token MIM", "SAC-ViT-B supervised", "time", None),
                Ratio("PUMIT stage 2: token MIM", "SAC-ViT-B supervised", "memory", None)),
        description="PUMIT: one training step of both token-reconstruction stages next to supervised SAC-ViT-B, "
                    "on the same SAC-ViT configuration (`-c 3d_sac_vit`). Stage 2 needs a stage-1 tokenizer: the "
                    "trained one (found by convention) or `nnUNet_mim_tokenizer=random` (an untrained tokenizer of "
                    "the default size: same cost). `--profile`: the `mim.tokenizer` scope is the frozen tokenizer's "
                    "share of the stage-2 step.",
    ),
    "mim_baselines": Suite(
        cases=(Case("MAE (mask 0.75)", "MAEPretrainer", "3d_sac_vit"),
               Case("MAE, official 8x512 decoder", "MAEPretrainer_dec8x512", "3d_sac_vit"),
               Case("SimMIM (mask 0.75)", "SimMIMPretrainer", "3d_sac_vit"),
               Case("token MIM (mask 0.55)", "TokenMIMPretrainer", "3d_sac_vit"),
               Case("SimCLR", "SimCLRPretrainer", "3d_sac_vit"),
               Case("HybridMIM (U-Net, same patch)", "HybridMIMPretrainer")),
        ratios=(Ratio("MAE (mask 0.75)", "SimMIM (mask 0.75)", "time", 0.6),
                Ratio("MAE, official 8x512 decoder", "SimMIM (mask 0.75)", "time", None),
                Ratio("MAE (mask 0.75)", "SimMIM (mask 0.75)", "memory", None),
                Ratio("SimCLR", "SimMIM (mask 0.75)", "time", None)),
        description="MIM baselines: one training step of MAE, SimMIM, token MIM and SimCLR on SAC-ViT "
                    "(`3d_sac_vit`) and of HybridMIM on nnU-Net's default U-Net re-planned for the same patch (`-c`, "
                    "`nnunet_mim add-config unet -d D -n NAME --patch P`). Token MIM: see the `pumit` suite for its "
                    "tokenizer. Target: MAE at mask 0.75 <= 0.6x SimMIM's step (encoder on the visible "
                    "tokens only); the official 8x512 decoder is shown for the decoder-size choice.",
    ),
}


# ------------------------------------------------------------------------------------------- one case
def build_trainer(dataset: str, configuration: str, trainer_name: str, plans_identifier: str,
                  device: torch.device):
    """Instantiate and initialise a trainer exactly as ``nnUNetv2_train`` does (its output goes to a temp dir)."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json

    from nnunet_mim.nnunet.plans import dataset_folder, plans_path
    from nnunet_mim.nnunet.versions import find_trainer_class

    plans = load_json(plans_path(dataset, plans_identifier))
    plans["continue_training"] = False
    dataset_json = load_json(join(dataset_folder(dataset), "dataset.json"))
    trainer = find_trainer_class(trainer_name)(plans, configuration, "benchmark", dataset_json, device)
    trainer.initialize()
    trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
    trainer.network.train()
    return trainer


def synthetic_batch(trainer, seed: int = 0) -> dict:
    """A batch of the plan's batch and patch size; deep-supervision targets when the trainer uses them."""
    g = torch.Generator().manual_seed(seed)
    patch = list(trainer.configuration_manager.patch_size)
    data = torch.randn(trainer.batch_size, trainer.num_input_channels, *patch, generator=g)
    classes = trainer.label_manager.num_segmentation_heads
    scales = trainer._get_deep_supervision_scales() or [[1.0] * len(patch)]
    targets = [torch.randint(0, classes, (trainer.batch_size, 1, *[int(round(p * s)) for p, s in zip(patch, sc)]),
                             generator=g).float() for sc in scales]
    return {"data": data, "target": targets if trainer.enable_deep_supervision else targets[0]}


def make_step(case: Case, dataset: str, configuration: str, plans: str, device: torch.device):
    """(step function, trainer) for one case."""
    trainer = build_trainer(dataset, case.configuration or configuration, case.trainer, case.plans or plans, device)
    batch = synthetic_batch(trainer)
    if case.mode == "predict":
        return _prediction_step(trainer, batch), trainer

    def step():
        trainer.train_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step, trainer


def _prediction_step(trainer, batch) -> Callable[[], None]:
    """Sliding-window prediction of one volume twice the patch per axis, as nnUNetv2_predict runs it."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=trainer.device,
                                perform_everything_on_device=trainer.device.type == "cuda", verbose=False,
                                allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, type(trainer).__name__, None)
    volume = torch.randn(trainer.num_input_channels, *[2 * p for p in trainer.configuration_manager.patch_size])

    def step():
        with torch.no_grad():
            predictor.predict_sliding_window_return_logits(volume)

    return step


# ---------------------------------------------------------------------------------------- measurement
def measure(cases: list[Case], dataset: str, configuration: str, plans: str, device: torch.device,
            steps: int, warmup: int) -> tuple[dict[str, list[float]], dict[str, tuple[float, float]]]:
    """Interleaved step times per case, and (activations, state) memory of one step per training case."""
    built = {c.label: make_step(c, dataset, configuration, plans, device) for c in cases}
    steps_fn = {label: fn for label, (fn, _) in built.items()}
    for _ in range(warmup):
        for fn in steps_fn.values():
            fn()
    memory = {c.label: step_memory_mb(*built[c.label]) for c in cases if c.mode == "train"}
    measure.built = built  # for profile_scopes
    times: dict[str, list[float]] = {c.label: [] for c in cases}
    for _ in range(steps):
        for c in cases:
            t0 = time.perf_counter()
            steps_fn[c.label]()
            times[c.label].append(time.perf_counter() - t0)
    return times, memory


def step_memory_mb(trainer_step: Callable[[], None], trainer) -> tuple[float, float]:
    """(activations saved for backward, parameters + gradients + optimiser state) of one step, in MB."""
    params = {p.untyped_storage().data_ptr() for p in trainer.network.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer_step()
    state = 0
    for p in trainer.network.parameters():
        state += p.numel() * p.element_size() * (2 if p.requires_grad else 1)
    for moments in trainer.optimizer.state.values():
        state += sum(v.numel() * v.element_size() for v in moments.values() if isinstance(v, torch.Tensor))
    return sum(saved.values()) / 2 ** 20, state / 2 ** 20


def cuda_peak_memory_mb(case: Case, dataset: str, configuration: str, plans: str, device: torch.device,
                        warmup: int) -> float:
    """CUDA allocator peak of a few steps of one case, measured in a fresh process."""
    probe = json.dumps({"case": case.__dict__, "dataset": dataset, "configuration": configuration,
                        "plans": plans, "device": str(device), "warmup": warmup})
    out = subprocess.run([sys.executable, "-m", "nnunet_mim.apps.benchmark", "--memory-probe", probe],
                         capture_output=True, text=True, env=os.environ.copy())
    match = re.search(r"PEAK_MB=([0-9.]+)", out.stdout)
    if not match:
        raise RuntimeError(f"memory probe for {case.label} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return float(match.group(1))


def _memory_probe(spec: str) -> None:
    spec = json.loads(spec)
    device = torch.device(spec["device"])
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["nnUNet_results"] = tmp
        step, _ = make_step(Case(**spec["case"]), spec["dataset"], spec["configuration"], spec["plans"], device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(max(2, spec["warmup"])):
            step()
        peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20
    print(f"PEAK_MB={peak_mb:.1f}")


def profile_scopes(cases: list[Case], built: dict, steps: int = 3) -> dict[str, dict[str, float]]:
    """Mean time (s) per step of each named scope (``hybridmim.*``, ``train.*`` record_function labels)."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for c in cases:
        if c.mode != "train":
            continue
        step, _ = built[c.label]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        scopes = {e.key: e.cpu_time_total / 1e6 / steps for e in prof.key_averages()
                  if e.key.startswith(("hybridmim.", "train.", "swin.", "vit.", "mim.",
                                       # attention (forward op, backward autograd node), e.g. SAC-ViT's SDPA
                                       "aten::scaled_dot_product_attention", "ScaledDotProduct"))}
        if scopes:
            out[c.label] = dict(sorted(scopes.items()))
    return out


# ------------------------------------------------------------------------------------------- reporting
def render(suite_name: str, suite: Suite, times: dict, memory: dict, cuda_peak: dict, command: str,
           device: torch.device, describe: str, scopes: dict | None = None) -> str:
    medians = {k: statistics.median(v) for k, v in times.items()}
    totals = {k: a + b for k, (a, b) in memory.items()}
    lines = [f"<!-- suite:{suite_name} -->", f"### {suite_name}", "", suite.description, "",
             f"- command: `{command}`", f"- machine: {machine_description(device)}",
             f"- date: {datetime.date.today().isoformat()}", f"- network: {describe}",
             f"- steps: {len(next(iter(times.values())))} timed per case, interleaved; median reported", "",
             "| case | step time, median (s) | IQR (s) | activations (MB) | params+grads+optimiser (MB) | "
             "memory total (MB) | CUDA peak (MB) |", "|---|---|---|---|---|---|---|"]
    for c in suite.cases:
        q1, q3 = np.percentile(times[c.label], [25, 75])
        act, state = memory.get(c.label, (float("nan"), float("nan")))
        cuda = f"{cuda_peak[c.label]:.0f}" if c.label in cuda_peak else "-"
        mb = [f"{v:.1f}" if np.isfinite(v) else "-" for v in (act, state, act + state)]  # predict: no backward
        lines.append(f"| {c.label} | {medians[c.label]:.3f} | {q1:.3f}-{q3:.3f} | {mb[0]} | {mb[1]} | {mb[2]} | "
                     f"{cuda} |")
    if suite.ratios:
        lines += ["", "| ratio | measured | target | |", "|---|---|---|---|"]
    for r in suite.ratios:
        src = medians if r.metric == "time" else (cuda_peak or totals)
        value = src[r.numerator] / src[r.denominator]
        verdict = ("-", "informational") if r.target is None else \
            (f"<= {r.target:.2f}x", "met" if value <= r.target else "MISSED")
        lines.append(f"| {r.metric}: {r.numerator} / {r.denominator} | {value:.2f}x | {verdict[0]} | {verdict[1]} |")
    if scopes:
        names = sorted({k for v in scopes.values() for k in v})
        lines += ["", "Profile (torch.profiler, mean CPU time per step in each named scope, s; scopes nest: "
                      "`train.forward_and_losses` contains the method's forward scopes, `hybridmim.*`, `swin.*`, `mim.*`; SDPA rows are the attention op and its backward node):", "",
                  "| case | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for label, v in scopes.items():
            lines.append(f"| {label} | " + " | ".join(f"{v[n]:.3f}" if n in v else "-" for n in names) + " |")
    lines.append(f"<!-- /suite:{suite_name} -->")
    return "\n".join(lines)


def write_section(path: str, suite_name: str, section: str) -> None:
    text = open(path).read() if os.path.isfile(path) else "# Benchmarks\n\nWritten by `nnunet_mim benchmark`.\n"
    pattern = re.compile(rf"<!-- suite:{suite_name} -->.*?<!-- /suite:{suite_name} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def run(args) -> str:
    suite = SUITES[args.suite]
    device = torch.device(args.device)
    from nnunet_mim.nnunet.plans import describe

    cases = [replace(c, configuration=args.sac_vit_configuration) if c.configuration == "3d_sac_vit" else c
             for c in suite.cases]
    user_results = os.environ.get("nnUNet_results")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["nnUNet_results"] = tmp  # trainers write logs; keep them out of the user's results
        try:
            print(f"timing {len(cases)} cases x {args.steps} steps (interleaved) on {device} ...", flush=True)
            times, memory = measure(cases, args.dataset, args.configuration, args.plans, device, args.steps,
                                    args.warmup)
            scopes = profile_scopes(cases, measure.built) if args.profile else None
            cuda_peak = {}
            if device.type == "cuda":
                for c in cases:
                    if c.mode == "train":
                        cuda_peak[c.label] = cuda_peak_memory_mb(c, args.dataset, args.configuration, args.plans,
                                                                 device, args.warmup)
        finally:
            if user_results is not None:
                os.environ["nnUNet_results"] = user_results
    command = "nnunet_mim benchmark " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["benchmark"] else sys.argv[1:])
    configurations = dict.fromkeys(c.configuration or args.configuration for c in cases)
    networks = "; ".join(describe(args.dataset, name, args.plans) for name in configurations)
    section = render(args.suite, suite, times, memory, cuda_peak, command, device, networks, scopes)
    print(section)
    if args.output:
        write_section(args.output, args.suite, section)
        print(f"written to {args.output}")
    return section


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("benchmark", help="side-by-side step time / peak memory of trainers (writes docs)")
    p.add_argument("suite", choices=sorted(SUITES))
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("--sac-vit-configuration", default="3d_sac_vit",
                   help="SAC-ViT configuration of the cases that run on one (suites sac_vit, mim_baselines)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="add a per-scope time breakdown (torch.profiler)")
    p.add_argument("-o", "--output", default="benchmarks.md",
                   help="markdown file whose section for this suite is replaced (default benchmarks.md in the current "
                        "folder; the repository keeps its results in documentation/benchmarks.md; '' to skip)")
    p.set_defaults(func=run)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-probe":
        _memory_probe(sys.argv[2])
    else:
        raise SystemExit("use `nnunet_mim benchmark ...`")
