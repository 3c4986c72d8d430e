r"""Tests of :class:`pyro_ebm.infer.MCMC`, the many-chain driver with NumPyro's ``chain_method``.

Exact properties (fast):

- after warmup (here ``warmup_steps=0``: nothing adapts) the vectorized chains are independent
  Markov chains: moving chain 0's start changes none of the other chains' draws, bit for bit,
  for every walker kernel, on a bare potential and on a Pyro model; what warmup adapted
  (step size, trajectory length, mass matrix, flow) stays fixed after it;
- one vectorized chain is Pyro's own ``MCMC`` run (the same draws from the same seed); seeds
  reproduce; ``initial_params`` are per chain (chain ``c`` starts at start ``c``, vectorized and
  sequential); ``hook_fn`` sees every step with a chain dimension, and its sample-stage
  positions are exactly the stored draws;
- the results API: ``get_samples`` shapes, ``summary()``, ``diagnostics()``, user and model
  transforms (constrained sites, plates), :func:`~pyro_ebm.infer.to_arviz`, argument errors,
  Pyro's NUTS through Pyro's driver (with a warning for ``"vectorized"``), draws kept in one
  preallocated tensor and :class:`~pyro_ebm.infer.DrawStats` growing past its capacity.

Statistical tests (seeded; tolerances from Monte Carlo error, never hand-tuned): on a Gaussian
with known means and scales 0.5-2, ``"vectorized"`` and ``"sequential"`` runs of each walker
kernel must both have means and variances within ``z * sd / sqrt(ESS)`` of the truth (ESS from
:func:`pyro_ebm.metrics.effective_sample_size`, ``method="mean"``; ``z`` a Bonferroni split of
``p = 1e-3`` over the checks of the test; chains start at exact draws of the target); on
posteriordb's eight schools (``../shared``; skipped without it), ChEESHMC's 32 chains must
reach R-hat < 1.01 and the reference means and sds within their Monte Carlo error (ours and the
reference's). Seed validation, with or without the injected bug each statistical test must
catch: ``python tests/test_mcmc.py [names] [first last] [--bug]``; the outcomes are in the
tests' docstrings.
"""

from __future__ import annotations

import json
import math
import sys
import time
import zipfile

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.multiprocessing
from pyro.infer import NUTS
from test_posteriors import eight_schools_draws
from torch.distributions import transforms as T

import pyro_ebm
from pyro_ebm.datasets import EIGHT_SCHOOLS_DATA, eight_schools_noncentered
from pyro_ebm.flows import AffineFlow, RealNVP
from pyro_ebm.infer import (
    MALA,
    MCMC,
    AdaptiveFlowMCMC,
    ChEESHMC,
    DrawStats,
    FlowHMC,
    FlowIMH,
    FlowISIR,
    FlowNUTS,
    to_arviz,
)
from pyro_ebm.metrics import effective_sample_size, rhat
from pyro_ebm.samplers import MoveInfo

# Pyro's driver warns when it runs num_chains > cpu_count - 1 chains one after another
pytestmark = pytest.mark.filterwarnings("ignore:num_chains=.*sequentially:UserWarning")

WALKER_KERNELS = [
    "MALA",
    "FlowIMH",
    "FlowISIR",
    "ChEESHMC",
    "FlowHMC",
    "FlowNUTS",
    "AdaptiveFlowMCMC",
]


# --------------------------------------------------------------------------------------------
# targets, kernels, runs


def gauss():
    """A diagonal Gaussian in 3-D with scales 0.5, 1, 2: ``(potential_fn, loc, scale)``."""
    loc = torch.tensor([1.0, -1.0, 0.5])
    scale = torch.tensor([0.5, 1.0, 2.0])
    return pyro_ebm.potential_fn(pyro_ebm.GaussianEnergy(loc, scale)), loc, scale


SMALL_DATA = (0.3, -0.4, 1.1, 0.7, 0.2)


