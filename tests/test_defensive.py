"""The defensive mixture proposal (a floor on the flow's density) of the flow kernels."""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC
from pyro.ops.stats import effective_sample_size

import pyro_ebm
from pyro_ebm.infer import FlowIMH
from pyro_ebm.samplers import DefensiveProposal


class NarrowGaussian:
    """A 'flow' N(0, 0.5² I): too narrow for a N(0, I) target, so plain IMH sticks in the tails."""

    dim = 2

    def __init__(self):
        self.d = dist.Normal(torch.zeros(2), 0.5).to_event(1)

    def sample(self, n):
        return self.d.sample((n,))

    def sample_and_log_prob(self, n):
        x = self.d.sample((n,))
        return x, self.d.log_prob(x)

    def log_prob(self, x):
        return self.d.log_prob(x)


def test_defensive_density_is_the_mixture_and_matches_its_draws():
    flow = NarrowGaussian()
    prop = DefensiveProposal(flow, weight=0.2, scale=3.0)
    x, log_q = prop.sample_and_log_prob(500)
    g = dist.Normal(prop.loc, prop.scale).to_event(1)
    log_w = torch.tensor([0.8, 0.2]).log()
    expected = torch.logaddexp(log_w[0] + flow.log_prob(x), log_w[1] + g.log_prob(x))
    assert torch.allclose(log_q, expected, rtol=1e-10, atol=1e-10)
    assert torch.allclose(prop.log_prob(x), expected, rtol=1e-10, atol=1e-10)
    # about 20% of the draws come from the broad component: wider than the flow alone
    assert (x.abs() > 2.0).any(-1).float().mean() > 0.02


def test_defensive_imh_has_the_right_variance_where_a_narrow_flow_alone_is_sticky():
    """Target N(0, I), flow N(0, 0.5² I). The defensive chain's variance estimate passes an MCSE
    check (|var - 1| < 4 sd/√ESS, sd of x² = √2); seeds 0-19 pass. Injected bug caught: using the
    flow's density instead of the mixture's in the weights (|z| 22-73 on seeds 0-4)."""
    pyro.set_rng_seed(0)
    pot = pyro_ebm.potential_fn(pyro_ebm.GaussianEnergy(torch.zeros(2)))
    mcmc = MCMC(
        FlowIMH(potential_fn=pot, flow=NarrowGaussian(), defensive=0.2),
        num_samples=4000,
        warmup_steps=100,
        disable_progbar=True,
    )
    mcmc.run()
    x2 = mcmc.get_samples(group_by_chain=True)["x"] ** 2
    for j in range(2):
        ess = float(effective_sample_size(x2[..., j : j + 1]).min())
        ess = max(min(ess, 4000.0), 1.0)
        z = abs(float(x2[..., j].mean()) - 1.0) / (2**0.5 / ess**0.5)
        assert z < 4.0, f"coordinate {j}: var {float(x2[..., j].mean()):.3f}, |z| = {z:.2f}"
