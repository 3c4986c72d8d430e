"""Tests of ChEES-HMC (``pyro_ebm.samplers.chees``): the many-chain HMC step and its adapter.

Exact properties: the step is :func:`hmc_step`'s math (same draws, same chain) plus the
proposal statistics, checked against a plain leapfrog; non-finite potentials and energy errors
above 1000 reject only the chains concerned; the ChEES gradient equals the derivative of the
criterion along the proposals' velocities (autograd); Stan's warmup windows; the Halton jitter
and the leapfrog cap; the regularised pooled variance of the mass update; argument checks.

Statistical tests (seeded; each ``run_*`` takes a seed so that it can be validated over many):
the step leaves a Gaussian with scales 0.1-10 invariant, and the adapter, on a Gaussian with
scales 0.1-10, learns the variances, a step size near the target acceptance and a trajectory
length near ChEES's optimum. Each was validated on 20 seeds, and the invariance test was seen to
fail with the bugs named in its docstring injected into the library.
"""

import math

import pyro
import pytest
import torch

from pyro_ebm.samplers import (
    ChEESAdapter,
    ChEESProposal,
    chees_hmc_step,
    hmc_step,
    init_state,
    warmup_windows,
)
from pyro_ebm.samplers.chees import MAX_ENERGY_ERROR, _halton

# --------------------------------------------------------------------------------------------
# helpers


def _z_critical(num_checks, p=1e-3):
    """Two-sided Bonferroni critical value for ``num_checks`` checks at family level ``p``."""
    normal = torch.distributions.Normal(0.0, 1.0)
    return float(normal.icdf(torch.tensor(1 - p / (2 * num_checks), dtype=torch.float64)))


def _diag_gauss(scales):
    """Potential of the centred Gaussian with independent coordinates of sds ``scales``."""

    def potential(x):
        return 0.5 * ((x / scales) ** 2).sum(-1)

    return potential


def _leapfrog_reference(x, p, eps, num_steps, inv_m, scales):
    """Plain leapfrog for :func:`_diag_gauss`; returns ``(x, p, H(x, p) - H(x0, p0))``."""

    def hamiltonian(z, q):
        return 0.5 * ((z / scales) ** 2).sum(-1) + 0.5 * (q**2 * inv_m).sum(-1)

    h0 = hamiltonian(x, p)
    for _ in range(num_steps):
        p = p - 0.5 * eps * x / scales**2
        x = x + eps * inv_m * p
        p = p - 0.5 * eps * x / scales**2
    return x, p, hamiltonian(x, p) - h0


def _proposal(x_init, x, velocity, accept_prob, divergent=None):
    if divergent is None:
        divergent = torch.zeros_like(accept_prob, dtype=torch.bool)
    return ChEESProposal(x, velocity, x_init, accept_prob, divergent, 1)


# --------------------------------------------------------------------------------------------
# the step


def test_step_is_hmc_step_plus_the_proposal(monkeypatch):
    """Same random draws, same chain as hmc_step; the proposal is the end of a plain leapfrog
    trajectory, with velocity M^{-1} p, and the acceptance probability is exp(H0 - H1)."""
    scales = torch.tensor([0.5, 1.0, 2.0])
    U = _diag_gauss(scales)
    inv_m = torch.tensor([0.3, 1.0, 3.0])
    state = init_state(U, torch.randn(64, 3) * scales)

    pyro.set_rng_seed(1)
    ref, ref_info = hmc_step(state, U, 1.2, 4, inv_m)
    pyro.set_rng_seed(1)
    new, info, proposal = chees_hmc_step(state, U, 1.2, 4, inv_m)
    for a, b in zip(ref[:3], new[:3], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ref_info, info, strict=True):
        assert torch.equal(a, b)
    assert not proposal.divergent.any() and (info.accept_prob < 0.999).any()

    x0 = state.x[:4]
    p0 = torch.randn(4, 3) / inv_m.sqrt()
    x1, p1, energy_error = _leapfrog_reference(x0, p0, 0.7, 5, inv_m, scales)
    monkeypatch.setattr(torch, "randn_like", lambda t: p0 * inv_m.sqrt())
    _, info, proposal = chees_hmc_step(init_state(U, x0), U, 0.7, 5, inv_m)
    assert torch.allclose(proposal.x, x1, rtol=1e-12, atol=1e-12)
    assert torch.allclose(proposal.velocity, inv_m * p1, rtol=1e-12, atol=1e-12)
    assert torch.equal(proposal.x_init, x0)
    assert torch.allclose(info.accept_prob, (-energy_error).clamp(max=0).exp(), rtol=1e-10)
    assert torch.equal(proposal.accept_prob, info.accept_prob)
    assert proposal.num_steps == 5


