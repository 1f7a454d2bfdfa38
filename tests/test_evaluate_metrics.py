"""Metrics of the evaluation tool against closed forms and hand-computed answers; shard files; reference files."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg
from scipy.stats import special_ortho_group

from samples.evaluate import shards
from samples.metrics.features import Reference, read_reference_npz
from samples.metrics.frechet import frechet_distance_from_statistics
from samples.metrics.precision_recall import knn_radii, precision_recall
from samples.metrics.saturation import clipped_fraction, hsv_saturation, saturation

# ------------------------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_diagonal_closed_form() -> None:
    """Diagonal covariances: FD = ||mu_a - mu_b||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance_from_statistics(mu_a, np.diag(a), mu_b, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_shared_eigenbasis_and_general_case() -> None:
    """Rotating both Gaussians by one rotation leaves FD unchanged (closed form above); a general pair matches the
    textbook formula with scipy's matrix square root."""
    rng = np.random.default_rng(1)
    rotation = special_ortho_group.rvs(5, random_state=2)
    a, b = rng.uniform(0.2, 2, 5), rng.uniform(0.2, 2, 5)
    mu_a, mu_b = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    sigma_a, sigma_b = rotation @ np.diag(a) @ rotation.T, rotation @ np.diag(b) @ rotation.T
    got = frechet_distance_from_statistics(rotation @ mu_a, sigma_a, rotation @ mu_b, sigma_b)
    assert got == pytest.approx(expected, rel=1e-9)

    x, y = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    sigma_a, sigma_b = x @ x.T + 0.1 * np.eye(5), y @ y.T + 0.1 * np.eye(5)
    textbook = np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a + sigma_b - 2 * np.real(linalg.sqrtm(sigma_a @ sigma_b)))
    assert frechet_distance_from_statistics(mu_a, sigma_a, mu_b, sigma_b) == pytest.approx(textbook, rel=1e-8)


# ------------------------------------------------------------------------------------------- precision/recall

LINE = np.stack([np.arange(10.0), np.zeros(10)], axis=1)  # real points 0..9 on a line


def test_knn_radii_on_a_line() -> None:
    """k = 3: the end points reach 3 neighbours at distance 3, the others at distance 2."""
    radii = knn_radii(torch.as_tensor(LINE), k=3)
    assert radii.tolist() == [3, 2, 2, 2, 2, 2, 2, 2, 2, 3]


def test_precision_recall_constructed_sets() -> None:
    # fake points: 4.5 (inside), -2.9 (0's ball has radius 3: inside), 12.5 (9's ball ends at 12: outside), 100 (out)
    fake = np.array([[4.5, 0], [-2.9, 0], [12.5, 0], [100, 0]])
    precision, _ = precision_recall(LINE, fake, k=3)
    assert precision == 0.5
    # a fake cluster 0, 0.5, ..., 2 has radii 1.5, 1, 1, 1, 1.5: its manifold is [-1.5, 3.5] -> real 0..3 covered
    cluster = np.stack([np.arange(5) * 0.5, np.zeros(5)], axis=1)
    precision, recall = precision_recall(LINE, cluster, k=3)
    assert (precision, recall) == (1.0, 0.4)


def _naive_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(points: np.ndarray) -> np.ndarray:
        return np.array([np.sort(np.linalg.norm(points - p, axis=1))[k] for p in points])

    def coverage(points: np.ndarray, manifold: np.ndarray) -> float:
        r = radii(manifold)
        return float(np.mean([np.any(np.linalg.norm(manifold - p, axis=1) <= r) for p in points]))

    return coverage(fake, real), coverage(real, fake)


def test_precision_recall_matches_a_naive_implementation() -> None:
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(60, 4)), rng.normal(0.7, 1.3, size=(45, 4))
    expected = _naive_precision_recall(real, fake, 3)
    assert precision_recall(real, fake, k=3) == pytest.approx(expected, abs=1e-12)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1


def test_precision_recall_bad_input() -> None:
    with pytest.raises(ValueError, match="more than 3 points"):
        precision_recall(LINE[:3], LINE, k=3)
    with pytest.raises(ValueError, match="width"):
        precision_recall(LINE, np.zeros((5, 3)))


# ------------------------------------------------------------------------------------------------- saturation


