"""Tests of pyro_ebm.energy: energy models and their Pyro adapters."""

import math
import pickle
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_value
from pyro.infer.mcmc.util import initialize_model
from pyro.ops.stats import effective_sample_size
from torch import nn

from pyro_ebm.energy import (
    EnergyDistribution,
    EnergyModel,
    EnergyPotential,
    GaussianEnergy,
    MLPEnergy,
    ModelEnergy,
    TiltedEnergy,
    potential_fn,
)
from pyro_ebm.energy.model import _agree

# z for Monte Carlo standard error tests: two-sided p ~ 6e-5 per check.
Z = 4.0


class CorrelatedGaussian(EnergyModel):
    """E(x) = 0.5 (x - m)^T P (x - m), a correlated 2-D Gaussian with covariance P^-1."""

    def __init__(self, mean, cov):
        super().__init__(mean.shape[0])
        self.register_buffer("mean", mean)
        self.register_buffer("precision", torch.linalg.inv(cov))

    def energy(self, x):
        d = self.check_input(x) - self.mean
        return 0.5 * torch.einsum("bi,ij,bj->b", d, self.precision, d)


MEAN = (1.0, -2.0)
COV = ((1.0, 0.8), (0.8, 2.0))


def model_normal_positive(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    w = pyro.sample("w", dist.Normal(torch.zeros(2, 3), 1.0).to_event(2))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu + w.sum(), sigma), obs=y)


def model_single_normal():
    pyro.sample("a", dist.Normal(1.0, 2.0))


def model_half_normal():
    pyro.sample("s", dist.HalfNormal(1.5))


def mcse_check(draws, truth, sd, label):
    """Assert |mean - truth| < Z * sd / sqrt(ESS) for each column of ``draws`` (N, k).

    ``sd`` is the exact standard deviation of each column under the target: the sample one is
    correlated with the error of a second-moment estimate and made the check too strict.
    """
    ess = effective_sample_size(draws.unsqueeze(0), chain_dim=0, sample_dim=1)
    err = (draws.mean(0) - truth).abs()
    bound = Z * sd / ess.sqrt()
    assert (err < bound).all(), f"{label}: err={err}, bound={bound}, ess={ess}"


def gaussian_moment_check(x, mean, var, label):
    """Check E[x_i] = mean_i and E[(x_i - mean_i)^2] = var_i for Gaussian draws ``x`` (N, d).

    Under a Gaussian, sd(x_i) = sqrt(var_i) and sd((x_i - mean_i)^2) = sqrt(2) var_i.
    """
    draws = torch.cat([x, (x - mean) ** 2], dim=-1)
    mcse_check(draws, torch.cat([mean, var]), torch.cat([var.sqrt(), 2**0.5 * var]), label)


# ---------------------------------------------------------------- Tier 1: exact properties


def test_base_class_validates_input_and_dim():
    E = CorrelatedGaussian(torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="x must have shape"):
        E(torch.zeros(2))
    with pytest.raises(ValueError, match="x must have shape"):
        E(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="loc"):
        GaussianEnergy(torch.zeros(()))
    with pytest.raises(ValueError, match="dim"):
        MLPEnergy(0)
    with pytest.raises(NotImplementedError):
        EnergyModel(2)(torch.zeros(1, 2))


@pytest.mark.parametrize("activation", ["silu", "swish", "leaky_relu", "softplus"])
def test_mlp_energy_shapes_and_small_init(activation):
    E = MLPEnergy(3, hidden=(64, 64), activation=activation)
    e = E(torch.randn(100, 3))
    assert e.shape == (100,)
    assert e.abs().max() < 1e-2
    assert E.net[-1].bias.abs().max() == 0


def test_mlp_energy_bad_args():
    with pytest.raises(ValueError, match="activation"):
        MLPEnergy(2, activation="gelu2")
    with pytest.raises(ValueError, match="hidden"):
        MLPEnergy(2, hidden=(8, 0))


