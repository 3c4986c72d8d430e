r"""pyro_ebm flows inside Pyro, and trained Pyro autoguides inside the pyro_ebm kernels.

- A flow's :attr:`~pyro_ebm.flows.Flow.transform` is a Pyro ``TransformModule``: it trains by
  SVI in ``AutoNormalizingFlow`` and serves ``NeuTraReparam``.
- Every flow kernel takes a trained ``AutoContinuous`` guide as ``flow=``
  (:class:`~pyro_ebm.flows.GuideFlow`).

Posterior checks use the Monte Carlo tolerances of :mod:`test_posteriors` (``|z| < 4`` per mean
and sd, from the ESS of the draws and of posteriordb's reference draws).
"""

from __future__ import annotations

import copy
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)
from pyro.infer.autoguide.initialization import init_to_value
from pyro.infer.reparam import NeuTraReparam
from test_posteriors import (
    EIGHT_SCHOOLS_ARGS,
    EIGHT_SCHOOLS_REF,
    GAUSS_MIX_REF,
    check_moments,
    eight_schools_draws,
    gauss_mix_draws,
    load_gauss_mix_data,
    run_mcmc,
)

from pyro_ebm.datasets import eight_schools_noncentered, low_dim_gauss_mix
from pyro_ebm.flows import AffineFlow, FlowTransform, GuideFlow, RealNVP, as_flow
from pyro_ebm.infer import (
    MALA,
    AdaptiveFlowMCMC,
    ChEESHMC,
    FlowHMC,
    FlowIMH,
    FlowISIR,
    FlowNUTS,
)
from pyro_ebm.samplers import AdaptiveFlowSampler


def fit_guide(model, args, make_transform, num_steps: int, lr: float = 5e-3, seed: int = 0):
    """An ``AutoNormalizingFlow`` guide fitted by SVI (16 vectorized particles per step)."""
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    guide = AutoNormalizingFlow(model, make_transform)
    elbo = Trace_ELBO(num_particles=16, vectorize_particles=True)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": lr}), elbo)
    for _ in range(num_steps):
        svi.step(*args)
    return guide


def eight_schools_guide(seed: int = 0) -> AutoNormalizingFlow:
    return fit_guide(
        eight_schools_noncentered,
        EIGHT_SCHOOLS_ARGS,
        lambda dim: RealNVP(dim, num_layers=4, hidden=(32, 32)).transform,
        num_steps=800,
        seed=seed,
    )


def moments_of(samples: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Eight-schools draws named as in posteriordb, from one chain's ``{site: draws}``."""

    class _One:
        def get_samples(self, group_by_chain=False):
            return {k: v[None] for k, v in samples.items()}

    return eight_schools_draws(_One())


@pytest.fixture(scope="module")
def guide() -> AutoNormalizingFlow:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return eight_schools_guide(0)
    finally:
        torch.set_default_dtype(old)


# -- the transform is a TransformModule ---------------------------------------------------------
def test_flow_transform_is_a_transform_module_whose_parameters_register():
    flow = RealNVP(3, num_layers=2, hidden=(8,))
    t = flow.transform
    assert isinstance(t, pyro.distributions.TransformModule)
    assert isinstance(t, FlowTransform) and t.flow is flow
    assert {id(p) for p in t.parameters()} == {id(p) for p in flow.parameters()}
    z = torch.randn(5, 3)
    x = t(z)
    assert torch.allclose(t.inv(x), z, atol=1e-10)
    assert torch.allclose(t.log_abs_det_jacobian(z, x), flow.forward(z)[1])


def test_svi_trains_a_pyro_ebm_flow_in_auto_normalizing_flow():
    """SVI moves the flow's weights (they are in Pyro's parameter store), lowers the loss and
    fits the posterior N((3, -1), 0.5^2 I)."""

    def model():
        pyro.sample("x", dist.Normal(torch.tensor([3.0, -1.0]), 0.5).to_event(1))

    guide = AutoNormalizingFlow(
        model, lambda dim: RealNVP(dim, num_layers=2, hidden=(8,)).transform
    )
    optim = pyro.optim.ClippedAdam({"lr": 2e-2, "lrd": 0.995})
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=8))
    first = svi.step()
    flow = guide.transform.flow
    before = [p.detach().clone() for p in flow.parameters()]
    names = set(pyro.get_param_store().keys())
    assert any(n.startswith("AutoNormalizingFlow.transform$$$flow.layers") for n in names), names
    losses = [svi.step() for _ in range(600)]
    assert any(not torch.equal(b, p) for b, p in zip(before, flow.parameters(), strict=True))
    assert sum(losses[-50:]) / 50 < first - 5.0
    x = guide.get_posterior().sample((4000,))
    # seeds 0-5: mean errors up to 0.084, sd errors up to 0.053 (the optimizer's noise)
    assert torch.allclose(x.mean(0), torch.tensor([3.0, -1.0]), atol=0.15)
    assert torch.allclose(x.std(0), torch.tensor([0.5, 0.5]), atol=0.1)


