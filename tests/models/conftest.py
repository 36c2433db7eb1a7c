"""Shared fixtures: the shipped default family and held-out camera features (loaded once)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from aiflow_stream.models.adapters import Captioner, load_captioner
from aiflow_stream.models.evaluate import camera_features
from aiflow_stream.scenes import Scene, heldout_scenes


@pytest.fixture(scope="session")
def target() -> Captioner:
    return load_captioner("default:target")


@pytest.fixture(scope="session")
def draft() -> Captioner:
    return load_captioner("default:draft")


@pytest.fixture(scope="session")
def heldout() -> list[Scene]:
    return heldout_scenes(100)


@pytest.fixture(scope="session")
def heldout_features(target: Captioner, heldout: list[Scene]) -> np.ndarray:
    """Features of 100 held-out scenes rendered at camera resolution with camera noise."""
    return camera_features(target, heldout)


@pytest.fixture(scope="session")
def target_greedy(target: Captioner, heldout_features: np.ndarray) -> list[list[int]]:
    return target.decode_ids(heldout_features)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Small models on a small machine: one intra-op thread is fastest and never oversubscribes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
