import math

import pytest
import torch

from pyro_ebm.datasets import imbalanced_pair, line4, rings
from pyro_ebm.metrics import (
    mode_indicator_ess,
    mode_weight_mse,
    mode_weights,
    mode_weights_mcse,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


MEANS = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 3.0]])


def test_mode_weights_hand_computed():
    x = torch.tensor(
        [
            [-0.9, 0.3],  # 0
            [1.2, 0.0],  # 1
            [0.2, 2.0],  # 2 (squared distances 5.44, 4.64, 1.04)
            [0.0, 0.0],  # tie between 0 and 1 -> lowest index, 0
            [5.0, -1.0],  # 1
            [0.1, 1.0],  # 1 (squared distances 2.21, 1.81, 4.01)
            [-3.0, 9.0],  # 2
            [0.9, -0.1],  # 1
        ]
    )
    w = mode_weights(x, MEANS)
    assert w.dtype == torch.float64
    assert torch.equal(w, torch.tensor([2.0, 4.0, 2.0]) / 8)
    # leading dimensions are pooled: (chains, draws, dim)
    assert torch.equal(mode_weights(x.reshape(2, 4, 2), MEANS), w)
    # a list of means is accepted too
    assert torch.equal(mode_weights(x, MEANS.tolist()), w)
    truth = torch.tensor([0.25, 0.25, 0.5])
    expected = ((w - truth) ** 2).mean().item()
    assert math.isclose(mode_weight_mse(x, MEANS, truth), expected)
    assert math.isclose(expected, (0 + 0.25**2 + 0.25**2) / 3)


def test_mode_weights_chunked_matches_unchunked():
    x = torch.randn(1001, 2) * 2
    assert torch.equal(mode_weights(x, MEANS, chunk_size=7), mode_weights(x, MEANS))


def test_mode_weights_uses_dataset_partition():
    ds = rings()
    x = torch.tensor([[0.0, -2.05], [0.0, 1.1], [-3.4, 0.0], [0.0, 3.9]])
    # by radius: rings 1, 0, 2, 3 -- not the nearest representative point (r_i, 0)
    assert torch.equal(mode_weights(x, ds), torch.full((4,), 0.25))
    assert not torch.equal(mode_weights(x, ds.means), torch.full((4,), 0.25))
    assert mode_weight_mse(x, ds) == 0.0  # true weights taken from the data set


def test_mode_weight_mse_on_samples():
    ds = line4()
    x = ds.sample(20_000, generator=_gen(0))
    assert mode_weight_mse(x, ds) < 1e-4
    assert mode_weight_mse(x, ds, ds.weights.flip(0)) > 0.04


def test_bad_inputs():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="means_or_dataset"):
        mode_weights(x, torch.zeros(3))
    with pytest.raises(ValueError, match="means_or_dataset"):
        mode_weights(x, 3.0)
    with pytest.raises(ValueError, match="x must"):
        mode_weights(torch.zeros(2), MEANS)
    with pytest.raises(ValueError, match="x must"):
        mode_weights(torch.zeros(4, 3), MEANS)
    with pytest.raises(ValueError, match="x must"):
        mode_weights(torch.zeros(0, 2), MEANS)
    with pytest.raises(ValueError, match="weights"):
        mode_weight_mse(x, MEANS)
    with pytest.raises(ValueError, match="weights"):
        mode_weight_mse(x, MEANS, torch.ones(2) / 2)
    with pytest.raises(ValueError, match="samples"):
        mode_weights_mcse(torch.zeros(10, 2), MEANS)
    with pytest.raises(ValueError, match="samples"):
        mode_indicator_ess(torch.zeros(3, 1, 2), MEANS)
    # nan points were counted as the first mode's (a new user's probe)
    with pytest.raises(ValueError, match="x must be finite"):
        mode_weights(torch.full((5, 2), math.nan), MEANS)
    with pytest.raises(ValueError, match="samples must be finite"):
        mode_weights_mcse(torch.full((2, 5, 2), math.nan), MEANS)


def test_mcse_iid_chains_is_binomial_sd():
    r"""On i.i.d. draws the MCSE equals the binomial sd sqrt(w (1 - w) / n) up to the noise of
    the ESS estimate (checked on seeds 0-29: ratio in [0.97, 1.06], ESS in [9000, 10500])."""
    ds = line4()
    draws = ds.sample(4 * 2500, generator=_gen(3)).reshape(4, 2500, 2)
    w, mcse = mode_weights_mcse(draws, ds)
    assert torch.equal(w, mode_weights(draws, ds))
    binomial = (w * (1 - w) / 10_000).sqrt()
    ratio = mcse / binomial
    assert ((ratio > 0.85) & (ratio < 1.15)).all(), ratio
    assert ((w - ds.weights).abs() < 4 * mcse).all()
    ess = mode_indicator_ess(draws, ds)
    assert ((ess > 7000) & (ess < 14_000)).all(), ess


def _sticky_chains(num_chains, num_draws, switch, generator):
    """Two-mode Markov chains on {-4, +4} that switch mode with probability ``switch``; start
    in the stationary law (1/2, 1/2). Lag-k autocorrelation (1 - 2 switch)^k, so the integrated
    autocorrelation time is (1 - switch) / switch."""
    state = torch.rand(num_chains, generator=generator) < 0.5
    out = torch.empty(num_chains, num_draws, dtype=torch.bool)
    flips = torch.rand(num_chains, num_draws, generator=generator) < switch
    for t in range(num_draws):
        state = state ^ flips[:, t]
        out[:, t] = state
    return (out.double() * 8 - 4)[..., None]  # (C, N, 1)


def test_mcse_correlated_chains():
    r"""On sticky chains the MCSE grows by sqrt(tau) (seeds 0-29: ratio to the exact value in
    [0.94, 1.08]); an MCSE that ignored autocorrelation would give a ratio of 1/3."""
    means = torch.tensor([[-4.0], [4.0]])
    switch = 0.1
    draws = _sticky_chains(4, 5000, switch, _gen(1))
    w, mcse = mode_weights_mcse(draws, means)
    tau = (1 - switch) / switch  # 9
    expected = (0.25 * tau / 20_000) ** 0.5
    assert ((mcse / expected > 0.85) & (mcse / expected < 1.18)).all(), mcse / expected
    assert ((w - 0.5).abs() < 4 * mcse).all()


def test_mcse_degenerate_constant_indicator():
    ds = imbalanced_pair(2)
    draws = torch.full((2, 50, 2), 4.0)  # every draw in the heavy mode
    w, mcse = mode_weights_mcse(draws, ds)
    assert torch.equal(w, torch.tensor([0.0, 1.0]))
    assert torch.isnan(mcse).all()
    assert torch.isnan(mode_indicator_ess(draws, ds)).all()
    # the sampler-test comparison then fails, as it should for a chain that never moved
    assert not ((w - ds.weights).abs() < 4 * mcse).any()


def test_mcse_dtype_follows_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        ds = imbalanced_pair(2)
        draws = ds.sample(400, generator=_gen(0)).reshape(2, 200, 2)
        w, mcse = mode_weights_mcse(draws, ds)
        assert w.dtype == mcse.dtype == torch.float32
        assert mode_weights(draws, ds).dtype == torch.float32
    finally:
        torch.set_default_dtype(old)
