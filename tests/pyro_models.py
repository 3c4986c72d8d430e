r"""Pyro's own MCMC test models (``tests/infer/mcmc/test_nuts.py`` of pyro-ppl/pyro), as records.

Each function takes a seed and returns a :class:`PyroModel`: the model and its data (generated
as Pyro's test generates them, under ``torch.manual_seed(seed)``), Pyro's ``warmup_steps`` and
``num_samples``, and the checks of Pyro's test with Pyro's tolerances. The checks compare the
draws with the **posterior** of the data drawn, not with the parameters that generated it
(Pyro's tests compare with the latter, which adds the data's own noise to the sampler's error):

- exact, in closed form: beta-bernoulli (Beta), dirichlet-categorical (Dirichlet), the Gaussian
  chains (a Gaussian Markov chain: a tridiagonal precision);
- exact up to quadrature error (a fine grid, relative error < 1e-6): gamma-normal (1-D per
  component), gamma-beta (2-D), the bernoulli latent model (1-D, the discrete sites summed out);
- importance sampling from a Student-t at the Laplace approximation (Monte Carlo error below a
  few thousandths, far below the tolerances; the effective sample size is kept in
  :attr:`Check.note`): logistic regression, the Gaussian mixture (relabelled so the cluster
  means increase, both in the reference and in the draws).

The tolerance of a check is Pyro's ``prec``, in Pyro's metric: ``"max"`` is the largest absolute
error over the elements (``assert_equal(tensor, tensor, prec)``), ``"rmse"`` the root mean
square error (``assert_equal(rmse(a, b), 0, prec)``).

Not included from ``test_nuts.py``: ``test_beta_binomial`` and ``test_gamma_poisson`` (they
test ``pyro.contrib.conjugate``'s collapsing, not a sampler), ``test_structured_mass`` and
``test_arrowhead_mass`` (structure of NUTS's mass matrix; no posterior check). The HMM of
``test_gaussian_hmm`` (5 warmup steps, 5 draws, no check in Pyro) is a smoke test here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import Tensor

__all__ = [
    "MODELS",
    "Check",
    "PyroModel",
    "bernoulli_latent",
    "beta_bernoulli",
    "dirichlet_categorical",
    "gamma_beta",
    "gamma_normal",
    "gaussian_chain",
    "gaussian_hmm",
    "gaussian_mixture",
    "logistic_regression",
]


@dataclass(frozen=True)
class Check:
    r"""One of Pyro's assertions: ``metric(statistic(samples), expected) <= tol``.

    :param name: e.g. ``"mean beta"``.
    :param statistic: ``{site: draws} -> tensor`` (draws as ``MCMC.get_samples()`` returns them).
    :param expected: the posterior's value of the statistic.
    :param tol: Pyro's ``prec``.
    :param metric: ``"max"`` (largest absolute error) or ``"rmse"``.
    :param note: how ``expected`` was computed.
    """

    name: str
    statistic: Callable[[dict], Tensor]
    expected: Tensor
    tol: float
    metric: str = "max"
    note: str = "exact"

    def error(self, samples: dict) -> float:
        """The error of the draws in Pyro's metric (compare with :attr:`tol`)."""
        diff = self.statistic(samples).double() - self.expected.double()
        if self.metric == "rmse":
            return float(diff.pow(2).mean().sqrt())
        return float(diff.abs().max())


@dataclass(frozen=True)
class PyroModel:
    r"""A model of Pyro's test suite with its data, run lengths and checks.

    :param name: short name. :param source: Pyro's test it comes from.
    :param model: the Pyro model; called as ``model(*args)``.
    :param args: the model's arguments (the data).
    :param warmup_steps, num_samples: Pyro's, per chain.
    :param checks: Pyro's assertions against the posterior (none for a smoke test).
    :param discrete: the model has discrete latent sites (enumerated by the kernels).
    :param max_plate_nesting: what Pyro's test passes to NUTS (``None``: not passed).
    """

    name: str
    source: str
    model: Callable
    args: tuple
    warmup_steps: int
    num_samples: int
    checks: tuple[Check, ...] = ()
    discrete: bool = False
    max_plate_nesting: int | None = None
    sites: tuple[str, ...] = field(default=())