def run_invariance(seed, num_chains=512, num_transitions=20):
    """Chains started from exact draws of a Gaussian with sds 0.1-10, after jittered HMC
    transitions with a fixed step size and a deliberately imperfect inverse mass: returns the
    final positions ``(C, D)`` and the sds."""
    pyro.set_rng_seed(seed)
    scales = torch.logspace(-1, 1, 6)
    U = _diag_gauss(scales)
    inv_m = scales**2 * torch.tensor([0.5, 2.0, 1.0, 0.7, 1.5, 1.0])
    # warmup_steps=0: frozen from the start, so only the jitter runs (and it runs after warmup)
    adapter = ChEESAdapter(6, 0, step_size=0.6, trajectory_length=3.0, inverse_mass=inv_m)
    state = init_state(U, torch.randn(num_chains, 6) * scales)
    for _ in range(num_transitions):
        state, _, proposal = chees_hmc_step(
            state, U, adapter.step_size, adapter.num_steps(), adapter.inverse_mass
        )
        adapter.update(proposal)
    return state.x, scales


def test_step_leaves_gaussian_invariant():
    """The chains, independent draws of the target at every step, keep its mean and variance
    per coordinate: standard errors sd / sqrt(C) and var sqrt(2 / (C - 1)), Bonferroni over the
    12 checks at family level 1e-3 (z = 3.9). Fails with the kinetic energy dropped from the
    acceptance ratio (variances 30-60% low) and with the sign of the first half step flipped."""
    x, scales = run_invariance(0)
    num_chains = x.shape[0]
    z_mean = x.mean(0) / (scales / math.sqrt(num_chains))
    var = scales**2
    z_var = (x.var(0) - var) / (var * math.sqrt(2 / (num_chains - 1)))
    z = torch.cat([z_mean, z_var])
    assert z.abs().max() < _z_critical(len(z)), f"z-scores {z}"


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_nonfinite_region_rejects_only_the_chains_entering_it(monkeypatch, bad):
    """U non-finite where x0 > 1: the chain whose trajectory enters it is rejected and flagged,
    the others move as usual, and no nan reaches the state or the proposal."""

    def U(x):
        return torch.where(x[:, 0] > 1, bad, 0.5 * (x**2).sum(-1))

    x0 = torch.tensor([[0.95, 0.0], [0.95, 0.0], [0.0, 0.5], [-0.5, -0.5]])
    p0 = torch.tensor([[5.0, 0.0], [-1.0, 0.0], [0.1, 0.1], [0.3, -0.2]])
    monkeypatch.setattr(torch, "randn_like", lambda t: p0.clone())
    monkeypatch.setattr(torch, "rand_like", lambda t: torch.zeros_like(t))  # accept if prob > 0
    state = init_state(U, x0)
    new, info, proposal = chees_hmc_step(state, U, 0.05, 10)
    assert info.nonfinite.tolist() == [True, False, False, False]
    assert proposal.divergent.tolist() == [True, False, False, False]
    assert info.accepted.tolist() == [False, True, True, True]
    assert info.accept_prob[0] == 0 and (info.accept_prob[1:] > 0.9).all()
    assert torch.equal(new.x[0], x0[0]) and torch.equal(new.grad[0], state.grad[0])
    assert not torch.equal(new.x[1:], x0[1:])
    for t in (*new[:3], proposal.x, proposal.velocity):
        assert torch.isfinite(t).all()


