"""Feature extractors for Frechet distance and precision/recall, each with an id that every result records.

* ``fd-digits/<sha256[:12] of model.safetensors>``: the embedded evaluation network
  (:class:`samples.digits.nets.DigitEvaluator`), its ``features()`` (128-d, the input of its linear head:
  "FD-digits"); 1x8x8 images in [-1, 1].
* ``inception-v3/<sha256[:12] of the .pt file>``: the TorchScript Inception-v3 ``inception-2015-12-05.pt`` of
  StyleGAN2-ADA / EDM / clean-fid, its 2048-d pool features (FID); RGB in [0, 255] (grayscale repeated to 3 channels),
  any size.

The Inception file is only ever read from a local path: ``--inception-weights`` or the environment variable
``GUIDANCE_INCEPTION_WEIGHTS``; nothing is downloaded. It is called the way StyleGAN2-ADA and EDM call it,
``features = model(images, return_features=True)``, with float images in [0, 255] at their own resolution; the module
resizes them to 299x299 itself. Different files (or a different evaluation network) give different ids, and results
with different ids are never compared.

All extractors take the common image currency of the evaluation tool: ``uint8`` tensors ``[B, C, H, W]``
(:func:`to_uint8`), the same quantisation a saved PNG has, applied alike to generated and reference images.

The reference (real-image) statistics carry the id of the extractor that made them (:class:`Reference`); a
precomputed ``.npz`` made by another extractor is refused.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from samples.digits.nets import WEIGHTS_DIR, WEIGHTS_NAME, load_evaluator
from samples.metrics.frechet import feature_statistics

INCEPTION_ENV = "GUIDANCE_INCEPTION_WEIGHTS"
DIGITS_SHAPE = (1, 8, 8)
EXTRACTOR_KINDS = ("auto", "inception", "fd-digits")


def file_digest(path: str | Path, length: int = 12) -> str:
    """The first ``length`` hex digits of the SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] (clamped first) -> ``uint8`` in [0, 255], rounded to nearest."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` in [0, 255] -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1