def small_model(y):
    """A Pyro model: a real and a positive latent, a plate of observations."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 0.5))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(mu, sigma), obs=y)


def constrained_model(y):
    """Positive, unit-interval and simplex latents, a vector latent inside a plate, and a plate
    of observations."""
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 0.5))
    tau = pyro.sample("tau", dist.HalfCauchy(1.0))
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    w = pyro.sample("w", dist.Dirichlet(torch.ones(3)))
    with pyro.plate("groups", 2):
        z = pyro.sample("z", dist.Normal(0.0, tau).expand([2, 3]).to_event(1))  # (2, 3)
    loc = (z * w.unsqueeze(-2)).sum(-1).sum(-1) * p  # a scalar (per chain)
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(loc.unsqueeze(-1), sigma.unsqueeze(-1)), obs=y)


CONSTRAINED_DATA = (0.3, -0.2, 0.5, 0.1)


def generic_flow(dim: int, base_scale: float = 0.5) -> RealNVP:
    """A RealNVP moved off the identity by fixed-seed noise: a generic, untrained proposal,
    narrower than the targets here (so that a flow-move chain may stay a while at a point in
    the target's tails)."""
    gen = torch.Generator().manual_seed(1)
    flow = RealNVP(dim, num_layers=2, hidden=(8,), base_scale=base_scale)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return flow


def matched_flow(loc, scale, widen: float = 1.3) -> AffineFlow:
    """A diagonal affine flow at the target's mean with ``widen`` times its scales."""
    flow = AffineFlow(len(loc), full=False)
    with torch.no_grad():
        flow.layers[-1].loc.copy_(loc)
        flow.layers[-1].log_diag.copy_((widen * scale).log())
    return flow


def fixed_kernel(name: str, model=None, potential_fn=None, dim: int = 3):
    """A kernel of ``name`` with nothing to adapt (for ``warmup_steps=0``)."""
    if name == "MALA":
        return MALA(model, potential_fn, step_size=0.2, adapt_step_size=False)
    if name == "FlowIMH":
        return FlowIMH(model, potential_fn, flow=generic_flow(dim), block_size=8)
    if name == "FlowISIR":
        return FlowISIR(model, potential_fn, flow=generic_flow(dim), num_particles=4, block_size=8)
    if name == "ChEESHMC":
        return ChEESHMC(
            model,
            potential_fn,
            step_size=0.3,
            trajectory_length=1.2,
            adapt_step_size=False,
            adapt_trajectory_length=False,
            adapt_mass_matrix=False,
        )
    if name in ("FlowHMC", "FlowNUTS"):
        fixed = {"step_size": 0.3, "adapt_step_size": False, "adapt_mass_matrix": False}
        if name == "FlowHMC":
            return FlowHMC(model, potential_fn, flow=generic_flow(dim), num_steps=3, **fixed)
        return FlowNUTS(model, potential_fn, flow=generic_flow(dim), max_tree_depth=4, **fixed)
    if name == "AdaptiveFlowMCMC":
        return AdaptiveFlowMCMC(
            model,
            potential_fn,
            flow=generic_flow(dim),
            num_walkers=4,
            num_particles=4,
            num_local_steps=1,
        )
    raise ValueError(name)


def adaptive_kernel(name: str, model=None, potential_fn=None, dim: int = 3):
    """A kernel of ``name`` that adapts during warmup (small settings, for plumbing tests)."""
    if name == "MALA":
        return MALA(model, potential_fn)
    if name == "ChEESHMC":
        return ChEESHMC(model, potential_fn)
    if name == "FlowHMC":
        return FlowHMC(model, potential_fn, flow=generic_flow(dim), num_steps=3)
    if name == "FlowNUTS":
        return FlowNUTS(model, potential_fn, flow=generic_flow(dim), max_tree_depth=4)
    if name == "AdaptiveFlowMCMC":
        return AdaptiveFlowMCMC(
            model, potential_fn, num_walkers=8, num_local_steps=1, flow_steps=1, flow_batch_size=64
        )
    return fixed_kernel(name, model, potential_fn, dim)  # the flow kernels do not adapt


def run(kernel, num_samples=20, warmup_steps=0, num_chains=4, args=(), **kwargs) -> MCMC:
    mcmc = MCMC(
        kernel,
        num_samples,
        warmup_steps=warmup_steps,
        num_chains=num_chains,
        disable_progbar=True,
        **kwargs,
    )
    mcmc.run(*args)
    return mcmc


# --------------------------------------------------------------------------------------------
# 1. vectorized chains are independent after warmup


def _draws_with_chain0_moved(name: str, target: str, shift: float) -> dict:
    """Vectorized draws (seed 0, ``warmup_steps=0``) of 6 chains from fixed starts, chain 0's
    moved by ``shift``."""
    gen = torch.Generator().manual_seed(2)
    if target == "potential":
        pot, loc, scale = gauss()
        init = {"x": loc + scale * torch.randn(6, 3, generator=gen)}
        init["x"][0] += shift
        model, args, dim = None, (), 3
    else:  # unconstrained starts: log sigma for sigma
        pot = None
        init = {
            "mu": 0.5 * torch.randn(6, generator=gen),
            "sigma": 0.3 * torch.randn(6, generator=gen),
        }
        init["mu"][0] += shift
        model, args, dim = small_model, (torch.tensor(SMALL_DATA),), 2
    pyro.set_rng_seed(0)
    kernel = fixed_kernel(name, model, pot, dim)
    mcmc = run(kernel, 30, 0, 6, args, initial_params=init)
    return mcmc.get_samples(group_by_chain=True)


@pytest.mark.parametrize("target", ["potential", "model"])
@pytest.mark.parametrize("name", WALKER_KERNELS)
def test_vectorized_chains_are_independent_after_warmup(name, target):
    """With nothing left to adapt, chain ``c``'s draws depend on its own start and random
    numbers only: moving chain 0's start leaves chains 1-5 bit for bit the same. Checked by
    hand: adding ``1e-12 * x[0]`` to every chain's new position (wrapping ``mala_step``,
    ``chees_hmc_step``, ``imh_step`` or ``isir_step`` where the kernel calls it, and
    ``mala_step``/``isir_step`` in ``samplers.adaptive`` for AdaptiveFlowMCMC) fails all 12
    such cases. The flows are narrower than the targets: with a wider one, both runs' chain 0
    left its start for the same i-SIR proposal at once and the coupling went unseen."""
    a = _draws_with_chain0_moved(name, target, 0.0)
    b = _draws_with_chain0_moved(name, target, 1.5)
    for site in a:
        assert torch.equal(a[site][1:], b[site][1:]), f"{site}: chain 0 changed other chains"
    # the test can only see a coupling while the two runs' chains 0 differ (flow moves may
    # take both to the same proposal, after which they agree)
    site = next(iter(a))
    assert not torch.equal(a[site][0, :10], b[site][0, :10])


def _adapted(kernel) -> list[torch.Tensor]:
    """What warmup adapts in ``kernel``: step size, trajectory length, mass, flow weights."""
    if isinstance(kernel, MALA):
        return [torch.as_tensor(kernel.step_size).clone()]
    if isinstance(kernel, ChEESHMC):
        a = kernel.adapter
        return [torch.tensor([a.step_size, a.trajectory_length]), a.inverse_mass.clone()]
    if isinstance(kernel, FlowHMC):  # and FlowNUTS
        return [torch.tensor(kernel.step_size), kernel.inverse_mass_matrix.clone()]
    sampler = kernel.sampler
    flow = [p.detach().clone() for p in sampler.flow.parameters()]
    return [torch.tensor(float(sampler.step_size))] + flow


@pytest.mark.parametrize("name", ["MALA", "ChEESHMC", "FlowNUTS", "AdaptiveFlowMCMC"])
def test_adaptation_is_frozen_after_warmup(name):
    """What warmup tuned from the pooled chains (step size, trajectory length, mass matrix,
    flow) changes during warmup and never after it: the chains are then independent. Checked
    by hand: MALA moving as in warmup throughout, ``ChEESAdapter.freeze`` a no-op, and
    ``AdaptiveFlowSampler.move`` always adapting each make this fail."""
    pot, _, _ = gauss()
    seen = {"Warmup": [], "Sample": []}

    def hook(kernel, params, stage, i):
        seen[stage].append(_adapted(kernel))

    run(adaptive_kernel(name, potential_fn=pot), 15, 30, 8, hook_fn=hook)
    first = seen["Sample"][0]
    assert any(not torch.equal(a, b) for a, b in zip(seen["Warmup"][0], first, strict=True))
    for snapshot in seen["Sample"][1:]:
        assert all(torch.equal(a, b) for a, b in zip(snapshot, first, strict=True))


# --------------------------------------------------------------------------------------------
# 2. vectorized and sequential chains sample the same (right) distribution


def z_critical(num_checks: int, p: float = 1e-3) -> float:
    """Two-sided Bonferroni critical value for ``num_checks`` checks at family level ``p``."""
    normal = torch.distributions.Normal(0.0, 1.0)
    return float(normal.icdf(torch.tensor(1 - p / (2 * num_checks), dtype=torch.float64)))


def mcse_zscores(series: dict) -> dict[str, float]:
    r"""``{name: (f (chains, draws), truth)} -> {name: (mean f - truth) / (sd f / sqrt ESS)}``,
    the ESS of ``f`` (``method="mean"``, capped at :math:`S \log_{10} S`)."""
    out = {}
    for name, (f, truth) in series.items():
        ess = float(effective_sample_size(f, method="mean")[0])
        out[name] = float((f.mean() - truth) / (f.std() / math.sqrt(ess)))
    return out


def gauss_moment_series(x, loc, scale, prefix: str = "") -> dict:
    """Means and variances of draws ``x`` ``(C, T, 3)`` as ``(series, truth)``."""
    out = {}
    for i in range(x.shape[-1]):
        out[f"{prefix}mean[{i}]"] = (x[..., i], loc[i])
        out[f"{prefix}var[{i}]"] = ((x[..., i] - loc[i]) ** 2, scale[i] ** 2)
    return out


#: per kernel and chain method: ``(num_chains, warmup_steps, num_samples)``
GAUSS_RUNS = {
    "MALA": {"vectorized": (16, 200, 500), "sequential": (4, 100, 1000)},
    "FlowISIR": {"vectorized": (16, 0, 300), "sequential": (2, 0, 1000)},
    # one chain: step size and mass adapt, the trajectory length stays at 1
    "ChEESHMC": {"vectorized": (16, 200, 300), "sequential": (2, 200, 500)},
    "FlowHMC": {"vectorized": (16, 200, 300), "sequential": (2, 200, 500)},
    "FlowNUTS": {"vectorized": (16, 200, 300), "sequential": (2, 200, 500)},
    "AdaptiveFlowMCMC": {"vectorized": (4, 200, 500), "sequential": (2, 200, 500)},
}


def gauss_kernel(name: str, pot, loc, scale):
    if name == "MALA":
        return MALA(potential_fn=pot, step_size=0.3)
    if name == "FlowISIR":
        return FlowISIR(potential_fn=pot, flow=matched_flow(loc, scale), num_particles=4)
    if name == "ChEESHMC":
        return ChEESHMC(potential_fn=pot)
    if name == "FlowHMC":
        return FlowHMC(potential_fn=pot, flow=generic_flow(3))
    if name == "FlowNUTS":
        return FlowNUTS(potential_fn=pot, flow=generic_flow(3))
    return AdaptiveFlowMCMC(
        potential_fn=pot, num_walkers=16, num_local_steps=1, flow_steps=2, flow_batch_size=256
    )


def gauss_zscores(name: str, seed: int) -> dict[str, float]:
    """z-scores of the means and variances of a vectorized and a sequential run of ``name``
    on :func:`gauss`, chains started at exact draws."""
    pot, loc, scale = gauss()
    series = {}
    for method, (chains, warmup, samples) in GAUSS_RUNS[name].items():
        pyro.set_rng_seed(seed)
        init = loc + scale * torch.randn(chains, 3)
        kernel = gauss_kernel(name, pot, loc, scale)
        mcmc = run(kernel, samples, warmup, chains, chain_method=method, initial_params={"x": init})
        assert mcmc.chain_method == method
        x = mcmc.get_samples(group_by_chain=True)["x"]
        assert x.shape == (chains, samples, 3)
        series.update(gauss_moment_series(x, loc, scale, f"{method} "))
    return mcse_zscores(series)


def assert_within_mcse(z: dict[str, float]) -> None:
    crit = z_critical(len(z))
    bad = {k: round(v, 2) for k, v in z.items() if not abs(v) < crit}
    assert not bad, f"errors beyond {crit:.2f} MCSE: {bad} (all: {z})"


def test_vectorized_and_sequential_mala_sample_the_gaussian():
    """MALA (dual-averaging step size): 16 vectorized chains x 500 draws, 4 sequential chains x
    1000; ~2-4 s. 12 checks, critical |z| 3.93. Seeds 0-19: 20/20 pass (max |z| 2.91; with 2
    sequential chains, 19/20: seed 3's sequential variance of the sd-2 coordinate, ESS ~140,
    had z = -4.06). Catches the Hastings term dropped (``samplers.local._langevin_log_q``
    returning 0): seeds 0-4 all fail, max |z| 24-31."""
    assert_within_mcse(gauss_zscores("MALA", 0))


def test_vectorized_and_sequential_flow_isir_sample_the_gaussian():
    """FlowISIR (4 particles) with an affine flow 1.3 times as wide as the target: 16 vectorized
    chains x 300 draws, 2 sequential chains x 1000; ~1-2 s. Seeds 0-19: 20/20 pass (max |z|
    3.83, critical 3.93). Catches importance weights without ``-log q``
    (``flow_moves.log_weights`` returning ``-U``): seeds 0-4 all fail, max |z| 22-25."""
    assert_within_mcse(gauss_zscores("FlowISIR", 0))


def test_vectorized_and_sequential_chees_hmc_sample_the_gaussian():
    """ChEESHMC: 16 vectorized chains x 300 draws (step size, trajectory length and mass
    adapted from the ensemble), 2 sequential chains x 500 (step size and mass adapted, the
    trajectory length fixed at 1); ~2-4 s. Seeds 0-19: 20/20 pass (max |z| 3.12, critical
    3.93). Catches a momentum drawn 1.5 times too wide (``torch.randn_like`` scaled in
    ``chees_hmc_step``): seeds 0-4 all fail, max |z| 16-19."""
    assert_within_mcse(gauss_zscores("ChEESHMC", 0))


def test_vectorized_and_sequential_flow_hmc_sample_the_gaussian():
    """FlowHMC (trajectory length 2, Stan's warmup from the pooled chains) in the latent space
    of a generic untrained RealNVP (:func:`generic_flow`): 16 vectorized chains x 300 draws, 2
    sequential chains x 500. Seeds 0-9: 10/10 pass (max |z| 2.97, critical 3.93). Catches
    ``log|det J|`` dropped from the pulled-back potential (``samplers.PullbackPotential``):
    seeds 0-2 fail, max |z| 5.2-10.8."""
    assert_within_mcse(gauss_zscores("FlowHMC", 0))


def test_vectorized_and_sequential_flow_nuts_sample_the_gaussian():
    """FlowNUTS (the chains' trajectories built in lockstep, Stan's warmup) in the latent space
    of the same RealNVP: 16 vectorized chains x 300 draws, 2 sequential chains x 500.
    Seeds 0-9: 10/10 pass (max |z| 3.01, critical 3.93). Catches ``log|det J|`` dropped from the
    pulled-back potential: seeds 0-2 fail, max |z| 9.5-11.8."""
    assert_within_mcse(gauss_zscores("FlowNUTS", 0))


@pytest.mark.slow
def test_vectorized_and_sequential_adaptive_flow_mcmc_sample_the_gaussian():
    """AdaptiveFlowMCMC (16 warmup walkers, 100 training cycles): 4 vectorized chains x 500
    draws that share one warmup ensemble, 2 sequential chains x 500 that train a flow each;
    ~10-25 s. Seeds 0-19: 20/20 pass (max |z| 2.93, critical 3.93). Catches i-SIR weights
    without ``-log q``: seeds 0-4 all fail, max |z| 20-26."""
    assert_within_mcse(gauss_zscores("AdaptiveFlowMCMC", 0))


@pytest.mark.parametrize("method", ["vectorized", "sequential"])
def test_chees_hmc_warms_up_a_single_chain(method):
    """ChEESHMC's docstring: with one chain the step size and mass matrix adapt (the trajectory
    length needs several chains). Until ChEESAdapter accepted one chain, this raised."""
    pot, _, _ = gauss()
    num_chains = 1 if method == "vectorized" else 2
    kernel = ChEESHMC(potential_fn=pot, trajectory_length=1.5)
    mcmc = run(kernel, 10, 30, num_chains, chain_method=method)
    x = mcmc.get_samples(group_by_chain=True)["x"]
    assert x.shape == (num_chains, 10, 3) and bool(torch.isfinite(x).all())
    assert kernel.adapter.step_size != pytest.approx(0.1)  # adapted


# --------------------------------------------------------------------------------------------
# 3. R-hat and reference moments on posteriordb's eight schools

EIGHT_SCHOOLS = "eight_schools-eight_schools_noncentered"
EIGHT_SCHOOLS_ARGS = (EIGHT_SCHOOLS_DATA["J"], EIGHT_SCHOOLS_DATA["y"], EIGHT_SCHOOLS_DATA["sigma"])


def read_reference_draws(shared_dir) -> dict[str, torch.Tensor]:
    """posteriordb's reference draws of eight schools: ``{name: (10, 1000)}``."""
    path = shared_dir / "posteriordb" / EIGHT_SCHOOLS / "reference_draws.json.zip"
    with zipfile.ZipFile(path) as z:
        chains = json.loads(z.read(z.namelist()[0]))
    return {name: torch.tensor([c[name] for c in chains]) for name in chains[0]}


def _mean_and_sd_with_se(x: torch.Tensor) -> tuple[float, float, float, float]:
    """Mean, its MCSE, sd and its MCSE (delta method on the variance) of chains ``x``."""
    m = x.mean()
    sq = (x - m) ** 2
    sd = float(sq.mean().sqrt())
    ess = float(effective_sample_size(x, method="mean")[0])
    ess_sq = float(effective_sample_size(sq, method="mean")[0])
    return float(m), sd / math.sqrt(ess), sd, float(sq.std()) / math.sqrt(ess_sq) / (2 * sd)


def eight_schools_zscores(draws: dict, ref: dict) -> dict[str, float]:
    """Per parameter, ``(ours - reference) / sqrt(se_ours^2 + se_ref^2)`` for means and sds."""
    out = {}
    for name, r in ref.items():
        m, se_m, s, se_s = _mean_and_sd_with_se(draws[name])
        rm, rse_m, rs, rse_s = _mean_and_sd_with_se(r)
        out[f"mean {name}"] = (m - rm) / math.hypot(se_m, rse_m)
        out[f"sd {name}"] = (s - rs) / math.hypot(se_s, rse_s)
    return out


def eight_schools_chees(seed: int) -> MCMC:
    pyro.set_rng_seed(seed)
    kernel = ChEESHMC(eight_schools_noncentered, jit_compile=True)
    return run(kernel, 400, 200, 32, EIGHT_SCHOOLS_ARGS)


RHAT_MAX = 1.01


def test_eight_schools_chees_hmc_rhat_and_reference_moments(shared_dir):
    """ChEESHMC (compiled potential), 32 vectorized chains, 200 warmup steps and 400 draws each
    (~5-10 s): the rank-normalised R-hat of every parameter < 1.01, and the means and sds of
    ``theta[1..8]``, ``mu``, ``tau`` within ``z`` MCSE of posteriordb's reference draws (the
    MCSE of both, from their ESS; ``z`` Bonferroni over the 20 checks, 4.06). Seeds 0-19:
    20/20 pass (max R-hat 1.0026-1.0060, max |z| 2.63); with 200 draws, 4 seeds had R-hat
    1.010-1.012. Catches a momentum drawn 1.5 times too wide: seeds 0-4 all fail (|z| 35-38)
    though their R-hat stays below 1.008: R-hat alone would not see it."""
    ref = read_reference_draws(shared_dir)
    mcmc = eight_schools_chees(0)
    draws = eight_schools_draws(mcmc)
    r = rhat(torch.stack(list(draws.values()), -1))
    assert float(r.max()) < RHAT_MAX, dict(zip(draws, r.tolist(), strict=True))
    assert_within_mcse(eight_schools_zscores(draws, ref))
    diag = mcmc.diagnostics()
    assert float(diag["tau"]["r_hat"]) < RHAT_MAX


# --------------------------------------------------------------------------------------------
# 4. one chain is Pyro's MCMC; seeds reproduce


@pytest.mark.parametrize("name", WALKER_KERNELS)
def test_one_vectorized_chain_is_pyros_mcmc(name):
    """Pyro's ``MCMC`` drives a kernel through ``setup``/``sample``, ours through
    ``setup_chains``/``step_chains`` with one chain: from the same seed, the same draws (warmup
    included), in the same constrained spaces (positive, unit-interval, simplex, plate
    sites)."""
    y = torch.tensor(CONSTRAINED_DATA)
    draws = []
    for driver in (pyro.infer.MCMC, MCMC):
        pyro.set_rng_seed(3)
        kernel = adaptive_kernel(name, constrained_model, dim=11)
        mcmc = driver(kernel, 15, warmup_steps=10, disable_progbar=True)
        mcmc.run(y)
        draws.append(mcmc.get_samples())
    assert set(draws[1]) == {"sigma", "tau", "p", "w", "z"}
    for site, value in draws[1].items():
        assert torch.equal(draws[0][site], value), site


@pytest.mark.parametrize("name", WALKER_KERNELS)
def test_same_seed_same_draws(name):
    """Same ``pyro.set_rng_seed``: identical draws, warmup (and its adaptation) included; the
    starts come from the model's init strategy (one per chain); another seed differs."""
    y = torch.tensor(SMALL_DATA)

    def draws(seed):
        pyro.set_rng_seed(seed)
        kernel = adaptive_kernel(name, small_model, dim=2)
        return run(kernel, 10, 10, 4, (y,)).get_samples(group_by_chain=True)

    a, b, c = draws(0), draws(0), draws(1)
    for site in ("mu", "sigma"):
        assert a[site].shape == (4, 10)
        assert torch.equal(a[site], b[site]), site
        assert not torch.equal(a[site], c[site]), site


# --------------------------------------------------------------------------------------------
# 5. the results: get_samples, summary, diagnostics


def vector_model(y):
    """A scalar ``mu`` and a vector ``z`` (shape ``(2,)``)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    z = pyro.sample("z", dist.Normal(mu, 1.0).expand([2]).to_event(1))
    pyro.sample("obs", dist.Normal(z.sum(-1), 1.0), obs=y)


@pytest.mark.parametrize("method", ["vectorized", "sequential"])
def test_get_samples_summary_and_diagnostics(method, capsys):
    mcmc = MCMC(
        MALA(vector_model),
        12,
        warmup_steps=5,
        num_chains=3,
        disable_progbar=True,
        chain_method=method,
    )
    for call in (mcmc.get_samples, mcmc.summary, mcmc.diagnostics):
        with pytest.raises(RuntimeError, match="run"):
            call()
    mcmc.run(torch.tensor(0.5))

    grouped = mcmc.get_samples(group_by_chain=True)
    assert {k: tuple(v.shape) for k, v in grouped.items()} == {"mu": (3, 12), "z": (3, 12, 2)}
    flat = mcmc.get_samples()
    assert {k: tuple(v.shape) for k, v in flat.items()} == {"mu": (36,), "z": (36, 2)}
    assert torch.equal(flat["z"], grouped["z"].reshape(36, 2))
    some = mcmc.get_samples(num_samples=7)
    assert {k: tuple(v.shape) for k, v in some.items()} == {"mu": (7,), "z": (7, 2)}
    for row in some["z"]:  # draws of the run, with replacement
        assert bool((flat["z"] == row).all(-1).any())
    assert tuple(mcmc.get_samples(5, group_by_chain=True)["z"].shape) == (3, 5, 2)

    mcmc.summary()
    out = capsys.readouterr().out
    for row in ("mu", "z[0]", "z[1]"):
        assert row in out
    for column in ("mean", "std", "median", "5.0%", "95.0%", "n_eff", "r_hat"):
        assert column in out
    assert "Number of divergences: 0" in out
    assert "k-hat" not in out  # no flow: no flow check

    diag = mcmc.diagnostics()
    for site, shape in (("mu", ()), ("z", (2,))):
        assert set(diag[site]) == {"n_eff", "r_hat"}
        assert diag[site]["n_eff"].shape == shape and diag[site]["r_hat"].shape == shape
    assert diag["divergences"] == {f"chain {c}": [] for c in range(3)}
    assert "sample_stats" not in diag
    assert "global acceptance rate" not in diag  # MALA makes no global moves: no nan row
    assert all(0 < rate <= 1 for rate in diag["local acceptance rate"].values())
    vectorized = mcmc.chain_method == "vectorized"
    assert diag["potential errors"] == (
        {"all chains": 0} if vectorized else {f"chain {c}": 0 for c in range(3)}
    )
    depth = diag["density depth"]  # a Gaussian: no neck (the depth check of test_depth.py)
    assert set(depth) == ({"all chains"} if vectorized else {f"chain {c}" for c in range(3)})
    assert all(0 <= d < 1 for d in depth.values())
    for key, per_chain in diag.items():
        if key not in ("mu", "z", "potential errors", "nan gradients", "density depth"):
            assert set(per_chain) == {f"chain {c}" for c in range(3)}, key
            assert all(not isinstance(v, dict) for v in per_chain.values()), key


@pytest.mark.parametrize("name, kinds", [("FlowIMH", {"global"}), ("FlowHMC", {"local"})])
def test_acceptance_rates_are_of_the_moves_the_kernel_makes(name, kinds):
    """An acceptance rate for each kind of move the chains made, none (not a ``nan`` row) for
    a kind they never make (MALA: test_get_samples_summary_and_diagnostics)."""
    pot, _, _ = gauss()
    mcmc = run(adaptive_kernel(name, potential_fn=pot), warmup_steps=10)
    diag = mcmc.diagnostics()
    made = {kind for kind in ("global", "local") if f"{kind} acceptance rate" in diag}
    assert made == kinds
    for kind in kinds:
        assert all(0 < r <= 1 for r in diag[f"{kind} acceptance rate"].values()), kind
    # Pyro's key: the fraction of draws that moved
    moved = to_arviz(mcmc).sample_stats["accepted"].mean("draw").values
    rates = [diag["acceptance rate"][f"chain {c}"] for c in range(4)]
    assert rates == pytest.approx(moved.tolist())


def _centred_hierarchy(y, s):
    """A walkthrough's centred hierarchical normal model: a funnel that MALA cannot cross."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    tau = pyro.sample("tau", dist.HalfNormal(5.0))
    with pyro.plate("groups", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, s), obs=y)