def test_nonfinite_region_with_adaptation():
    """Many chains near the edge of the support: no chain ever leaves it, rejected chains keep
    their state, and the adapter, fed the divergent proposals, stays finite."""

    def U(x):
        return torch.where(x[:, 0] > 1, torch.inf, 0.5 * (x**2).sum(-1))

    x = torch.randn(256, 3)
    x[:, 0] = -x[:, 0].abs()
    state = init_state(U, x)
    adapter = ChEESAdapter(3, 60, step_size=0.5, trajectory_length=2.0)
    num_flagged = 0
    for _ in range(60):
        new, info, proposal = chees_hmc_step(
            state, U, adapter.step_size, adapter.num_steps(), adapter.inverse_mass
        )
        adapter.update(proposal)
        flagged = info.nonfinite
        assert not (flagged & ~proposal.divergent).any()
        div = proposal.divergent  # also energy errors (the dual averaging tries large steps)
        assert torch.equal(new.x[div], state.x[div]) and not info.accepted[div].any()
        assert (new.x[:, 0] <= 1).all() and torch.isfinite(new.potential_energy).all()
        num_flagged += int(flagged.sum())
        state = new
    assert num_flagged > 100
    assert math.isfinite(adapter.step_size) and math.isfinite(adapter.trajectory_length)
    assert torch.isfinite(adapter.inverse_mass).all()


def test_energy_error_above_1000_is_a_rejected_divergence(monkeypatch):
    """An unstable leapfrog (step size beyond 2 / frequency) makes an energy error far above
    1000: that chain is rejected and divergent, though its potential is finite."""
    scales = torch.tensor([0.01, 1.0])
    U = _diag_gauss(scales)
    x0 = torch.tensor([[0.0, 0.0], [0.01, 0.0]])  # the first chain sits at the mode
    p0 = torch.tensor([[0.0, 0.3], [0.0, 0.3]])
    monkeypatch.setattr(torch, "randn_like", lambda t: p0.clone())
    monkeypatch.setattr(torch, "rand_like", lambda t: torch.zeros_like(t))
    new, info, proposal = chees_hmc_step(init_state(U, x0), U, 0.1, 3)
    _, _, energy_error = _leapfrog_reference(x0, p0, 0.1, 3, torch.ones(2), scales)
    assert energy_error[0] < 1e-3 and energy_error[1] > MAX_ENERGY_ERROR
    assert proposal.divergent.tolist() == [False, True]
    assert info.nonfinite.tolist() == [False, False]
    assert info.accept_prob[1] == 0 and info.accepted.tolist() == [True, False]
    assert torch.equal(new.x[1], x0[1])


# --------------------------------------------------------------------------------------------
# the adapter: exact properties


def test_warmup_windows_are_stans():
    assert warmup_windows(1000) == (99, 149, 249, 449, 949)
    assert warmup_windows(300) == (99, 249)
    assert warmup_windows(100) == (89,)  # Stan's fallback: 15% initial, 10% terminal
    assert warmup_windows(19) == ()
    assert warmup_windows(500, init_buffer=10, term_buffer=10, base_window=10) == (
        19,
        39,
        79,
        159,
        489,
    )


def test_jitter_is_halton_and_continues_after_warmup():
    assert [_halton(n) for n in range(1, 8)] == [0.5, 0.25, 0.75, 0.125, 0.625, 0.375, 0.875]
    state = init_state(_diag_gauss(torch.ones(2)), torch.randn(4, 2))
    adapter = ChEESAdapter(2, 0, step_size=0.1, trajectory_length=1.0)
    assert adapter.frozen
    counts = []
    for _ in range(7):
        n = adapter.num_steps()
        assert adapter.num_steps() == n  # stable until update
        counts.append(n)
        _, _, proposal = chees_hmc_step(state, _diag_gauss(torch.ones(2)), 0.1, n)
        adapter.update(proposal)
        assert adapter.step_size == 0.1 and adapter.trajectory_length == pytest.approx(1.0)
    assert counts == [5, 3, 8, 2, 7, 4, 9]  # ceil(u_k T / eps)
    capped = ChEESAdapter(2, 0, step_size=0.1, trajectory_length=1.0, max_num_steps=4)
    assert capped.trajectory_length == pytest.approx(0.4)  # clipped to max_num_steps * eps


