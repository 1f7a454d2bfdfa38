"""Train the embedded default model: a class-conditional 8x8 digit diffusion model and two classifiers.

Run ``python -m scripts.train_digits [--out samples/weights] [--seed 0] [--steps N] [--quick]``. Everything is
seeded and runs on 2 CPU threads; the full run takes about 10 minutes on 2 otherwise idle cores (on a shared
machine, ``OMP_WAIT_POLICY=PASSIVE`` avoids a large slow-down and changes no result). It writes:

* ``digits/`` and ``digits-weak/``: diffusers pipeline folders (``unet/``, ``scheduler/``, ``model_index.json``)
  for a class-conditional ``UNet2DModel`` (label 10 is the null label used for the unconditional branch of
  classifier-free guidance) and for an early EMA snapshot of the same training run, chosen by measurement so
  that its conditional samples are recognisably weaker (class accuracy near ``WEAK_TARGET_ACCURACY``);
* ``classifier/`` (the guidance classifier) and ``evaluator/`` (the evaluation network);
* ``MODEL_CARD.md`` with the settings, timings and quality metrics measured on the saved weights.

``--quick`` trains tiny versions with few steps (for smoke tests) and writes to a temporary folder unless
``--out`` is given.
"""

from __future__ import annotations

from samples import cli  # noqa: F401  (first: quiet third-party start-up notices of the pipelines import)

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import diffusers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from guidance.cfg import CFG  # noqa: E402
from pipelines import GuidedClassConditionalPipeline  # noqa: E402
from samples.digits.data import NUM_CLASSES, SPLIT_SEED, TEST_FRACTION, DigitsSplit, load_digits_split  # noqa: E402
from samples.digits.nets import (  # noqa: E402
    WEIGHTS_DIR,
    DigitClassifier,
    DigitEvaluator,
    load_classifier,
    load_evaluator,
    save_network,
)
from samples.metrics.frechet import frechet_distance  # noqa: E402

NULL_LABEL = NUM_CLASSES
NUM_THREADS = 2
WEAK_TARGET_ACCURACY = 0.96

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "num_class_embeds": NULL_LABEL + 1,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
}
QUICK_UNET_CONFIG: dict[str, Any] = {**UNET_CONFIG, "block_out_channels": (8, 16, 16)}
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": False,
}


@dataclass
class Settings:
    """Everything the run depends on besides the seed (recorded in the model card)."""

    diffusion_steps: int = 3000
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    p_uncond: float = 0.15
    weak_candidates: tuple[int, ...] = (1000, 1250, 1500, 1750, 2000)
    unet_config: dict[str, Any] = field(default_factory=lambda: dict(UNET_CONFIG))
    classifier_steps: int = 1500
    evaluator_steps: int = 1500
    samples_per_class: int = 100
    inference_steps: int = 50
    oversaturated_scale: float = 8.0

    @classmethod
    def quick(cls) -> Settings:
        """Tiny settings for smoke tests: minutes become seconds, the metrics become meaningless."""
        return cls(
            diffusion_steps=40,
            batch_size=32,
            warmup_steps=5,
            weak_candidates=(10, 20),
            unet_config=dict(QUICK_UNET_CONFIG),
            classifier_steps=30,
            evaluator_steps=30,
            samples_per_class=4,
            inference_steps=5,
        )


@dataclass
class DiffusionRun:
    """The EMA model after training and the EMA state dicts at the snapshot steps."""

    unet: UNet2DModel
    snapshots: dict[int, dict[str, torch.Tensor]]