def test_neutra_reparam_with_a_pyro_ebm_flow_guide_samples_eight_schools(guide):
    """Pyro's own NeuTraReparam + NUTS in the latent space of a pyro_ebm RealNVP trained by SVI
    (~25 s): posteriordb's eight-schools moments within Monte Carlo error."""
    neutra = NeuTraReparam(guide.requires_grad_(False))
    model = pyro.poutine.reparam(eight_schools_noncentered, config=lambda _: neutra)
    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(model), num_samples=600, warmup_steps=150, disable_progbar=True)
    mcmc.run(*EIGHT_SCHOOLS_ARGS)
    (latent,) = mcmc.get_samples().values()
    check_moments(moments_of(neutra.transform_sample(latent)), EIGHT_SCHOOLS_REF)


# -- the kernels take a trained guide -----------------------------------------------------------
@pytest.mark.parametrize("kernel", [FlowISIR, FlowIMH])
def test_flow_kernels_sample_eight_schools_with_a_trained_guide(guide, kernel):
    """The guide's flow as the proposal of i-SIR / IMH: posteriordb's moments within Monte Carlo
    error. An injected bug, the guide's log-determinant dropped from its densities, fails
    (:func:`test_guide_check_catches_a_dropped_log_det`)."""
    mcmc, _ = run_mcmc(kernel(eight_schools_noncentered, flow=guide), 50, 2000, *EIGHT_SCHOOLS_ARGS)
    check_moments(eight_schools_draws(mcmc), EIGHT_SCHOOLS_REF)


def test_flow_nuts_samples_eight_schools_with_a_trained_guide(guide):
    mcmc, _ = run_mcmc(
        FlowNUTS(eight_schools_noncentered, flow=guide), 100, 400, *EIGHT_SCHOOLS_ARGS
    )
    check_moments(eight_schools_draws(mcmc), EIGHT_SCHOOLS_REF)


def test_guide_check_catches_a_dropped_log_det(guide, monkeypatch):
    """With the log-determinant of the guide's transform dropped, i-SIR's weights are wrong and
    the moment check fails."""
    monkeypatch.setattr(GuideFlow, "_ladj", staticmethod(lambda t, z, x: z.new_zeros(z.shape[:-1])))
    mcmc, _ = run_mcmc(
        FlowISIR(eight_schools_noncentered, flow=guide), 50, 2000, *EIGHT_SCHOOLS_ARGS
    )
    with pytest.raises(AssertionError, match=r"\|z\|"):
        check_moments(eight_schools_draws(mcmc), EIGHT_SCHOOLS_REF)


@pytest.mark.parametrize(
    "kernel", [FlowISIR, FlowIMH, FlowHMC, FlowNUTS, AdaptiveFlowMCMC, ChEESHMC]
)
def test_every_flow_kernel_takes_a_multivariate_normal_guide(kernel):
    def model():
        pyro.sample("s", dist.LogNormal(0.0, 0.3))
        pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    guide = AutoMultivariateNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(200):
        svi.step()
    k = kernel(model, flow=guide)
    assert isinstance(k.flow, GuideFlow) and k.flow.guide is guide
    mcmc = MCMC(k, num_samples=300, warmup_steps=100, disable_progbar=True)
    mcmc.run()
    s = mcmc.get_samples()
    assert s["x"].shape == (300, 2) and bool((s["s"] > 0).all())
    assert abs(float(s["s"].log().mean())) < 0.2


@pytest.mark.slow
def test_flow_nuts_with_a_guide_on_posteriordb_gauss_mix(shared_dir):
    """SVI with a RealNVP in ``AutoNormalizingFlow`` on posteriordb's ``low_dim_gauss_mix``
    (~20 s), then FlowNUTS with that guide (~20 s): moments within Monte Carlo error of the
    reference draws in ``../shared``. Seed 0: max |z| 1.1, min ESS 585."""
    y = load_gauss_mix_data(shared_dir)
    guide = fit_guide(
        low_dim_gauss_mix,
        (y,),
        lambda dim: RealNVP(dim, num_layers=4, hidden=(32, 32)).transform,
        num_steps=1500,
    )
    mcmc, _ = run_mcmc(FlowNUTS(low_dim_gauss_mix, flow=guide), 100, 1000, y)
    check_moments(gauss_mix_draws(mcmc), GAUSS_MIX_REF)


# -- GuideFlow ----------------------------------------------------------------------------------
def _model():
    pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))


