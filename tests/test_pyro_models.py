r"""Every kernel on Pyro's own MCMC test models (:mod:`pyro_models`), at Pyro's run lengths.

For each kernel and each model of ``tests/infer/mcmc/test_nuts.py`` (pyro-ppl/pyro), one chain
runs Pyro's ``warmup_steps`` and ``num_samples`` and the draws must pass Pyro's assertions, with
Pyro's tolerances, against the posterior of the data drawn (exact, by quadrature or by
importance sampling: see :mod:`pyro_models`), on seeds 0, 1 and 2 (the seed draws the data
and then runs the chain). Kernels, all with their defaults:

- ``pyro_nuts``: Pyro's :class:`~pyro.infer.NUTS` through Pyro's ``MCMC``, the reference row;
- ``mala``, ``adaptive`` (:class:`~pyro_ebm.infer.AdaptiveFlowMCMC`), through
  :class:`pyro_ebm.infer.MCMC` with ``num_chains=1``;
- ``chees1`` and ``chees4``: :class:`~pyro_ebm.infer.ChEESHMC` with 1 chain (its trajectory
  length then stays at 1: only step size and mass matrix adapt) and with 4 chains (it adapts
  the trajectory length from the chains; 4 times Pyro's draws in all, as 4 chains of Pyro's
  length);
- ``flow_imh``, ``flow_isir``, ``flow_hmc``, ``flow_nuts``: with their defaults, each fits its
  own flow at setup (:func:`~pyro_ebm.samplers.fit_flow`), then runs Pyro's warmup and draws.

Discrete sites (the Gaussian mixture's assignments, the bernoulli latent model's ``y`` and
``z``, the HMM's states) are enumerated by every kernel, as by Pyro's NUTS: the fast
:func:`test_discrete_sites_are_enumerated` checks the kernels' potential against Pyro's. The
HMM of Pyro's ``test_gaussian_hmm`` is a smoke test (5 warmup steps, 5 draws, finite draws;
Pyro checks nothing either).

Pairs that fail now are ``xfail(strict=True)`` with the measured failure, so the file passes and
flags a fix. A pair that takes more than ~1.2 s a seed is ``slow`` on seed 0 (CI runs it) and
``matrix`` on seeds 1 and 2, as are the flow kernels' HMM smoke tests (2-3 min each): ``python
-m pytest -m matrix`` runs them (about 50 min on one core), so that CI stays within its time
(with the whole matrix in it the slow tier took 55 min on one core, and CI 66 min). The
outcome of every pair is in :data:`FAILURES` and :data:`FAST`; ``python
tests/test_pyro_models.py [kernel ...] [--models name ...] [--seeds 0 1 2]`` prints the
pass/fail matrix with times.
"""

from __future__ import annotations

import functools
import math
import sys
import time

import pyro
import pytest
import torch
from pyro.infer import MCMC as PyroMCMC
from pyro.infer import NUTS
from pyro.infer.mcmc.util import initialize_model
from pyro_models import MODELS, PyroModel

from pyro_ebm.infer import (
    MALA,
    MCMC,
    AdaptiveFlowMCMC,
    ChEESHMC,
    FlowHMC,
    FlowIMH,
    FlowISIR,
    FlowNUTS,
)

SEEDS = (0, 1, 2)

#: the kernel rows: name -> (kernel class, number of chains)
KERNELS = {
    "pyro_nuts": (NUTS, 1),
    "mala": (MALA, 1),
    "adaptive": (AdaptiveFlowMCMC, 1),
    "chees1": (ChEESHMC, 1),
    "chees4": (ChEESHMC, 4),
    "flow_imh": (FlowIMH, 1),
    "flow_isir": (FlowISIR, 1),
    "flow_hmc": (FlowHMC, 1),
    "flow_nuts": (FlowNUTS, 1),
}
FLOW_KERNELS = ("flow_imh", "flow_isir", "flow_hmc", "flow_nuts")

#: the models with posterior checks (the HMM is :func:`test_gaussian_hmm_smoke`)
CHECKED_MODELS = tuple(name for name in MODELS if name != "gaussian_hmm")

