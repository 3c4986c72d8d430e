"""Shared test configuration.

Every test runs in float64 with a fixed seed and one intra-op thread (on 2 cores, two threads make
small matmuls many times slower). Tests that read ``../shared`` skip when it is absent.
"""

import os
import signal
from pathlib import Path

import pyro
import pytest
import torch

torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _float64_and_seed():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def ctrl_c():
    """A function that sends this process Ctrl-C (SIGINT), with Python's default handler (which
    raises KeyboardInterrupt) installed for the test: a process started in the background, as CI
    may start pytest, ignores SIGINT otherwise."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield lambda: os.kill(os.getpid(), signal.SIGINT)
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def shared_dir() -> Path:
    """Path to the read-only ``../shared`` folder; skips the test when it is absent."""
    if not SHARED.is_dir() or os.environ.get("PYRO_EBM_NO_SHARED"):
        pytest.skip("../shared is not available")
    return SHARED


def perturb(module, scale: float = 0.1):
    """Add ``scale`` times fixed-seed Gaussian noise to every parameter of ``module`` (moves a
    flow started at the identity to a generic map for the exactness tests); returns it."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module