@pytest.mark.parametrize(
    "make",
    [
        AutoDiagonalNormal,
        AutoMultivariateNormal,
        lambda m: AutoIAFNormal(m, num_transforms=2),
        lambda m: AutoNormalizingFlow(m, lambda d: AffineFlow(d).transform),
    ],
)
def test_guide_flow_densities_match_the_guide(make):
    guide = make(_model)
    guide()
    flow = GuideFlow(guide)
    assert flow.dim == 3 and flow.site_shapes == {"scale": (), "x": (2,)}
    x, log_q = flow.sample_and_log_prob(50)
    assert torch.allclose(log_q, flow.log_prob(x), atol=1e-6)
    assert torch.allclose(log_q, guide.get_posterior().log_prob(x), atol=1e-6)
    z, ladj = flow.inverse(x)
    x2, ladj2 = flow.forward(z)
    assert torch.allclose(x2, x, atol=1e-6) and torch.allclose(ladj, -ladj2, atol=1e-6)


def test_guide_flow_errors_name_what_is_wrong():
    with pytest.raises(TypeError, match="AutoContinuous"):
        GuideFlow(AutoNormal(_model))
    with pytest.raises(ValueError, match="has not run yet"):
        GuideFlow(AutoMultivariateNormal(_model))
    assert as_flow(None) is None


def test_a_guide_of_another_model_is_refused():
    def other():
        pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("scale", dist.LogNormal(0.0, 1.0))

    guide = AutoMultivariateNormal(other)
    guide()
    mcmc = MCMC(FlowISIR(_model, flow=guide), num_samples=5, warmup_steps=0, disable_progbar=True)
    with pytest.raises(ValueError, match="the model's latent sites"):
        mcmc.run()


def _seed_sweep(num_seeds: int) -> None:  # pragma: no cover - a validation run, not a test
    """``python tests/test_pyro_bridge.py N``: the eight-schools bridge checks on seeds 0..N-1
    (a guide fitted per seed): max |z| and min ESS of FlowISIR, FlowIMH, FlowNUTS, NeuTraReparam
    with Pyro's NUTS, and of FlowISIR with the guide's log-determinant dropped (an injected bug,
    which must fail)."""
    from test_posteriors import moment_zscores

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)

    def worst(draws):
        z = moment_zscores(draws, EIGHT_SCHOOLS_REF)
        return max(max(abs(a), abs(b)) for a, b, _ in z.values()), min(e for *_, e in z.values())

    for seed in range(num_seeds):
        guide = eight_schools_guide(seed)
        row = {}
        for kernel, warmup, draws in (
            (FlowISIR, 50, 2000),
            (FlowIMH, 50, 2000),
            (FlowNUTS, 100, 400),
        ):
            mcmc, _ = run_mcmc(
                kernel(eight_schools_noncentered, flow=guide), warmup, draws, *EIGHT_SCHOOLS_ARGS,
                seed=seed,
            )  # fmt: skip
            row[kernel.__name__] = worst(eight_schools_draws(mcmc))
        original = GuideFlow.__dict__["_ladj"]
        GuideFlow._ladj = staticmethod(lambda t, z, x: z.new_zeros(z.shape[:-1]))
        try:
            mcmc, _ = run_mcmc(
                FlowISIR(eight_schools_noncentered, flow=guide), 50, 2000, *EIGHT_SCHOOLS_ARGS,
                seed=seed,
            )  # fmt: skip
            row["FlowISIR, log-det dropped"] = worst(eight_schools_draws(mcmc))
        finally:
            GuideFlow._ladj = original
        neutra = NeuTraReparam(guide.requires_grad_(False))
        model = pyro.poutine.reparam(eight_schools_noncentered, config=lambda _, n=neutra: n)
        pyro.set_rng_seed(seed)
        mcmc = MCMC(NUTS(model), num_samples=600, warmup_steps=150, disable_progbar=True)
        mcmc.run(*EIGHT_SCHOOLS_ARGS)
        (latent,) = mcmc.get_samples().values()
        row["NeuTraReparam + NUTS"] = worst(moments_of(neutra.transform_sample(latent)))
        print(seed, {k: f"|z| {z:.2f}, ESS {e:.0f}" for k, (z, e) in row.items()}, flush=True)


if __name__ == "__main__":  # pragma: no cover
    import sys

    _seed_sweep(int(sys.argv[1]) if len(sys.argv) > 1 else 6)


# -- a given flow: where the chains start, and what training may do to it ------------------------
def _narrow_flow(dim: int, loc: float = 3.0, scale: float = 0.01) -> AffineFlow:
    flow = AffineFlow(dim)
    with torch.no_grad():
        flow.layers[-1].loc.fill_(loc)
        flow.layers[-1].log_diag.fill_(math.log(scale))
    return flow


