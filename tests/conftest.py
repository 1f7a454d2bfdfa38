"""Test settings: 1 CPU thread (tiny models run faster without intra-op threading), deterministic, quiet."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """Components of a tiny random Stable Diffusion 1.x pipeline (``tests/tiny.py``), one set per test module."""
    from tiny import tiny_sd_components

    return tiny_sd_components(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """Components of a tiny random SDXL pipeline, one set per test module."""
    from tiny import tiny_sdxl_components

    return tiny_sdxl_components(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """Components of a tiny random SD3 pipeline, one set per test module."""
    from tiny import tiny_sd3_components

    return tiny_sd3_components(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