def make_scheduler() -> DDPMScheduler:
    """The training noise schedule (1000 steps, cosine ``squaredcos_cap_v2``, epsilon, ``clip_sample=False``)."""
    return DDPMScheduler(**SCHEDULER_CONFIG)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for every parameter."""
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1.0 - decay)


def train_diffusion(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    seed: int,
    settings: Settings | None = None,
    snapshot_steps: tuple[int, ...] = (),
    progress: bool = True,
) -> DiffusionRun:
    """Train a class-conditional epsilon-prediction ``UNet2DModel`` on ``images`` and return its EMA.

    Labels are replaced by ``NULL_LABEL`` with probability ``settings.p_uncond`` so that the same network also
    predicts the unconditional noise. All randomness comes from ``seed``, so two runs give identical weights.
    The EMA decay warms up as ``min(ema_decay, (1 + step) / (10 + step))``; its state is copied at
    ``snapshot_steps`` (counted after the update, 1-based).
    """
    settings = settings or Settings()
    torch.manual_seed(seed)
    unet = UNet2DModel(**settings.unet_config)
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    scheduler = make_scheduler()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.learning_rate)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, settings.warmup_steps))
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    bar = tqdm(range(steps), desc="diffusion", disable=not progress)
    for step in bar:
        index = torch.randint(0, len(images), (settings.batch_size,), generator=generator)
        clean, cond = images[index], labels[index].clone()
        cond[torch.rand(settings.batch_size, generator=generator) < settings.p_uncond] = NULL_LABEL
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (settings.batch_size,), generator=generator)
        noise = torch.randn(clean.shape, generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, class_labels=cond).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        ema_update(ema, unet, min(settings.ema_decay, (1 + step) / (10 + step)))
        if step + 1 in snapshot_steps:
            snapshots[step + 1] = {name: tensor.clone() for name, tensor in ema.state_dict().items()}
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return DiffusionRun(unet=ema, snapshots=snapshots)


def random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by -1, 0 or +1 pixel in each direction, filling with the background value -1."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    offset_y, offset_x = torch.randint(0, 3, (2, batch, 1), generator=generator)
    rows = (offset_y + torch.arange(height))[:, :, None]
    cols = (offset_x + torch.arange(width))[:, None, :]
    return padded[torch.arange(batch)[:, None, None], 0, rows, cols].unsqueeze(1)


def train_classifier(
    net: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, steps: int, seed: int, progress: bool = True
) -> nn.Module:
    """Train ``net`` (cross-entropy, random 1-pixel shifts, AdamW, cosine decay); return it frozen, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, steps // 20))
    net.train()
    bar = tqdm(range(steps), desc=type(net).__name__, disable=not progress)
    for step in bar:
        index = torch.randint(0, len(images), (128,), generator=generator)
        loss = F.cross_entropy(net(random_shift(images[index], generator)), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return net.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` whose argmax logit is the label."""
    return (net(images).argmax(dim=1) == labels).float().mean().item()


@torch.no_grad()
def sample_cfg(
    unet: UNet2DModel,
    scheduler_config: dict[str, Any],
    labels: torch.Tensor,
    scale: float,
    *,
    num_inference_steps: int = 50,
    seed: int = 0,
    chunk: int = 250,
) -> torch.Tensor:
    """Deterministic DDIM (eta 0) samples with plain classifier-free guidance, unclipped, through our own loop
    (:class:`pipelines.GuidedClassConditionalPipeline`, i.e. :func:`pipelines.loop.denoise`).

    ``eps = eps_u + scale * (eps_c - eps_u)`` (:class:`guidance.cfg.CFG`) with ``eps_u`` from ``NULL_LABEL`` (at
    ``scale == 1`` only the conditional branch is evaluated); ``chunk`` images per pipeline call, all noise from one
    generator seeded with ``seed``. Returns ``[N, 1, 8, 8]``.
    """
    pipe = GuidedClassConditionalPipeline(
        scheduler=DDIMScheduler.from_config(scheduler_config), unet=unet, null_class_label=NULL_LABEL
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([
        pipe(part, guidance=CFG(scale), num_inference_steps=num_inference_steps, generator=generator,
             output_type="latent").images
        for part in labels.split(chunk)
    ])


def save_pipeline(unet: UNet2DModel, scheduler: DDPMScheduler, folder: Path) -> None:
    """Write a diffusers pipeline folder for ``pipelines.GuidedClassConditionalPipeline`` (UNet stored as fp16)."""
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    weights = folder / "unet" / SAFETENSORS_WEIGHTS_NAME
    save_file({name: tensor.half() for name, tensor in load_file(weights).items()}, weights, metadata={"format": "pt"})
    scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "GuidedClassConditionalPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "transformer": [None, None],
        "vae": [None, None],
        "null_class_label": NULL_LABEL,
        "id2label": {str(label): str(label) for label in range(NUM_CLASSES)},
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def load_unet(folder: Path) -> UNet2DModel:
    """The UNet of a saved pipeline folder, in float32, eval mode, frozen."""
    return UNet2DModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval().requires_grad_(False)


@dataclass
class SampleMetrics:
    """Quality of samples at one guidance scale, measured with the evaluation network."""

    accuracy: float
    fd_test: float
    outside: float
    outside_margin: float


SATURATION_MARGIN = 0.1


def measure_samples(
    unet: UNet2DModel, evaluator: DigitEvaluator, test_features: torch.Tensor, scale: float, settings: Settings
) -> SampleMetrics:
    """Sample ``samples_per_class`` images per class (seed 0) and measure them.

    Class accuracy and FD-digits (against the held-out features) use the samples clamped to [-1, 1] as they
    would be shown; the saturation fractions use the raw samples: pixels outside [-1, 1], and pixels more than
    ``SATURATION_MARGIN`` outside it.
    """
    labels = torch.arange(NUM_CLASSES).repeat_interleave(settings.samples_per_class)
    raw = sample_cfg(unet, make_scheduler().config, labels, scale, num_inference_steps=settings.inference_steps)
    shown = raw.clamp(-1.0, 1.0)
    with torch.no_grad():
        features = evaluator.features(shown)
    return SampleMetrics(
        accuracy=accuracy(evaluator, shown, labels),
        fd_test=frechet_distance(features, test_features),
        outside=(raw.abs() > 1.0).float().mean().item(),
        outside_margin=(raw.abs() > 1.0 + SATURATION_MARGIN).float().mean().item(),
    )


def choose_weak(
    run: DiffusionRun, evaluator: DigitEvaluator, test_features: torch.Tensor, settings: Settings, scratch: Path
) -> tuple[int, dict[int, SampleMetrics]]:
    """Measure every EMA snapshot at scale 1 (after an fp16 round trip) and pick the one whose class accuracy is
    closest to ``WEAK_TARGET_ACCURACY``."""
    measured: dict[int, SampleMetrics] = {}
    for step, state in sorted(run.snapshots.items()):
        candidate = UNet2DModel.from_config(run.unet.config)
        candidate.load_state_dict(state)
        save_pipeline(candidate, make_scheduler(), scratch / f"snapshot-{step}")
        measured[step] = measure_samples(
            load_unet(scratch / f"snapshot-{step}"), evaluator, test_features, 1.0, settings
        )
        print(f"  snapshot {step}: class accuracy at scale 1 = {measured[step].accuracy:.3f}")
    weak_step = min(measured, key=lambda step: (abs(measured[step].accuracy - WEAK_TARGET_ACCURACY), step))
    return weak_step, measured


class PhaseTimer:
    """Wall-clock and process CPU seconds per phase (CPU time shows the work when the machine is shared)."""

    def __init__(self) -> None:
        self.seconds: dict[str, dict[str, float]] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, phase: str) -> None:
        """Record the time since the previous lap under ``phase``."""
        wall, cpu = time.perf_counter(), time.process_time()
        self.seconds[phase] = {"wall": wall - self._wall, "cpu": cpu - self._cpu}
        self._wall, self._cpu = wall, cpu

    def total(self) -> dict[str, float]:
        """Sum over the recorded phases."""
        return {kind: sum(phase[kind] for phase in self.seconds.values()) for kind in ("wall", "cpu")}


def real_data_reference(evaluator: DigitEvaluator, data: DigitsSplit, subsets: int = 10) -> dict[str, float]:
    """Accuracies on real digits and the FD-digits references.

    ``fd_test_vs_train`` is the FD of the held-out digits against all training digits (the bar for the samples);
    ``fd_subsets_*`` summarise the FD of ``subsets`` random 1,000-image training subsets against the held-out
    digits, the like-for-like spread of a perfect 1,000-sample generator.
    """
    with torch.no_grad():
        test_features, train_features = evaluator.features(data.test_images), evaluator.features(data.train_images)
    generator = torch.Generator().manual_seed(0)
    subset_fds = [
        frechet_distance(train_features[torch.randperm(len(train_features), generator=generator)[:1000]], test_features)
        for _ in range(subsets)
    ]
    return {
        "evaluator_test_accuracy": accuracy(evaluator, data.test_images, data.test_labels),
        "evaluator_train_accuracy": accuracy(evaluator, data.train_images, data.train_labels),
        "fd_test_vs_train": frechet_distance(test_features, train_features),
        "fd_subsets_mean": sum(subset_fds) / subsets,
        "fd_subsets_max": max(subset_fds),
    }


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: train, save, measure and write the model card."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: samples/weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="diffusion training steps (default 3000)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test run")
    args = parser.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    if args.steps is not None:
        settings.diffusion_steps = args.steps
    default_out = Path(tempfile.mkdtemp(prefix="digits-quick-")) if args.quick else WEIGHTS_DIR
    out = args.out or default_out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(NUM_THREADS)
    timer = PhaseTimer()
    data = load_digits_split()

    torch.manual_seed(args.seed + 1)
    classifier = DigitClassifier()
    train_classifier(
        classifier, data.train_images, data.train_labels, steps=settings.classifier_steps, seed=args.seed + 1
    )
    save_network(classifier, out / "classifier")
    timer.lap("classifier")
    torch.manual_seed(args.seed + 2)
    evaluator = DigitEvaluator()
    train_classifier(
        evaluator, data.train_images, data.train_labels, steps=settings.evaluator_steps, seed=args.seed + 2
    )
    save_network(evaluator, out / "evaluator")
    timer.lap("evaluator")
    classifier, evaluator = load_classifier(out / "classifier"), load_evaluator(out / "evaluator")
    report: dict[str, Any] = {
        "seed": args.seed,
        "classifier_test_accuracy": accuracy(classifier, data.test_images, data.test_labels),
        **real_data_reference(evaluator, data),
    }
    print(json.dumps(report, indent=2))

    candidates = tuple(step for step in settings.weak_candidates if step < settings.diffusion_steps)
    run = train_diffusion(
        data.train_images,
        data.train_labels,
        steps=settings.diffusion_steps,
        seed=args.seed,
        settings=settings,
        snapshot_steps=candidates,
    )
    save_pipeline(run.unet, make_scheduler(), out / "digits")
    timer.lap("diffusion")

    unet = load_unet(out / "digits")
    with torch.no_grad():
        test_features = evaluator.features(data.test_images)
    scales = (1.0, settings.oversaturated_scale)
    strong = {scale: measure_samples(unet, evaluator, test_features, scale, settings) for scale in scales}
    with tempfile.TemporaryDirectory() as scratch:
        weak_step, weak = choose_weak(run, evaluator, test_features, settings, Path(scratch))
    weak_unet = UNet2DModel.from_config(run.unet.config)
    weak_unet.load_state_dict(run.snapshots[weak_step])
    save_pipeline(weak_unet, make_scheduler(), out / "digits-weak")
    timer.lap("sampling_metrics")

    report.update(
        strong={f"{scale:g}": vars(metrics) for scale, metrics in strong.items()},
        weak_step=weak_step,
        weak_candidates={step: metrics.accuracy for step, metrics in weak.items()},
        weak=vars(weak[weak_step]),
        seconds={**timer.seconds, "total": timer.total()},
        parameters=sum(p.numel() for p in unet.parameters()),
    )
    print(json.dumps(report, indent=2))
    (out / "MODEL_CARD.md").write_text(model_card(report, settings, data))
    print(f"wrote {out}")


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = [header, tuple("---" for _ in header), *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def model_card(report: dict[str, Any], settings: Settings, data: DigitsSplit) -> str:
    """The markdown model card for the ``report`` built by :func:`main`."""
    w8 = f"{settings.oversaturated_scale:g}"
    s1, s8, weak = report["strong"]["1"], report["strong"][w8], report["weak"]
    ref = report["fd_test_vs_train"]
    unet = settings.unet_config
    contents = _table(
        ("folder", "what"),
        [
            (
                "`digits/`",
                (
                    f"diffusion pipeline (`unet/`, `scheduler/`, `model_index.json`), EMA after "
                    f"{settings.diffusion_steps} steps"
                ),
            ),
            ("`digits-weak/`", f"the same run's EMA snapshot after {report['weak_step']} steps: deliberately weaker"),
            ("`classifier/`", "`DigitClassifier`, the guidance classifier (GFCG)"),
            ("`evaluator/`", "`DigitEvaluator`, the evaluation network (class accuracy, FD-digits features)"),
        ],
    )
    classifiers = _table(
        ("network", "architecture", "steps", "seed", "held-out accuracy"),
        [
            (
                "`DigitClassifier`",
                "conv 32, conv 64, avg-pool, conv 64 (SiLU), global average pool, linear",
                settings.classifier_steps,
                report["seed"] + 1,
                f"{report['classifier_test_accuracy']:.2%}",
            ),
            (
                "`DigitEvaluator`",
                (
                    "conv 48, conv 48, max-pool, conv 96, conv 128, max-pool (ReLU), global average "
                    "pool (128-d features), dropout 0.2, linear"
                ),
                settings.evaluator_steps,
                report["seed"] + 2,
                f"{report['evaluator_test_accuracy']:.2%}",
            ),
        ],
    )
    quality = _table(
        ("metric", "value"),
        [
            ("evaluator accuracy, held-out real digits", f"{report['evaluator_test_accuracy']:.2%}"),
            ("evaluator accuracy, training digits", f"{report['evaluator_train_accuracy']:.2%}"),
            ("class accuracy, `digits` samples, w = 1", f"{s1['accuracy']:.2%}"),
            ("class accuracy, `digits-weak` samples, w = 1", f"{weak['accuracy']:.2%}"),
            (f"class accuracy, `digits` samples, w = {w8}", f"{s8['accuracy']:.2%}"),
            ("FD-digits, held-out vs all training digits (reference)", f"{ref:.3f}"),
            (
                "FD-digits, 1,000-image training subsets vs held-out (10 subsets)",
                (
                    f"mean {report['fd_subsets_mean']:.3f} ({report['fd_subsets_mean'] / ref:.2f}x), "
                    f"max {report['fd_subsets_max']:.3f} ({report['fd_subsets_max'] / ref:.2f}x)"
                ),
            ),
            ("FD-digits, `digits` samples (w = 1) vs held-out", f"{s1['fd_test']:.3f} ({s1['fd_test'] / ref:.2f}x)"),
            (
                "FD-digits, `digits-weak` samples (w = 1) vs held-out",
                f"{weak['fd_test']:.3f} ({weak['fd_test'] / ref:.2f}x)",
            ),
            (
                f"FD-digits, `digits` samples (w = {w8}) vs held-out",
                f"{s8['fd_test']:.3f} ({s8['fd_test'] / ref:.2f}x)",
            ),
            ("pixels outside [-1, 1], w = 1", f"{s1['outside']:.2%}"),
            (
                f"pixels outside [-1, 1], w = {w8}",
                f"{s8['outside']:.2%} ({s8['outside'] / max(s1['outside'], 1e-12):.1f}x)",
            ),
            (f"pixels more than {SATURATION_MARGIN} outside [-1, 1], w = 1", f"{s1['outside_margin']:.2%}"),
            (
                f"pixels more than {SATURATION_MARGIN} outside [-1, 1], w = {w8}",
                f"{s8['outside_margin']:.2%} ({s8['outside_margin'] / max(s1['outside_margin'], 1e-12):.0f}x)",
            ),
        ],
    )
    candidates = ", ".join(f"step {step}: {acc:.2%}" for step, acc in report["weak_candidates"].items())
    seconds = report["seconds"]
    timing = _table(
        ("phase", "wall-clock s", "CPU s"),
        [(phase, f"{t['wall']:.0f}", f"{t['cpu']:.0f}") for phase, t in seconds.items()],
    )
    return f"""# Embedded default model: 8x8 digits

Trained by `python -m scripts.train_digits --seed {report["seed"]}` (diffusers {diffusers.__version__}, torch
{torch.__version__}, {NUM_THREADS} CPU threads). Every number below was measured by that run on the saved weights.

## Data

scikit-learn's bundled `load_digits` (1,797 8x8 grey-level handwritten digits, 10 classes, no download). Pixels
in [0, 16] are mapped to [-1, 1] by `x / 8 - 1`. Fixed split (`samples/digits/data.py`):
`train_test_split(test_size={TEST_FRACTION}, stratify=labels, random_state={SPLIT_SEED})` gives
{len(data.train_labels)} training and {len(data.test_labels)} held-out images. All networks saw the training split
only.

## Contents

{contents}

The UNets are stored in float16 (small files) and load as float32; the metrics were measured after that round trip.

## Diffusion model

- `UNet2DModel`: sample size 8, 1 channel, `block_out_channels={tuple(unet["block_out_channels"])}`,
  `layers_per_block={unet["layers_per_block"]}`, down blocks `{", ".join(unet["down_block_types"])}`,
  up blocks `{", ".join(unet["up_block_types"])}`, `norm_num_groups={unet["norm_num_groups"]}`,
  `num_class_embeds={unet["num_class_embeds"]}`; {report["parameters"]:,} parameters.
- Class labels 0-9; label **{NULL_LABEL} is the null label** (the unconditional branch of classifier-free
  guidance). During training each label is replaced by {NULL_LABEL} with probability {settings.p_uncond}.
- Epsilon prediction; `DDPMScheduler` with 1000 steps, `beta_schedule="squaredcos_cap_v2"`, `clip_sample=False`
  (clipping x0 would hide the overshoot that guidance methods such as APG correct).
- {settings.diffusion_steps} steps, batch {settings.batch_size}, AdamW lr {settings.learning_rate:g} with
  {settings.warmup_steps} warm-up steps and cosine decay, EMA decay {settings.ema_decay} (warm-up
  `min(decay, (1 + step) / (10 + step))`), no augmentation, seed {report["seed"]}.
- `digits-weak` is the EMA snapshot whose class accuracy at w = 1 is closest to {WEAK_TARGET_ACCURACY:.0%}
  among the candidates ({candidates}).

## Classifiers

Both trained on the training split with cross-entropy, random 1-pixel shifts, AdamW (lr 2e-3, weight decay 1e-4,
cosine decay), batch 128.

{classifiers}

## Quality

Sampling: DDIM ({settings.inference_steps} steps, eta 0, built `from_config` of the saved scheduler), plain CFG
`eps = eps_u + w (eps_c - eps_u)` with the null label for `eps_u`, {settings.samples_per_class * NUM_CLASSES}
samples ({settings.samples_per_class} per class), noise seed 0. Class accuracy and FD-digits use the samples clamped
to [-1, 1] (as they are shown); the saturation rows use the raw samples. FD-digits is the Frechet distance between
`DigitEvaluator.features` of two image sets. About half of all real pixels are exactly -1 (background), so even a
perfect unclipped sampler puts a share of them a hair outside [-1, 1]; the margin rows count real overshoot.

{quality}

## Training time

{timing}

Wall-clock time depends on the machine's load; the CPU time is the work done.
"""


if __name__ == "__main__":
    main()