def test_chees_starts_from_draws_of_a_given_flow():
    """With a given flow and no start, ChEESHMC's chains start at draws of the flow's base: a
    uniform start mapped back through a narrow flow lands hundreds of units out in its latent
    space, where the chains stayed (a new user's hierarchical model: R-hat 4.4, no warning)."""

    def model():
        pyro.sample("x", dist.Normal(3.0 * torch.ones(2), 0.01).to_event(1))

    kernel = ChEESHMC(model, flow=_narrow_flow(2))
    kernel.setup_chains(8, warmup_steps=10)
    z = kernel._state.x  # the chains' latent positions
    assert float(z.abs().max()) < 6.0, z
    # a start the user asks for is kept
    kernel = ChEESHMC(
        model, flow=_narrow_flow(2), init_strategy=init_to_value(values={"x": 3 + torch.zeros(2)})
    )
    kernel.setup_chains(2, warmup_steps=10)
    assert torch.allclose(kernel._state.x, torch.zeros(2, 2), atol=1e-6)


def test_training_never_leaves_a_given_unstandardized_flow_worse():
    """AdaptiveFlowSampler with a given flow that is not standardized (what AdaptiveFlowMCMC
    does with a Pyro guide): a flow that is the target, trained at a rate that ruins it, is
    restored at freeze (a guide's k-hat went from 0.52 to 2.69 before)."""
    target = _narrow_flow(2, loc=1.0, scale=0.5)
    flow = copy.deepcopy(target)
    sampler = AdaptiveFlowSampler(lambda x: -target.log_prob(x), flow, standardize=False,
                                  flow_lr=1.0, num_local_steps=1)  # fmt: skip
    given = copy.deepcopy(flow.state_dict())
    sampler.run(1.0 + 0.5 * torch.randn(32, 2), num_adapt_steps=30, num_samples=2)
    assert sampler.kept_flow_start
    for k, v in sampler.flow.state_dict().items():
        assert torch.equal(v, given[k]), k


def test_kernel_options_are_checked_by_name():
    pot = lambda p: (p["x"] ** 2).sum()  # noqa: E731
    with pytest.raises(
        TypeError, match=r"FlowNUTS.__init__\(\) got an unexpected keyword argument 'bogus'"
    ):
        FlowNUTS(potential_fn=pot, bogus=1)
    # Pyro's options that these kernels do not take say why (found by a walkthrough)
    with pytest.raises(TypeError, match="FlowHMC does not take Pyro's 'transforms' option"):
        FlowHMC(potential_fn=pot, transforms={})
    with pytest.raises(TypeError, match="'use_multinomial_sampling' option: NUTS here always"):
        FlowNUTS(potential_fn=pot, use_multinomial_sampling=False)
    # every kernel says why it lacks one of Pyro's options (a helper's probe found bare errors)
    for kernel, option, reason in (
        (FlowIMH, "target_accept_prob", "no step size"),
        (FlowISIR, "full_mass", "no mass matrix"),
        (FlowISIR, "jit_compile", "need no gradient"),
        (MALA, "num_steps", "one gradient step"),
        (ChEESHMC, "num_steps", "ChEES sets the leapfrog steps"),
        (FlowNUTS, "trajectory_length", "doubling"),
        (AdaptiveFlowMCMC, "full_mass", "standardize="),
        (AdaptiveFlowMCMC, "transforms", "from the model"),
    ):
        with pytest.raises(TypeError, match=f"{kernel.__name__} does not take Pyro's '{option}'"):
            kernel(potential_fn=pot, **{option: 1})
        with pytest.raises(TypeError, match=reason):
            kernel(potential_fn=pot, **{option: 1})
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        FlowIMH(potential_fn=pot, block_size=0)
    for kernel in (FlowIMH, FlowISIR, AdaptiveFlowMCMC):  # when built, not after a flow fit
        with pytest.raises(TypeError, match="flow must offer sample_and_log_prob.*got int"):
            kernel(potential_fn=pot, flow=42)
    # before a run, the configured step size and steps (as Pyro's kernels report them)
    kernel = FlowHMC(potential_fn=pot, step_size=0.5, trajectory_length=2.0)
    assert (kernel.step_size, kernel.num_steps) == (0.5, 4)
    with pytest.raises(TypeError, match="AdaptiveFlowMCMC got an unexpected keyword argument"):
        AdaptiveFlowMCMC(potential_fn=pot, bogus=1)
    with pytest.raises(TypeError, match="init_strategy must be a Pyro init strategy"):
        FlowISIR(potential_fn=pot, init_strategy="median")
    with pytest.raises(TypeError, match="potential_fn must be callable"):
        FlowISIR(potential_fn="x")
    with pytest.raises(TypeError, match="full_mass must be a bool"):
        FlowNUTS(potential_fn=pot, full_mass="yes")
