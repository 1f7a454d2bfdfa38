"""The two 8x8 digit classifiers of the embedded default, and their safetensors loaders.

* :class:`DigitClassifier` is the *guidance* classifier (used by GFCG): a small three-layer CNN with
  global average pooling.
* :class:`DigitEvaluator` is the *evaluation* network, a different architecture trained from a different
  seed, so that class accuracy is never measured with the classifier a method guides with. Its
  penultimate activations (:meth:`DigitEvaluator.features`) are the features of the "FD-digits" Frechet
  distance.

Both map images ``[B, 1, 8, 8]`` in [-1, 1] to logits ``[B, 10]``. A saved network is a folder with a
``config.json`` (class name and constructor arguments) and a ``model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
EMBEDDED_MODEL = WEIGHTS_DIR / "digits"  # the pipeline both CLIs load by default
WEAK_MODEL = WEIGHTS_DIR / "digits-weak"  # its less-trained checkpoint: Autoguidance's default guiding model

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def is_embedded(model: str | Path | None) -> bool:
    """Whether ``model`` (``None``: the default) is one of the digits checkpoints shipped in ``samples/weights``."""
    return model is None or Path(model).expanduser().resolve().parent == WEIGHTS_DIR


class DigitClassifier(nn.Module):
    """Guidance classifier: conv(32) - conv(64) - pool - conv(64) - global average pool - linear."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.config = {"width": width, "num_classes": num_classes}
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, 1, 8, 8]`` in [-1, 1]."""
        return self.head(self.body(x))


class DigitEvaluator(nn.Module):
    """Evaluation network: conv-conv-max-pool, conv-conv-max-pool (8x8 -> 4x4 -> 2x2), global average pool, linear.

    The features are the global-average-pooled activations of the last conv layer (``feature_dim`` channels), as
    Inception's pool features are for FID. Pooled conv features were chosen over a dense penultimate layer because
    their Frechet distance between two sets of real digits varies less from subset to subset (fewer dead units, less
    class-collapsed), so FD-digits at 1,000 samples is a steadier measurement.
    """

    def __init__(self, width: int = 48, feature_dim: int = 128, num_classes: int = 10, dropout: float = 0.2) -> None:
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes, "dropout": dropout}
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, feature_dim, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, feature_dim]`` (the input of the linear head) used for FD-digits."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, 1, 8, 8]`` in [-1, 1]."""
        return self.head(self.body(x))


_NETWORKS: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in (DigitClassifier, DigitEvaluator)}


def save_network(net: nn.Module, path: str | Path) -> None:
    """Write a :class:`DigitClassifier` or :class:`DigitEvaluator` as ``config.json`` + ``model.safetensors``."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": type(net).__name__, **net.config}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    state = {name: tensor.detach().contiguous() for name, tensor in net.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME))


def load_network(path: str | Path) -> nn.Module:
    """Build the network described by ``path/config.json``, load its weights, freeze it and put it in eval mode."""
    folder = Path(path)
    config = json.loads((folder / CONFIG_NAME).read_text())
    class_name = config.pop("_class_name")
    if class_name not in _NETWORKS:
        raise ValueError(f"{folder / CONFIG_NAME}: unknown network class {class_name!r}; known: {sorted(_NETWORKS)}")
    net = _NETWORKS[class_name](**config)
    net.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    net.eval().requires_grad_(False)
    return net


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The guidance classifier from ``path`` (default: the committed ``samples/weights/classifier``)."""
    net = load_network(WEIGHTS_DIR / "classifier" if path is None else path)
    if not isinstance(net, DigitClassifier):
        raise TypeError(f"expected a DigitClassifier, found {type(net).__name__}")
    return net


def load_evaluator(path: str | Path | None = None) -> DigitEvaluator:
    """The evaluation network from ``path`` (default: the committed ``samples/weights/evaluator``)."""
    net = load_network(WEIGHTS_DIR / "evaluator" if path is None else path)
    if not isinstance(net, DigitEvaluator):
        raise TypeError(f"expected a DigitEvaluator, found {type(net).__name__}")
    return net