#: ``(kernel, model) -> {seed: (exception raised, measured failure)}``, from the matrix (run on
#: 2026-12-06 at 5012ad4, MALA's rows at 59f264d, AdaptiveFlowMCMC's after its dense
#: standardization and automatic production local steps; "worst" is the check with the largest
#: error relative to its tolerance, errors in Pyro's metric). The flow kernels fit their own
#: flow; MALA (diagonal mass, one chain) misses the strongly correlated Gaussian chains, as
#: it would on most seeds with the exact mass matrix (RESULTS, issue 20, section 17);
#: ``chees1`` (one chain: its trajectory length is not adapted) misses ``gaussian_chain9``'s
#: tight tolerances by Monte Carlo error (min bulk ESS ~500 of 1400 draws)
FAILURES: dict[tuple[str, str], dict[int, tuple[type[BaseException], str]]] = {
    ("chees1", "gaussian_chain9"): {
        0: (AssertionError, "8 of 18 checks fail; worst mean loc_5: 0.139 > 0.08"),
        1: (AssertionError, "2 of 18 checks fail; worst mean loc_2: 0.083 > 0.08"),
    },
    # measured on this project's sandbox on 2026-12-07 (a matrix pair, see EDGE): Pyro's own
    # NUTS and FlowNUTS miss seed 0 by Monte Carlo error, FlowHMC (batched since 646634f) passes
    # seeds 0-2
    ("pyro_nuts", "gaussian_chain9"): {
        0: (AssertionError, "2 of 18 checks fail; worst mean loc_5: 0.083 > 0.08"),
    },
    ("flow_nuts", "gaussian_chain9"): {
        0: (AssertionError, "1 of 18 checks fail; worst sd loc_6: 0.089 > 0.08"),
    },
    ("mala", "gaussian_chain2_obs10k"): {
        0: (AssertionError, "1 of 4 checks fail; worst mean loc_1: 0.051 > 0.05"),
        2: (AssertionError, "1 of 4 checks fail; worst mean loc_1: 0.054 > 0.05"),
    },
    ("mala", "gaussian_chain3"): {
        0: (AssertionError, "5 of 6 checks fail; worst mean loc_2: 0.232 > 0.09"),
        1: (AssertionError, "4 of 6 checks fail; worst mean loc_2: 0.224 > 0.09"),
        2: (AssertionError, "4 of 6 checks fail; worst mean loc_2: 0.186 > 0.09"),
    },
    ("mala", "gaussian_chain4"): {
        0: (AssertionError, "6 of 8 checks fail; worst mean loc_2: 0.295 > 0.07"),
        1: (AssertionError, "8 of 8 checks fail; worst mean loc_3: 0.210 > 0.07"),
        2: (AssertionError, "8 of 8 checks fail; worst mean loc_3: 0.244 > 0.07"),
    },
    ("mala", "gaussian_chain9"): {
        0: (AssertionError, "17 of 18 checks fail; worst mean loc_7: 0.572 > 0.08"),
        1: (AssertionError, "17 of 18 checks fail; worst mean loc_6: 0.907 > 0.08"),
        2: (AssertionError, "17 of 18 checks fail; worst mean loc_5: 0.471 > 0.08"),
    },
}

#: ``(kernel, model)`` pairs whose seed-0 outcome at Pyro's tolerances depends on the machine:
#: on ``gaussian_chain9`` (1400 draws, tolerance 0.08) the NUTS kernels' errors sit at the
#: tolerance within Monte Carlo error (ESS of the squares ~500-600), and Pyro's own NUTS, seed 0,
#: passed on CI at 82d7f1a but fails (0.083) on this project's sandbox at the same commit, the
#: floating point of the two machines taking the chain down different paths. All their seeds are
#: in the matrix, a record rather than a gate; the NUTS math is tested exactly by
#: tests/test_nuts.py and tests/test_mcmc.py's moment tests
EDGE: set[tuple[str, str]] = {
    ("pyro_nuts", "gaussian_chain9"),
    ("flow_hmc", "gaussian_chain9"),
    ("flow_nuts", "gaussian_chain9"),
}