class _seeded:
    """Context manager: the global RNG seeded with ``seed`` inside, restored after."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


def _site(name: str, stat: str = "mean") -> Callable[[dict], Tensor]:
    if stat == "mean":
        return lambda s: s[name].mean(0)
    return lambda s: s[name].std(0)


def _grid_moments(log_density: Callable[[Tensor], Tensor], grid: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and sd of a 1-D density known up to a constant, by the trapezoid rule on ``grid``
    (uniform); the grid must cover the mass."""
    logp = log_density(grid)
    w = torch.exp(logp - logp.max())
    w[0] *= 0.5
    w[-1] *= 0.5
    w = w / w.sum()
    mean = (w * grid).sum()
    return mean, (w * (grid - mean) ** 2).sum().sqrt()


def _zoom(log_density: Callable[[Tensor], Tensor], lo: float, hi: float, n: int = 200_001):
    """Mean and sd of a 1-D density: a first grid on ``[lo, hi]``, then a fine one on the mean
    plus or minus 12 sds (clipped to ``[lo, hi]``)."""
    mean, sd = _grid_moments(log_density, torch.linspace(lo, hi, n, dtype=torch.float64))
    a, b = max(lo, float(mean - 12 * sd)), min(hi, float(mean + 12 * sd))
    return _grid_moments(log_density, torch.linspace(a, b, n, dtype=torch.float64))


