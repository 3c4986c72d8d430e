"""Pyro's argument names on every kernel (``target_accept_prob``, ``num_steps``,
``adapt_step_size``, ``adapt_mass_matrix``, ``full_mass``, ``max_plate_nesting``,
``jit_compile``, ``init_strategy``).

What is new, and tested here: ``MALA(jit_compile=True)`` (the same chain as without it, the
potential's Python run only to record the graph); ``ChEESHMC(full_mass=True)`` (a dense inverse
mass, exact in the HMC step: the dense step is the identity step in whitened coordinates, and
learnt as the covariance of a correlated Gaussian); ``AdaptiveFlowMCMC``'s
``target_accept_prob``, ``num_steps`` and ``adapt_step_size``; the old names (``target_accept``,
``num_leapfrog``) with a ``FutureWarning`` and the same chain as the new ones; both names a
``TypeError``; bad values an error naming the argument. Every test is deterministic (seeded)
and takes well under a few seconds.
"""

import warnings

import pyro
import pytest
import torch

from pyro_ebm.flows import RealNVP
from pyro_ebm.infer import MALA, MCMC, AdaptiveFlowMCMC, ChEESHMC, CompiledPotential
from pyro_ebm.samplers import ChEESAdapter, chees_hmc_step, hmc_step, init_state
from pyro_ebm.samplers.state import potential_and_grad

# a correlated Gaussian in 3 dimensions: sds 1, 3, 0.5, correlations 0.9 and -0.3
SD = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
CORR = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, -0.3], [0.0, -0.3, 1.0]], dtype=torch.float64)
COV = SD[:, None] * CORR * SD
MEAN = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
PREC = torch.linalg.inv(COV)


def flat_gauss(x):
    """The correlated Gaussian's potential on rows ``(C, 3)``."""
    d = x - MEAN
    return 0.5 * ((d @ PREC) * d).sum(-1)


