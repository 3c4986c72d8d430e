"""The speed options of the NeuTra kernels: ``AffineFlow`` and ``jit_compile=True``."""

import pickle

import pyro
import pytest
import torch
from pyro.ops.integrator import potential_grad
from test_kernels import _assert_within_mcse, gauss_chains, gauss_target, moment_series

import pyro_ebm
from conftest import perturb
from pyro_ebm.datasets import EIGHT_SCHOOLS_DATA, eight_schools_noncentered
from pyro_ebm.flows import AffineFlow, fit_reverse_kl
from pyro_ebm.infer import (
    CompiledPotential,
    FlowHMC,
    FlowNUTS,
    LatentPotential,
    compile_value_and_grad,
)
from pyro_ebm.infer.neutra import _AutogradValueAndGrad

MODEL_ARGS = (
    EIGHT_SCHOOLS_DATA["J"],
    torch.tensor(EIGHT_SCHOOLS_DATA["y"]),
    torch.tensor(EIGHT_SCHOOLS_DATA["sigma"]),
)


@pytest.mark.parametrize(
    "full, couplings, sas", [(True, 0, False), (False, 0, False), (True, 2, False), (True, 0, True)]
)
def test_affine_flow_inverse_logdet_and_identity_at_init(full, couplings, sas):
    flow = AffineFlow(4, full=full, num_coupling_layers=couplings, hidden=(8,), sinh_arcsinh=sas)
    z = torch.randn(16, 4)
    x, ladj = flow.forward(z)
    if sas:  # sinh(asinh(z)) is z up to rounding
        assert torch.allclose(x, z, atol=1e-12) and ladj.abs().max() < 1e-12
    else:
        assert torch.equal(x, z) and torch.equal(ladj, torch.zeros(16))
    perturb(flow, 0.3)
    x, ladj = flow.forward(z)
    z2, ladj_inv = flow.inverse(x)
    assert torch.allclose(z2, z, atol=1e-10) and torch.allclose(ladj_inv, -ladj, atol=1e-10)
    assert (x - z).abs().max() > 1e-2
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: flow.forward(v)[0], z[i])
        assert torch.allclose(torch.linalg.slogdet(jac)[1], ladj[i], atol=1e-10)
    tril = flow.scale_tril
    assert torch.equal(tril, tril.tril()) and (tril.diagonal() > 0).all()
    if not full:
        assert torch.equal(tril, torch.diag(tril.diagonal()))
    if couplings == 0 and not sas:  # then x = loc + L z exactly
        assert torch.allclose(x, flow.loc + z @ tril.T, atol=1e-12)


def test_affine_flow_fits_a_correlated_gaussian_by_reverse_kl():
    pot, mean, cov = gauss_target()
    energy = pot.energy
    flow = AffineFlow(2)
    fit_reverse_kl(flow, energy, num_steps=1500, num_samples=256, lr=2e-2)
    with torch.no_grad():
        lt = flow.scale_tril
        assert torch.allclose(flow.loc, mean, atol=0.1)
        assert torch.allclose(lt @ lt.T, cov, atol=0.15)


@pytest.mark.parametrize("target", ["model", "potential_fn"])
def test_jit_latent_potential_matches_the_python_one_and_pickles(target):
    if target == "model":
        potential = pyro_ebm.ModelEnergy(eight_schools_noncentered, MODEL_ARGS)
        dim = 10
    else:
        potential, dim = gauss_target()[0].energy, 2
    flow = perturb(AffineFlow(dim, num_coupling_layers=2, hidden=(8,)), 0.1)
    flow.requires_grad_(False)
    plain = LatentPotential(potential, flow)
    jitted = LatentPotential(potential, flow, jit_compile=True)
    for _ in range(3):  # traced at the first call, the graph reused on new points
        z = torch.randn(dim)
        g0, u0 = potential_grad(plain, {"z": z})
        g1, u1 = potential_grad(jitted, {"z": z})
        assert torch.allclose(u0, u1, atol=1e-10)
        assert torch.allclose(g0["z"], g1["z"], atol=1e-10)
    # the whole gradient was compiled, not the value alone (the fallback)
    assert not isinstance(jitted._compiled, _AutogradValueAndGrad)
    clone = pickle.loads(pickle.dumps(jitted))
    assert clone._compiled is None and clone.jit_compile
    z = torch.randn(dim)
    assert torch.allclose(clone({"z": z}), plain({"z": z}), atol=1e-10)