def _importance(
    log_target: Callable[[Tensor], Tensor],
    start: Tensor,
    functional: Callable[[Tensor], Tensor],
    num: int = 2**16,
    df: float = 10.0,
    chunk: int = 4096,
) -> tuple[Tensor, float]:
    r"""``E[functional(u)]`` under the density ``exp(log_target(u))`` (batched over rows of
    ``u``), by self-normalised importance sampling from a multivariate Student-t (``df``) at the
    Laplace approximation (mode by L-BFGS from ``start``, Hessian by autograd, scale 1.2 times the
    Laplace one). Returns the estimate and the weights' effective sample size. Seeded: the same
    inputs give the same estimate."""
    u = start.clone().double().requires_grad_()
    opt = torch.optim.LBFGS([u], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -log_target(u[None])[0]
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    mode = u.detach()
    hess = torch.autograd.functional.hessian(lambda v: -log_target(v[None])[0], mode)
    cov = torch.linalg.inv(0.5 * (hess + hess.T)) * 1.2**2
    proposal = dist.MultivariateStudentT(df, mode, torch.linalg.cholesky(cov))
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    draws = proposal.sample((num,))
    torch.random.set_rng_state(gen_state)
    with torch.no_grad():
        logw = torch.cat([log_target(d) for d in draws.split(chunk)]) - proposal.log_prob(draws)
        logw = torch.where(torch.isfinite(logw), logw, torch.tensor(-math.inf))
        w = torch.softmax(logw, 0)
        values = torch.cat([functional(d) for d in draws.split(chunk)])
        estimate = (w.reshape((-1,) + (1,) * (values.dim() - 1)) * values).sum(0)
    return estimate, float(1.0 / (w**2).sum())


# ----------------------------------------------------------------------------------------------
# the models


def logistic_regression(seed: int = 0) -> PyroModel:
    """``test_logistic_regression``: 3 coefficients, 2000 observations; rmse of the posterior
    mean <= 0.1 (100 warmup steps, 500 draws)."""
    dim = 3
    with _seeded(seed):
        data = torch.randn(2000, dim)
        true_coefs = torch.arange(1.0, dim + 1.0)
        labels = dist.Bernoulli(logits=(true_coefs * data).sum(-1)).sample()

    def model(data):
        coefs_mean = torch.zeros(dim)
        coefs = pyro.sample("beta", dist.Normal(coefs_mean, torch.ones(dim)))
        y = pyro.sample("y", dist.Bernoulli(logits=(coefs * data).sum(-1)), obs=labels)
        return y

    def log_target(b):  # (n, 3) -> (n,)
        logits = b @ data.T
        lik = (labels * logits - torch.nn.functional.softplus(logits)).sum(-1)
        return lik - 0.5 * (b**2).sum(-1)

    mean, ess = _importance(log_target, true_coefs, lambda b: b)
    note = f"importance sampling, ESS {ess:.0f}"
    check = Check("mean beta", _site("beta"), mean, 0.1, "rmse", note)
    return PyroModel(
        name="logistic_regression",
        source="test_logistic_regression",
        model=model,
        args=(data,),
        warmup_steps=100,
        num_samples=500,
        checks=(check,),
        sites=("beta",),
    )


def beta_bernoulli(seed: int = 0) -> PyroModel:
    """``test_beta_bernoulli``: two Beta(1.1, 1.1) probabilities, 1000 observations each;
    posterior means within 0.02 (200 warmup steps, 400 draws)."""

    def model(data):
        alpha = torch.tensor([1.1, 1.1])
        beta = torch.tensor([1.1, 1.1])
        p_latent = pyro.sample("p_latent", dist.Beta(alpha, beta))
        pyro.sample("obs", dist.Bernoulli(p_latent), obs=data)
        return p_latent

    with _seeded(seed):
        true_probs = torch.tensor([0.9, 0.1])
        data = dist.Bernoulli(true_probs).sample(sample_shape=(torch.Size((1000,))))
    a = 1.1 + data.sum(0)
    b = 1.1 + (1 - data).sum(0)
    check = Check("mean p_latent", _site("p_latent"), a / (a + b), 0.02)
    return PyroModel(
        name="beta_bernoulli",
        source="test_beta_bernoulli",
        model=model,
        args=(data,),
        warmup_steps=200,
        num_samples=400,
        checks=(check,),
        sites=("p_latent",),
    )


def gamma_normal(seed: int = 0) -> PyroModel:
    """``test_gamma_normal``: two Gamma(1, 1) scales of Normal(3, scale), 2000 observations
    each; posterior means within 0.05 (100 warmup steps, 200 draws)."""

    def model(data):
        rate = torch.tensor([1.0, 1.0])
        concentration = torch.tensor([1.0, 1.0])
        p_latent = pyro.sample("p_latent", dist.Gamma(rate, concentration))
        pyro.sample("obs", dist.Normal(3, p_latent), obs=data)
        return p_latent

    with _seeded(seed):
        true_std = torch.tensor([0.5, 2])
        data = dist.Normal(3, true_std).sample(sample_shape=(torch.Size((2000,))))
    n, ss = data.shape[0], ((data - 3) ** 2).sum(0)
    means = []
    for s in ss:  # Gamma(1, 1) prior, i.e. exp(-sigma), times the Normal likelihood
        means.append(_zoom(lambda g, s=s: -g - n * torch.log(g) - s / (2 * g**2), 1e-3, 10.0)[0])
    check = Check("mean p_latent", _site("p_latent"), torch.stack(means), 0.05, note="quadrature")
    return PyroModel(
        name="gamma_normal",
        source="test_gamma_normal",
        model=model,
        args=(data,),
        warmup_steps=100,
        num_samples=200,
        checks=(check,),
        sites=("p_latent",),
    )


def dirichlet_categorical(seed: int = 0) -> PyroModel:
    """``test_dirichlet_categorical``: a Dirichlet(1, 1, 1) probability vector, 2000 categorical
    observations; posterior means within 0.02 (100 warmup steps, 200 draws)."""

    def model(data):
        concentration = torch.tensor([1.0, 1.0, 1.0])
        p_latent = pyro.sample("p_latent", dist.Dirichlet(concentration))
        pyro.sample("obs", dist.Categorical(p_latent), obs=data)
        return p_latent

    with _seeded(seed):
        true_probs = torch.tensor([0.1, 0.6, 0.3])
        data = dist.Categorical(true_probs).sample(sample_shape=(torch.Size((2000,))))
    conc = 1.0 + torch.bincount(data, minlength=3).to(torch.get_default_dtype())
    check = Check("mean p_latent", _site("p_latent"), conc / conc.sum(), 0.02)
    return PyroModel(
        name="dirichlet_categorical",
        source="test_dirichlet_categorical",
        model=model,
        args=(data,),
        warmup_steps=100,
        num_samples=200,
        checks=(check,),
        sites=("p_latent",),
    )


def gamma_beta(seed: int = 0) -> PyroModel:
    """``test_gamma_beta``: the two Gamma(1, 1) concentrations of a Beta, 5000 observations;
    posterior means within 0.08 (alpha) and 0.05 (beta) (200 warmup steps, 500 draws)."""

    def model(data):
        alpha_prior = pyro.sample("alpha", dist.Gamma(concentration=1.0, rate=1.0))
        beta_prior = pyro.sample("beta", dist.Gamma(concentration=1.0, rate=1.0))
        pyro.sample("x", dist.Beta(concentration1=alpha_prior, concentration0=beta_prior), obs=data)

    with _seeded(seed):
        true_alpha = torch.tensor(5.0)
        true_beta = torch.tensor(1.0)
        data = dist.Beta(concentration1=true_alpha, concentration0=true_beta).sample(
            torch.Size((5000,))
        )
    n, s1, s0 = data.shape[0], torch.log(data).sum(), torch.log1p(-data).sum()

    def log_post(a, b):  # Exponential(1) priors and the Beta likelihood's sufficient statistics
        lik = n * (torch.lgamma(a + b) - torch.lgamma(a) - torch.lgamma(b))
        return lik + (a - 1) * s1 + (b - 1) * s0 - a - b

    # a 2-D grid: a coarse one locates the mass, a fine one on mean +- 12 sd integrates it
    box = [(1e-3, 30.0), (1e-3, 10.0)]
    for _ in range(2):
        ga = torch.linspace(*box[0], 1501, dtype=torch.float64)
        gb = torch.linspace(*box[1], 1501, dtype=torch.float64)
        logp = log_post(ga[:, None], gb[None, :])
        w = torch.exp(logp - logp.max())
        w = w / w.sum()
        ma, mb = (w.sum(1) * ga).sum(), (w.sum(0) * gb).sum()
        sa = (w.sum(1) * (ga - ma) ** 2).sum().sqrt()
        sb = (w.sum(0) * (gb - mb) ** 2).sum().sqrt()
        box = [
            (max(1e-3, float(ma - 12 * sa)), float(ma + 12 * sa)),
            (max(1e-3, float(mb - 12 * sb)), float(mb + 12 * sb)),
        ]
    checks = (
        Check("mean alpha", _site("alpha"), ma, 0.08, note="quadrature"),
        Check("mean beta", _site("beta"), mb, 0.05, note="quadrature"),
    )
    return PyroModel(
        name="gamma_beta",
        source="test_gamma_beta",
        model=model,
        args=(data,),
        warmup_steps=200,
        num_samples=500,
        checks=checks,
        sites=("alpha", "beta"),
    )


class _GaussianChain:
    """Pyro's ``GaussianChain`` (``test_hmc.py``): ``loc_1 ~ N(0, 1)``, ``loc_i ~ N(loc_{i-1},
    1)``, ``num_obs`` observations ``N(loc_n, 1)``, all equal to one, ``dim`` independent
    coordinates. A plain class, so that the model pickles."""

    def __init__(self, dim: int, chain_len: int, num_obs: int) -> None:
        self.dim, self.chain_len, self.num_obs = dim, chain_len, num_obs

    def model(self, data):
        loc = torch.zeros(self.dim)
        lambda_prec = torch.ones(self.dim)
        for i in range(1, self.chain_len + 1):
            loc = pyro.sample(f"loc_{i}", dist.Normal(loc=loc, scale=lambda_prec))
        pyro.sample("obs", dist.Normal(loc, lambda_prec), obs=data)

    def posterior(self) -> tuple[Tensor, Tensor]:
        """Exact posterior means and sds of ``loc_1 .. loc_n`` (the same for every coordinate):
        the precision is tridiagonal, the observations add ``num_obs`` to the last entry."""
        n = self.chain_len
        prec = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):  # increments loc_i - loc_{i-1} ~ N(0, 1), loc_0 = 0
            prec[i, i] += 1.0
            if i + 1 < n:
                prec[i, i] += 1.0
                prec[i, i + 1] -= 1.0
                prec[i + 1, i] -= 1.0
        prec[n - 1, n - 1] += self.num_obs
        rhs = torch.zeros(n, dtype=torch.float64)
        rhs[n - 1] = float(self.num_obs)  # sum of the observations, all 1
        cov = torch.linalg.inv(prec)
        return cov @ rhs, cov.diagonal().sqrt()