def test_a_run_that_has_not_converged_is_warned(caplog):
    """After a run, one warning when R-hat is above 1.05 or the bulk ESS below 100 per chain,
    naming the worst site (as Stan warns): MALA on a centred hierarchy, 4 chains, 300 warmup
    steps, 500 draws (R-hat 1.50-2.44, ESS 5-8 on seeds 0-4) is warned; on a Gaussian it is
    not (seeds 0-4). Without the check the first half fails."""
    y = torch.tensor([12.0, 3.0, -4.0, 8.0, 1.0, 15.0, 6.0, -2.0, 9.0])
    s = torch.tensor([10.0, 8.0, 12.0, 9.0, 11.0, 14.0, 7.0, 10.0, 13.0])
    pot, _, _ = gauss()
    for kernel, args, warned in (
        (MALA(_centred_hierarchy), (y, s), True),
        (MALA(potential_fn=pot), (), False),
    ):
        pyro.set_rng_seed(0)
        caplog.clear()
        with caplog.at_level("WARNING", logger="pyro_ebm.infer.mcmc"):
            run(kernel, num_samples=500, warmup_steps=300, args=args)
        messages = [r.getMessage() for r in caplog.records if "not have converged" in r.message]
        assert len(messages) == int(warned)
        if warned:
            assert "R-hat up to" in messages[0] and "bulk ESS as low as" in messages[0]