def test_compiled_gradient_of_an_energy_still_being_trained():
    """An MLP energy whose parameters require gradients (a trainer's model): the compiled graph
    holds them as constants, and gradient and value equal autograd's at new points."""
    energy = pyro_ebm.MLPEnergy(3, hidden=(16, 16))
    assert all(p.requires_grad for p in energy.parameters())
    fn = lambda z: energy(z[None])[0]  # noqa: E731
    compiled = compile_value_and_grad(fn, torch.randn(3))
    assert not isinstance(compiled, _AutogradValueAndGrad)
    for _ in range(3):
        z = torch.randn(3, requires_grad=True)
        (grad,) = torch.autograd.grad(fn(z), z)
        g, u = compiled(z.detach())
        assert torch.allclose(u, fn(z).detach(), atol=1e-12)
        assert torch.allclose(g, grad, atol=1e-12)
        # the parameters are constants of the graph: no autograd bookkeeping in a call
        assert not (g.requires_grad or u.requires_grad)


def test_compiled_gradient_of_a_model_with_a_pyro_param():
    """A model reading a ``pyro.param`` (a tensor that requires grad, not an ``nn.Parameter``):
    compiled, not the fallback, and equal to the Python latent potential; the param keeps
    requiring grad."""
    pyro.clear_param_store()

    def model(y):
        s = pyro.param("s", torch.tensor(1.5), constraint=pyro.distributions.constraints.positive)
        m = pyro.sample("m", pyro.distributions.Normal(0.0, s))
        with pyro.plate("n", len(y)):
            pyro.sample("y", pyro.distributions.Normal(m, 1.0), obs=y)

    energy = pyro_ebm.ModelEnergy(model, (torch.randn(20),))
    flow = perturb(AffineFlow(1, sinh_arcsinh=True), 0.3).requires_grad_(False)
    plain, compiled = LatentPotential(energy, flow), LatentPotential(energy, flow, jit_compile=True)
    for _ in range(3):
        z = torch.randn(1)
        g0, u0 = potential_grad(plain, {"z": z})
        g1, u1 = potential_grad(compiled, {"z": z})
        assert torch.allclose(u0, u1, atol=1e-10) and torch.allclose(g0["z"], g1["z"], atol=1e-10)
    assert not isinstance(compiled._compiled, _AutogradValueAndGrad)
    g, u = compiled._compiled(torch.randn(1))  # the param is a constant of the graph
    assert not (g.requires_grad or u.requires_grad)
    assert pyro.param("s").unconstrained().requires_grad


def test_compiled_gradient_falls_back_to_autograd_with_a_warning(caplog):
    """A function that reads a tensor as a Python number cannot be recorded as one graph of
    operations: the value is traced alone and differentiated by autograd, with a warning."""

    def fn(z):
        return (z**2).sum() * float(z.abs().max().item() > -1.0)

    with caplog.at_level("WARNING", logger="pyro_ebm.infer.neutra"):
        compiled = compile_value_and_grad(fn, torch.ones(2))
    assert isinstance(compiled, _AutogradValueAndGrad)
    assert "compiling the gradient failed" in caplog.text
    g, u = compiled(torch.tensor([1.0, -2.0]))
    assert torch.allclose(g, torch.tensor([2.0, -4.0])) and torch.allclose(u, torch.tensor(5.0))