#: ``test_nuts_conjugate_gaussian``'s cases: (dim, chain_len, num_obs, num_samples,
#: warmup_steps, mean_tol, std_tol). (Pyro skips that test as slow.)
GAUSSIAN_CHAINS = {
    "chain3": (10, 3, 1, 800, 200, 0.09, 0.09),
    "chain4": (10, 4, 1, 1600, 200, 0.07, 0.06),
    "chain2_obs10k": (5, 2, 10000, 800, 200, 0.05, 0.05),
    "chain9": (5, 9, 1, 1400, 200, 0.08, 0.08),
}


def gaussian_chain(case: str, seed: int = 0) -> PyroModel:
    """A case of ``test_nuts_conjugate_gaussian`` (:data:`GAUSSIAN_CHAINS`): per site
    ``loc_i``, the rmse over the coordinates of the posterior mean and of the posterior sd
    (``chain2_obs10k``: 10^4 observations, the posterior sds are 0.71 and 0.01)."""
    dim, chain_len, num_obs, num_samples, warmup_steps, mean_tol, std_tol = GAUSSIAN_CHAINS[case]
    chain = _GaussianChain(dim, chain_len, num_obs)
    means, sds = chain.posterior()
    checks = []
    for i in range(chain_len):
        name = f"loc_{i + 1}"
        ones = torch.ones(dim, dtype=torch.float64)
        checks.append(Check(f"mean {name}", _site(name), means[i] * ones, mean_tol, "rmse"))
        checks.append(Check(f"sd {name}", _site(name, "sd"), sds[i] * ones, std_tol, "rmse"))
    data = torch.ones(num_obs, dim)
    sites = tuple(f"loc_{i + 1}" for i in range(chain_len))
    return PyroModel(
        name=f"gaussian_{case}",
        source="test_nuts_conjugate_gaussian",
        model=chain.model,
        args=(data,),
        warmup_steps=warmup_steps,
        num_samples=num_samples,
        checks=tuple(checks),
        sites=sites,
    )


