r"""Energy models and their adapters to Pyro.

Sign convention (Pyro's): ``potential = energy = -log unnormalized density``, so an energy
:math:`E` defines :math:`p(x) = e^{-E(x)} / Z`. An :class:`EnergyModel` maps a flat
``(batch, dim)`` tensor to ``(batch,)`` energies, which is also the ``potential_fn`` shape used by
:mod:`pyro_ebm.samplers`. The adapters connect energies and Pyro both ways:

- :func:`potential_fn` turns an energy into a ``potential_fn`` for :class:`pyro.infer.mcmc.HMC` /
  :class:`~pyro.infer.mcmc.NUTS` (a dict of tensors in, a scalar out);
- :class:`EnergyDistribution` makes an energy a (unnormalized) site of a Pyro model;
- :class:`ModelEnergy` turns a Pyro model into an energy over its flattened unconstrained latents.

References:

- Nijkamp, Hill, Han, Zhu, Wu (2020), "On the Anatomy of MCMC-Based Maximum Likelihood Learning
  of Energy-Based Models", https://arxiv.org/abs/1903.12370
- Grenioux, Moulines, Gabrié (2023), "Balanced Training of Energy-Based Models with Adaptive
  Flow Sampling", https://arxiv.org/abs/2306.00684
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import pyro
import torch
from pyro import poutine
from pyro.distributions import TorchDistribution, constraints
from pyro.distributions.util import broadcast_shape
from pyro.infer import config_enumerate
from pyro.infer.autoguide.initialization import InitMessenger, init_to_uniform
from pyro.infer.mcmc.util import initialize_model
from pyro.ops.contract import contract_to_tensor
from torch import Tensor, nn

from ._checks import check_hidden, check_int, check_tensor
from .coordinates import AffineCoordinates
from .layout import SiteLayout

__all__ = [
    "EnergyDistribution",
    "EnergyModel",
    "EnergyPotential",
    "GaussianEnergy",
    "MLPEnergy",
    "ModelEnergy",
    "StandardizedEnergy",
    "TiltedEnergy",
    "potential_fn",
]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
}


def _check_batch(x: Tensor, dim: int, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[-1] != dim:
        raise ValueError(f"{name} must have shape (batch, {dim}), got {tuple(x.shape)}")
    return x


class EnergyModel(nn.Module):
    r"""Base class of energies :math:`E: \mathbb{R}^d \to \mathbb{R}`, ``p(x) ∝ exp(-E(x))``.

    Subclasses implement :meth:`energy` on a ``(batch, dim)`` tensor and return ``(batch,)``;
    calling the module validates the input shape and then calls :meth:`energy`.

    :param int dim: dimension ``d`` of the input space.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, 1)

    def check_input(self, x: Tensor, name: str = "x") -> Tensor:
        r"""Return ``x``, in the model's dtype (a floating ``x`` of another dtype is converted:
        float64 data meet a float32 model), or raise if it is not a ``(batch, dim)`` tensor.

        :param Tensor x: candidate input.
        :param str name: argument name used in the error message.
        """
        x = _check_batch(x, self.dim, name)
        dtype = self._input_dtype()
        if dtype is not None and x.dtype != dtype and x.is_floating_point():
            x = x.to(dtype)
        return x

    def _input_dtype(self) -> torch.dtype | None:
        """The dtype :meth:`check_input` converts to: the parameters' (``None``: none)."""
        p = next(self.parameters(), None)
        return None if p is None else p.dtype

    def energy(self, x: Tensor) -> Tensor:
        r"""Energy of each row of ``x``.

        :param Tensor x: ``(batch, dim)`` points.
        :returns: ``(batch,)`` energies.
        """
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.energy(self.check_input(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class MLPEnergy(EnergyModel):
    r"""Multi-layer perceptron energy with a scalar output.

    ``Linear -> activation`` blocks followed by a ``Linear(hidden[-1], 1)`` layer whose weights
    are scaled by ``last_layer_scale`` and whose bias is zero, so that ``E ≈ 0`` at initialisation
    (the model starts close to the base density when tilted, see :class:`TiltedEnergy`). This is
    the architecture of the 2-D toy experiments of Nijkamp et al. (2020) and Grenioux et al. (2023).

    :param int dim: input dimension.
    :param hidden: widths of the hidden layers.
    :param str activation: one of ``"silu"`` (= ``"swish"``), ``"leaky_relu"``, ``"elu"``,
        ``"softplus"``, ``"tanh"``.
    :param float last_layer_scale: multiplier applied to the default init of the last weights.

    Example::

        >>> E = MLPEnergy(2, hidden=(32, 32))
        >>> E(torch.randn(5, 2)).shape
        torch.Size([5])
        >>> bool(E(torch.randn(5, 2)).abs().max() < 1e-2)
        True
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (128, 128),
        activation: str = "silu",
        last_layer_scale: float = 1e-3,
    ) -> None:
        super().__init__(dim)
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        hidden = check_hidden("hidden", hidden)
        layers: list[nn.Module] = []
        width = dim
        for h in hidden:
            layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
            width = h
        last = nn.Linear(width, 1)
        with torch.no_grad():
            last.weight.mul_(last_layer_scale)
            last.bias.zero_()
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def energy(self, x: Tensor) -> Tensor:
        return self.net(self.check_input(x)).squeeze(-1)


class GaussianEnergy(EnergyModel):
    r"""Diagonal Gaussian energy with learnable ``loc`` and ``log_scale``.

    .. math:: E(x) = \tfrac12 \sum_i \big((x_i - \mu_i)/\sigma_i\big)^2, \qquad
        \log Z = \sum_i \log \sigma_i + \tfrac{d}{2} \log 2\pi

    :param Tensor loc: ``(dim,)`` mean.
    :param scale: ``(dim,)`` or scalar positive standard deviation.

    Example::

        >>> E = GaussianEnergy(torch.zeros(2), torch.ones(2))
        >>> E(torch.tensor([[1.0, 1.0]])).item()
        1.0
        >>> round(E.log_normalizer().item(), 4)  # log(2 pi)
        1.8379
    """

    def __init__(self, loc: Tensor, scale: Tensor | float = 1.0) -> None:
        loc = torch.as_tensor(loc, dtype=torch.get_default_dtype())
        if loc.dim() != 1:
            raise ValueError(f"loc must be a 1-D tensor, got shape {tuple(loc.shape)}")
        scale = torch.as_tensor(scale, dtype=loc.dtype)
        if scale.dim() > 1 or (scale.dim() == 1 and scale.shape != loc.shape):
            raise ValueError(f"scale must be a scalar or have shape {tuple(loc.shape)}")
        if not bool((scale > 0).all()):
            raise ValueError("scale must be positive")
        super().__init__(loc.shape[0])
        self.loc = nn.Parameter(loc.clone())
        self.log_scale = nn.Parameter(scale.log().expand(loc.shape).clone())

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def energy(self, x: Tensor) -> Tensor:
        z = (self.check_input(x) - self.loc) / self.scale
        return 0.5 * z.pow(2).sum(-1)

    def log_normalizer(self) -> Tensor:
        r"""Exact :math:`\log Z = \log \int e^{-E(x)} dx`."""
        return self.log_scale.sum() + 0.5 * self.dim * math.log(2 * math.pi)


class TiltedEnergy(EnergyModel):
    r"""Energy tilted by a base density: :math:`\tilde E(x) = E(x) - \log \rho(x)`.

    The model density is :math:`p(x) \propto e^{-E(x)} \rho(x)` (Grenioux et al., 2023): with
    :math:`E \approx 0` at initialisation the model starts at the base ``rho`` (e.g. the base
    distribution of a normalizing flow), and :math:`E` only learns a correction.

    :param EnergyModel energy: the inner energy ``E`` (registered as the submodule ``inner``).
    :param base: any object with ``log_prob(x) -> (batch,)`` on ``(batch, dim)`` inputs, e.g.
        ``pyro.distributions.Normal(torch.zeros(d), 1.).to_event(1)``. A module is registered
        as a submodule; a distribution is kept as a plain attribute (``.to(device)`` does not
        move it).

    Example::

        >>> import pyro.distributions as dist
        >>> base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        >>> T = TiltedEnergy(MLPEnergy(2, hidden=(8,)), base)
        >>> T(torch.zeros(3, 2)).shape
        torch.Size([3])
    """

    def __init__(self, energy: EnergyModel, base) -> None:
        if not isinstance(energy, EnergyModel):
            raise TypeError(f"energy must be an EnergyModel, got {type(energy).__name__}")
        if not callable(getattr(base, "log_prob", None)):
            raise TypeError(f"base must have a log_prob method, got {type(base).__name__}")
        super().__init__(energy.dim)
        self.inner = energy
        self.base = base  # registered as a submodule by nn.Module.__setattr__ if it is one

    def base_log_prob(self, x: Tensor) -> Tensor:
        r"""``log rho(x)`` of shape ``(batch,)``."""
        lp = self.base.log_prob(x)
        if lp.shape != x.shape[:1]:
            raise ValueError(
                f"base.log_prob must return shape {tuple(x.shape[:1])} on a {tuple(x.shape)} "
                f"input, got {tuple(lp.shape)} (use .to_event(1) on a factorised distribution)"
            )
        return lp

    def energy(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        return self.inner.energy(x) - self.base_log_prob(x)


class StandardizedEnergy(EnergyModel):
    r"""An energy over standardized coordinates :math:`u` read as an energy over the data's,
    :math:`x = m + S u` (:class:`~pyro_ebm.coordinates.AffineCoordinates`):

    .. math:: E_x(x) = E\big(S^{-1} (x - m)\big) + \log|\det S|,

    so that :math:`e^{-E_x}` is the density of :math:`x` when :math:`e^{-E}` is that of
    :math:`u` (the constant keeps normalised quantities such as log-likelihoods right; an inner
    energy with a ``log_normalizer``, an EBFlow, keeps it, and :meth:`log_prob` is exact).
    :class:`~pyro_ebm.train.EBMTrainer` trains on standardized data when the data are far from
    centred and unit-scaled, and :class:`~pyro_ebm.ebflow.EBFlowTrainer` on whitened vectors
    when they are ill-conditioned; both return their model this way.

    :param EnergyModel energy: the energy :math:`E` on standardized coordinates.
    :param Tensor loc: :math:`m`, ``(dim,)``, with
    :param Tensor scale: a diagonal :math:`S = \mathrm{diag}(s)`, :math:`s > 0`, ``(dim,)``;
    :param coordinates: or, instead of ``loc`` and ``scale``, any
        :class:`~pyro_ebm.coordinates.AffineCoordinates` (shared, not copied).

    Example::

        >>> E = StandardizedEnergy(GaussianEnergy(torch.zeros(1)), torch.tensor([5.0]),
        ...                        torch.tensor([2.0]))
        >>> x = torch.tensor([[5.0], [7.0]])
        >>> torch.allclose(E(x), -torch.distributions.Normal(5.0, 2.0).log_prob(x)[:, 0]
        ...                - E.inner.log_normalizer())
        True
    """

    def __init__(
        self,
        energy: EnergyModel,
        loc: Tensor | None = None,
        scale: Tensor | None = None,
        *,
        coordinates: AffineCoordinates | None = None,
    ) -> None:
        if not isinstance(energy, EnergyModel):
            raise TypeError(f"energy must be an EnergyModel, got {type(energy).__name__}")
        super().__init__(energy.dim)
        if (coordinates is None) == (loc is None or scale is None):
            raise ValueError("give either loc and scale, or coordinates")
        if coordinates is None:
            check_tensor("loc", loc, shape=(energy.dim,))
            check_tensor("scale", scale, shape=(energy.dim,))
            coordinates = AffineCoordinates(loc, scale)
        elif not isinstance(coordinates, AffineCoordinates):
            raise TypeError(
                f"coordinates must be an AffineCoordinates, got {type(coordinates).__name__}"
            )
        elif coordinates.dim != energy.dim:
            raise ValueError(f"coordinates has dim {coordinates.dim}, the energy {energy.dim}")
        self.inner = energy
        self.coordinates = coordinates

    @property
    def loc(self) -> Tensor:
        """:math:`m`."""
        return self.coordinates.loc

    @property
    def scale(self) -> Tensor:
        """The marginal scales of :math:`S`."""
        return self.coordinates.scale

    def log_normalizer(self) -> Tensor:
        r""":math:`\log Z` of the inner energy (which must define ``log_normalizer``): the
        density over :math:`x` has the same, since the log-determinant is in the energy."""
        return self.inner.log_normalizer()

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density of ``x`` ``(batch, dim)`` when the inner energy is normalised."""
        return -self.energy(x) - self.log_normalizer()

    def _input_dtype(self) -> torch.dtype | None:
        return None  # standardized in the wider dtype, then converted (see energy)

    def energy(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        z = self.coordinates.to_u(x)  # in the wider of the two dtypes (float64 moments of
        p = next(self.inner.parameters(), None)  # data at large offsets keep their precision)
        return self.inner.energy(z if p is None else z.to(p.dtype)) + self.coordinates.log_det()


class EnergyPotential:
    r"""Picklable Pyro ``potential_fn``: ``params[site] -> energy(x).sum()``.

    ``params[site]`` may have shape ``(dim,)`` or ``(..., dim)``; leading dimensions are
    flattened and the energies summed (independent copies of the same target).

    :param energy: callable ``(batch, dim) -> (batch,)``, usually an :class:`EnergyModel`.
    :param str site: name of the parameter in the dict passed by Pyro.
    """

    def __init__(self, energy: Callable[[Tensor], Tensor], site: str = "x") -> None:
        if not callable(energy):
            raise TypeError(f"energy must be callable, got {type(energy).__name__}")
        if not isinstance(site, str):
            raise TypeError(f"site must be a str, got {type(site).__name__}")
        self.energy = energy
        self.site = site

    def __call__(self, params: dict[str, Tensor]) -> Tensor:
        if self.site not in params:
            raise KeyError(f"site {self.site!r} is missing from params (keys: {sorted(params)})")
        x = params[self.site]
        if x.dim() == 0:
            raise ValueError(f"params[{self.site!r}] must have shape (..., dim), got ()")
        return self.energy(x.reshape(-1, x.shape[-1])).sum()


def potential_fn(energy: Callable[[Tensor], Tensor], site: str = "x") -> EnergyPotential:
    r"""Wrap an energy as a ``potential_fn`` for :class:`pyro.infer.mcmc.HMC` / ``NUTS``.

    The result is an :class:`EnergyPotential` (picklable, so it also works with
    ``MCMC(num_chains > 1)`` in worker processes). Pass the start point with
    ``MCMC(..., initial_params={site: x0})``.

    :param energy: an :class:`EnergyModel` or any callable ``(batch, dim) -> (batch,)``.
    :param str site: name of the latent in Pyro's parameter dict.

    Example::

        >>> from pyro.infer import MCMC, NUTS
        >>> pot = potential_fn(GaussianEnergy(torch.zeros(2)))
        >>> mcmc = MCMC(NUTS(potential_fn=pot), num_samples=5, warmup_steps=5,
        ...             initial_params={"x": torch.zeros(2)}, disable_progbar=True)
        >>> mcmc.run()
        >>> mcmc.get_samples()["x"].shape
        torch.Size([5, 2])
    """
    return EnergyPotential(energy, site)


class EnergyDistribution(TorchDistribution):
    r"""An energy as an **unnormalized** Pyro distribution: ``log_prob(x) = -energy(x)``.

    ``log_prob`` omits :math:`\log Z`, so the distribution is only fit for inference where the
    site is latent and the normaliser is constant (MCMC over ``x``); it must not be used as an
    observed likelihood of a learned energy. It has no ``sample``/``rsample``.

    **NUTS/HMC on a model with this site.** Pyro runs the model once with ordinary sampling to
    guess ``max_plate_nesting`` and its default ``init_to_uniform`` calls ``sample()`` to learn the
    site's shape; Pyro's own :class:`~pyro.distributions.ImproperUniform` fails the same way. Pass
    both ``max_plate_nesting`` and an init strategy that does not sample, e.g.
    ``NUTS(model, max_plate_nesting=0, init_strategy=init_to_value(values={"x": x0}))``.

    :param energy: an :class:`EnergyModel` (``energy.dim`` gives the event shape ``(dim,)``).
    :param batch_shape: batch shape (each batch element is an independent copy).

    Example::

        >>> import pyro
        >>> from pyro.infer import MCMC, NUTS
        >>> from pyro.infer.autoguide.initialization import init_to_value
        >>> E = GaussianEnergy(torch.zeros(2))
        >>> def model():
        ...     pyro.sample("x", EnergyDistribution(E))
        >>> kernel = NUTS(model, max_plate_nesting=0,
        ...               init_strategy=init_to_value(values={"x": torch.zeros(2)}))
        >>> mcmc = MCMC(kernel, num_samples=5, warmup_steps=5, disable_progbar=True)
        >>> mcmc.run()
        >>> mcmc.get_samples()["x"].shape
        torch.Size([5, 2])
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(
        self,
        energy: EnergyModel,
        batch_shape: Sequence[int] = (),
        validate_args: bool | None = None,
    ) -> None:
        dim = getattr(energy, "dim", None)
        if not callable(energy) or not isinstance(dim, int):
            raise TypeError("energy must be a callable with an int attribute dim (an EnergyModel)")
        self.energy = energy
        super().__init__(torch.Size(batch_shape), torch.Size([dim]), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> EnergyDistribution:
        new = self._get_checked_instance(EnergyDistribution, _instance)
        new.energy = self.energy
        super(EnergyDistribution, new).__init__(
            torch.Size(batch_shape), self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        dim = self.event_shape[0]
        if value.dim() < 1 or value.shape[-1] != dim:
            raise ValueError(f"value must have shape (..., {dim}), got {tuple(value.shape)}")
        lp = -self.energy(value.reshape(-1, dim)).reshape(value.shape[:-1])
        return lp.expand(broadcast_shape(lp.shape, self.batch_shape))

    def _no_sampling(self):
        raise NotImplementedError(
            "EnergyDistribution is unnormalized and cannot be sampled directly: draw from it "
            "with MCMC (pyro_ebm.infer kernels or pyro.infer.mcmc.NUTS). Inside a Pyro model, "
            "give the kernel (any of them) init_strategy=init_to_value(values={site: start}), "
            "and NUTS/HMC also max_plate_nesting."
        )

    def sample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        self._no_sampling()

    def rsample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        self._no_sampling()


@contextmanager
def _validation_disabled() -> Iterator[None]:
    """Turn off Pyro's validation and torch distributions' default argument/support checks (their
    ``if not valid.all(): raise`` is data-dependent control flow, which vmap cannot run), then
    restore both settings as they were."""
    torch_default = torch.distributions.Distribution._validate_args
    try:
        with pyro.validation_enabled(False):
            yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(torch_default)


class _InitContinuous(InitMessenger):
    """Pyro's init strategy for continuous sites; discrete sites sample as usual."""

    def _pyro_sample(self, msg: dict) -> None:
        support = getattr(msg["fn"], "support", None)  # none for a plate's subsample site
        if not msg["is_observed"] and support is not None and support.is_discrete:
            return
        super()._pyro_sample(msg)


def _guess_max_plate_nesting(
    model: Callable, args: tuple, kwargs: dict, init_strategy: Callable
) -> int:
    """Pyro guesses plate nesting by running the model with ``sample()``, which unnormalized
    sites such as :class:`EnergyDistribution` lack; run it under the init strategy instead
    (discrete sites, which no init strategy can place, are sampled: Pyro's HMC enumerates
    them)."""
    with poutine.block(), _validation_disabled():
        traced = poutine.trace(_InitContinuous(init_strategy)(model))
        trace = traced.get_trace(*args, **kwargs)
    nesting = [-f.dim for site in trace.nodes.values() for f in site.get("cond_indep_stack", ())]
    return max(nesting, default=0)


def _agree(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` equal up to rounding, relative to the largest entry of ``b`` (a sum of
    large terms that cancel carries the rounding of its terms)."""
    if a.shape != b.shape:
        return False
    scale = 1.0 + float(b.detach().abs().nan_to_num(0.0, 0.0, 0.0).max())
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6 * scale, equal_nan=True)


def _blocker(exc: Exception) -> str:
    """An exception as ``Type: first line of its message``, for a warning."""
    lines = str(exc).strip().splitlines()
    msg = lines[0] if lines else ""
    return f"{type(exc).__name__}: {msg[:300]}{'...' if len(msg) > 300 else ''}"


class ModelEnergy(EnergyModel):
    r"""The potential energy of a Pyro model over its flattened unconstrained latents.

    Uses :func:`pyro.infer.mcmc.util.initialize_model`: ``energy(x)`` equals Pyro's own HMC
    potential (``-log joint`` in unconstrained space, including the log-Jacobians of the
    transforms and any observed sites) at ``unflatten(x)``. Latent sites are laid out in the
    order the model samples them, each flattened row-major. Parameters of the model
    (``pyro.param``) are not registered in this module.

    **Batches.** A batch of ``C > 1`` rows (chains, walkers, particles) is evaluated in the first
    of these ways that works, chosen once on the first such batch and kept in :attr:`batching`:

    - ``"plate"``: one model execution inside an extra outer ``pyro.plate`` left of the model's
      own plates, for models that broadcast that way (as Pyro's vectorized ELBOs also require);
    - ``"vmap"``: :func:`torch.func.vmap` of the per-row potential, which also runs the model's
      Python once per batch. It covers models that do not broadcast over an outer plate (a
      vector observed without a plate, ``.to_event``, ``X @ w``, ``torch.stack`` / ``torch.cat``
      of latents, ...). It runs the model without Pyro's ``poutine.enum`` wrapper (which reads
      ``value.data``, forbidden under vmap) and with Pyro's validation and torch distributions'
      default ``validate_args`` off (their checks are data-dependent control flow), restoring
      both afterwards;
    - ``"loop"``: one model execution per row, typically 10-100x slower. Models with enumerated
      discrete sites always use it; other models fall back to it when neither batched way
      works, with one warning that names what blocked each (vmap cannot run ``.item()``,
      Python ``if`` on a latent, in-place writes of a latent into another tensor, or boolean
      mask indexing such as in ``Multinomial.log_prob``).

    A batched way is kept only if it agrees with the loop on the first rows of that batch
    (values; for vmap also the gradients, ``torch.autograd.grad`` of the sum with respect to the
    batch, as the samplers take them). A single row is always one plain model execution.

    :param model: a Pyro model with continuous latents (discrete ones are enumerated out).
    :param tuple model_args: positional arguments of the model.
    :param dict model_kwargs: keyword arguments of the model.
    :param init_strategy: Pyro init strategy for :attr:`initial_params`.
    :param max_plate_nesting: passed to ``initialize_model`` (guessed if ``None``).

    Example::

        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        >>> E = ModelEnergy(model)
        >>> E.dim, E.site_names
        (2, ('mu', 'sigma'))
        >>> x = torch.zeros(3, 2)
        >>> E(x).shape, E.constrain(x)["sigma"]
        (torch.Size([3]), tensor([1., 1., 1.]))
        >>> E.batching  # plate-free scalar sites broadcast over an outer plate
        'plate'
        >>> def regression():  # X @ w does not broadcast over an outer plate
        ...     w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        ...     pyro.sample("y", dist.Normal(torch.ones(5, 2) @ w, 1.0).to_event(1),
        ...                 obs=torch.zeros(5))
        >>> R = ModelEnergy(regression)
        >>> R(torch.zeros(4, 2)).shape, R.batching
        (torch.Size([4]), 'vmap')

    :ivar batching: how batches of more than one row are evaluated: ``"plate"``, ``"vmap"`` or
        ``"loop"`` (see above); ``None`` until the first such batch.
    """

    def __init__(
        self,
        model: Callable,
        model_args: tuple = (),
        model_kwargs: dict | None = None,
        init_strategy: Callable = init_to_uniform,
        max_plate_nesting: int | None = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if max_plate_nesting is None:
            max_plate_nesting = _guess_max_plate_nesting(
                model, tuple(model_args), dict(model_kwargs or {}), init_strategy
            )
        init, pot, transforms, trace = initialize_model(
            model,
            model_args=tuple(model_args),
            model_kwargs=dict(model_kwargs or {}),
            max_plate_nesting=max_plate_nesting,
            init_strategy=init_strategy,
        )
        if not init:
            raise ValueError("model has no continuous latent sample sites")
        self.layout = SiteLayout.from_params(init)
        self.site_names = self.layout.site_names
        self.site_shapes = self.layout.site_shapes
        self.site_sizes = self.layout.site_sizes
        super().__init__(self.layout.dim)
        self.model = model
        self.model_args = tuple(model_args)
        self.model_kwargs = dict(model_kwargs or {})
        self.transforms = transforms
        self._potential = pot
        nesting = [
            -f.dim for site in trace.nodes.values() for f in site.get("cond_indep_stack", ())
        ]
        self._max_plate_nesting = max(nesting, default=0)
        self._batch_ranks = {k: len(trace.nodes[k]["fn"].batch_shape) for k in init}
        self._enumerated = any(
            site["type"] == "sample" and site["infer"].get("enumerate")
            for site in trace.nodes.values()
        )
        self.batching: str | None = None  # "plate", "vmap" or "loop", decided on the first batch
        self.register_buffer("initial_params", self.flatten(init).detach())

    @classmethod
    def from_model(cls, model: Callable, *args, **kwargs) -> ModelEnergy:
        r"""Alias of the constructor: ``ModelEnergy.from_model(model, model_args=...)``."""
        return cls(model, *args, **kwargs)

    def energy(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        if x.shape[0] > 1:
            if self.batching is None:
                self.batching = self._choose_batching(x[:3])
            if self.batching == "plate":
                return self._batched_energy(x)
            if self.batching == "vmap":
                return self._vmapped_energy(x)
        return self._looped_energy(x)  # one row: one plain model execution, no outer plate

    def _looped_energy(self, x: Tensor) -> Tensor:
        return torch.stack([self._potential(self.unflatten(row)) for row in x])

    def _batched_energy(self, x: Tensor) -> Tensor:
        # one model execution for the whole batch, inside an outer plate left of all the
        # model's own plates (the model must broadcast correctly, as Pyro's vectorized
        # ELBOs also require); enumerated discrete sites take dimensions left of that plate
        n, nest = x.shape[0], self._max_plate_nesting
        u = self.unflatten(x)
        c = {k: self.transforms[k].inv(v) for k, v in u.items()}
        data = {  # (constrained shapes: a simplex has one entry more than its coordinates)
            k: v.reshape((n,) + (1,) * (nest - self._batch_ranks[k]) + v.shape[1:])
            for k, v in c.items()
        }
        model = poutine.condition(self.model, data)
        if self._enumerated:
            model = poutine.enum(config_enumerate(model), first_available_dim=-(nest + 2))
        with pyro.plate("_pyro_ebm_batch", n, dim=-(nest + 1)):
            tr = poutine.trace(model).get_trace(*self.model_args, **self.model_kwargs)
        if self._enumerated:
            log_joint = _enumerated_log_joint(tr, n)
        else:
            tr.compute_log_prob()
            log_joint = x.new_zeros(n)
            for site in tr.nodes.values():
                if site["type"] == "sample":
                    lp = site["log_prob"]
                    log_joint = log_joint + torch.broadcast_to(lp, (n,) + lp.shape[1:]).reshape(
                        n, -1
                    ).sum(1)
        for k, t in self.transforms.items():
            log_joint = log_joint - t.log_abs_det_jacobian(c[k], u[k]).reshape(n, -1).sum(1)
        return -log_joint

    def _row_energy(self, row: Tensor) -> Tensor:
        # Pyro's potential (see _PEMaker in pyro.infer.mcmc.util) without its poutine.enum
        # wrapper, which only matters for enumerated sites and reads value.data (not under vmap)
        u = self.unflatten(row)
        c = {k: self.transforms[k].inv(v) for k, v in u.items()}
        tr = poutine.trace(poutine.condition(self.model, c)).get_trace(
            *self.model_args, **self.model_kwargs
        )
        log_joint = tr.log_prob_sum()
        for k, t in self.transforms.items():
            log_joint = log_joint - t.log_abs_det_jacobian(c[k], u[k]).sum()
        return -log_joint

    def _vmapped_energy(self, x: Tensor) -> Tensor:
        # one execution of the model's Python for the whole batch, per-row semantics
        with _validation_disabled():
            return torch.func.vmap(self._row_energy)(x)

    def _choose_batching(self, x: Tensor) -> str:
        """The first of plate, vmap that agrees with the loop on the rows ``x``, else loop
        (an enumerated model: plate, else loop)."""
        with torch.inference_mode(False), torch.enable_grad():
            rows = x.detach().clone().requires_grad_(True)
            looped = self._looped_energy(rows)
            try:
                with torch.no_grad():
                    ok = _agree(self._batched_energy(rows), looped.detach())
                plate = None if ok else "results differ from the per-row model"
            except Exception as e:  # the model does not broadcast over an outer plate
                plate = _blocker(e)
            if plate is None:
                return "plate"
            vmap = "enumerated discrete sites" if self._enumerated else self._try_vmap(rows, looped)
            if vmap is None:
                return "vmap"
        warnings.warn(
            "ModelEnergy: batches of parameters (walkers, particles) are evaluated one model "
            "run per row, which is slow. The model does not broadcast over an extra batch "
            f"dimension left of its plates ({plate}), and torch.func.vmap of its potential "
            f"over the rows did not work ({vmap}). Write the model so that vmap can run it (no "
            ".item() or Python control flow on latents, no in-place writes of latents into "
            "other tensors) or so that batched latents broadcast (see Pyro's tensor shapes "
            "tutorial).",
            stacklevel=3,
        )
        return "loop"

    def _try_vmap(self, rows: Tensor, looped: Tensor) -> str | None:
        """Why vmap cannot batch the model (``None`` when it agrees with the loop, gradients
        included)."""
        try:
            vmapped = self._vmapped_energy(rows)
            ok = _agree(vmapped.detach(), looped.detach())
            if ok:  # the samplers differentiate the batch's energies
                (g_vmap,) = torch.autograd.grad(vmapped.sum(), rows)
                (g_loop,) = torch.autograd.grad(looped.sum(), rows, retain_graph=True)
                ok = _agree(g_vmap, g_loop)
            return None if ok else "results differ from the per-row model"
        except Exception as e:  # .item(), control flow on a latent, in-place writes, ...
            return _blocker(e)

    def unflatten(self, x: Tensor) -> dict[str, Tensor]:
        r"""Split flat unconstrained ``(..., dim)`` vectors into ``{site: (..., *shape)}``."""
        return self.layout.unflatten(x)

    def flatten(self, params: dict[str, Tensor]) -> Tensor:
        r"""Inverse of :meth:`unflatten`: ``{site: (..., *shape)}`` to ``(..., dim)``."""
        return self.layout.flatten(params)

    def constrain(self, x: Tensor) -> dict[str, Tensor]:
        r"""Map flat unconstrained ``(..., dim)`` vectors to constrained site values."""
        return {k: self.transforms[k].inv(v) for k, v in self.unflatten(x).items()}

    def unconstrain(self, values: dict[str, Tensor]) -> Tensor:
        r"""Inverse of :meth:`constrain`: constrained site values to flat ``(..., dim)``."""
        missing = [k for k in self.site_names if k not in values]
        if missing:
            raise KeyError(f"values is missing sites {missing}")
        return self.flatten({k: self.transforms[k](values[k]) for k in self.site_names})


def _enumerated_log_joint(trace, n: int) -> Tensor:
    r"""Per-row log joint ``(n,)`` of a batched trace whose enumerated discrete sites are summed
    out, as Pyro's HMC/NUTS potential does for one row (``TraceEinsumEvaluator``), contracted
    to the outer batch plate ``_pyro_ebm_batch`` instead of to a scalar."""
    trace.compute_log_prob()
    trace.pack_tensors()
    factors: dict = {}
    for site in trace.nodes.values():
        if site["type"] == "sample" and "packed" in site:
            ordinal = frozenset(
                trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
            )
            factors.setdefault(ordinal, []).append(site["packed"]["log_prob"])
    from collections import OrderedDict

    sum_dims = set(trace.symbol_to_dim) - set(trace.plate_to_symbol.values())
    batch = frozenset({trace.plate_to_symbol["_pyro_ebm_batch"]})
    out = contract_to_tensor(OrderedDict(factors), sum_dims, target_ordinal=batch)
    return out.reshape(n)