class HalfSpaceGaussian(pyro_ebm.EnergyModel):
    """A standard Gaussian energy, ``inf`` where ``x_0 > 1``: proposals there diverge."""

    def __init__(self) -> None:
        super().__init__(2)

    def energy(self, x):
        u = 0.5 * (self.check_input(x) ** 2).sum(-1)
        return torch.where(x[:, 0] > 1, torch.full_like(u, math.inf), u)


@pytest.mark.parametrize("method", ["vectorized", "sequential"])
def test_divergences_are_counted_per_chain(method, capsys):
    """Post-warmup proposals with a non-finite potential: ``diagnostics()["divergences"]``
    lists their draw indices per chain, ``summary()`` prints their total, ``to_arviz`` marks the
    same draws ``diverging``."""
    pot = pyro_ebm.potential_fn(HalfSpaceGaussian())
    kernel = MALA(potential_fn=pot, step_size=0.5, adapt_step_size=False)
    mcmc = run(kernel, 40, 5, 3, chain_method=method, initial_params={"x": torch.zeros(3, 2)})
    divergences = mcmc.diagnostics()["divergences"]
    total = sum(len(d) for d in divergences.values())
    assert total > 0 and bool((mcmc.get_samples()["x"][:, 0] <= 1).all())
    mcmc.summary()
    assert f"Number of divergences: {total}" in capsys.readouterr().out
    diverging = to_arviz(mcmc)["sample_stats"]["diverging"].values
    for c in range(3):
        assert diverging[c].nonzero()[0].tolist() == divergences[f"chain {c}"]