def _relabelled(samples: dict) -> tuple[Tensor, Tensor]:
    """Each draw's ``(phi, cluster_means)`` with the clusters ordered by increasing mean."""
    order = samples["cluster_means"].argsort(-1)
    return samples["phi"].gather(-1, order), samples["cluster_means"].gather(-1, order)


def gaussian_mixture(seed: int = 0) -> PyroModel:
    """``test_gaussian_mixture_model``: 3 clusters, 1000 points, the assignments enumerated;
    mixture weights within 0.05 and cluster means within 0.2 (100 warmup steps, 300 draws).
    Pyro sorts each site's posterior mean; here each draw is relabelled so that the cluster
    means increase (the same when no chain switches labels, and right when one does)."""
    K, N = 3, 1000

    def gmm(data):
        mix_proportions = pyro.sample("phi", dist.Dirichlet(torch.ones(K)))
        with pyro.plate("num_clusters", K):
            cluster_means = pyro.sample("cluster_means", dist.Normal(torch.arange(float(K)), 1.0))
        with pyro.plate("data", data.shape[0]):
            assignments = pyro.sample("assignments", dist.Categorical(mix_proportions))
            pyro.sample("obs", dist.Normal(cluster_means[assignments], 1.0), obs=data)
        return cluster_means

    with _seeded(seed):
        true_cluster_means = torch.tensor([1.0, 5.0, 10.0])
        true_mix_proportions = torch.tensor([0.1, 0.3, 0.6])
        cluster_assignments = dist.Categorical(true_mix_proportions).sample(torch.Size((N,)))
        data = dist.Normal(true_cluster_means[cluster_assignments], 1.0).sample()
    prior_loc = torch.arange(float(K))
    perms = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])

    def log_folded(u):  # the posterior of the relabelled (ordered) parameters: u = (logit, mu)
        # phi = softmax([logit, 0]), with the log-Jacobian sum(log phi); the Dirichlet(1) density
        # is constant. Every labelling that orders to this point has the same likelihood and
        # Jacobian: only the prior of the cluster means depends on it.
        logit, mu = u[:, :2], u[:, 2:]
        logphi = torch.log_softmax(torch.cat([logit, torch.zeros_like(logit[:, :1])], -1), -1)
        lik = torch.logsumexp(logphi[:, None] - 0.5 * (data[None, :, None] - mu[:, None]) ** 2, -1)
        prior = torch.stack([-0.5 * ((mu[:, p] - prior_loc) ** 2).sum(-1) for p in perms])
        ordered = (mu[:, 1:] > mu[:, :-1]).all(-1)
        log_p = lik.sum(-1) + logphi.sum(-1) + torch.logsumexp(prior, 0)
        return torch.where(ordered, log_p, -math.inf)

    def functional(u):
        phi = torch.softmax(torch.cat([u[:, :2], torch.zeros_like(u[:, :1])], -1), -1)
        return torch.cat([phi, u[:, 2:]], -1)

    start = torch.cat([torch.log(true_mix_proportions[:2] / 0.6), true_cluster_means])
    ref, ess = _importance(log_folded, start, functional, num=2**13, chunk=1024)
    note = f"importance sampling, ESS {ess:.0f}"
    checks = (
        Check("mean phi", lambda s: _relabelled(s)[0].mean(0), ref[:3], 0.05, note=note),
        Check("mean cluster_means", lambda s: _relabelled(s)[1].mean(0), ref[3:], 0.2, note=note),
    )
    return PyroModel(
        name="gaussian_mixture",
        source="test_gaussian_mixture_model",
        model=gmm,
        args=(data,),
        warmup_steps=100,
        num_samples=300,
        checks=checks,
        discrete=True,
        max_plate_nesting=1,
        sites=("phi", "cluster_means"),
    )