class CountingPotential:
    """Pyro ``potential_fn`` of the correlated Gaussian that counts its Python calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, params):
        self.calls += 1
        return flat_gauss(params["x"])


def gauss_pot(params):
    return flat_gauss(params["x"])


def run(kernel, warmup=40, samples=5, chains=4, dim=3):
    mcmc = MCMC(
        kernel,
        num_samples=samples,
        warmup_steps=warmup,
        num_chains=chains,
        initial_params={"x": torch.zeros(chains, dim)},
        disable_progbar=True,
    )
    mcmc.run()
    return mcmc


def small_flow():
    return RealNVP(3, num_layers=2, hidden=(8,))


def adaptive(**kwargs):
    kwargs.setdefault("flow", small_flow())
    return AdaptiveFlowMCMC(potential_fn=gauss_pot, num_walkers=8, flow_steps=1, **kwargs)


# kernels whose step size adapts, with the step size they end warmup with (MALA's chains each
# have their own: their median)
KERNELS = {
    "MALA": (
        lambda **kw: MALA(potential_fn=gauss_pot, **kw),
        lambda k: float(torch.as_tensor(k.step_size).median()),
    ),
    "ChEESHMC": (
        lambda **kw: ChEESHMC(potential_fn=gauss_pot, flow=False, **kw),
        lambda k: k.adapter.step_size,
    ),
    "AdaptiveFlowMCMC": (adaptive, lambda k: float(k.sampler.step_size)),
}


def final_step_size(name, seed=0, **kwargs):
    make, step_size = KERNELS[name]
    pyro.set_rng_seed(seed)
    kernel = make(**kwargs)
    run(kernel, chains=8)
    return step_size(kernel)


# --------------------------------------------------------------------------------------------
# the names every step-size kernel shares: adapt_step_size, target_accept_prob


@pytest.mark.parametrize("name", KERNELS)
def test_adapt_step_size_false_keeps_the_step_size(name):
    assert final_step_size(name, step_size=0.07, adapt_step_size=False) == 0.07
    assert final_step_size(name, step_size=0.07) != 0.07  # adapted when True


@pytest.mark.parametrize("name", KERNELS)
def test_a_higher_target_accept_prob_gives_a_smaller_step_size(name):
    """Dual averaging toward a higher acceptance must shrink the step size (seeds 0-2)."""
    for seed in range(3):
        low = final_step_size(name, seed, target_accept_prob=0.3)
        high = final_step_size(name, seed, target_accept_prob=0.95)
        assert high < 0.7 * low, (seed, low, high)


# --------------------------------------------------------------------------------------------
# MALA: jit_compile


def test_mala_jit_compile_gives_the_same_chain_and_records_the_potential_once():
    draws, calls, kernels = {}, {}, {}
    for jit in (False, True):
        pot = CountingPotential()
        pyro.set_rng_seed(3)
        kernels[jit] = kernel = MALA(potential_fn=pot, jit_compile=jit)
        draws[jit] = run(kernel, warmup=30, samples=20).get_samples()["x"]
        calls[jit] = pot.calls
    torch.testing.assert_close(draws[True], draws[False], rtol=1e-9, atol=1e-12)
    # 50 steps, and step-size searches: the Python potential runs at each step without jit,
    # and with it only to set the target up and record the graph (6 calls), and to record it
    # for the two batch shapes of the density-depth check after the run (6 more)
    assert calls[False] >= 50
    assert calls[True] <= 16
    compiled = kernels[True]._potential.potential
    assert isinstance(compiled, CompiledPotential)
    x = torch.randn(4, 3)
    u, g = potential_and_grad(kernels[True]._potential, x)
    u0, g0 = potential_and_grad(kernels[False]._potential, x)
    torch.testing.assert_close(u, u0)
    torch.testing.assert_close(g, g0)


def test_mala_jit_arguments():
    with pytest.raises(TypeError, match="jit_compile"):
        MALA(potential_fn=gauss_pot, jit_compile="yes")
    with pytest.raises(TypeError, match="jit_options"):
        MALA(potential_fn=gauss_pot, jit_compile=True, jit_options=["check_trace"])
    kernel = MALA(potential_fn=gauss_pot, jit_compile=True, jit_options={"check_trace": False})
    assert kernel.jit_compile and kernel.jit_options == {"check_trace": False}


def test_mala_old_name_same_chain_and_both_names_are_a_type_error():
    pyro.set_rng_seed(0)
    new = run(MALA(potential_fn=gauss_pot, target_accept_prob=0.8)).get_samples()["x"]
    pyro.set_rng_seed(0)
    with pytest.warns(FutureWarning, match="use target_accept_prob"):
        kernel = MALA(potential_fn=gauss_pot, target_accept=0.8)
    assert torch.equal(run(kernel).get_samples()["x"], new)
    # both names, even with the new one at its default value
    for value in (0.574, 0.8, 0.6):
        with pytest.raises(TypeError, match="target_accept_prob.*target_accept"):
            MALA(potential_fn=gauss_pot, target_accept_prob=value, target_accept=0.8)


# --------------------------------------------------------------------------------------------
# ChEESHMC: full_mass


@pytest.mark.parametrize("step", ["chees", "hmc"])
def test_dense_mass_step_is_the_identity_step_in_whitened_coordinates(step):
    """HMC with inverse mass A = L L^T on U(q) is HMC with the identity on U(L y), q = L y,
    p_y = L^T p_q: the same random numbers give the same chain, mapped by L (checks the
    momentum's distribution, the kinetic energy and the position update together)."""
    chol = torch.linalg.cholesky(COV)

    def whitened(y):
        return flat_gauss(y @ chol.T)

    q0 = MEAN + torch.randn(16, 3) @ chol.T
    y0 = torch.linalg.solve_triangular(chol, q0.T, upper=False).T
    results = []
    for pot, x0, mass in ((flat_gauss, q0, COV), (whitened, y0, None)):
        torch.manual_seed(5)
        state = init_state(pot, x0)
        for _ in range(3):
            if step == "chees":
                state, info, proposal = chees_hmc_step(state, pot, 0.4, 5, mass)
            else:
                state, info = hmc_step(state, pot, 0.4, 5, mass)
                proposal = None
        results.append((state, info, proposal))
    (sq, iq, pq), (sy, iy, py) = results
    torch.testing.assert_close(sq.x, sy.x @ chol.T)
    torch.testing.assert_close(iq.accept_prob, iy.accept_prob)
    assert 0.05 < float(iq.accept_prob.mean()) < 1.0  # not a trivial chain
    assert not torch.equal(sq.x, q0)
    if step == "chees":
        torch.testing.assert_close(pq.velocity, py.velocity @ chol.T)
        torch.testing.assert_close(pq.x, py.x @ chol.T)


def test_a_diagonal_matrix_given_dense_gives_the_diagonal_chain():
    diag = SD**2
    out = []
    for mass in (diag, torch.diag(diag)):
        torch.manual_seed(1)
        state = init_state(flat_gauss, torch.randn(8, 3))
        state, info, proposal = chees_hmc_step(state, flat_gauss, 0.3, 4, mass)
        out.append((state.x, info.accept_prob, proposal.velocity))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b)


