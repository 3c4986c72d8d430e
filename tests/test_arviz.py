"""Tests of :func:`pyro_ebm.infer.to_arviz`.

Each test runs once per installed backend: ``"arviz"`` (ArviZ 0.x, ``InferenceData``) and
``"arviz_base"`` (the refactored ArviZ, ``xarray.DataTree``; install ``arviz-base`` and
``arviz-stats[xarray]``); a backend that is not installed is skipped. Chains always run
sequentially (Pyro would start worker processes on machines with many cores).
"""

import importlib.util
import sys

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.infer.mcmc.api as mcmc_api
import pytest
import torch
import xarray as xr
from pyro.infer import MCMC, NUTS

import pyro_ebm
from pyro_ebm.flows import RealNVP
from pyro_ebm.infer import MALA, FlowISIR, to_arviz


def _arviz_major() -> int | None:
    if importlib.util.find_spec("arviz") is None:
        return None
    import arviz

    return int(arviz.__version__.split(".")[0])


AZ_LEGACY = _arviz_major() == 0
HAS_ARVIZ_BASE = importlib.util.find_spec("arviz_base") is not None
BACKENDS = [
    pytest.param("arviz", marks=pytest.mark.skipif(not AZ_LEGACY, reason="needs arviz 0.x")),
    pytest.param(
        "arviz_base", marks=pytest.mark.skipif(not HAS_ARVIZ_BASE, reason="needs arviz-base")
    ),
]
STATS = ["accept_prob", "accepted", "potential_energy", "lp", "is_global", "diverging"]

pytestmark = pytest.mark.filterwarnings("ignore:num_chains=.*:UserWarning")


@pytest.fixture(autouse=True)
def _sequential_chains(monkeypatch):
    monkeypatch.setattr(mcmc_api.mp, "cpu_count", lambda: 1)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _gaussian():
    return pyro_ebm.potential_fn(pyro_ebm.GaussianEnergy(torch.zeros(2)))


def walled_potential(params):
    """Standard normal inside the box ``|x_i| <= 1.5``, infinite outside: moves leaving the box
    have a non-finite potential (a divergence)."""
    x = params["x"]
    outside = (x.abs() > 1.5).any()
    return 0.5 * (x**2).sum() + torch.where(outside, torch.tensor(float("inf")), torch.tensor(0.0))


def scale_model(y):
    scale = pyro.sample("scale", dist.HalfNormal(2.0))
    loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(loc, scale), obs=y)


def _run(kernel, num_chains=1, num_samples=40, warmup_steps=20, x0=None, args=()):
    initial = None if x0 is None else {"x": x0}
    mcmc = MCMC(
        kernel,
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        num_chains=num_chains,
        initial_params=initial,
        disable_progbar=True,
    )
    mcmc.run(*args)
    return mcmc


def _group(data, name: str) -> xr.Dataset:
    """A group as a Dataset, from an InferenceData or a DataTree."""
    group = data[name]
    return group if isinstance(group, xr.Dataset) else group.to_dataset()


def _check_output_type(data, backend):
    if backend == "arviz" and AZ_LEGACY:
        import arviz as az

        assert isinstance(data, az.InferenceData)
    else:
        assert isinstance(data, xr.DataTree)


def _check_stats(stats: xr.Dataset, num_chains: int, num_draws: int):
    assert set(STATS) <= set(stats.data_vars)
    for name in STATS:
        assert stats[name].dims == ("chain", "draw")
        assert stats[name].shape == (num_chains, num_draws)
    for name in ("accepted", "is_global", "diverging"):
        assert stats[name].dtype == bool
    for name in ("accept_prob", "potential_energy", "lp"):
        assert stats[name].dtype == np.float64
    np.testing.assert_array_equal(stats["lp"].values, -stats["potential_energy"].values)
    prob = stats["accept_prob"].values
    assert np.all((prob >= 0) & (prob <= 1))


# -- our kernels ------------------------------------------------------------------------------
@pytest.mark.parametrize("num_chains", [1, 4])
def test_mala(backend, num_chains):
    x0 = torch.randn(num_chains, 2) if num_chains > 1 else torch.randn(2)
    mcmc = _run(MALA(potential_fn=_gaussian()), num_chains, x0=x0)
    data = to_arviz(mcmc, backend=backend)
    _check_output_type(data, backend)
    post = _group(data, "posterior")
    assert post["x"].dims == ("chain", "draw", "x_dim_0")
    expected = mcmc.get_samples(group_by_chain=True)["x"].numpy()
    np.testing.assert_array_equal(post["x"].values, expected)
    stats = _group(data, "sample_stats")
    _check_stats(stats, num_chains, 40)
    assert not stats["is_global"].values.any()  # MALA only makes local moves
    # the recorded potential is that of the draw
    x = post["x"].values
    np.testing.assert_allclose(stats["lp"].values, -0.5 * (x**2).sum(-1), rtol=1e-10)
    assert post.attrs["sampler"] == "MALA"
    assert post.attrs["inference_library"] == "pyro"