# --------------------------------------------------------------------------------------------
# 6. transforms: the user's, and the model's constrained sites


@pytest.mark.parametrize("method", ["vectorized", "sequential"])
def test_user_transforms_are_applied_inverted(method):
    """``transforms={"x": t}`` maps the sampled space to the reported one by ``t.inv`` (as
    Pyro): with ``t = ExpTransform().inv`` the draws are ``exp`` of the untransformed run's."""
    pot, _, _ = gauss()
    draws = []
    for transforms in (None, {"x": T.ExpTransform().inv}):
        pyro.set_rng_seed(0)
        kernel = fixed_kernel("MALA", potential_fn=pot)
        mcmc = run(kernel, 10, 0, 3, chain_method=method, transforms=transforms)
        draws.append(mcmc.get_samples(group_by_chain=True)["x"])
    assert torch.allclose(draws[1], draws[0].exp(), rtol=1e-12, atol=0)
    assert isinstance(mcmc.transforms["x"], T.Transform)


@pytest.mark.parametrize(
    "name,method",
    [("MALA", "vectorized"), ("MALA", "sequential"), ("ChEESHMC", "vectorized")],
)
def test_constrained_sites_and_plates(name, method):
    """A model's sites come out in their constrained spaces, shaped as in the model."""
    y = torch.tensor(CONSTRAINED_DATA)
    mcmc = run(adaptive_kernel(name, constrained_model), 15, 10, 4, (y,), chain_method=method)
    s = mcmc.get_samples(group_by_chain=True)
    shapes = {k: tuple(v.shape) for k, v in s.items()}
    assert shapes == {
        "sigma": (4, 15),
        "tau": (4, 15),
        "p": (4, 15),
        "w": (4, 15, 3),
        "z": (4, 15, 2, 3),
    }
    assert bool((s["sigma"] > 0).all()) and bool((s["tau"] > 0).all())
    assert bool(((s["p"] > 0) & (s["p"] < 1)).all())
    assert bool((s["w"] > 0).all())
    assert torch.allclose(s["w"].sum(-1), torch.ones(4, 15), atol=1e-12)
    assert not torch.equal(s["z"][..., 0, :], s["z"][..., 1, :])  # two groups, two latents
    mcmc.summary()  # every site, every element


