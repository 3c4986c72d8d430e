r"""The :class:`EnergyModel` base class and the basic energies :class:`MLPEnergy` and
:class:`GaussianEnergy`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_hidden, check_int

__all__ = ["EnergyModel", "GaussianEnergy", "MLPEnergy"]

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
        """The dtype :meth:`check_input` converts to: the parameters' (``None``: none). The
        first parameter is found once and kept (``.to()`` converts it in place), since this
        runs at every call of the energy."""
        p = self.__dict__.get("_dtype_source")  # not an attribute: it would register
        if p is None:
            p = next(self.parameters(), None)
            if p is None:
                return None
            self.__dict__["_dtype_source"] = p
        return p.dtype

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
