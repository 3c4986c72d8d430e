r"""Energies built on other energies: a flow-tilted energy (:class:`TiltedEnergy`) and an energy
read in other coordinates (:class:`StandardizedEnergy`)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_tensor
from ..coordinates import AffineCoordinates
from .base import EnergyModel

__all__ = ["StandardizedEnergy", "TiltedEnergy"]


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
        >>> from pyro_ebm import MLPEnergy
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

        >>> from pyro_ebm import GaussianEnergy
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