# --------------------------------------------------------------------------------------------
# 7. ArviZ


@pytest.mark.parametrize(
    "num_chains,method", [(1, "vectorized"), (5, "vectorized"), (3, "sequential")]
)
def test_to_arviz(num_chains, method):
    """Chains are ArviZ chains: posterior ``(chain, draw, ...)`` in the chains' order, and every
    per-draw statistic ``(chain, draw)``."""
    mcmc = run(MALA(vector_model), 8, 4, num_chains, (torch.tensor(0.5),), chain_method=method)
    data = to_arviz(mcmc)
    samples = mcmc.get_samples(group_by_chain=True)
    assert data["posterior"]["mu"].shape == (num_chains, 8)
    assert data["posterior"]["z"].shape == (num_chains, 8, 2)
    assert (data["posterior"]["z"].values == samples["z"].numpy()).all()
    stats = data["sample_stats"]
    assert {"accept_prob", "accepted", "diverging", "is_global", "lp", "potential_energy"} <= set(
        stats.data_vars
    )
    for name in stats.data_vars:
        assert stats[name].shape == (num_chains, 8), name


def test_to_arviz_with_pyros_nuts():
    pyro.set_rng_seed(0)
    mcmc = run(NUTS(small_model), 6, 4, 2, (torch.tensor(SMALL_DATA),))
    data = to_arviz(mcmc)
    assert data["posterior"]["sigma"].shape == (2, 6)
    assert data["sample_stats"]["diverging"].shape == (2, 6)


# --------------------------------------------------------------------------------------------
# 8. bad input