def test_chees_full_mass_learns_the_covariance_of_a_correlated_gaussian():
    """32 chains, 300 warmup steps (~2 s). Measured: relative Frobenius error of the inverse
    mass 0.004-0.026 on seeds 0-9; a diagonal estimate's is 0.4."""
    pyro.set_rng_seed(0)
    kernel = ChEESHMC(potential_fn=gauss_pot, flow=False, full_mass=True)
    run(kernel, warmup=300, samples=1, chains=32)
    mass = kernel.inverse_mass_matrix
    assert mass.shape == (3, 3)
    torch.testing.assert_close(mass, mass.T)
    assert float((mass - COV).norm() / COV.norm()) < 0.1
    assert float((torch.diag(COV.diagonal()) - COV).norm() / COV.norm()) > 0.3
    # the step size a whitened target allows (the diagonal metric's is limited by the
    # correlations)
    assert kernel.adapter.step_size > 0.5


def test_chees_diagonal_mass_by_default_and_no_adaptation_keeps_the_identity():
    pyro.set_rng_seed(0)
    kernel = ChEESHMC(potential_fn=gauss_pot, flow=False)
    run(kernel, warmup=100, samples=1, chains=8)
    assert kernel.inverse_mass_matrix.shape == (3,)
    assert not torch.equal(kernel.inverse_mass_matrix, torch.ones(3))
    kernel = ChEESHMC(potential_fn=gauss_pot, flow=False, full_mass=True, adapt_mass_matrix=False)
    run(kernel, warmup=100, samples=1, chains=8)
    assert torch.equal(kernel.inverse_mass_matrix, torch.eye(3))


def test_chees_dense_trajectory_carry_over_reduces_to_the_diagonal_rule():
    old, new = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.3, 4.0, 0.1])
    shifts = []
    for full, (a, b) in ((False, (old, new)), (True, (torch.diag(old), torch.diag(new)))):
        adapter = ChEESAdapter(3, 100, full_mass=full)
        before = adapter._log_t
        adapter._rescale_log_t(a, b)
        shifts.append(adapter._log_t - before)
    assert shifts[0] != 0
    assert shifts[1] == pytest.approx(shifts[0], rel=1e-10)
    # a rotation of both matrices leaves the shift unchanged
    rot, _ = torch.linalg.qr(torch.randn(3, 3))
    adapter = ChEESAdapter(3, 100, full_mass=True)
    before = adapter._log_t
    adapter._rescale_log_t(rot @ torch.diag(old) @ rot.T, rot @ torch.diag(new) @ rot.T)
    assert adapter._log_t - before == pytest.approx(shifts[0], rel=1e-8)


