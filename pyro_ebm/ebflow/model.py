r"""Energy-based normalizing flow (EBFlow): a flow :math:`g = g_L \circ \dots \circ g_1` read as an
energy-based model.

.. math:: \log p(x) = \log p_u(g(x)) + \sum_{i} \log|\det J_{g_i}(x_{i-1})|
    = -E(x) - \log Z,

with :math:`E(x) = -\log p_u(g(x)) - \sum_{i \in S_n} \log|\det J_{g_i}|` (non-linear layers only)
and :math:`\log Z = -\sum_{i \in S_l} \log|\det J_{g_i}|` (the linear layers' constant
log-determinants). Score-matching objectives only need :math:`\nabla_x E`, so training never
computes a linear log-determinant: :math:`O(D^2 L)` per step instead of :math:`O(D^3 L)`.

Reference: Chao et al. (2023), "Training Energy-Based Normalizing Flow with Score-Matching
Objectives", https://arxiv.org/abs/2305.15267
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pyro_ebm.energy import EnergyModel

from .layers import Dense, EBFlowLayer, SmoothLeakyReLU

__all__ = ["EBFlow", "fc_ebflow"]

_LOG_2PI = math.log(2 * math.pi)


class EBFlow(EnergyModel):
    r"""A flow of :class:`~pyro_ebm.ebflow.layers.EBFlowLayer` layers with a standard normal
    base, as an :class:`~pyro_ebm.energy.EnergyModel`.

    - :meth:`energy` leaves out the linear layers' log-determinants (it plugs into
      :func:`pyro_ebm.potential_fn` and the kernels of :mod:`pyro_ebm.infer`);
    - :meth:`log_prob` is exact: it adds :meth:`log_normalizer`, computed once with ``slogdet``
      and cached while the model is in eval mode (recomputed in train mode);
    - :meth:`sample` inverts the layers (Newton's method for the smooth leaky ReLU).

    :param layers: the layers ``g_1, ..., g_L`` (applied in this order to ``x``).
    :param dim: data dimension.

    Example::

        >>> model = fc_ebflow((4,))
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(model.log_prob(x), -model.energy(x) - model.log_normalizer())
        True
    """

    def __init__(self, layers: Sequence[EBFlowLayer], dim: int) -> None:
        super().__init__(dim)
        self.layers = nn.ModuleList(layers)
        self._cached_log_z: Tensor | None = None

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``g(x)`` and the sum of the non-linear layers' log-determinants."""
        ld = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
        for layer in self.layers:
            x, l = layer(x)
            if not layer.linear:
                ld = ld + l
        return x, ld

    def energy(self, x: Tensor) -> Tensor:
        z, ld = self._forward(self.check_input(x))
        log_pu = -0.5 * z.pow(2).sum(-1) - 0.5 * self.dim * _LOG_2PI
        return -log_pu - ld

    def log_normalizer(self) -> Tensor:
        r""":math:`\log Z = -\sum_{\text{linear}} \log|\det J|` (cached in eval mode)."""
        if not self.training and self._cached_log_z is not None:
            return self._cached_log_z
        log_z = -sum(
            (layer.log_det() for layer in self.layers if layer.linear), start=torch.zeros(())
        )
        if not self.training:
            self._cached_log_z = log_z.detach()
        return log_z

    def train(self, mode: bool = True) -> EBFlow:
        self._cached_log_z = None
        return super().train(mode)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density ``(batch,)``."""
        return -self.energy(x) - self.log_normalizer()

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` exact samples by inverting the layers, ``(n, dim)``."""
        p = next(self.parameters())
        z = torch.randn(n, self.dim, dtype=p.dtype, device=p.device)
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z


def fc_ebflow(shape: Sequence[int], num_blocks: int = 1) -> EBFlow:
    r"""The fully connected EBFlow (Gresele et al. 2020; Chao et al. 2023): Dense, then
    ``num_blocks`` times [smooth leaky ReLU, Dense], on data of shape ``shape`` (flattened).

    :param shape: the shape of one example, e.g. ``(784,)`` or ``(1, 28, 28)``.
    """
    dim = int(math.prod(shape))
    layers: list[EBFlowLayer] = [Dense(dim)]
    for _ in range(num_blocks):
        layers += [SmoothLeakyReLU(), Dense(dim)]
    return EBFlow(layers, dim)