def bernoulli_latent(seed: int = 0) -> PyroModel:
    """``test_bernoulli_latent_model`` (``test_nuts.py``'s version): per point a Bernoulli
    ``y`` and a Bernoulli ``z`` given it, 2000 points, both enumerated; the posterior mean of
    ``y_prob`` within 0.05 (200 warmup steps, 600 draws)."""

    @poutine.broadcast
    def model(data):
        y_prob = pyro.sample("y_prob", dist.Beta(1.0, 1.0))
        with pyro.plate("data", data.shape[0]):
            y = pyro.sample("y", dist.Bernoulli(y_prob))
            z = pyro.sample("z", dist.Bernoulli(0.65 * y + 0.1))
            pyro.sample("obs", dist.Normal(2.0 * z, 1.0), obs=data)

    N = 2000
    with _seeded(seed):
        y_prob = torch.tensor(0.3)
        y = dist.Bernoulli(y_prob).sample(torch.Size((N,)))
        z = dist.Bernoulli(0.65 * y + 0.1).sample()
        data = dist.Normal(2.0 * z, 1.0).sample()
    # p(x | y) with z summed out, then y summed out: a 1-D posterior of y_prob
    n0, n2 = torch.exp(-0.5 * data**2), torch.exp(-0.5 * (data - 2.0) ** 2)
    given_y0, given_y1 = 0.9 * n0 + 0.1 * n2, 0.25 * n0 + 0.75 * n2

    def log_post(p):
        return torch.log((1 - p[:, None]) * given_y0 + p[:, None] * given_y1).sum(-1)

    mean, sd = _grid_moments(log_post, torch.linspace(1e-6, 1 - 1e-6, 2001, dtype=torch.float64))
    fine = torch.linspace(float(mean - 12 * sd), float(mean + 12 * sd), 2001, dtype=torch.float64)
    mean = _grid_moments(log_post, fine)[0]
    check = Check("mean y_prob", _site("y_prob"), mean, 0.05, note="quadrature")
    return PyroModel(
        name="bernoulli_latent",
        source="test_bernoulli_latent_model",
        model=model,
        args=(data,),
        warmup_steps=200,
        num_samples=600,
        checks=(check,),
        discrete=True,
        max_plate_nesting=1,
        sites=("y_prob",),
    )