@pytest.mark.parametrize("num_chains", [1, 4])
def test_flow_isir(backend, num_chains):
    x0 = torch.randn(num_chains, 2) if num_chains > 1 else torch.randn(2)
    kernel = FlowISIR(potential_fn=_gaussian(), flow=RealNVP(2))
    data = to_arviz(_run(kernel, num_chains, x0=x0), backend=backend)
    stats = _group(data, "sample_stats")
    _check_stats(stats, num_chains, 40)
    assert stats["is_global"].values.all()
    assert _group(data, "posterior").attrs["sampler"] == "FlowISIR"


def test_model_constrained_sites_and_data(backend):
    y = torch.tensor([0.3, -1.2, 2.0, 0.8, 1.1])
    mcmc = _run(MALA(model=scale_model), num_chains=2, num_samples=30, warmup_steps=20, args=(y,))
    data = to_arviz(
        mcmc,
        observed_data={"obs": y},
        constant_data={"t": torch.arange(5.0)},
        dims={"obs": ["obs_id"], "t": ["obs_id"]},
        backend=backend,
    )
    post = _group(data, "posterior")
    assert set(post.data_vars) == {"scale", "loc"}
    assert post["scale"].dims == ("chain", "draw")  # scalar sites: no extra dims
    assert (post["scale"].values > 0).all()  # constrained values, not log(scale)
    samples = mcmc.get_samples(group_by_chain=True)
    np.testing.assert_array_equal(post["scale"].values, samples["scale"].numpy())
    obs = _group(data, "observed_data")
    assert obs["obs"].dims == ("obs_id",)
    np.testing.assert_array_equal(obs["obs"].values, y.numpy())
    np.testing.assert_array_equal(_group(data, "constant_data")["t"].values, np.arange(5.0))
    _check_stats(_group(data, "sample_stats"), 2, 30)


def test_coords_and_dims(backend):
    mcmc = _run(MALA(potential_fn=_gaussian()), x0=torch.zeros(2), num_samples=20)
    data = to_arviz(mcmc, coords={"axis": ["a", "b"]}, dims={"x": ["axis"]}, backend=backend)
    x = _group(data, "posterior")["x"]
    assert x.dims == ("chain", "draw", "axis")
    assert list(x["axis"].values) == ["a", "b"]


# -- divergences ------------------------------------------------------------------------------
def test_pyro_nuts_divergences(backend):
    kernel = NUTS(potential_fn=walled_potential, step_size=0.5, adapt_step_size=False)
    mcmc = _run(kernel, num_chains=2, num_samples=40, warmup_steps=5, x0=torch.zeros(2, 2))
    data = to_arviz(mcmc, backend=backend)
    stats = _group(data, "sample_stats")
    assert list(stats.data_vars) == ["diverging"]  # Pyro's NUTS reports nothing else
    diverging = stats["diverging"].values
    assert diverging.shape == (2, 40) and diverging.dtype == bool
    for chain in range(2):
        divergences = mcmc._diagnostics[chain]["divergences"]
        assert 0 < len(divergences) < 40
        np.testing.assert_array_equal(np.flatnonzero(diverging[chain]), divergences)


def test_our_divergences(backend):
    kernel = MALA(potential_fn=walled_potential, step_size=0.5, adapt_step_size=False)
    mcmc = _run(kernel, num_samples=40, warmup_steps=5, x0=torch.zeros(2))
    stats = _group(to_arviz(mcmc, backend=backend), "sample_stats")
    diverging = stats["diverging"].values[0]
    divergences = mcmc._diagnostics[0]["divergences"]
    assert 0 < len(divergences) < 40
    np.testing.assert_array_equal(np.flatnonzero(diverging), divergences)
    assert not stats["accepted"].values[0][diverging].any()  # a divergent proposal is rejected
    assert np.isfinite(stats["lp"].values).all()  # lp is that of the (kept) state


# -- chain order ------------------------------------------------------------------------------
def test_twelve_chains_stay_in_order(backend):
    # tiny fixed steps: each chain stays at its own start, far from the others
    starts = torch.stack([torch.arange(12.0), -torch.arange(12.0)], dim=-1) * 10.0
    kernel = MALA(potential_fn=_gaussian(), step_size=1e-6, adapt_step_size=False)
    mcmc = _run(kernel, num_chains=12, num_samples=15, warmup_steps=2, x0=starts)
    data = to_arviz(mcmc, backend=backend)
    post = _group(data, "posterior")
    assert list(post["chain"].values) == list(range(12))
    np.testing.assert_allclose(post["x"].values.mean(axis=1), starts.numpy(), atol=0.1)
    lp = _group(data, "sample_stats")["lp"].values.mean(axis=1)
    np.testing.assert_allclose(lp, -0.5 * (starts**2).sum(-1).numpy(), rtol=1e-2, atol=0.1)


