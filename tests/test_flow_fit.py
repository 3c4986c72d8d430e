"""The flow a kernel fits itself (``flow=None``, :func:`pyro_ebm.samplers.fit_flow`).

- ``fit_flow``'s stages: the Laplace Gaussian alone on a badly scaled, correlated Gaussian (the
  case the old recipe underfit: sd 1e-3 beside sd 10, correlation 0.99); reverse KL and coupling
  layers on a banana, whose Laplace Gaussian is poor; a clear error without a finite start.
- Every flow kernel with ``flow=None`` samples the banana correctly (means and covariances within
  Monte Carlo error), fits once per run (Pyro's sequential chains share the fit), keeps a given
  flow as it is, and ``ChEESHMC(flow=False)`` runs without a flow.
- On the centred eight schools (a funnel) the fitted flow's k-hat is above the non-centred
  model's.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import MCMC as PyroMCMC
from test_flow_check import eight_schools_centered
from test_kernels import moment_series, z_critical, zscores

from pyro_ebm.datasets import EIGHT_SCHOOLS_DATA, eight_schools_noncentered
from pyro_ebm.flows import AffineFlow
from pyro_ebm.infer import MCMC, ChEESHMC, FlowHMC, FlowIMH, FlowISIR, FlowNUTS
from pyro_ebm.samplers import fit_flow, flow_fit

# a badly scaled, strongly correlated Gaussian
SCALES = torch.tensor([1e-3, 1.0, 10.0, 0.1])
CORR = 0.99 * torch.ones(4, 4) + 0.01 * torch.eye(4)
MEAN = torch.tensor([1.0, -2.0, 3.0, 0.5])


def gaussian():
    cov = SCALES[:, None] * CORR * SCALES[None, :]
    precision = torch.linalg.inv(cov.double())

    def potential(x):
        d = x - MEAN.to(x)
        return 0.5 * (d @ precision.to(x) * d).sum(-1)

    return potential, MEAN.double(), cov.double()


#: the banana: x0 ~ N(0, 1), x1 | x0 ~ N(B x0^2, S^2), x2 ~ N(0, 1) independent
B, S = 0.6, 0.4
BANANA_MEAN = torch.tensor([0.0, B, 0.0])
BANANA_COV = torch.diag(torch.tensor([1.0, 2 * B**2 + S**2, 1.0]))


def banana(x):
    return 0.5 * (x[..., 0] ** 2 + ((x[..., 1] - B * x[..., 0] ** 2) / S) ** 2 + x[..., 2] ** 2)


def banana_potential_fn(params):
    return banana(params["x"])


def test_the_laplace_gaussian_fits_a_badly_scaled_correlated_gaussian():
    potential, mean, cov = gaussian()
    fit = fit_flow(potential, 4 * torch.rand(8, 4) - 2)
    assert fit.stages == ("laplace",) and fit.steps == 0
    assert fit.khat < 0.5 and fit.ess > 0.9 * fit.num_draws
    scale_tril = fit.flow.scale_tril
    fitted_cov = scale_tril @ scale_tril.T
    assert torch.allclose(fit.flow.loc, mean, atol=1e-6, rtol=1e-6)
    assert torch.allclose(fitted_cov, cov, rtol=1e-4, atol=1e-12)
    assert not any(p.requires_grad for p in fit.flow.parameters())  # frozen


def test_a_banana_gets_reverse_kl_and_coupling_layers():
    torch.manual_seed(0)
    fit = fit_flow(banana, 4 * torch.rand(8, 3) - 2)
    assert fit.stages[-2:] == ("affine", "coupling"), fit
    assert 0 < fit.steps <= 2 * flow_fit.MAX_STEPS
    assert fit.khat < 0.7 and fit.ess > 0.9 * fit.num_draws, fit  # seeds 0-9: 0.25-0.51
    # the fit's k-hat beats the Laplace Gaussian's (the mode is at the origin, curvature 1/S^2)
    laplace = AffineFlow(3).double()
    flow_fit._set_affine(laplace, torch.zeros(3), torch.diag(torch.tensor([1.0, S, 1.0])))
    from pyro_ebm.metrics import MAX_CHECK_DRAWS, flow_importance_diagnostic

    laplace_check = flow_importance_diagnostic(laplace, banana, max_draws=MAX_CHECK_DRAWS)
    assert laplace_check.khat > 0.7 > fit.khat


def test_fit_flow_needs_a_finite_start():
    with pytest.raises(ValueError, match="finite potential"):
        fit_flow(lambda x: torch.full(x.shape[:1], math.inf), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="init"):
        fit_flow(banana, torch.zeros(3))


SEED = 0  # the seed of the sampling tests

KERNELS = {
    "FlowIMH": (lambda: FlowIMH(potential_fn=banana_potential_fn), 4, 100),
    "FlowISIR": (lambda: FlowISIR(potential_fn=banana_potential_fn), 4, 100),
    "ChEESHMC": (lambda: ChEESHMC(potential_fn=banana_potential_fn), 8, 300),
    "FlowHMC": (lambda: FlowHMC(potential_fn=banana_potential_fn), 1, 400),
    "FlowNUTS": (lambda: FlowNUTS(potential_fn=banana_potential_fn), 1, 400),
}


@pytest.mark.parametrize("name", list(KERNELS))
def test_flow_kernels_fit_their_own_flow_and_sample_the_banana(name):
    """Means and covariances of the banana within Monte Carlo error (seeds 0-3 pass; FlowHMC and
    FlowNUTS warm up 400 steps: with 200, one chain's fit budget, 51,200 rows, left a flow on
    which FlowNUTS missed by z = 3.6 on seed 1)."""
    factory, chains, warmup = KERNELS[name]
    pyro.set_rng_seed(SEED)
    kernel = factory()
    init = {"x": torch.zeros(chains, 3)} if chains > 1 else {"x": torch.zeros(3)}
    if chains > 1:
        mcmc = MCMC(
            kernel, 1000, warmup, num_chains=chains, initial_params=init, disable_progbar=True
        )
    else:
        mcmc = PyroMCMC(kernel, 1000, warmup, initial_params=init, disable_progbar=True)
    mcmc.run()
    assert kernel.flow is None and kernel.flow_fit is not None
    assert kernel.flow_ is kernel.flow_fit.flow
    xs = mcmc.get_samples(group_by_chain=True)["x"]
    if xs.dim() == 2:
        xs = xs[None]
    z = zscores(moment_series(xs, BANANA_MEAN.double(), BANANA_COV.double()))
    crit = z_critical(len(z))
    assert all(abs(v) < crit for v in z.values()), z


def test_sequential_chains_share_one_fit_and_a_given_flow_is_used_as_is(monkeypatch):
    calls = []
    real = flow_fit.fit_flow

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    import pyro_ebm.infer.base as base

    monkeypatch.setattr(base, "fit_flow", counting)
    kernel = FlowIMH(potential_fn=banana_potential_fn)
    mcmc = PyroMCMC(
        kernel, 20, 10, num_chains=2, initial_params={"x": torch.zeros(2, 3)}, disable_progbar=True
    )
    mcmc.run()
    assert len(calls) == 1
    flow = AffineFlow(3).double()
    given = FlowIMH(potential_fn=banana_potential_fn, flow=flow)
    MCMC(
        given, 5, 5, num_chains=2, initial_params={"x": torch.zeros(2, 3)}, disable_progbar=True
    ).run()
    assert len(calls) == 1 and given.flow_fit is None and given._flow is flow


def test_chees_without_a_flow():
    kernel = ChEESHMC(potential_fn=banana_potential_fn, flow=False)
    mcmc = MCMC(
        kernel, 10, 10, num_chains=4, initial_params={"x": torch.zeros(4, 3)}, disable_progbar=True
    )
    mcmc.run()
    assert kernel.flow_fit is None and kernel._flow is None
    assert "flow k-hat" not in mcmc.diagnostics()
    with pytest.raises(TypeError, match="flow"):
        ChEESHMC(potential_fn=banana_potential_fn, flow="affine")


def test_the_fitted_flow_is_worse_on_the_centred_eight_schools_than_non_centred():
    """A funnel: reverse KL cannot follow it. The fitted flow's k-hat (its final check, refined
    to up to 32768 draws near 0.7) on the centred eight schools is above the non-centred one's
    on average over seeds 0-3 (0.70 against 0.57). Per seed it is not a test: seeds 0-7 gave
    0.49-0.82 centred (above 0.7 on four) and 0.33-0.65 non-centred, the centred above on seven
    of eight. From 4096 draws alone (before) they had looked separated on every seed
    (0.55-0.73 against 0.36-0.56), with the warning on one: the estimate from 4096 draws runs
    low and varies by about 0.1."""
    khat = {"centred": [], "non-centred": []}
    for seed in range(4):
        for name, model in (
            ("centred", eight_schools_centered),
            ("non-centred", eight_schools_noncentered),
        ):
            pyro.set_rng_seed(seed)
            kernel = FlowIMH(model)
            MCMC(kernel, 10, 10, num_chains=2, disable_progbar=True).run(
                *EIGHT_SCHOOLS_DATA.values()
            )
            khat[name].append(kernel.flow_fit.khat)
            assert kernel.diagnostics(0)["flow k-hat"] == khat[name][-1]
    assert sum(khat["centred"]) > sum(khat["non-centred"]), khat


def test_the_khat_advice_names_the_fit_and_the_kernels_own_remedy():
    """A fitted flow's warning says it was fitted by reverse KL; a given flow's says to give a
    better one; both carry the kernel's own remedy (FlowIMH: a defensive component)."""
    fitted = FlowIMH(potential_fn=banana_potential_fn)._flow_khat_advice_for(True)
    given = FlowIMH(potential_fn=banana_potential_fn)._flow_khat_advice_for(False)
    assert "fitted by reverse KL" in fitted and "non-centre the model" in fitted
    assert "give a better flow" in given and "non-centre the model" in given
    assert all("defensive=0.05" in advice for advice in (fitted, given))
    assert "flow=False" in ChEESHMC(potential_fn=banana_potential_fn)._flow_khat_advice_for(True)