#: ``(kernel, model)`` pairs fast enough for the default run (at most ~1.2 s a seed, measured in
#: the matrix); the others are ``slow``
FAST: set[tuple[str, str]] = {
    ("chees1", "gamma_normal"),
    ("chees4", "gamma_normal"),
    ("flow_imh", "beta_bernoulli"),
    ("flow_imh", "dirichlet_categorical"),
    ("flow_imh", "gamma_normal"),
    ("flow_imh", "gaussian_chain3"),
    ("flow_imh", "gaussian_chain4"),
    ("flow_imh", "gaussian_chain9"),
    ("flow_imh", "logistic_regression"),
    ("flow_isir", "dirichlet_categorical"),
    ("flow_isir", "gamma_normal"),
    ("flow_isir", "gaussian_chain3"),
    ("flow_isir", "gaussian_chain4"),
    ("flow_isir", "gaussian_chain9"),
    ("mala", "beta_bernoulli"),
    ("mala", "dirichlet_categorical"),
    ("mala", "gamma_normal"),
    ("mala", "logistic_regression"),
    ("pyro_nuts", "gamma_normal"),
}


@functools.cache
def _record(name: str, seed: int) -> PyroModel:
    with _float64():
        return MODELS[name](seed)


class _float64:
    """The default dtype float64 inside (as the tests' autouse fixture sets it)."""

    def __enter__(self):
        self._old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)

    def __exit__(self, *exc):
        torch.set_default_dtype(self._old)


def run_kernel(kernel_name: str, rec: PyroModel, seed: int) -> dict[str, torch.Tensor]:
    """Draws of ``kernel_name`` on ``rec`` at Pyro's run lengths (one chain; 4 for
    ``chees4``), after ``pyro.set_rng_seed(seed)``."""
    cls, chains = KERNELS[kernel_name]
    if kernel_name == "pyro_nuts":
        pyro.set_rng_seed(seed)
        kwargs = {} if rec.max_plate_nesting is None else {"max_plate_nesting": 1}
        mcmc = PyroMCMC(
            NUTS(rec.model, **kwargs), rec.num_samples, rec.warmup_steps, disable_progbar=True
        )
        mcmc.run(*rec.args)
        return mcmc.get_samples()
    pyro.set_rng_seed(seed)
    kernel = cls(model=rec.model)
    mcmc = MCMC(
        kernel,
        num_samples=rec.num_samples,
        warmup_steps=rec.warmup_steps,
        num_chains=chains,
        disable_progbar=True,
    )
    mcmc.run(*rec.args)
    return mcmc.get_samples()


def check_errors(rec: PyroModel, samples: dict) -> list[tuple[str, float, float]]:
    """``(check, error, tol)`` of every check of ``rec`` (a non-finite draw is an infinite
    error)."""
    out = []
    for check in rec.checks:
        error = check.error(samples)
        out.append((check.name, error if math.isfinite(error) else math.inf, check.tol))
    return out


def _params():
    for model_name in CHECKED_MODELS:
        for seed in SEEDS:
            for kernel_name in KERNELS:
                marks = []
                if (kernel_name, model_name) in EDGE:
                    marks.append(pytest.mark.matrix)
                elif (kernel_name, model_name) not in FAST:
                    # the slow pairs: seed 0 in the slow tier (CI), the other seeds in the matrix
                    marks.append(pytest.mark.slow if seed == SEEDS[0] else pytest.mark.matrix)
                failure = FAILURES.get((kernel_name, model_name), {}).get(seed)
                if failure is not None:
                    raises, reason = failure
                    marks.append(pytest.mark.xfail(strict=True, raises=raises, reason=reason))
                yield pytest.param(
                    kernel_name,
                    model_name,
                    seed,
                    marks=marks,
                    id=f"{kernel_name}-{model_name}-{seed}",
                )