def test_chees_gradient_is_the_criterion_derivative():
    """The gradient fed to Adam is u T d/dt ChEES(x' + t v') at t = 0 (TFP's construction, by
    autograd), with the proposals' mean weighted by acceptance and held fixed; divergent chains
    (nan here) are left out and the harmonic mean is over the others."""
    gen = torch.Generator().manual_seed(3)
    x0, x1, v = (torch.randn(8, 3, generator=gen) for _ in range(3))
    accept = torch.rand(8, generator=gen)
    divergent = torch.zeros(8, dtype=torch.bool)
    divergent[2] = True
    x1[2], v[2] = math.nan, math.nan
    keep = ~divergent
    w = accept[keep]
    m1 = (w[:, None] * x1[keep]).sum(0) / w.sum()
    t = torch.zeros((), requires_grad=True)
    y = x1[keep] + t * v[keep]
    jump = ((y - m1) ** 2).sum(-1) - ((x0[keep] - x0.mean(0)) ** 2).sum(-1)
    chees = (w * 0.25 * jump**2).sum() / w.sum()
    (expected,) = torch.autograd.grad(chees, t)
    adapter = ChEESAdapter(3, 10)
    grad, harmonic = adapter._statistics(_proposal(x0, x1, v, accept, divergent), 0.7)
    assert grad == pytest.approx(0.7 * float(expected), rel=1e-10)
    assert harmonic == pytest.approx(float(1 / (1 / w).mean()), rel=1e-12)


def test_mass_update_is_the_regularised_pooled_variance():
    """warmup 20: one slow window, iterations 3-17 (Stan's fallback); the inverse mass becomes
    (n / (n + 5)) var + 1e-3 (5 / (n + 5)) of the n = 15 C positions of that window, and the step
    size dual averaging restarts."""
    adapter = ChEESAdapter(2, 20, step_size=0.5)
    assert adapter.mass_update_iterations == (17,)
    gen = torch.Generator().manual_seed(0)
    xs = []
    for i in range(20):
        x = torch.randn(16, 2, generator=gen) * torch.tensor([0.1, 3.0]) + 1.0
        xs.append(x)
        adapter.update(_proposal(x, x, torch.zeros_like(x), torch.full((16,), 0.7)))
        if i < 17:
            assert torch.equal(adapter.inverse_mass, torch.ones(2))
        elif i == 17:
            assert adapter._da._t == 0  # restarted
    pooled = torch.cat(xs[3:18])
    n = pooled.shape[0]
    expected = n / (n + 5) * pooled.var(0) + 1e-3 * 5 / (n + 5)
    assert torch.allclose(adapter.inverse_mass, expected, rtol=1e-12)
    assert adapter.frozen and adapter.iteration == 20


def test_frozen_adapter_keeps_its_parameters():
    scales = torch.tensor([0.5, 2.0])
    U = _diag_gauss(scales)
    state = init_state(U, torch.randn(32, 2))
    adapter = ChEESAdapter(2, 100, step_size=0.3, trajectory_length=2.0)
    for _ in range(100):
        assert not adapter.frozen
        state, _, proposal = chees_hmc_step(
            state, U, adapter.step_size, adapter.num_steps(), adapter.inverse_mass
        )
        adapter.update(proposal)
    assert adapter.frozen
    frozen = adapter.step_size, adapter.trajectory_length, adapter.inverse_mass.clone()
    assert frozen[:2] == (adapter.final_step_size, adapter.final_trajectory_length)
    counts = set()
    for _ in range(10):
        counts.add(adapter.num_steps())
        state, _, proposal = chees_hmc_step(
            state, U, adapter.step_size, adapter.num_steps(), adapter.inverse_mass
        )
        adapter.update(proposal)
        assert (adapter.step_size, adapter.trajectory_length) == frozen[:2]
        assert torch.equal(adapter.inverse_mass, frozen[2])
    assert len(counts) > 1  # still jittered