def test_gradients_reach_every_parameter():
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    for E in [MLPEnergy(2, hidden=(8, 8), last_layer_scale=1.0), GaussianEnergy(torch.ones(2))]:
        T = TiltedEnergy(E, base)
        T(torch.randn(7, 2)).sum().backward()
        for name, p in T.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gaussian_energy_values_and_log_normalizer():
    loc, scale = torch.tensor([1.0, -1.0, 0.5]), torch.tensor([0.5, 2.0, 1.0])
    E = GaussianEnergy(loc, scale)
    x = torch.randn(5, 3)
    expected = 0.5 * (((x - loc) / scale) ** 2).sum(-1)
    assert torch.allclose(E(x), expected)
    log_z = scale.log().sum() + 1.5 * math.log(2 * math.pi)
    assert torch.allclose(E.log_normalizer(), log_z)
    # -E - log Z is the exact Normal log density.
    ref = dist.Normal(loc, scale).to_event(1).log_prob(x)
    assert torch.allclose(-E(x) - E.log_normalizer(), ref)
    with pytest.raises(ValueError, match="scale"):
        GaussianEnergy(loc, -scale)
    with pytest.raises(ValueError, match="scale"):
        GaussianEnergy(loc, torch.ones(2))


def test_tilted_energy_is_energy_minus_base_log_prob():
    E = MLPEnergy(2, hidden=(16,), last_layer_scale=1.0)
    base = dist.Normal(torch.tensor([0.5, -0.5]), torch.tensor([1.0, 2.0])).to_event(1)
    T = TiltedEnergy(E, base)
    x = torch.randn(11, 2)
    assert torch.equal(T(x), E(x) - base.log_prob(x))
    assert T.dim == 2 and T.base is base
    assert {n for n, _ in T.named_parameters()} == {f"inner.{n}" for n, _ in E.named_parameters()}


def test_tilted_energy_registers_module_base_and_checks_base():
    base = GaussianEnergy(torch.zeros(2))

    class ModuleBase(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = base

        def log_prob(self, x):
            return -self.g(x) - self.g.log_normalizer()

    T = TiltedEnergy(GaussianEnergy(torch.ones(2)), ModuleBase())
    assert "base.g.loc" in dict(T.named_parameters())
    with pytest.raises(ValueError, match="to_event"):
        TiltedEnergy(GaussianEnergy(torch.ones(2)), dist.Normal(0.0, 1.0))(torch.zeros(3, 2))
    with pytest.raises(TypeError, match="base"):
        TiltedEnergy(GaussianEnergy(torch.ones(2)), object())
    with pytest.raises(TypeError, match="energy"):
        TiltedEnergy(lambda x: x, dist.Normal(0.0, 1.0))


def test_potential_fn_shapes_values_pickle_and_errors():
    E = CorrelatedGaussian(torch.tensor(MEAN), torch.tensor(COV))
    pot = potential_fn(E, site="z")
    assert isinstance(pot, EnergyPotential)
    x = torch.randn(4, 3, 2)
    assert torch.allclose(pot({"z": x}), E(x.reshape(-1, 2)).sum())
    assert torch.allclose(pot({"z": x[0, 0]}), E(x[0, :1]).squeeze())
    assert pot({"z": x[0, 0]}).shape == ()
    clone = pickle.loads(pickle.dumps(pot))
    assert torch.equal(clone({"z": x}), pot({"z": x}))
    with pytest.raises(KeyError, match="'z'"):
        pot({"x": x})


def test_energy_distribution_log_prob_expand_and_no_sampling():
    E = GaussianEnergy(torch.tensor([1.0, 2.0]))
    d = EnergyDistribution(E)
    assert d.event_shape == (2,) and d.batch_shape == ()
    assert d.support is dist.constraints.real_vector
    x = torch.randn(5, 4, 2)
    assert torch.allclose(d.log_prob(x), -E(x.reshape(-1, 2)).reshape(5, 4))
    assert d.log_prob(x[0, 0]).shape == ()
    e = d.expand([4])
    assert e.batch_shape == (4,) and e.energy is E
    assert e.log_prob(torch.zeros(2)).shape == (4,)
    assert torch.allclose(e.log_prob(x), d.log_prob(x))
    assert d.to_event(0).batch_shape == ()
    for fn in (d.sample, d.rsample, e.sample):
        with pytest.raises(NotImplementedError, match="unnormalized"):
            fn()
    with pytest.raises(ValueError, match="value"):
        d.log_prob(torch.zeros(3))


def test_model_energy_matches_pyro_potential():
    y = torch.randn(6) + 1.0
    E = ModelEnergy(model_normal_positive, model_args=(y,))
    assert E.site_names == ("mu", "sigma", "w")
    assert E.dim == 1 + 1 + 6
    assert E.initial_params.shape == (8,)
    _, pyro_pot, transforms, _ = initialize_model(model_normal_positive, (y,))
    x = torch.randn(5, 8)
    expected = torch.stack([pyro_pot(E.unflatten(row)) for row in x])
    assert torch.allclose(E(x), expected)
    # Pyro's potential spelled out: -log joint in unconstrained space minus log|d sigma/du|.
    mu, u, w = x[:, 0], x[:, 1], x[:, 2:]
    sigma = u.exp()
    lp = dist.Normal(0.0, 2.0).log_prob(mu) + dist.HalfNormal(1.0).log_prob(sigma) + u
    lp = lp + dist.Normal(0.0, 1.0).log_prob(w).sum(-1)
    lp = lp + dist.Normal((mu + w.sum(-1))[:, None], sigma[:, None]).log_prob(y).sum(-1)
    assert torch.allclose(E(x), -lp)
    # Layout, round trips and constrained values.
    params = E.unflatten(x)
    assert params["w"].shape == (5, 2, 3) and params["sigma"].shape == (5,)
    assert torch.equal(params["w"][2], x[2, 2:].reshape(2, 3))
    assert torch.equal(E.flatten(params), x)
    values = E.constrain(x)
    assert torch.allclose(values["sigma"], sigma) and torch.equal(values["mu"], mu)
    assert torch.allclose(E.unconstrain(values), x)
    assert torch.allclose(E.flatten(E.unflatten(E.initial_params)), E.initial_params)


def test_model_energy_analytic_and_gradient():
    E = ModelEnergy.from_model(model_single_normal)
    x = torch.linspace(-3, 3, 7)[:, None]
    e = E(x)
    # energy = (a - 1)^2 / 8 + const.
    assert torch.allclose(e - e[3], (x[:, 0] - 1) ** 2 / 8 - (x[3, 0] - 1) ** 2 / 8)
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(E(x).sum(), x)
    assert torch.allclose(g[:, 0], (x[:, 0] - 1).detach() / 4)
    # Positive site in log space: energy = exp(2u) / (2 * 1.5^2) - u + const.
    H = ModelEnergy(model_half_normal)
    u = torch.linspace(-2, 2, 5)[:, None]
    h = H(u)[:, None] - (torch.exp(2 * u) / (2 * 1.5**2) - u)
    assert torch.allclose(h, h[0].expand_as(h))


def test_model_energy_errors_and_pickle():
    E = ModelEnergy(model_single_normal)
    with pytest.raises(ValueError, match="x must have shape"):
        E(torch.zeros(3, 2))
    with pytest.raises(KeyError, match="a"):
        E.flatten({})
    with pytest.raises(ValueError, match="no continuous latent"):
        ModelEnergy(lambda: pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0)))
    x = torch.randn(3, 1)
    assert torch.equal(pickle.loads(pickle.dumps(E))(x), E(x))


