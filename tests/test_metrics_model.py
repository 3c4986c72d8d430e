"""Tests of the model-level metrics (pyro_ebm.metrics.density, .convergence) against closed
forms and ArviZ."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyro_ebm.datasets import eight_gaussians, line4, mixture_hd, rings
from pyro_ebm.flows import Flow
from pyro_ebm.metrics import (
    grid_log_density,
    log_density_error,
    log_normalizer,
    max_rhat,
    model_mode_weights,
    nll,
    rhat,
)


def test_rhat_matches_arviz_rank_rhat():
    az = pytest.importorskip("arviz")
    torch.manual_seed(0)
    x = torch.randn(6, 200, 4)
    x[:2, :, 1] += 0.7  # two chains shifted
    x[:, :, 2] = x[:, :, 2].round()  # ties
    x[:, :, 3] = x[:, :, 3].exp()  # skewed
    ours = rhat(x).numpy()
    ref = np.array([float(az.rhat(x[:, :, j].numpy(), method="rank")) for j in range(4)])
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    assert max_rhat(x) == pytest.approx(ref.max())


def test_rhat_flags_chains_stuck_in_different_modes():
    """Seeds 0-19 pass (good < 1.05, stuck > 1.4)."""
    torch.manual_seed(0)
    ds = mixture_hd(16)
    good = ds.sample(128 * 50).reshape(128, 50, 16)  # iid: every chain sees every mode
    stuck = ds.means[torch.arange(128) % 4][:, None, :] + torch.randn(128, 50, 16)
    assert max_rhat(good) < 1.05
    # each coordinate's chain means are +-a (a = 1.39) around within-chain sd 1:
    # R-hat ~ sqrt(1 + a^2) / ... ~ 1.57 for chains spread evenly over the four modes
    assert max_rhat(stuck) > 1.4
    stuck[0, 3, 0] = float("nan")  # (ranked as an ordinary value, nan gave R-hat 4.2)
    with pytest.raises(ValueError, match="samples must be finite"):
        max_rhat(stuck)


def test_grid_mode_weights_and_log_density_error_of_the_truth():
    for ds in (line4(), eight_gaussians(), rings()):
        w = model_mode_weights(ds.potential, ds)
        assert torch.allclose(w.double(), ds.weights, atol=2e-3), ds
        assert log_density_error(ds.potential, ds) < 1e-4


def test_log_density_error_of_a_wrong_model_is_its_log_ratio():
    ds = line4()
    # the truth tilted by a constant energy offset on the right half: error = offset^2 mostly
    tilted = lambda x: ds.potential(x) + 0.5 * (x[:, 0] > 0)  # noqa: E731
    err = log_density_error(tilted, ds)
    # after renormalisation the log-ratio is 0.5 - log Z' on the right and -log Z' on the left
    log_zp = math.log(0.3 + 0.7 * math.exp(-0.5))
    expected = sorted([(0.5 + log_zp) ** 2] * 7 + [log_zp**2] * 3)[3]  # median at 70/30 split
    assert err == pytest.approx(expected, rel=1e-2)


def test_snis_mode_weights_in_high_dimension():
    """SNIS weights within 4.5 standard errors, the error from the importance sampling ESS
    (sum w)^2 / sum w^2 of the same proposal (Bonferroni over 4 modes, two-sided 1e-4 each).
    Unequal weights, so that ignoring the importance weights is caught. Seeds 0-19 pass; bug
    injected (all log-weights set to 0, i.e. plain proposal draws) fails. (The previous fixed
    atol of 0.03 with a wider proposal failed on 5 of 20 seeds.)"""
    from pyro_ebm.datasets import GaussianMixture
    from pyro_ebm.metrics.density import _snis_log_weights

    torch.manual_seed(0)
    means = mixture_hd(8).means
    ds = GaussianMixture(means, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), 1.0)
    proposal = Flow(8, base_scale=2.0)  # a broad Gaussian covering all four modes
    w = model_mode_weights(ds.potential, ds, flow=proposal, num_samples=200_000)
    _, lw = _snis_log_weights(ds.potential, proposal, 200_000, 65536)
    ess = float(lw.logsumexp(0).mul(2).sub((2 * lw).logsumexp(0)).exp())
    se = (ds.weights * (1 - ds.weights) / ess).sqrt()
    assert ((w.double() - ds.weights).abs() < 4.5 * se).all(), (w, ess)
    with pytest.raises(ValueError, match="flow"):
        model_mode_weights(ds.potential, ds)
    with pytest.raises(ValueError, match="method"):
        model_mode_weights(ds.potential, ds, flow=proposal, method="exact")


def test_log_normalizer_and_nll_of_a_gaussian():
    """Within 4 standard errors of the closed forms; seeds 0-19 pass."""
    torch.manual_seed(0)
    scale = torch.tensor([0.5, 2.0, 1.0])
    U = lambda x: 0.5 * ((x / scale) ** 2).sum(-1)  # noqa: E731
    true_log_z = float(scale.log().sum() + 1.5 * math.log(2 * math.pi))
    log_z, se = log_normalizer(U, Flow(3, base_scale=2.0), num_samples=100_000)
    assert abs(log_z - true_log_z) < 4 * se
    data = torch.randn(2000, 3) * scale
    value, se_nll = nll(U, data, Flow(3, base_scale=2.0), num_samples=100_000)
    exact = float(U(data).mean()) + true_log_z
    assert abs(value - exact) < 4 * se_nll


def test_grid_bounds_are_checked():
    with pytest.raises(ValueError, match="bounds"):
        grid_log_density(lambda x: x.sum(-1), bounds=(1.0, -1.0))
    with pytest.raises(ValueError, match="resolution"):
        grid_log_density(lambda x: x.sum(-1), resolution=1)


def test_grid_metrics_take_the_dtype_and_device_of_a_bound_method_s_owner():
    """``trainer.potential`` is a bound method with no parameters of its own: the grid takes the
    dtype and device of the trainer it belongs to. Before, it took the default dtype on the
    CPU, so a float64 model under a float32 default failed in its first ``Linear`` during the
    trainer's evaluation, and ``pyro-ebm train --device cuda`` failed the same way on a GPU
    (mat1 on the CPU). An explicit ``device`` wins."""
    from pyro_ebm import MLPEnergy
    from pyro_ebm.datasets import two_to_one
    from pyro_ebm.metrics.density import _dtype_device
    from pyro_ebm.train import EBMTrainer

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(0)
        ds = two_to_one()
        trainer = EBMTrainer(
            MLPEnergy(2, hidden=(8,)).double(),
            num_walkers=16,
            target=ds,
            sampler_kwargs={"num_particles": 4, "num_mala_steps": 1},
        )
        trainer.fit(ds.sample(256).double(), num_steps=2, batch_size=32, progress=False)
        assert len(trainer.history.last["model_weights"]) == 2
        pts, _, _ = grid_log_density(trainer.potential, resolution=20)
        assert pts.dtype == torch.float64 and pts.device == trainer.device
        assert _dtype_device(trainer.potential, "meta") == (torch.float64, torch.device("meta"))
        assert _dtype_device(lambda x: x) == (torch.float32, torch.device("cpu"))
    finally:
        torch.set_default_dtype(old)