def gaussian_hmm(seed: int = 0, num_steps: int = 3) -> PyroModel:
    """``test_gaussian_hmm``: an HMM with 4 states, Gaussian emissions and ``num_steps + 1``
    observations, the states enumerated in a ``pyro.markov`` loop. Pyro only runs it (5
    warmup steps, 5 draws): a smoke test, no checks."""
    dim = 4

    def model(data):
        initialize = pyro.sample("initialize", dist.Dirichlet(torch.ones(dim)))
        with pyro.plate("states", dim):
            transition = pyro.sample("transition", dist.Dirichlet(torch.ones(dim, dim)))
            emission_loc = pyro.sample(
                "emission_loc", dist.Normal(torch.zeros(dim), torch.ones(dim))
            )
            emission_scale = pyro.sample(
                "emission_scale", dist.LogNormal(torch.zeros(dim), torch.ones(dim))
            )
        x = None
        for t, y in pyro.markov(enumerate(data)):
            x = pyro.sample(
                f"x_{t}",
                dist.Categorical(initialize if x is None else transition[x]),
                infer={"enumerate": "parallel"},
            )
            pyro.sample(f"y_{t}", dist.Normal(emission_loc[x], emission_scale[x]), obs=y)

    with _seeded(seed):
        transition_probs = torch.rand(dim, dim)
        emissions_loc = torch.arange(dim, dtype=torch.get_default_dtype())
        state = torch.tensor(1)
        obs = [dist.Normal(emissions_loc[state], 1.0).sample()]
        for _ in range(num_steps):
            state = dist.Categorical(transition_probs[state]).sample()
            obs.append(dist.Normal(emissions_loc[state], 1.0).sample())
        data = torch.stack(obs)
    return PyroModel(
        name="gaussian_hmm",
        source="test_gaussian_hmm",
        model=model,
        args=(data,),
        warmup_steps=5,
        num_samples=5,
        checks=(),
        discrete=True,
        max_plate_nesting=1,
        sites=("initialize", "transition", "emission_loc", "emission_scale"),
    )


#: every model by name: ``MODELS[name](seed)``
MODELS: dict[str, Callable[[int], PyroModel]] = {
    "logistic_regression": logistic_regression,
    "beta_bernoulli": beta_bernoulli,
    "gamma_normal": gamma_normal,
    "dirichlet_categorical": dirichlet_categorical,
    "gamma_beta": gamma_beta,
    **{
        f"gaussian_{case}": (lambda seed, case=case: gaussian_chain(case, seed))
        for case in GAUSSIAN_CHAINS
    },
    "gaussian_mixture": gaussian_mixture,
    "bernoulli_latent": bernoulli_latent,
    "gaussian_hmm": gaussian_hmm,
}