# ---------------------------------------------------------------- Tier 2: Pyro NUTS


def test_potential_fn_under_pyro_nuts_recovers_gaussian_moments():
    """NUTS on potential_fn(correlated Gaussian): means and variances within 4 MCSE.

    Validated on 25 seeds (all pass, largest z 2.7). Fails with the injected bug ``2 * energy``
    in EnergyPotential (dropping the 0.5: variances halved; z >= 6.3 on 10/10 seeds) and with a
    sign flip (NUTS drifts away, z > 1e5).
    """
    mean, cov = torch.tensor(MEAN), torch.tensor(COV)
    pot = potential_fn(CorrelatedGaussian(mean, cov))
    mcmc = MCMC(
        NUTS(potential_fn=pot),
        num_samples=1000,
        warmup_steps=300,
        initial_params={"x": torch.zeros(2)},
        disable_progbar=True,
    )
    mcmc.run()
    x = mcmc.get_samples()["x"]
    assert x.shape == (1000, 2)
    gaussian_moment_check(x, mean, cov.diagonal(), "gaussian")


def test_energy_distribution_site_under_pyro_nuts_gives_conjugate_posterior():
    """x ~ EnergyDistribution(Gaussian prior), y_i ~ N(x, s^2) observed: posterior moments.

    Validated on 25 seeds (all pass, largest z 2.6). Fails with the injected bug
    ``log_prob = -2 * energy`` (prior precision doubled: posterior mean pulled to the prior;
    z >= 19 on 10/10 seeds) and with ``log_prob = +energy`` (z > 1e3).
    """
    prior_loc, prior_scale, noise = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.5]), 0.7
    y = torch.tensor([[0.3, 0.2], [-0.4, 0.9], [0.1, 0.4]])
    prior = GaussianEnergy(prior_loc, prior_scale)

    def model():
        x = pyro.sample("x", EnergyDistribution(prior))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(x, noise).to_event(1), obs=y)

    post_prec = prior_scale**-2 + y.shape[0] / noise**2
    post_var = 1 / post_prec
    post_mean = post_var * (prior_loc / prior_scale**2 + y.sum(0) / noise**2)
    kernel = NUTS(model, max_plate_nesting=1, init_strategy=init_to_value(values={"x": y[0]}))
    mcmc = MCMC(kernel, num_samples=1000, warmup_steps=300, disable_progbar=True)
    mcmc.run()
    x = mcmc.get_samples()["x"]
    assert x.shape == (1000, 2)
    gaussian_moment_check(x, post_mean, post_var, "conjugate")