class _NoFuncTransforms(torch.autograd.Function):
    """An ``autograd.Function`` without ``setup_context``, as Pyro's ``_SafeLog`` (used by
    enumeration): ``torch.func`` transforms refuse it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_compiled_potential_falls_back_when_its_graph_disagrees_with_the_potential(caplog):
    """A potential that guards its own errors (as a Pyro model's potential does) returns inf
    where ``torch.func`` cannot run it, so the recorded graph would be inf everywhere. The
    compiled potential compares the graph's values with the potential's on the first batch and
    runs the potential as is, with one warning. Found by a walkthrough: ``FlowHMC(model,
    jit_compile=True)`` on an enumerated mixture refused every start. Fails without the
    comparison (the values are inf)."""

    def potential(x):
        try:
            y = _NoFuncTransforms.apply(x)
        except RuntimeError:
            return torch.full(x.shape[:1], torch.inf, dtype=x.dtype)
        return 0.5 * (y**2).sum(-1)

    compiled = CompiledPotential(potential)
    x = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    with caplog.at_level("WARNING", logger="pyro_ebm.infer.neutra"):
        u, g = compiled.value_and_grad(x)
        compiled.value_and_grad(torch.zeros(3, 2))  # another batch shape: no second warning
    assert torch.allclose(u, torch.tensor([2.5, 4.5])) and torch.allclose(g, x)
    assert caplog.text.count("compiling the potential failed") == 1


@pytest.mark.parametrize("sas", [False, True])
def test_frozen_affine_flow_caches_its_constants_and_notices_updates(sas):
    """A frozen AffineFlow reuses its derived scales; ``load_state_dict`` (an in-place update)
    invalidates them, and a flow that requires gradients never caches."""
    flow = perturb(AffineFlow(3, sinh_arcsinh=sas), 0.3).requires_grad_(False)
    other = perturb(AffineFlow(3, sinh_arcsinh=sas), 0.6)
    z = torch.randn(5, 3)
    before = flow.forward(z)
    assert "_frozen_cache" in flow.layers[-1].__dict__
    flow.load_state_dict(other.state_dict())
    after, expected = flow.forward(z), other.forward(z)
    assert torch.allclose(after[0], expected[0]) and torch.allclose(after[1], expected[1])
    assert not torch.allclose(before[0], after[0])
    assert "_frozen_cache" not in other.layers[-1].__dict__
    x, _ = other.forward(z)
    x.sum().backward()  # gradients still reach every parameter of a trainable flow
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in other.parameters())
    # inference mode neither fills the cache nor breaks a flow made inside it
    fresh = perturb(AffineFlow(3, sinh_arcsinh=sas), 0.3).requires_grad_(False)
    with torch.inference_mode():
        fresh.forward(z)
        made_inside = AffineFlow(3, sinh_arcsinh=sas).requires_grad_(False)
        made_inside.forward(z)
    assert "_frozen_cache" not in fresh.layers[-1].__dict__
    zg = z.clone().requires_grad_()
    fresh.forward(zg)[0].sum().backward()  # the cache, filled now, works with autograd
    assert zg.grad is not None


def _rough_affine():
    """An affine flow a bit off the target (location, scales and correlation wrong)."""
    flow = AffineFlow(2)
    with torch.no_grad():
        flow.layers[-1].loc.copy_(torch.tensor([0.7, -0.2]))
        flow.layers[-1].log_diag.copy_(torch.tensor([0.3, 0.1]))
        flow.layers[-1].off_diag.fill_(0.2)
    return flow


@pytest.mark.parametrize("cls", [FlowHMC, FlowNUTS])
def test_jit_neutra_kernels_target_correlated_gaussian(cls):
    """FlowHMC/FlowNUTS with ``jit_compile=True`` and an imperfect AffineFlow: means and
    covariance within Bonferroni MCSE bounds (2 chains of 500-600 draws)."""
    kwargs = {"num_steps": 3} if cls is FlowHMC else {"max_tree_depth": 3}
    kernel = cls(
        potential_fn=gauss_target()[0],
        flow=_rough_affine(),
        jit_compile=True,
        adapt_mass_matrix=False,
        **kwargs,
    )
    _assert_within_mcse(moment_series(*gauss_chains(kernel, 0, num_chains=2, num_samples=600)))


def test_jit_flow_nuts_on_a_model_with_a_constrained_site():
    """Eight schools (``tau`` positive) through ``jit_compile=True``: the draws match those of the
    Python potential to rounding, with the same seed."""
    flow = AffineFlow(10)
    fit_reverse_kl(
        flow, pyro_ebm.ModelEnergy(eight_schools_noncentered, MODEL_ARGS), 100, 64, lr=2e-2
    )
    draws = []
    for jit in (False, True):
        pyro.set_rng_seed(3)
        mcmc = pyro.infer.MCMC(
            FlowNUTS(eight_schools_noncentered, flow=flow, jit_compile=jit),
            num_samples=20,
            warmup_steps=20,
            disable_progbar=True,
        )
        mcmc.run(*MODEL_ARGS)
        draws.append(mcmc.get_samples())
    assert set(draws[1]) == {"theta_trans", "mu", "tau"} and (draws[1]["tau"] > 0).all()
    for k in draws[0]:
        assert torch.allclose(draws[0][k], draws[1][k], atol=1e-6), k


def test_sinh_arcsinh_affine_flow_fits_a_skewed_target_better_than_a_gaussian():
    """The log of a Gamma(2, 1) variable, density ``exp(2 y - e^y) / Gamma(2)`` (skewed, with a
    long left tail): fitted by reverse KL, the sinh-arcsinh flow's KL (log Z = 0 known, so the
    loss is the KL itself, averaged on 20000 fresh draws) is well below the Gaussian's, and the
    layer stays finite far out in the tails. (Seeds 0-4: KL 0.0026-0.0046 against the
    Gaussian's 0.038-0.046.)"""
    torch.manual_seed(0)

    def potential(y):
        return (torch.exp(y) - 2.0 * y).sum(-1)  # log Gamma(2) = 0

    kls = {}
    for sas in (False, True):
        flow = AffineFlow(1, sinh_arcsinh=sas)
        fit_reverse_kl(flow, potential, num_steps=1500, num_samples=256, lr=2e-2)
        with torch.no_grad():
            y, log_q = flow.sample_and_log_prob(20000)
            kls[sas] = float((log_q + potential(y)).mean())
    # Gaussian KL here is about 0.03 nats; a sinh-arcsinh fit is within Monte Carlo noise of 0
    assert kls[False] > 0.02 and kls[True] < 0.3 * kls[False], kls
    far = torch.tensor([[-1e4], [1e4]])
    x, ladj = flow.forward(far)
    assert torch.isfinite(ladj).all() and not torch.isnan(x).any()


def test_sinh_arcsinh_keeps_gaussian_tails_when_fitted_from_a_too_wide_start():
    """Reverse KL from the unit Gaussian to N(0, 0.1^2 I): the fit must shrink the flow tenfold,
    and thin tails are its quickest way to drop far-out draws. The tail weight is clamped to
    Gaussian-or-heavier, so the fit ends Gaussian (importance-sampling efficiency 0.972-0.986
    over seeds 0-3, bound 0.9; without the clamp 0.56-0.74, log tail weight -1.05)."""
    torch.manual_seed(0)

    def potential(x):
        return 0.5 * (x / 0.1).square().sum(-1)

    flow = AffineFlow(3, sinh_arcsinh=True)
    fit_reverse_kl(flow, potential, num_steps=300, num_samples=256, lr=2e-2)
    with torch.no_grad():
        x, log_q = flow.sample_and_log_prob(20000)
        w = torch.softmax(-potential(x) - log_q, 0)
    assert float(1 / w.square().sum() / len(w)) > 0.9