def test_adaptation_can_be_switched_off_per_parameter():
    """Without step-size or trajectory-length adaptation those stay as given (through the mass
    updates too), while the mass matrix adapts and the jitter runs."""
    scales = torch.tensor([0.5, 2.0])
    U = _diag_gauss(scales)
    state = init_state(U, torch.randn(32, 2) * scales)
    adapter = ChEESAdapter(
        2,
        60,
        step_size=0.3,
        trajectory_length=1.5,
        adapt_step_size=False,
        adapt_trajectory_length=False,
    )
    counts = set()
    for _ in range(80):
        counts.add(adapter.num_steps())
        state, _, proposal = chees_hmc_step(
            state, U, adapter.step_size, adapter.num_steps(), adapter.inverse_mass
        )
        adapter.update(proposal)
        assert adapter.step_size == 0.3 and adapter.trajectory_length == pytest.approx(1.5)
    assert adapter.frozen and not torch.equal(adapter.inverse_mass, torch.ones(2))
    assert counts == {1, 2, 3, 4, 5}  # ceil(u * 1.5 / 0.3)


def test_leapfrog_count_respects_the_cap():
    """A target with sds 0.01-100 asks for thousands of steps; the cap holds them at 6. And the
    default cap of 1000 holds when the step size is tiny (Pyro's HMC would make T / eps)."""
    scales = torch.logspace(-2, 2, 4)
    U = _diag_gauss(scales)
    state = init_state(U, torch.randn(32, 4) * scales)
    adapter = ChEESAdapter(
        4, 100, step_size=0.01, trajectory_length=1.0, adapt_mass=False, max_num_steps=6
    )
    assert adapter.trajectory_length == pytest.approx(0.06)  # clipped to 6 eps
    counts = []
    for _ in range(150):
        counts.append(adapter.num_steps())
        state, _, proposal = chees_hmc_step(
            state, U, adapter.step_size, counts[-1], adapter.inverse_mass
        )
        adapter.update(proposal)
        assert adapter.trajectory_length <= 6 * adapter.step_size * (1 + 1e-12)
    assert max(counts) <= 6 and min(counts) >= 1

    tiny = ChEESAdapter(4, 0, step_size=1e-4, trajectory_length=10.0)
    assert tiny.trajectory_length == pytest.approx(0.1)
    counts = []
    for _ in range(64):
        counts.append(tiny.num_steps())
        tiny.update(proposal)  # frozen: only advances the jitter
    assert max(counts) <= 1000 and max(counts) > 980  # ceil(u_k 1000), u_k up to 63/64


# --------------------------------------------------------------------------------------------
# the adapter: statistical test

ADAPT_CHAINS = 64
ADAPT_WARMUP = 400
#: the last slow window of a 400-step warmup: iterations 150-349
ADAPT_WINDOW = 200
#: assumed bound on the integrated autocorrelation time of x_i^2 from one warmup iteration to
#: the next (a jittered trajectory near ChEES's optimum decorrelates x^2 in a few transitions)
ADAPT_TAU = 10.0


def run_adaptation(seed, num_samples=50):
    """ChEES warmup on a 10-d Gaussian with sds 0.1-10 from N(0, I) starts, then
    ``num_samples`` frozen transitions: returns (learnt / true variances, final step size,
    final trajectory length, mean harmonic-mean acceptance after warmup, leapfrog counts)."""
    pyro.set_rng_seed(seed)
    scales = torch.logspace(-1, 1, 10)
    U = _diag_gauss(scales)
    state = init_state(U, torch.randn(ADAPT_CHAINS, 10))
    adapter = ChEESAdapter(10, ADAPT_WARMUP, step_size=0.1)
    counts, harmonic = [], []
    for _ in range(ADAPT_WARMUP + num_samples):
        counts.append(adapter.num_steps())
        frozen = adapter.frozen
        state, _, proposal = chees_hmc_step(
            state, U, adapter.step_size, counts[-1], adapter.inverse_mass
        )
        adapter.update(proposal)
        if frozen:
            harmonic.append(float(1 / (1 / proposal.accept_prob).mean()))
    ratio = adapter.inverse_mass / scales**2
    return (
        ratio,
        adapter.step_size,
        adapter.trajectory_length,
        sum(harmonic) / len(harmonic),
        counts,
    )