def _eight_schools(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("J", y.shape[0]):
        tt = pyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * tt, sigma), obs=y)


def _not_broadcastable():
    z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.sample("o", dist.Normal(z.sum(), 1.0), obs=torch.tensor(1.0))  # sums over the batch too


def test_model_energy_batches_in_one_execution_when_the_model_broadcasts():
    """A plated model is evaluated in one execution and agrees with Pyro's own potential row by
    row; a model that does not broadcast over an outer plate is batched with vmap instead."""
    y = torch.tensor([28.0, 8, -3, 7, -1, 1, 18, 12])
    sigma = torch.tensor([15.0, 10, 16, 11, 9, 11, 10, 18])
    E = ModelEnergy(_eight_schools, (y, sigma))
    assert E.batching is None
    x = torch.randn(50, E.dim)
    batched = E(x)
    assert E.batching == "plate"
    expected = torch.stack([E._potential(E.unflatten(row)) for row in x])
    assert torch.allclose(batched, expected, rtol=1e-10, atol=1e-10)

    E2 = ModelEnergy(_not_broadcastable)
    x2 = torch.randn(5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = E2(x2)
    assert E2.batching == "vmap"
    assert torch.allclose(out, torch.stack([E2._potential(E2.unflatten(r)) for r in x2]))


def _simplex_and_scales():
    p = pyro.sample("p", dist.Dirichlet(torch.ones(4)))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    pyro.sample("c", dist.Multinomial(20, p), obs=torch.tensor([10.0, 3, 1, 6]))
    pyro.sample("o", dist.Normal(0.0, s), obs=torch.tensor(0.3))


def test_model_energy_batches_sites_whose_constrained_shape_differs():
    """A Dirichlet's 4 constrained entries come from 3 unconstrained coordinates: the batched
    execution reshapes by the constrained shape (by the unconstrained one it failed, and the
    energy silently fell back to one model run per row, 10-20x slower)."""
    E = ModelEnergy(_simplex_and_scales)
    x = torch.randn(20, E.dim)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batched = E(x)
    assert E.dim == 4 and E.batching == "plate"
    expected = torch.stack([E._potential(E.unflatten(row)) for row in x])
    assert torch.allclose(batched, expected, rtol=1e-10, atol=1e-10)


# ------------------------------------------- ModelEnergy: plate, vmap or loop for a batch

_Y = torch.tensor([0.3, -1.2, 0.8, 2.0, 0.1, -0.4, 1.1], dtype=torch.float64)
_X = torch.linspace(-1.0, 1.0, 14, dtype=torch.float64).reshape(7, 2)


def _vector_obs_no_plate():
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.sample("obs", dist.Normal(mu, 1.0), obs=_Y)  # a (7,) observation without a plate


def _regression_to_event():
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    s = pyro.sample("s", dist.HalfCauchy(1.0))
    pyro.sample("y", dist.Normal(_X @ w, s).to_event(1), obs=_Y)


def _constrained_sites():
    p = pyro.sample("p", dist.Dirichlet(torch.ones(3)))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    t = pyro.sample("t", dist.HalfCauchy(2.0))
    loc = torch.stack([p[0], s, t])
    pyro.sample("obs", dist.Normal(loc, 1.0).to_event(1), obs=torch.tensor([0.2, 1.0, 0.5]))
    pyro.sample("c", dist.Categorical(p), obs=torch.tensor([0, 2, 2, 1]))


def _branches_on_a_latent():
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    scale = 1.0 if mu > 0 else 2.0  # Python control flow on a latent: neither plate nor vmap
    pyro.sample("obs", dist.Normal(mu, scale), obs=_Y)


def _item_of_a_sum():
    z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    s = z.sum()  # over an outer plate's batch too: runs there, but gives wrong results
    pyro.sample("o", dist.Normal(s.item(), 1.0), obs=torch.tensor(1.0))  # .item(): no vmap


def _pyro_values_and_grads(E, x):
    """Pyro's own potential row by row, and its gradient."""
    x = x.clone().requires_grad_(True)
    v = torch.stack([E._potential(E.unflatten(row)) for row in x])
    (g,) = torch.autograd.grad(v.sum(), x)
    return v.detach(), g


def _values_and_grads(E, x):
    x = x.clone().requires_grad_(True)
    v = E(x)
    (g,) = torch.autograd.grad(v.sum(), x)
    return v.detach(), g


@pytest.mark.parametrize("model", [_vector_obs_no_plate, _regression_to_event, _constrained_sites])
def test_model_energy_batches_with_vmap_when_the_model_does_not_broadcast(model):
    """Models that do not broadcast over an outer plate (a vector observed without a plate,
    .to_event, X @ w, torch.stack of constrained latents) are batched with vmap, without a
    warning, and agree with Pyro's potential row by row in values and gradients."""
    E = ModelEnergy(model)
    x1 = torch.randn(1, E.dim)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v, g = _values_and_grads(E, x1)  # one row: one plain model run, decides nothing
        assert E.batching is None
        for v_ref, g_ref in [_pyro_values_and_grads(E, x1)]:
            assert torch.allclose(v, v_ref, rtol=1e-10) and torch.allclose(g, g_ref, rtol=1e-10)
        x5 = torch.randn(5, E.dim)
        with torch.no_grad():  # deciding under no_grad still checks the gradients
            E(x5)
        assert E.batching == "vmap"
        for x in (x5, x1, torch.randn(9, E.dim)):
            v, g = _values_and_grads(E, x)
            v_ref, g_ref = _pyro_values_and_grads(E, x)
            assert torch.allclose(v, v_ref, rtol=1e-10) and torch.allclose(g, g_ref, rtol=1e-10)


@pytest.mark.parametrize(
    "model, plate_blocker, vmap_blocker",
    [
        (_branches_on_a_latent, "RuntimeError: Boolean value of Tensor", "control flow"),
        (_item_of_a_sum, "results differ from the per-row model", "calling .item()"),
    ],
)
def test_model_energy_falls_back_to_the_loop_with_one_warning_naming_the_blockers(
    model, plate_blocker, vmap_blocker
):
    E = ModelEnergy(model)
    x = torch.randn(4, E.dim)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = E(x)
        E(torch.randn(6, E.dim))
    messages = [str(w.message) for w in caught if "ModelEnergy" in str(w.message)]
    assert len(messages) == 1, messages
    assert plate_blocker in messages[0] and vmap_blocker in messages[0], messages[0]
    assert E.batching == "loop"
    assert torch.allclose(out, torch.stack([E._potential(E.unflatten(r)) for r in x]))


def _gp_classification(x, y):
    """A GP classifier with a Cholesky of its covariance (jitter 1e-4), in float32."""
    lengthscale = pyro.sample("lengthscale", dist.LogNormal(0.0, 0.5))
    amplitude = pyro.sample("amplitude", dist.LogNormal(0.0, 0.5))
    z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([len(x)]).to_event(1))
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    cov = amplitude**2 * torch.exp(-0.5 * d2 / lengthscale**2) + 1e-4 * torch.eye(len(x))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Bernoulli(logits=torch.linalg.cholesky(cov) @ z), obs=y)