# -- ArviZ functions on the result ------------------------------------------------------------
@pytest.fixture(scope="module")
def four_chain_mala():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(1)
    with pytest.MonkeyPatch.context() as mp, pytest.warns(UserWarning, match="num_chains"):
        mp.setattr(mcmc_api.mp, "cpu_count", lambda: 1)
        # 100 warmup steps: after 20, MALA's step size has had no time to settle once the first
        # mass-matrix window ends (min bulk ESS 5-18 of 400 draws over seeds 0-7; with 100:
        # 134-253)
        mcmc = _run(
            MALA(potential_fn=_gaussian()),
            4,
            num_samples=100,
            warmup_steps=100,
            x0=torch.randn(4, 2),
        )
    torch.set_default_dtype(old)
    return mcmc


@pytest.mark.skipif(not AZ_LEGACY, reason="needs arviz 0.x")
def test_arviz_legacy_functions(four_chain_mala):
    import arviz as az
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idata = to_arviz(four_chain_mala, backend="arviz")
    summary = az.summary(idata)
    assert list(summary.index) == ["x[0]", "x[1]"]
    assert np.isfinite(summary["r_hat"]).all() and (summary["ess_bulk"] > 10).all()
    assert np.isfinite(az.rhat(idata)["x"].values).all()
    assert (az.ess(idata)["x"].values > 10).all()
    axes = az.plot_trace(idata)
    assert axes.shape == (1, 2)
    plt.close("all")


@pytest.mark.skipif(not HAS_ARVIZ_BASE, reason="needs arviz-base")
def test_arviz_stats_functions(four_chain_mala):
    stats = pytest.importorskip("arviz_stats")
    if not hasattr(stats, "summary"):
        pytest.skip("arviz_stats without its [xarray] extra (scipy) has no summary/ess/rhat")
    dt = to_arviz(four_chain_mala, backend="arviz_base")
    summary = stats.summary(dt)
    assert list(summary.index) == ["x[0]", "x[1]"]
    assert np.isfinite(summary["r_hat"]).all() and (summary["ess_bulk"] > 10).all()
    assert np.isfinite(stats.rhat(dt)["x"].values).all()
    assert (stats.ess(dt)["x"].values > 10).all()


# -- backend choice and bad input -------------------------------------------------------------
def test_default_backend(monkeypatch, four_chain_mala):
    if _arviz_major() is None and not HAS_ARVIZ_BASE:
        pytest.skip("no ArviZ installed")
    _check_output_type(to_arviz(four_chain_mala), "arviz" if _arviz_major() is not None else "")
    monkeypatch.setitem(sys.modules, "arviz", None)  # import arviz now raises ImportError
    if HAS_ARVIZ_BASE:
        assert isinstance(to_arviz(four_chain_mala), xr.DataTree)
    with pytest.raises(ImportError):
        to_arviz(four_chain_mala, backend="arviz")
    monkeypatch.setitem(sys.modules, "arviz_base", None)
    with pytest.raises(ImportError, match="pip install arviz"):
        to_arviz(four_chain_mala)


@pytest.mark.skipif(not HAS_ARVIZ_BASE, reason="needs arviz-base")
def test_arviz_1x_namespace(monkeypatch, four_chain_mala):
    # ArviZ 1.x is a namespace over arviz_base/arviz_stats/arviz_plots (`from arviz_base import
    # *`): fake it on Python < 3.12, where arviz 1.x does not install
    import types

    import arviz_base

    fake = types.ModuleType("arviz")
    fake.__version__ = "1.3.0"
    fake.from_dict = arviz_base.from_dict
    monkeypatch.setitem(sys.modules, "arviz", fake)
    for backend in (None, "arviz"):
        data = to_arviz(four_chain_mala, backend=backend)
        assert isinstance(data, xr.DataTree)
        assert _group(data, "posterior")["x"].shape == (4, 100, 2)


def test_bad_input(four_chain_mala):
    with pytest.raises(TypeError, match="mcmc must be a pyro_ebm.infer.MCMC or pyro.infer"):
        to_arviz({"x": torch.zeros(3, 2)})
    fresh = MCMC(MALA(potential_fn=_gaussian()), num_samples=5, disable_progbar=True)
    with pytest.raises(ValueError, match="has not been run"):
        to_arviz(fresh)
    with pytest.raises(ValueError, match="backend"):
        to_arviz(four_chain_mala, backend="pymc")
    with pytest.raises(TypeError, match="observed_data"):
        to_arviz(four_chain_mala, observed_data=[1.0, 2.0])
    with pytest.raises(TypeError, match="constant_data"):
        to_arviz(four_chain_mala, constant_data=np.zeros(3))
