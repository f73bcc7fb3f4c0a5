"""Fixtures shared by the captioner test files: one tiny MM-SeR checkpoint per session
(built here, random weights) and a batch of frames of mixed sizes."""

from __future__ import annotations

import numpy as np
import pytest

from captioner.random_weights import build_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-mmser"), refine=True, seed=0)


@pytest.fixture(scope="session")
def frames():
    """Six frames of different sizes and content (the processor resizes them)."""
    rng = np.random.default_rng(0)
    sizes = [(48, 40), (32, 32), (60, 90), (33, 47), (40, 40), (64, 48)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
