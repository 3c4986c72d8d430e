"""Property tests (hypothesis): the coordinates object's round trips and log-determinants, the
site layout's round trips, and the flows' inverse / log-determinant consistency."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import perturb
from pyro_ebm import GaussianEnergy, StandardizedEnergy
from pyro_ebm.coordinates import AffineCoordinates, needs_standardization
from pyro_ebm.energy import SiteLayout
from pyro_ebm.flows import AffineFlow, RealNVP, SplineFlow, Standardized

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _coordinates(kind: str, dim: int, seed: int) -> AffineCoordinates:
    g = torch.Generator().manual_seed(seed)
    loc = 10 * torch.randn(dim, generator=g, dtype=torch.float64)
    if kind == "diagonal":
        return AffineCoordinates(loc, torch.rand(dim, generator=g, dtype=torch.float64) * 5 + 0.01)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    if kind == "tril":
        tril = torch.tril(a, -1) + torch.diag(
            torch.rand(dim, generator=g, dtype=torch.float64) + 0.1
        )
        return AffineCoordinates(loc, scale_tril=tril)
    return AffineCoordinates(loc, whitening=a + dim * torch.eye(dim, dtype=torch.float64))


@SETTINGS
@given(
    kind=st.sampled_from(["diagonal", "tril", "whitening"]),
    dim=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    batch=st.lists(st.integers(1, 4), min_size=0, max_size=2),
)
def test_coordinates_round_trip_and_log_det(kind, dim, seed, batch):
    c = _coordinates(kind, dim, seed)
    x = torch.randn(*batch, dim, dtype=torch.float64)
    u = c.to_u(x)
    assert u.shape == x.shape
    assert torch.allclose(c.to_x(u), x, atol=1e-8, rtol=1e-8)
    # to_x is the affine map m + S u, and log_det its log-determinant
    s = c.matrix()
    assert torch.allclose(c.to_x(u), c.loc + u @ s.T, atol=1e-8, rtol=1e-8)
    assert math.isclose(float(c.log_det()), float(torch.linalg.slogdet(s)[1]), abs_tol=1e-8)
    assert torch.allclose(c.scale, s.pow(2).sum(-1).sqrt())  # the marginal scales


@SETTINGS
@given(kind=st.sampled_from(["diagonal", "tril", "whitening"]), dim=st.integers(1, 4),
       seed=st.integers(0, 10_000))  # fmt: skip
def test_standardized_energy_is_the_density_of_x(kind, dim, seed):
    """A standard Gaussian in u read in x is N(m, S S^T): log-densities match exactly."""
    c = _coordinates(kind, dim, seed)
    inner = GaussianEnergy(torch.zeros(dim, dtype=torch.float64))
    model = StandardizedEnergy(inner, coordinates=c)
    s = c.matrix()
    mvn = torch.distributions.MultivariateNormal(c.loc, scale_tril=torch.linalg.cholesky(s @ s.T))
    x = c.to_x(torch.randn(5, dim, dtype=torch.float64))
    assert torch.allclose(model.log_prob(x), mvn.log_prob(x), atol=1e-8)


def test_coordinates_bad_arguments_name_the_argument():
    with pytest.raises(TypeError, match="loc"):
        AffineCoordinates([0.0, 1.0])
    with pytest.raises(ValueError, match="scale"):
        AffineCoordinates(torch.zeros(2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="scale_tril"):
        AffineCoordinates(torch.zeros(2), scale_tril=torch.ones(3, 3))
    with pytest.raises(ValueError, match="at most one"):
        AffineCoordinates(torch.zeros(2), torch.ones(2), scale_tril=torch.eye(2))
    with pytest.raises(ValueError, match="loc and scale, or coordinates"):
        StandardizedEnergy(GaussianEnergy(torch.zeros(2)))


def test_one_coordinates_object_is_shared():
    """The trainers' standardization, the energy and the flow view share one object."""
    c = AffineCoordinates.standardizing(torch.tensor([[0.0, 10.0], [2.0, 30.0]]))
    energy = StandardizedEnergy(GaussianEnergy(torch.zeros(2)), coordinates=c)
    flow = Standardized(RealNVP(2, num_layers=1), coordinates=c)
    assert energy.coordinates is c and flow.coordinates is c
    assert torch.equal(flow.loc, torch.tensor([1.0, 20.0]))
    with pytest.raises(ValueError, match="lower-triangular"):
        Standardized(RealNVP(2, num_layers=1), dense=True, coordinates=c)


def test_needs_standardization_rule():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 3, generator=g)
    assert not needs_standardization(z)
    assert needs_standardization(z + 50.0)  # far from centred
    assert needs_standardization(100.0 * z)  # RMS sd above 10
    assert needs_standardization(z * torch.tensor([1.0, 1.0, 1e-3]))  # sds 1000x apart


# -- site layout --------------------------------------------------------------------------------
shapes = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)


@SETTINGS
@given(
    sites=st.dictionaries(
        st.text("abcxyz", min_size=1, max_size=3), shapes, min_size=1, max_size=4
    ),
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple),
)
def test_site_layout_round_trip(sites, batch):
    layout = SiteLayout(sites)
    assert layout.dim == sum(math.prod(s) for s in sites.values())
    x = torch.randn(*batch, layout.dim)
    params = layout.unflatten(x)
    assert list(params) == list(sites)  # the sites' order is kept
    for name, shape in sites.items():
        assert params[name].shape == batch + shape
    assert torch.equal(layout.flatten(params), x)


# -- flows: inverse and log-determinant ---------------------------------------------------------
FLOWS = {
    "realnvp": lambda d: RealNVP(d, num_layers=3, hidden=(8,)),
    "spline": lambda d: SplineFlow(d, num_layers=2, hidden=(8,), count_bins=5, bound=3.0),
    "affine": lambda d: AffineFlow(d, num_coupling_layers=1, hidden=(8,), sinh_arcsinh=True),
    "standardized": lambda d: Standardized(RealNVP(d, num_layers=2, hidden=(8,)), dense=True),
}


@SETTINGS
@given(name=st.sampled_from(sorted(FLOWS)), dim=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_flow_inverse_and_log_det_are_consistent(name, dim, seed):
    """``inverse(forward(z)) = z``, the two log-determinants are opposite, and they equal the
    log-determinant of the Jacobian computed by autograd (flows with perturbed weights)."""
    torch.manual_seed(seed)
    flow = FLOWS[name](dim).double()
    perturb(flow, 0.3)
    if isinstance(flow, Standardized):
        flow.standardize_(3.0 * torch.randn(50, dim, dtype=torch.float64) @ torch.randn(dim, dim))
    z = 1.5 * torch.randn(3, dim, dtype=torch.float64)
    x, ladj = flow.forward(z)
    z2, ladj_inv = flow.inverse(x)
    assert torch.allclose(z2, z, atol=1e-6)
    assert torch.allclose(ladj, -ladj_inv, atol=1e-6)
    for i in range(len(z)):
        jac = torch.autograd.functional.jacobian(lambda v: flow.forward(v[None])[0][0], z[i])
        logdet = float(torch.linalg.slogdet(jac)[1])
        assert math.isclose(logdet, float(ladj[i].detach()), abs_tol=1e-6)