def test_adaptation_learns_a_gaussian():
    """Inverse mass: the variance pooled over 64 chains x 200 iterations of the last window,
    with at most ADAPT_TAU iterations per independent draw, has relative sd sqrt(2 tau / n) =
    0.04; Bonferroni over the 10 coordinates at 1e-3 gives z = 4.06, a tolerance of 16%.
    Trajectory length: with the variances as inverse mass every coordinate oscillates with period
    2 pi, and the jittered ChEES objective E_u[sin^2(u T)] peaks at T = 2.25; step size: the
    acceptance after warmup, at the frozen iterate average, ends somewhat above the target (as
    in Stan). Fails with the ChEES gradient's sign flipped (T about 0.65), with the arithmetic
    instead of the harmonic mean of the acceptance (0.55 after warmup), and on 4 seeds of 5
    without carrying T over the mass updates (T about 8-9)."""
    ratio, step_size, trajectory_length, accept, counts = run_adaptation(0)
    tol = _z_critical(10) * math.sqrt(2 * ADAPT_TAU / (ADAPT_CHAINS * ADAPT_WINDOW))
    assert (ratio - 1).abs().max() < tol, f"learnt / true variances {ratio}"
    assert 1.0 < trajectory_length < 3.5
    assert 0.6 < accept < 0.9
    assert 0.3 < step_size < 1.5
    assert max(counts) <= 1000
    # after warmup a transition makes about T / (2 eps) leapfrog steps, not hundreds
    assert sum(counts[ADAPT_WARMUP:]) / len(counts[ADAPT_WARMUP:]) < 10


# --------------------------------------------------------------------------------------------
# argument checks


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(dim=0), "dim"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(step_size=0.0), "step_size"),
        (dict(step_size=math.nan), "step_size"),
        (dict(trajectory_length=-1.0), "trajectory_length"),
        (dict(target_accept=1.0), "target_accept"),
        (dict(max_num_steps=0), "max_num_steps"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(decay=0.0), "decay"),
        (dict(decay=1.5), "decay"),
        (dict(inverse_mass=torch.ones(3)), "inverse_mass"),
        (dict(inverse_mass=-torch.ones(2)), "inverse_mass"),
        (dict(base_window=0), "base_window"),
        (dict(init_buffer=-1), "init_buffer"),
    ],
)
def test_adapter_bad_arguments(kwargs, name):
    args = dict(dim=2, warmup_steps=100) | kwargs
    with pytest.raises(ValueError, match=name):
        ChEESAdapter(**args)


def test_step_bad_arguments():
    U = _diag_gauss(torch.ones(2))
    state = init_state(U, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="num_steps"):
        chees_hmc_step(state, U, 0.1, 0)
    with pytest.raises(ValueError, match="step_size"):
        chees_hmc_step(state, U, -0.1, 2)
    with pytest.raises(ValueError, match="inverse_mass"):
        chees_hmc_step(state, U, 0.1, 2, torch.ones(3))
    with pytest.raises(ValueError, match="grad"):
        chees_hmc_step(init_state(U, torch.zeros(3, 2), with_grad=False), U, 0.1, 2)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_windows(-5)
    adapter = ChEESAdapter(2, 10)
    _, _, proposal = chees_hmc_step(init_state(U, torch.zeros(1, 2)), U, 0.1, 1)
    with pytest.raises(ValueError, match="at least 2 chain"):
        adapter.update(proposal)