def test_full_mass_argument_errors():
    with pytest.raises(TypeError, match="full_mass"):
        ChEESHMC(potential_fn=gauss_pot, full_mass="yes")
    with pytest.raises(TypeError, match="target_accept_prob"):
        ChEESHMC(potential_fn=gauss_pot, target_accept_prob="0.8")
    with pytest.raises(ValueError, match="target_accept_prob"):
        ChEESHMC(potential_fn=gauss_pot, target_accept_prob=1.0)
    with pytest.raises(ValueError, match="inverse_mass"):
        ChEESAdapter(3, 100, full_mass=True, inverse_mass=torch.ones(3))
    with pytest.raises(ValueError, match="inverse_mass"):
        ChEESAdapter(3, 100, full_mass=True, inverse_mass=-torch.eye(3))
    state = init_state(flat_gauss, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="symmetric"):
        chees_hmc_step(state, flat_gauss, 0.1, 2, torch.triu(torch.ones(3, 3)))
    with pytest.raises(ValueError, match="inverse_mass"):
        chees_hmc_step(state, flat_gauss, 0.1, 2, torch.eye(2))


# --------------------------------------------------------------------------------------------
# AdaptiveFlowMCMC: target_accept_prob, num_steps, adapt_step_size; the old names


def test_adaptive_num_steps_sets_the_leapfrog_steps_of_local_hmc_moves():
    calls = {}
    for steps in (1, 4):
        pot = CountingPotential()
        pyro.set_rng_seed(0)
        kernel = AdaptiveFlowMCMC(
            potential_fn=pot, flow=small_flow(), num_walkers=8, flow_steps=1, local_move="hmc",
            num_steps=steps, production_local_steps=1,
        )  # fmt: skip
        run(kernel, warmup=20, samples=8)
        assert kernel.num_steps == steps and kernel.sampler.num_leapfrog == steps
        calls[steps] = pot.calls
    # each local move evaluates the potential once per leapfrog step: at least 3 more per move
    assert calls[4] - calls[1] >= 3 * 15


@pytest.mark.parametrize(
    "old, new, value, local_move",
    [("target_accept", "target_accept_prob", 0.8, "mala"), ("num_leapfrog", "num_steps", 3, "hmc")],
)
def test_adaptive_old_names_warn_and_give_the_same_chain(old, new, value, local_move):
    pyro.set_rng_seed(0)
    kernel = adaptive(local_move=local_move, **{new: value})
    draws = run(kernel, warmup=20, samples=4).get_samples()["x"]
    pyro.set_rng_seed(0)
    with pytest.warns(FutureWarning, match=f"{old} is deprecated: use {new}"):
        old_kernel = adaptive(local_move=local_move, **{old: value})
    assert getattr(old_kernel, new) == value
    assert old_kernel.sampler_options == kernel.sampler_options
    assert torch.equal(run(old_kernel, warmup=20, samples=4).get_samples()["x"], draws)
    with pytest.raises(TypeError, match=f"{new}.*{old}"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        adaptive(local_move=local_move, **{new: value, old: value})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adaptive(local_move=local_move, **{new: value})  # the new name does not warn


def test_adaptive_default_target_depends_on_the_local_move():
    pyro.set_rng_seed(0)
    kernel = adaptive()
    assert kernel.target_accept_prob is None
    run(kernel, warmup=4, samples=1)
    assert kernel.sampler.adapter.target_accept == 0.574
    kernel = adaptive(local_move="hmc")
    run(kernel, warmup=4, samples=1)
    assert kernel.sampler.adapter.target_accept == 0.75
    kernel = adaptive(target_accept_prob=0.6)
    run(kernel, warmup=4, samples=1)
    assert kernel.sampler.adapter.target_accept == 0.6


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"target_accept_prob": 0.0}, ValueError, "target_accept_prob"),
        ({"target_accept_prob": 1.5}, ValueError, "target_accept_prob"),
        ({"target_accept_prob": "0.8"}, TypeError, "target_accept_prob"),
        ({"target_accept_prob": True}, TypeError, "target_accept_prob"),
        ({"num_steps": 0}, ValueError, "num_steps"),
        ({"num_steps": 2.5}, TypeError, "num_steps"),
        ({"num_steps": 3}, ValueError, "num_steps sets .* local_move='hmc'"),  # MALA: no effect
        ({"adapt_step_size": "no"}, TypeError, "adapt_step_size"),
    ],
)
def test_adaptive_bad_arguments_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        adaptive(**kwargs)
