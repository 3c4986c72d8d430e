r"""Models with discrete latent sites: summed out by enumeration, as Pyro's HMC and NUTS do.

Pyro's ``initialize_model`` enumerates every discrete site with finite support
(``config_enumerate`` + ``poutine.enum``); the kernels here then sample the continuous sites of
the marginal model. Tracing the model for its plate nesting used to fail first, under the init
strategy (``Continuous inference cannot handle discrete sample site``).

The statistical test checks the posterior mean of ``p`` in

.. math:: p \sim \mathrm{Beta}(1, 1),\quad z \sim \mathrm{Bernoulli}(p),\quad
    y \sim \mathcal N(z, 1),\ y = 1,

whose posterior density is proportional to :math:`a p + b (1 - p)` with
:math:`a = \varphi(0)`, :math:`b = \varphi(1)`, hence mean :math:`(a/3 + b/6) / ((a + b)/2)`,
within ``z * sd / sqrt(ESS)``. Seeds 0-9 pass for MALA and ChEESHMC (``python
tests/test_discrete.py``; max |z| 1.53 and 2.11). An enumerated model that broadcasts (as
this one) is evaluated for all chains in one model run (:class:`~pyro_ebm.energy.ModelEnergy`
puts the enumeration dimensions left of its batch plate); one that does not (e.g.
``means[z]`` indexing) falls back to one run per chain.
A kernel that did not sum the site out but held it at one value would sample Beta(1, 2) or
Beta(2, 1) (means 1/3 and 2/3): with the ESS of these runs (several hundred at least) that is
tens of Monte Carlo standard errors away (computed, not injected).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from test_mcmc import mcse_zscores, z_critical

from pyro_ebm.infer import MALA, MCMC, ChEESHMC

pytestmark = pytest.mark.filterwarnings("ignore:num_chains=.*sequentially:UserWarning")


def bernoulli_latent(y):
    p = pyro.sample("p", dist.Beta(1.0, 1.0))
    z = pyro.sample("z", dist.Bernoulli(p))
    pyro.sample("y", dist.Normal(z, 1.0), obs=y)


def posterior_mean() -> float:
    phi = lambda t: math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)  # noqa: E731
    a, b = phi(0.0), phi(1.0)
    return (a / 3 + b / 6) / ((a + b) / 2)


KERNELS = {
    "MALA": lambda: MALA(model=bernoulli_latent),
    "ChEESHMC": lambda: ChEESHMC(model=bernoulli_latent),
}


def run(name: str, seed: int) -> torch.Tensor:
    pyro.set_rng_seed(seed)
    mcmc = MCMC(KERNELS[name](), num_samples=500, warmup_steps=300, num_chains=8)
    mcmc.disable_progbar = True
    mcmc.run(torch.tensor(1.0))
    return mcmc.get_samples(group_by_chain=True)["p"]


@pytest.mark.parametrize("name", list(KERNELS))
def test_discrete_site_is_summed_out(name):
    p = run(name, 0)
    z = mcse_zscores({"mean p": (p, posterior_mean())})["mean p"]
    assert abs(z) < z_critical(len(KERNELS)), f"mean of p: z = {z:.2f}"


if __name__ == "__main__":
    for name in KERNELS:
        zs = [mcse_zscores({"m": (run(name, s), posterior_mean())})["m"] for s in range(10)]
        crit = z_critical(len(KERNELS))
        print(name, "fails", sum(abs(z) >= crit for z in zs), "max |z|", max(map(abs, zs)))