class FeatureExtractor:
    """Maps ``uint8`` images ``[B, C, H, W]`` to features ``[B, F]``; ``id`` names the network and its weights."""

    id: str

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def extract(self, images: torch.Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Features ``[N, F]`` (float64) of ``uint8`` images ``[N, C, H, W]``, in batches."""
        images = torch.as_tensor(images)
        parts = [self.features(images[i : i + batch_size]).double().cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(parts).numpy()


class DigitsExtractor(FeatureExtractor):
    """FD-digits: features of the embedded evaluation network; its logits give the class accuracy.

    Args:
        path: a saved :class:`~samples.digits.nets.DigitEvaluator` folder (default: ``samples/weights/evaluator``).
        device: where the network runs.
    """

    prefix = "fd-digits"

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        self.path = Path(WEIGHTS_DIR / "evaluator" if path is None else path)
        weights = self.path / WEIGHTS_NAME
        if not weights.is_file():
            raise ValueError(f"evaluation network not found: {weights} does not exist")
        self.id = f"{self.prefix}/{file_digest(weights)}"
        self.device = torch.device(device)
        self._net: torch.nn.Module | None = None

    @property
    def net(self) -> torch.nn.Module:
        if self._net is None:
            self._net = load_evaluator(self.path).to(self.device)
        return self._net

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[1:]) != DIGITS_SHAPE:
            raise ValueError(f"{self.id} reads 1x8x8 images, got {tuple(images.shape[1:])}")
        return from_uint8(images).to(self.device)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(self._inputs(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor | np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Predicted class ids ``[N]`` of ``uint8`` images ``[N, 1, 8, 8]``."""
        images = torch.as_tensor(images)
        batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
        return torch.cat([self.net(self._inputs(batch)).argmax(1).cpu() for batch in batches]).numpy()


class InceptionExtractor(FeatureExtractor):
    """FID features: the TorchScript Inception-v3 ``inception-2015-12-05.pt`` loaded with ``torch.jit.load``.

    ``model(x, return_features=True)`` with ``x`` float ``[B, 3, H, W]`` in [0, 255] gives the 2048-d pool features
    (the module resizes to 299x299 itself). Grayscale images are repeated to three channels.
    """

    prefix = "inception-v3"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ValueError(f"Inception weights not found: {self.path} is not a file (nothing is downloaded)")
        self.id = f"{self.prefix}/{file_digest(self.path)}"
        self.device = torch.device(device)
        self._model: torch.jit.ScriptModule | None = None

    @property
    def model(self) -> torch.jit.ScriptModule:
        if self._model is None:
            self._model = torch.jit.load(str(self.path), map_location=self.device).eval()
        return self._model

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        if images.shape[1] != 3:
            raise ValueError(f"{self.id} reads RGB or grayscale images, got {images.shape[1]} channels")
        return self.model(images.to(self.device, torch.float32), return_features=True)


def inception_path(option: str | None) -> str | None:
    """The Inception weights file: the option if given, else ``$GUIDANCE_INCEPTION_WEIGHTS``, else ``None``."""
    return option or os.environ.get(INCEPTION_ENV) or None


def build_extractor(
    kind: str,
    image_shape: tuple[int, int, int],
    inception_weights: str | None = None,
    evaluator: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> FeatureExtractor:
    """The extractor for ``kind`` (``"auto"``, ``"inception"``, ``"fd-digits"``) and images of ``image_shape``.

    ``"auto"``: Inception when a weights file is given (option or environment variable), else FD-digits for 1x8x8
    images; anything else is a ``ValueError`` that says what to pass.
    """
    if kind not in EXTRACTOR_KINDS:
        raise ValueError(f"extractor must be one of {', '.join(EXTRACTOR_KINDS)}; got {kind!r}")
    weights = inception_path(inception_weights)
    if kind == "inception" or (kind == "auto" and weights):
        if not weights:
            raise ValueError(f"the Inception extractor needs --inception-weights PATH or ${INCEPTION_ENV}")
        return InceptionExtractor(weights, device)
    if tuple(image_shape) != DIGITS_SHAPE:
        raise ValueError(
            f"no feature extractor for {'x'.join(map(str, image_shape))} images: give --inception-weights PATH "
            f"(inception-2015-12-05.pt) or set ${INCEPTION_ENV}; FD-digits only reads 1x8x8 images"
        )
    return DigitsExtractor(evaluator, device)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Reference:
    """Feature statistics of the real images: mean, covariance, the features themselves (for precision/recall; may be
    ``None`` for a precomputed ``.npz`` that holds only the statistics), the extractor id and where they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    extractor: str
    source: str

    @classmethod
    def from_features(cls, features: np.ndarray, extractor: str, source: str) -> Reference:
        mu, sigma = feature_statistics(features)
        return cls(mu, sigma, features, extractor, source)

    @property
    def num_images(self) -> int | None:
        return None if self.features is None else len(self.features)

    def save(self, path: str | Path) -> None:
        """Write ``mu``, ``sigma``, ``features``, ``extractor`` and ``source`` to a ``.npz`` file."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "extractor": np.array(self.extractor),
                  "source": np.array(self.source)}
        if self.features is not None:
            arrays["features"] = self.features.astype(np.float32)
        np.savez(path, **arrays)


def read_reference_npz(path: str | Path, extractor: str) -> Reference:
    """A precomputed reference (``mu``, ``sigma``, ``extractor``, optional ``features``) made by ``extractor``.

    ``ValueError`` if the file lacks those keys or was made by another extractor: statistics of different feature
    networks are never compared.
    """
    with np.load(path, allow_pickle=False) as data:
        missing = [key for key in ("mu", "sigma", "extractor") if key not in data.files]
        if missing:
            raise ValueError(
                f"reference {path} lacks {', '.join(missing)}: it must hold mu, sigma and the extractor id "
                "(write one with --save-reference)"
            )
        found = str(data["extractor"])
        if found != extractor:
            raise ValueError(f"reference {path} was made with extractor {found}, this run uses {extractor}")
        features = data["features"].astype(np.float64) if "features" in data.files else None
        return Reference(data["mu"], data["sigma"], features, found, str(path))


def reference_extractor_id(path: str | Path) -> str:
    """The extractor id stored in a reference ``.npz`` (checked before any generation starts)."""
    with np.load(path, allow_pickle=False) as data:
        if "extractor" not in data.files:
            raise ValueError(f"reference {path} has no extractor id (write one with --save-reference)")
        return str(data["extractor"])


def image_files(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted; ``ValueError`` if there are fewer than two."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"reference folder {folder} holds {len(files)} images ({'/'.join(IMAGE_SUFFIXES)}); need >= 2")
    return files


def load_images(files: list[Path], shape: tuple[int, int, int]) -> torch.Tensor:
    """``uint8`` images ``[N, C, H, W]`` of ``shape``: grayscale or RGB, resized (bicubic) to ``H x W`` if needed."""
    channels, height, width = shape
    arrays = []
    for file in files:
        with Image.open(file) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.BICUBIC)
            arrays.append(np.asarray(image, dtype=np.uint8).reshape(height, width, channels))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def folder_reference(
    folder: str | Path, extractor: FeatureExtractor, shape: tuple[int, int, int], batch_size: int = 256
) -> Reference:
    """Reference statistics of the images in ``folder``, read in batches at the generated images' ``shape``."""
    files = image_files(folder)
    parts = [extractor.extract(load_images(files[i : i + batch_size], shape)) for i in range(0, len(files), batch_size)]
    return Reference.from_features(np.concatenate(parts), extractor.id, f"{folder} ({len(files)} images)")