def test_float32_rounding_through_a_cholesky_does_not_send_a_model_to_the_loop():
    """In float32 the Cholesky of a GP's covariance makes vmap's and the loop's gradients
    differ by rounding beyond 1e-5 relative (on these rows: a walkthrough's model, where the
    loop made FlowIMH 7x slower); the agreement band widens with the dtype's epsilon, while an
    order-one difference still fails."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        g = torch.Generator().manual_seed(4)
        x = 4 * torch.rand(30, 2, generator=g) - 2
        f = torch.sin(1.5 * x[:, 0]) + 0.5 * x[:, 1]
        y = (torch.rand(30, generator=g) < torch.sigmoid(2 * f)).float()
        torch.manual_seed(4)
        E = ModelEnergy(_gp_classification, (x, y))
        rows = E.initial_params + 0.5 * torch.randn(4, E.dim)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            E(rows)
        assert E.batching == "vmap"
    finally:
        torch.set_default_dtype(previous)
    b = torch.tensor([1.0, -20.0, 300.0], dtype=torch.float32)
    assert _agree(b * (1 + 5e-4), b)  # float32 rounding, amplified
    assert not _agree(b.double() * (1 + 5e-4), b.double())  # float64 keeps 1e-5
    assert not _agree(b + torch.tensor([0.0, 0.0, 1.0], dtype=torch.float32), b)  # wrong


def test_model_energy_batches_enumerated_sites_in_one_model_run():
    """A model with an enumerated site is run once for the whole batch (enumeration dims left
    of the batch plate, summed out per row) and gives Pyro's potential, and its gradient, row
    by row; one that does not broadcast over the batch falls back to the loop, with a warning."""

    def mixture(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.3))
            pyro.sample("o", dist.Normal(mu + z, 1.0), obs=data)

    data = torch.tensor([0.5, 1.5, -0.2])
    E = ModelEnergy(mixture, (data,), max_plate_nesting=1)
    assert E._enumerated
    x = torch.randn(6, E.dim, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = E(x)
    assert E.batching == "plate"
    rows = torch.stack([E._potential(E.unflatten(r)) for r in x])
    assert torch.allclose(out, rows)
    (g_batch,) = torch.autograd.grad(out.sum(), x)
    (g_rows,) = torch.autograd.grad(rows.sum(), x)
    assert torch.allclose(g_batch, g_rows)

    def indexed(data):  # cluster_means[z] does not broadcast over an outer batch dimension
        means = pyro.sample("means", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2))
            pyro.sample("o", dist.Normal(means[z], 1.0), obs=data)

    E = ModelEnergy(indexed, (data,), max_plate_nesting=1)
    x = torch.randn(4, E.dim)
    with pytest.warns(UserWarning, match="one model run per row"):
        out = E(x)
    assert E.batching == "loop"
    assert torch.allclose(out, torch.stack([E._potential(E.unflatten(r)) for r in x]))


class _Counted:
    """A model that counts how often its Python body runs."""

    def __init__(self, body):
        self.body, self.runs = body, 0

    def __call__(self, *args, **kwargs):
        self.runs += 1
        return self.body(*args, **kwargs)


@pytest.mark.parametrize(
    "body, args, batching",
    [
        (_eight_schools, (torch.tensor([28.0, 8, -3]), torch.tensor([15.0, 10, 16])), "plate"),
        (_simplex_and_scales, (), "plate"),
        (_regression_to_event, (), "vmap"),
        (_branches_on_a_latent, (), "loop"),
    ],
)
def test_model_energy_runs_the_model_once_per_batch_with_plate_and_vmap(body, args, batching):
    model = _Counted(body)
    E = ModelEnergy(model, args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        E(torch.randn(3, E.dim))  # decides the batching
    assert E.batching == batching
    model.runs = 0
    x = torch.randn(8, E.dim, requires_grad=True)
    torch.autograd.grad(E(x).sum(), x)
    assert model.runs == (8 if batching == "loop" else 1)


def test_model_energy_vmap_restores_the_validation_settings():
    torch_default = torch.distributions.Distribution._validate_args
    pyro_default = pyro.infer.is_validation_enabled()
    try:
        for pyro_on, torch_on in ((True, True), (True, False), (False, False)):
            pyro.enable_validation(pyro_on)
            torch.distributions.Distribution.set_default_validate_args(torch_on)
            E = ModelEnergy(_vector_obs_no_plate)
            E(torch.randn(4, 1))
            assert E.batching == "vmap"
            assert pyro.infer.is_validation_enabled() is pyro_on
            assert pyro.poutine.is_validation_enabled() is pyro_on
            assert torch.distributions.Distribution._validate_args is torch_on
    finally:
        pyro.enable_validation(pyro_default)
        torch.distributions.Distribution.set_default_validate_args(torch_default)