def test_argument_errors():
    pot, _, _ = gauss()
    kernel = MALA(potential_fn=pot)
    with pytest.raises(ValueError, match="initial_params"):
        MCMC(kernel, 10, num_chains=3, initial_params={"x": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="initial_params"):
        MCMC(kernel, 10, num_chains=3, initial_params={"x": torch.tensor(0.0)})
    with pytest.raises(ValueError, match="initial_params"):
        MCMC(kernel, 10, num_chains=3, initial_params={})
    with pytest.raises(ValueError, match="chain_method"):
        MCMC(kernel, 10, chain_method="threads")
    for kwargs, name, error in [
        ({"num_chains": 0}, "num_chains", ValueError),
        ({"num_chains": 2.5}, "num_chains", TypeError),
        ({"num_samples": 0}, "num_samples", ValueError),
        ({"num_samples": True}, "num_samples", TypeError),
        ({"warmup_steps": -1}, "warmup_steps", ValueError),
        ({"hook_fn": 3}, "hook_fn", TypeError),
        ({"transforms": 3}, "transforms", TypeError),
        ({"mp_context": "nope"}, "mp_context", ValueError),
    ]:
        with pytest.raises(error, match=name):
            MCMC(kernel, **{"num_samples": 10, **kwargs})
    for bad in (MALA, "MALA", pot, None):
        with pytest.raises(TypeError, match="kernel"):
            MCMC(bad, 10)
    wrong = {"mu": torch.zeros(3), "z": torch.zeros(3, 3)}  # z is (2,)
    with pytest.raises(ValueError, match=r"initial_params\['z'\] must end with the site's shape"):
        MCMC(MALA(vector_model), 5, num_chains=3, initial_params=wrong).run(torch.tensor(0.5))
    with pytest.raises(TypeError, match="'num_warmup' .NumPyro's name; here warmup_steps"):
        MCMC(kernel, 10, num_warmup=5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'warmup'$"):
        MCMC(kernel, 10, warmup=5)


def test_an_interrupted_run_leaves_no_draws():
    """A run stopped by Ctrl-C (a KeyboardInterrupt from the potential) keeps no draws: the
    previous run's are not returned as if they were its own."""
    pot, _, _ = gauss()
    calls = [0, math.inf]

    def interrupted(params):
        calls[0] += 1
        if calls[0] > calls[1]:
            raise KeyboardInterrupt
        return pot(params)

    mcmc = MCMC(MALA(potential_fn=interrupted), 10, 10, initial_params={"x": torch.zeros(3)})
    mcmc.run()
    assert mcmc.get_samples()["x"].shape == (10, 3)
    calls[:] = [0, 15]
    with pytest.raises(KeyboardInterrupt):
        mcmc.run()
    with pytest.raises(RuntimeError, match="interrupted"):
        mcmc.get_samples()
    with pytest.raises(RuntimeError, match="interrupted"):
        mcmc.diagnostics()


# --------------------------------------------------------------------------------------------
# 9. chain methods, Pyro's kernels, per-chain starts


def test_pyros_nuts_through_pyros_driver():
    """NUTS cannot move chains as a batch: ``"vectorized"`` warns and runs them one after
    another through Pyro's driver; the default does so silently."""
    y = torch.tensor(SMALL_DATA)
    with pytest.warns(UserWarning, match="cannot move chains"):
        mcmc = MCMC(
            NUTS(small_model),
            8,
            warmup_steps=8,
            num_chains=2,
            disable_progbar=True,
            chain_method="vectorized",
        )
    assert mcmc.chain_method == "sequential"
    mcmc.run(y)
    s = mcmc.get_samples(group_by_chain=True)
    assert s["mu"].shape == (2, 8) and bool((s["sigma"] > 0).all())
    assert set(mcmc.diagnostics()["divergences"]) == {"chain 0", "chain 1"}
    assert MCMC(NUTS(small_model), 8).chain_method == "sequential"


def test_default_chain_method():
    """``None``: vectorized for the walker kernels, Pyro's driver (silently) for the others."""
    pot, _, _ = gauss()
    for name in WALKER_KERNELS:
        assert MCMC(fixed_kernel(name, potential_fn=pot), 5).chain_method == "vectorized", name
    for kernel in (
        FlowHMC(potential_fn=pot, flow=generic_flow(3)),
        FlowNUTS(small_model, flow=generic_flow(2)),
    ):
        assert MCMC(kernel, 5).chain_method == "vectorized", type(kernel).__name__
    assert MCMC(NUTS(small_model), 5).chain_method == "sequential"


def test_parallel_goes_through_pyros_driver(monkeypatch):
    """``"parallel"`` is Pyro's driver (which runs the chains one after another when the cores
    are too few: pinned here so that no process starts)."""
    monkeypatch.setattr(torch.multiprocessing, "cpu_count", lambda: 1)
    pot, loc, _ = gauss()
    init = loc + torch.tensor([[-2.0], [2.0]])
    mcmc = run(MALA(potential_fn=pot), 6, 4, 2, chain_method="parallel", initial_params={"x": init})
    assert mcmc.get_samples(group_by_chain=True)["x"].shape == (2, 6, 3)
    assert len(mcmc._diagnostics) == 2


@pytest.mark.parametrize("method", ["vectorized", "sequential"])
def test_each_chain_starts_at_its_initial_params(method):
    """With ``warmup_steps=0`` and a small MALA step, each chain's first draw lies near its own
    start (starts 2 apart, moves of ~0.2)."""
    pot, loc, _ = gauss()
    starts = loc + torch.linspace(-3.0, 3.0, 4)[:, None]
    kernel = MALA(potential_fn=pot, step_size=0.01, adapt_step_size=False)
    mcmc = run(kernel, 5, 0, 4, chain_method=method, initial_params={"x": starts})
    first = mcmc.get_samples(group_by_chain=True)["x"][:, 0]
    assert float((first - starts).abs().max()) < 0.7
    assert len(mcmc._diagnostics) == 4


# --------------------------------------------------------------------------------------------
# 10. hook_fn


def test_hook_fn_sees_every_step_of_every_chain():
    pot, _, _ = gauss()
    calls = []

    def hook(kernel, params, stage, i):
        calls.append((kernel, stage, i, params["x"].clone()))

    mcmc = run(MALA(potential_fn=pot), 7, 5, 3, hook_fn=hook)
    assert len(calls) == 12
    assert all(kernel is mcmc.kernel for kernel, *_ in calls)
    assert [c[1] for c in calls] == ["Warmup"] * 5 + ["Sample"] * 7
    assert [c[2] for c in calls] == list(range(5)) + list(range(7))
    assert all(c[3].shape == (3, 3) for c in calls)
    # the positions the hook saw after each sample step are the stored draws
    seen = torch.stack([c[3] for c in calls[5:]], 1)
    assert torch.equal(seen, mcmc.get_samples(group_by_chain=True)["x"])


def test_hook_fn_of_a_sequential_chain_sees_no_chain_dimension():
    """As in Pyro's MCMC: each chain of a sequential run is one chain."""
    pot, _, _ = gauss()
    shapes = []
    run(
        MALA(potential_fn=pot),
        3,
        2,
        2,
        chain_method="sequential",
        hook_fn=lambda kernel, params, stage, i: shapes.append(params["x"].shape),
    )
    assert shapes == [torch.Size([3])] * 10


def test_sequential_pyro_kernel_leaves_no_logger_thread(monkeypatch):
    """Where Pyro would run NUTS's chains in processes, "sequential" replaces its process pool
    and stops the pool's logger thread, and Pyro's note that chains run in turn is not shown."""
    import threading
    import warnings

    monkeypatch.setattr(torch.multiprocessing, "cpu_count", lambda: 8)

    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mcmc = MCMC(
            NUTS(model), 4, 4, num_chains=2, chain_method="sequential", disable_progbar=True
        )
        mcmc.run()
    assert mcmc.get_samples(group_by_chain=True)["a"].shape == (2, 4)
    assert not any(t.name == "logger_thread" or "logger" in t.name for t in threading.enumerate())


# --------------------------------------------------------------------------------------------
# 11. memory: one preallocated tensor of draws, growing per-draw statistics


def test_many_chains_and_draws_in_one_tensor():
    """64 chains x 2000 draws x 20 dims (~20 MB of draws) of a cheap MALA run: the draws are
    one contiguous tensor, exactly that size, which ``get_samples`` views without copying; the
    per-draw statistics are ``(64, 2000)``; ``diagnostics()`` (linear-time ESS) reads them."""
    pot = pyro_ebm.potential_fn(pyro_ebm.GaussianEnergy(torch.zeros(20)))
    kernel = MALA(potential_fn=pot, step_size=0.5, adapt_step_size=False)
    last = {}

    def hook(kernel, params, stage, i):
        if i == 1999:
            last["x"] = params["x"].clone()

    mcmc = run(kernel, 2000, 0, 64, hook_fn=hook)
    x = mcmc.get_samples(group_by_chain=True)["x"]
    assert x.shape == (64, 2000, 20) and x.is_contiguous()
    assert x.untyped_storage().nbytes() == x.numel() * x.element_size()
    assert mcmc.get_samples()["x"].data_ptr() == x.data_ptr()
    assert torch.equal(x[:, -1], last["x"])  # the last draw is the chains' final position
    assert bool(torch.isfinite(x).all())
    assert kernel.stats.num_draws == 2000
    assert all(v.shape == (2000,) for v in kernel.stats.chain(63).values())
    diag = mcmc.diagnostics()
    assert diag["x"]["n_eff"].shape == (20,)
    assert len(diag["divergences"]) == 64


def test_draw_stats_grow_past_their_capacity():
    stats = DrawStats(3, capacity=4)
    for t in range(11):
        value = torch.full((3,), float(t))
        stats.record(MoveInfo(value / 10, value > 5, -value, value == 7), is_global=t % 2 == 0)
    chain = stats.chain(1)
    assert {k: tuple(v.shape) for k, v in chain.items()} == {
        "accept_prob": (11,),
        "accepted": (11,),
        "potential_energy": (11,),
        "is_global": (11,),
        "diverging": (11,),
    }
    assert torch.equal(chain["potential_energy"], -torch.arange(11.0))
    assert chain["accepted"].tolist() == [t > 5 for t in range(11)]
    assert chain["is_global"].tolist() == [t % 2 == 0 for t in range(11)]
    assert stats.diagnostics(2)["divergences"] == [7]


def test_draw_stats_past_1024_draws_in_pyros_mcmc():
    """Pyro's driver does not tell the kernel the number of draws: the statistics start at
    1024 draws and grow; ``to_arviz`` gets one entry per draw."""
    pot, _, _ = gauss()
    kernel = FlowIMH(potential_fn=pot, flow=generic_flow(3), block_size=256)
    mcmc = pyro.infer.MCMC(kernel, 1100, warmup_steps=0, disable_progbar=True)
    mcmc.run()
    stats = mcmc._diagnostics[0]["sample_stats"]
    assert all(v.shape == (1100,) for v in stats.values())
    assert to_arviz(mcmc)["sample_stats"]["accept_prob"].shape == (1, 1100)


# --------------------------------------------------------------------------------------------
# seed validation of the statistical tests: python tests/test_mcmc.py [names] [first last] [--bug]


class _WideMomentum:
    """``torch`` for ``samplers.chees`` with ``randn_like`` 1.5 times too wide (a bug)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def randn_like(t):
        return 1.5 * torch.randn_like(t)


def _bugs() -> dict:
    from pyro_ebm.samplers import chees, flow_moves, local

    no_log_q = (flow_moves, "log_weights", lambda u, log_q: -u)
    return {
        "MALA": (local, "_langevin_log_q", lambda *args: 0.0),
        "FlowISIR": no_log_q,
        "ChEESHMC": (chees, "torch", _WideMomentum()),
        "AdaptiveFlowMCMC": no_log_q,
        "eight_schools": (chees, "torch", _WideMomentum()),
    }


def _validate(names, seeds, bug: bool, shared) -> None:  # pragma: no cover
    for name in names:
        if bug:
            module, attr, fake = _bugs()[name]
            original = getattr(module, attr)
            setattr(module, attr, fake)
        passes, worst, extra, start = 0, [], [], time.perf_counter()
        for seed in seeds:
            if name == "eight_schools":
                mcmc = eight_schools_chees(seed)
                draws = eight_schools_draws(mcmc)
                z = eight_schools_zscores(draws, read_reference_draws(shared))
                r = float(rhat(torch.stack(list(draws.values()), -1)).max())
                extra.append(r)
                ok = r < RHAT_MAX
            else:
                z, ok = gauss_zscores(name, seed), True
            m = max(abs(v) for v in z.values())
            worst.append(m)
            passes += ok and m < z_critical(len(z))
        if bug:
            setattr(module, attr, original)
        seconds = (time.perf_counter() - start) / len(seeds)
        rhats = f" max R-hat per seed {[round(r, 4) for r in extra]}" if extra else ""
        print(
            f"{name:18s} bug={bug} pass {passes}/{len(seeds)} max|z| {max(worst):.2f} (critical "
            f"{z_critical(len(z)):.2f}, per seed {[round(w, 2) for w in worst]}){rhats} "
            f"{seconds:.1f} s/seed",
            flush=True,
        )


if __name__ == "__main__":  # pragma: no cover
    from pathlib import Path

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    argv = sys.argv[1:]
    bug = "--bug" in argv
    names = [a for a in argv if a in _bugs()] or list(_bugs())
    nums = [int(a) for a in argv if a.isdigit()]
    seeds = range(nums[0], nums[1]) if len(nums) == 2 else range(5 if bug else 20)
    shared = Path(__file__).resolve().parents[2] / "shared"
    _validate(names, seeds, bug, shared)


@pytest.mark.parametrize("min_global_accept", [1.0, 0.0])
def test_adaptive_keeps_its_local_moves_when_the_flow_is_poor(min_global_accept, caplog):
    """After warmup AdaptiveFlowMCMC makes ``production_local_steps`` local moves per global
    move, unless the global acceptance at the end of warmup is below ``min_global_accept``:
    then it keeps the warmup's ``num_local_steps`` and says so."""
    pot, _, _ = gauss()
    kernel = AdaptiveFlowMCMC(
        potential_fn=pot,
        num_walkers=8,
        min_global_accept=min_global_accept,
        production_local_steps=1,
    )
    with caplog.at_level("WARNING", logger="pyro_ebm.infer.adaptive"):
        run(kernel, 8, 40, num_chains=8)
    poor = min_global_accept == 1.0
    assert kernel.sampler.num_local_steps == (3 if poor else 1)
    assert ("keeping 3 local moves" in caplog.text) == poor


@pytest.mark.parametrize("khat", [0.3, 0.5, 0.51, 0.9])
def test_adaptive_auto_production_moves_follow_the_flow_check(khat, monkeypatch):
    """``production_local_steps="auto"`` (the default): pure i-SIR moves after warmup when the
    frozen flow's k-hat is at most 0.5, with the fewest particles that move 9 times in 10 by
    the check's importance weights (half of them 0, half 1: a move with N particles leaves
    with probability ``1 - 2^(1 - N)``, so 5); one local move per i-SIR move with all
    ``num_particles`` when it is not (the check made at the end of warmup is set to report
    ``khat``: a real k-hat from 4096 draws has a standard deviation of ~0.1 and would make the
    test depend on the seed)."""
    import pyro_ebm.samplers.adaptive as sampler_module
    from pyro_ebm.metrics import FlowCheck

    lw = torch.cat([torch.zeros(2048), torch.full((2048,), -math.inf)])
    made = FlowCheck(khat, 2048.0, 4096, lw)
    monkeypatch.setattr(sampler_module, "flow_importance_diagnostic", lambda *a, **k: made)
    monkeypatch.setattr(sampler_module, "sharpened", lambda check, *a, **k: check)
    pot, _, _ = gauss()
    kernel = AdaptiveFlowMCMC(potential_fn=pot, num_walkers=16)
    run(kernel, 8, 40, num_chains=8)
    assert kernel.flow_check.khat == khat
    assert kernel.sampler.num_local_steps == (0 if khat <= 0.5 else 1)
    draws = kernel.sampler._proposals.num_per_step  # fresh proposals per chain and step
    assert draws == (4 if khat <= 0.5 else 31)
    with pytest.raises(ValueError, match="production_local_steps"):
        AdaptiveFlowMCMC(potential_fn=pot, production_local_steps="always")


def test_adaptive_chains_continue_from_the_ensemble_when_the_flow_covers_too_little(
    monkeypatch, caplog
):
    """Several chains continue after warmup from importance-resampled draws of the frozen flow
    (``sir_draws``), unless its weights' ESS is below the number of chains: then from the
    warmup ensemble, with a warning."""
    import pyro_ebm.infer.adaptive as adaptive

    pot, _, _ = gauss()
    calls = []

    def no_cover(proposal, potential_fn, num_draws, num_candidates, min_ess, max_rounds):
        calls.append((num_draws, num_candidates, min_ess, max_rounds))
        return torch.zeros(0, 3), 0.5

    monkeypatch.setattr(adaptive, "sir_draws", no_cover)
    kernel = AdaptiveFlowMCMC(potential_fn=pot, num_walkers=8, num_particles=4)
    with caplog.at_level("WARNING", logger="pyro_ebm.infer.adaptive"):
        mcmc = run(kernel, 4, 12, num_chains=6)
    assert calls == [(6, 24, 24, 16)]
    assert "effective sample size of 0.5 for 6 chains" in caplog.text
    assert torch.isfinite(mcmc.get_samples()["x"]).all()