def test_hsv_saturation_constructed_images() -> None:
    red, gray, black, pale = (1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.0, 0.0, 0.0), (1.0, 0.5, 0.5)
    images = torch.tensor([[red] * 4, [gray] * 4, [black] * 4, [pale] * 4, [red, red, gray, gray]]).permute(0, 2, 1)
    images = images.reshape(5, 3, 2, 2)
    assert hsv_saturation(images).tolist() == [1.0, 0.0, 0.0, 0.5, 0.5]


def test_hsv_saturation_matches_colorsys_and_saturation_maps_from_minus_one_one() -> None:
    rng = np.random.default_rng(4)
    pixels = rng.uniform(-1.3, 1.3, size=(2, 3, 4, 4))
    clamped = np.clip((pixels + 1) / 2, 0, 1)
    expected = [np.mean([colorsys.rgb_to_hsv(*clamped[b, :, i, j])[1] for i in range(4) for j in range(4)])
                for b in range(2)]
    assert saturation(torch.as_tensor(pixels)).numpy() == pytest.approx(expected, abs=1e-12)


def test_grayscale_saturation_is_the_clipped_fraction() -> None:
    pixels = torch.tensor([-1.5, 0.0, 1.0, 1.0001, -1.0, 0.3, 2.0, -0.99]).reshape(2, 1, 2, 2)
    assert clipped_fraction(pixels).tolist() == [0.5, 0.25]  # exactly +-1 is not clipped
    assert clipped_fraction(pixels, margin=0.1).tolist() == [0.25, 0.25]  # 1.0001 is within the margin
    assert saturation(pixels).tolist() == [0.5, 0.25]
    with pytest.raises(ValueError, match="1- or 3-channel"):
        saturation(torch.zeros(1, 2, 4, 4))


# ----------------------------------------------------------------------------------------------------- shards


def test_plan_assign_cover_every_shard_once() -> None:
    plan = shards.plan("cell", 23, 5)
    assert [(s.start, s.count) for s in plan] == [(0, 5), (5, 5), (10, 5), (15, 5), (20, 3)]
    parts = [shards.assign(plan, rank, 3) for rank in range(3)]
    assert sorted(s.start for part in parts for s in part) == [0, 5, 10, 15, 20]


def test_write_read_cell_atomic_and_complete(tmp_path: Path) -> None:
    plan = shards.plan("cell", 7, 3)
    (tmp_path / "cell").mkdir()
    (tmp_path / "cell" / "shard-00000000-000003.abc.tmp").write_bytes(b"half a file")  # a crashed write: ignored
    for shard in plan[:2]:
        shards.write_shard(tmp_path, shard, {"x": np.arange(shard.count) + 10 * shard.start, "seconds": np.array(1.5)})
    assert shards.pending(tmp_path, plan) == plan[2:]
    with pytest.raises(shards.MissingShardsError, match="1 of 3 shards"):
        shards.read_cell(tmp_path, plan)
    shards.write_shard(tmp_path, plan[2], {"x": np.array([60]), "seconds": np.array(0.5)})
    samples, per_shard = shards.read_cell(tmp_path, plan)
    assert samples["indices"].tolist() == list(range(7))
    assert samples["x"].tolist() == [0, 1, 2, 30, 31, 32, 60]
    assert per_shard["seconds"].sum() == 3.5
    assert len(list((tmp_path / "cell").glob("*.tmp"))) == 1  # only the stray one: writes leave no temp files
    with pytest.raises(ValueError, match="rows"):
        shards.write_shard(tmp_path, plan[0], {"x": np.arange(2)})


# ------------------------------------------------------------------------------------------ reference stats


def test_reference_npz_round_trip_refuses_another_extractor(tmp_path: Path) -> None:
    features = np.random.default_rng(0).normal(size=(10, 4))
    Reference.from_features(features, "fd-digits/abc", "test").save(tmp_path / "ref.npz")
    loaded = read_reference_npz(tmp_path / "ref.npz", "fd-digits/abc")
    assert np.allclose(loaded.features, features, atol=1e-6) and loaded.mu.shape == (4,)
    with pytest.raises(ValueError, match="made with extractor fd-digits/abc"):
        read_reference_npz(tmp_path / "ref.npz", "inception-v3/def")
