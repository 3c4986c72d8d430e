"""AdaptiveFlowMCMC, through ``pyro.infer.mcmc.MCMC``, recovers the weights of modes that no local
chain would visit: ``imbalanced_pair(d)`` (0.2 N(-4·1, I) + 0.8 N(4·1, I)) for d = 2, 8, 16.

Tolerance from Monte Carlo error: ``|w - 0.8| < Z * mcse`` with ``mcse`` from the ESS of the mode
indicator (``pyro_ebm.metrics.mode_weights_mcse``); ``Z = 3.9`` (two-sided p = 1e-4 per test).
Seed validation: ``python tests/test_kernels_multimodal.py 10`` (results in the docstring below).
"""

from __future__ import annotations

import sys

import pyro
import pytest
import torch
from pyro.infer import MCMC

import pyro_ebm
from pyro_ebm.datasets import imbalanced_pair
from pyro_ebm.infer import AdaptiveFlowMCMC
from pyro_ebm.metrics import mode_weights_mcse

Z = 3.9


def run(dim: int, seed: int, num_samples: int = 4000):
    pyro.set_rng_seed(seed)
    target = imbalanced_pair(dim)
    kernel = AdaptiveFlowMCMC(
        potential_fn=pyro_ebm.potential_fn(target.potential),
        num_particles=64,
        production_local_steps=0,
    )
    mcmc = MCMC(
        kernel,
        num_samples=num_samples,
        warmup_steps=400,
        initial_params={"x": torch.zeros(dim)},
        disable_progbar=True,
    )
    mcmc.run()
    w, se = mode_weights_mcse(mcmc.get_samples(group_by_chain=True)["x"], target)
    return float(w[1]), float(se[1])


@pytest.mark.parametrize("dim", [2, 8, 16])
def test_adaptive_kernel_recovers_imbalanced_weights(dim):
    """Seeds 0-9 for each of d = 2, 8, 16: 10/10 pass (max |z| 2.16, 2.27, 2.21). Injected bug
    caught: i-SIR weights without the -log q term (seeds 0-2, every d: the chain never leaves the
    heavy mode, weight 1.0, or |z| > 400)."""
    w, se = run(dim, seed=0)
    assert se == se, "a mode was never entered or never left"
    assert abs(w - 0.8) < Z * se, f"heavy-mode weight {w:.4f} ± {se:.4f}, truth 0.8"


if __name__ == "__main__":  # seed validation
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    for dim in (2, 8, 16):
        zs = [abs(w - 0.8) / se for w, se in (run(dim, s) for s in range(n))]
        print(dim, f"fails {sum(z >= Z for z in zs)}/{n}", "max z", round(max(zs), 2), flush=True)