@pytest.mark.parametrize("kernel_name, model_name, seed", list(_params()))
def test_posterior(kernel_name, model_name, seed):
    """Pyro's assertions, Pyro's tolerances, against the posterior of the data."""
    rec = _record(model_name, seed)
    samples = run_kernel(kernel_name, rec, seed)
    errors = check_errors(rec, samples)
    failed = [f"{name}: error {err:.4f} > tol {tol}" for name, err, tol in errors if not err <= tol]
    assert not failed, f"{kernel_name} on {model_name} (seed {seed}): " + "; ".join(failed)


def _hmm_params():
    for kernel_name in KERNELS:
        marks = []
        if kernel_name == "adaptive":  # its walkers and particles: ~20 s
            marks.append(pytest.mark.slow)
        elif kernel_name not in ("pyro_nuts", "mala"):
            # the flow kernels' fit and k-hat check (4096 draws), each draw an enumerated model
            # run (the HMM does not batch): 130-150 s a kernel
            marks.append(pytest.mark.matrix)
        yield pytest.param(kernel_name, marks=marks)


@pytest.mark.parametrize("model_name", ["gaussian_mixture", "bernoulli_latent", "gaussian_hmm"])
def test_discrete_sites_are_enumerated(model_name):
    """A ``pyro_ebm`` kernel's potential on a model with discrete sites is Pyro's potential
    with the sites enumerated (fast: one evaluation; the posterior tests of these models are
    slow)."""
    rec = _record(model_name, 0)
    params, potential_fn, _, _ = initialize_model(rec.model, rec.args, max_plate_nesting=1)
    kernel = MALA(model=rec.model)
    kernel.setup(0, *rec.args)
    x = kernel.target.layout.flatten(params)
    assert torch.allclose(kernel.target.potential(x[None])[0], potential_fn(params))


@pytest.mark.parametrize("kernel_name", list(_hmm_params()))
def test_gaussian_hmm_smoke(kernel_name):
    """Pyro's ``test_gaussian_hmm`` (4 enumerated states, 4 observations): 5 warmup steps and 5
    draws run, and the draws are finite."""
    rec = _record("gaussian_hmm", 0)
    samples = run_kernel(kernel_name, rec, 0)
    for site in rec.sites:
        assert samples[site].shape[0] == rec.num_samples * KERNELS[kernel_name][1]
        assert torch.isfinite(samples[site]).all(), site


# ----------------------------------------------------------------------------------------------
# the matrix: python tests/test_pyro_models.py [kernel ...] [--models name ...] [--seeds 0 1 2]


def _matrix(kernels, models, seeds) -> None:
    torch.set_num_threads(1)
    for model_name in models:
        for kernel_name in kernels:
            for seed in seeds:
                rec = _record(model_name, seed)
                start = time.perf_counter()
                try:
                    with _float64():
                        samples = run_kernel(kernel_name, rec, seed)
                    errors = check_errors(rec, samples)
                    ok = all(err <= tol for _, err, tol in errors)
                    detail = "; ".join(f"{n} {e:.4f}/{t}" for n, e, t in errors)
                    outcome = "pass" if ok else "FAIL"
                except Exception as error:  # a crash is a result of the matrix
                    first = (str(error).strip().splitlines() or [""])[0]
                    outcome, detail = "CRASH", f"{type(error).__name__}: {first[:160]}"
                seconds = time.perf_counter() - start
                print(
                    f"{kernel_name:10s} {model_name:24s} seed {seed}  {outcome:5s} "
                    f"{seconds:7.1f}s  {detail}",
                    flush=True,
                )


if __name__ == "__main__":
    argv = sys.argv[1:]
    kernels = [a for a in argv if a in KERNELS] or list(KERNELS)
    models = list(CHECKED_MODELS)
    seeds = list(SEEDS)
    if "--models" in argv:
        i = argv.index("--models") + 1
        models = [a for a in argv[i:] if a in MODELS]
    if "--seeds" in argv:
        i = argv.index("--seeds") + 1
        seeds = [int(a) for a in argv[i:] if a.isdigit()]
    _matrix(kernels, models, seeds)
