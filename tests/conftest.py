"""Test setup: 8 fake CPU devices for sharding tests, set before JAX is imported anywhere."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA compilation cache for the session, inherited by the CLI subprocesses: the many
# runs of the same tiny trainer (folds, arms, restarts, bad-input cases) compile their steps once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="dnd_jax_test_xla_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests (run with -m slow)")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fft_thresholds():
    """The same FFT conv choices on every CPU (the per-CPU-kind table is tested on its own)."""
    from dnd_jax.models import hyperconv

    hyperconv.FFT_THRESHOLDS_OVERRIDE = (0.45, 24)
    yield
    hyperconv.FFT_THRESHOLDS_OVERRIDE = None
