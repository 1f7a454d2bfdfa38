"""The embedded default: reproducible training and the committed weights."""

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel

from samples.digits.data import load_digits_split
from samples.digits.nets import DigitClassifier, DigitEvaluator, load_classifier, load_evaluator
from samples.metrics.frechet import frechet_distance
from scripts.train_digits import NULL_LABEL, Settings, train_diffusion

WEIGHTS = Path(__file__).resolve().parents[1] / "samples" / "weights"


def test_train_diffusion_is_deterministic():
    torch.set_num_threads(2)
    data = load_digits_split()
    images, labels = data.train_images[:64], data.train_labels[:64]
    settings = Settings.quick()
    runs = [
        train_diffusion(images, labels, steps=4, seed=3, settings=settings, snapshot_steps=(2,), progress=False)
        for _ in range(2)
    ]
    first, second = (run.unet.state_dict() for run in runs)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert all(torch.equal(runs[0].snapshots[2][name], runs[1].snapshots[2][name]) for name in first)
    other = train_diffusion(images, labels, steps=4, seed=4, settings=settings, progress=False).unet.state_dict()
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_committed_weights_load_and_evaluator_is_accurate():
    torch.set_num_threads(2)
    classifier, evaluator = load_classifier(), load_evaluator()
    assert isinstance(classifier, DigitClassifier) and isinstance(evaluator, DigitEvaluator)
    assert not evaluator.training and not any(p.requires_grad for p in evaluator.parameters())
    data = load_digits_split()
    with torch.no_grad():
        assert evaluator(data.test_images).shape == (len(data.test_labels), 10)
        assert classifier(data.test_images).shape == (len(data.test_labels), 10)
        accuracy = (evaluator(data.test_images).argmax(1) == data.test_labels).float().mean().item()
        assert evaluator.features(data.test_images).shape[0] == len(data.test_labels)
    assert accuracy >= 0.98
    for name in ("digits", "digits-weak"):
        unet = UNet2DModel.from_pretrained(WEIGHTS / name / "unet")
        assert unet.dtype == torch.float32 and unet.config.num_class_embeds == NULL_LABEL + 1
        assert json.loads((WEIGHTS / name / "model_index.json").read_text())["null_class_label"] == NULL_LABEL


def test_frechet_distance_of_shifted_gaussians():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(400, 8))
    assert frechet_distance(feats, feats) < 1e-8
    assert np.isclose(frechet_distance(feats, feats + 2.0), 8 * 4.0)
