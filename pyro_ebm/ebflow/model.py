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

from .layers import (
    ActNorm,
    AffineCoupling,
    Conv2d,
    Dense,
    EBFlowLayer,
    SmoothLeakyReLU,
    Squeeze,
    _check_image_shape,
)

__all__ = ["EBFlow", "cnn_ebflow", "coupling_ebflow", "fc_ebflow"]

_LOG_2PI = math.log(2 * math.pi)


class EBFlow(EnergyModel):
    r"""A flow of :class:`~pyro_ebm.ebflow.layers.EBFlowLayer` layers with a standard normal
    base, as an :class:`~pyro_ebm.energy.EnergyModel`.

    - :meth:`energy` leaves out the linear layers' log-determinants (it plugs into
      :func:`pyro_ebm.potential_fn` and the kernels of :mod:`pyro_ebm.infer`);
    - :meth:`log_prob` is exact: it adds :meth:`log_normalizer`, computed with ``slogdet`` and
      cached while the model is in eval mode and its weights do not change (recomputed in
      train mode, and after any change of the weights: an optimiser step, ``load_state_dict``);
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
        #: ``(weights' versions, log Z)`` cached in eval mode (see :meth:`log_normalizer`)
        self._cached_log_z: tuple[tuple, Tensor] | None = None
        #: whether :meth:`initialize` has run (saved with the weights)
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> EBFlow:
        """Data-dependent initialisation on a batch ``x`` (in the space the model is trained
        on, e.g. after the logit under MaP): the layers with ``data_init`` set
        (:class:`~pyro_ebm.ebflow.layers.Conv2d`, by default) are set, in order, so that
        their outputs on ``x`` have zero mean and unit variance per channel. Other layers
        are left as they are, so this does nothing on the FC and coupling models. Sets
        :attr:`initialized`; returns the model. :class:`~pyro_ebm.ebflow.EBFlowTrainer` calls
        it on the first batch (``data_init=True``).

        Why: the CNN model at its paper initialisation (negated identity kernels and residual
        smooth leaky ReLUs of slope 1.3-2) amplifies logit-space images tenfold or more, so
        every objective spends its budget shrinking the scale; on digits after 3000 steps the
        test NLL went from 277 / 1483 / 1495 nats (ml / ssm / dsm) to 194 / 207 / 208 with this
        initialisation. Initialising only the last convolution was
        tried too: better for ml and dsm (189 / 195), worse for ssm (224, and its held-out NLL
        rose from step 250 on), so every convolution is initialised.
        """
        x = self.check_input(x)
        for layer in self.layers:
            x = layer(x)[0]
            if _takes_data_init(layer):
                x = layer.data_init_(x)
        self.initialized.fill_(True)
        self._cached_log_z = None
        return self

    @property
    def has_data_init(self) -> bool:
        """Whether :meth:`initialize` would change any layer."""
        return any(_takes_data_init(layer) for layer in self.layers)

    def _energy_from(self, x: Tensor, start: int = 0) -> Tensor:
        """The energy, applying the layers from index ``start`` on to ``x``."""
        ld = x.new_zeros(x.shape[:-1])
        for layer in self.layers[start:]:
            x, l = layer(x)
            if not layer.linear:
                ld = ld + l
        return 0.5 * x.pow(2).sum(-1) + 0.5 * self.dim * _LOG_2PI - ld

    def energy(self, x: Tensor) -> Tensor:
        return self._energy_from(self.check_input(x))

    def energy_on_lines(self, x: Tensor, v: Tensor, ts: Sequence[float]) -> Tensor:
        """Energies at ``x + t v`` for each ``t`` in ``ts``, ``(len(ts), batch)``. A linear first
        layer ``A x + c`` is applied to ``x`` and ``v`` once (``A x + c + t A v``) instead of
        to every point: finite-difference score matching evaluates three points per line."""
        x = self.check_input(x)
        first = self.layers[0]
        if not first.linear or not first.has_jet:
            return self.energy(torch.cat([x + t * v for t in ts])).reshape(len(ts), -1)
        hx, hv = first._matvec(torch.cat([x, v])).chunk(2)
        hx = hx + first._offset()
        points = torch.cat([hx + t * hv for t in ts])
        return self._energy_from(points, start=1).reshape(len(ts), -1)

    @property
    def has_jet(self) -> bool:
        """Whether every layer implements the second-order forward mode (:meth:`energy_jet`)."""
        return all(layer.has_jet for layer in self.layers)

    def energy_jet(self, x: Tensor, v: Tensor, with_score: bool = False) -> tuple[Tensor, ...]:
        r"""The energy along the line :math:`x + t v` and its first two derivatives at ``t = 0``:
        :math:`(E(x),\; v^\top \nabla E(x),\; v^\top \nabla^2 E(x)\, v)`, each ``(batch,)``,
        by propagating second-order jets forward through the layers (Taylor mode; see
        :meth:`~pyro_ebm.ebflow.layers.EBFlowLayer.jet`). Sliced score matching needs exactly
        these two directional derivatives; this computes them in one forward pass (linear layers
        apply their matrix to ``x``, ``u`` and ``w`` at once), so that the training step
        back-propagates once instead of through a double backward pass. With ``with_score`` the
        score :math:`s(x)` (:meth:`score`) is appended, sharing the forward pass.

        With the score, the trailing linear layers ``A`` (the last Dense of the FC model) do not
        carry the second-order term ``w``: the term :math:`z \cdot A w` of the second derivative
        is computed as :math:`(A^\top z) \cdot w`, and :math:`A^\top z` is the first step of the
        score's backward pass anyway (one matrix product fewer, forward and backward).
        """
        x = self.check_input(x)
        u, w = v, None
        ld = ld1 = ld2 = x.new_zeros(x.shape[:-1])
        saved = []
        fold = self._trailing_linear() if with_score else len(self.layers)
        for i, layer in enumerate(self.layers):
            if layer.linear:
                saved.append(None)
                if i < fold:
                    x, u, w, *_ = layer.jet(x, u, w)
                else:  # w stays at the input of the trailing linear layers
                    x, u, *_ = layer.jet(x, u, None)
                continue
            derivatives = layer._derivatives(x)
            saved.append(derivatives[1:3])  # f', f'' for the score
            x, u, w, l0, l1, l2 = layer.jet(x, u, w, derivatives)
            ld, ld1, ld2 = ld + l0, ld1 + l1, ld2 + l2
        energy = 0.5 * x.pow(2).sum(-1) + 0.5 * self.dim * _LOG_2PI - ld
        d1 = (x * u).sum(-1) - ld1
        d2 = u.pow(2).sum(-1) - ld2
        g = x  # the gradient of |z|^2 / 2, pulled back through the folded layers
        for layer in reversed(self.layers[fold:]):
            g = layer._rmatvec(g)
        if w is not None:
            d2 = d2 + (g * w).sum(-1)
        if with_score:
            return energy, d1, d2, self._score_backward(g, saved[:fold])
        return energy, d1, d2

    def _trailing_linear(self) -> int:
        """The index of the first layer of the trailing run of linear layers."""
        i = len(self.layers)
        while i > 0 and self.layers[i - 1].linear:
            i -= 1
        return i

    def score(self, x: Tensor) -> Tensor:
        r"""The model score :math:`s(x) = -\nabla_x E(x)`, ``(batch, D)``, by an explicit
        backward pass through the layers (linear layers apply their transpose, element-wise
        layers their derivative and the gradient of :math:`-\log f'`), written with ordinary
        differentiable operations: a loss built on it (denoising score matching) then
        back-propagates once, without autograd's double backward. Needs :attr:`has_jet`."""
        x = self.check_input(x)
        saved = []
        for layer in self.layers:
            if layer.linear:
                saved.append(None)
                x = layer(x)[0]
            else:
                x, d1, d2, _ = layer._derivatives(x)
                saved.append((d1, d2))
        return self._score_backward(x, saved)

    def _score_backward(self, g: Tensor, saved: list) -> Tensor:
        """``-grad E`` from ``g``, the gradient of :math:`|z|^2 / 2` with respect to the output of
        layer ``len(saved) - 1``, and the first ``len(saved)`` layers' ``(f', f'')`` (``None``
        for linear layers)."""
        for layer, d in zip(reversed(self.layers[: len(saved)]), reversed(saved), strict=True):
            g = layer._rmatvec(g) if d is None else d[0] * g - d[1] / d[0]
        return -g

    def log_normalizer(self) -> Tensor:
        r""":math:`\log Z = -\sum_{\text{linear}} \log|\det J|`, cached in eval mode until
        a weight changes (each weight's storage, dtype and in-place version counter is the
        cache's key)."""
        if self.training:
            return self._log_z()
        key = tuple((p.data_ptr(), p.dtype, p._version) for p in self.parameters())
        if self._cached_log_z is None or self._cached_log_z[0] != key:
            self._cached_log_z = (key, self._log_z().detach())
        return self._cached_log_z[1]

    def _log_z(self) -> Tensor:
        return -sum(
            (layer.log_det() for layer in self.layers if layer.linear), start=torch.zeros(())
        )

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


def _takes_data_init(layer: EBFlowLayer) -> bool:
    return bool(getattr(layer, "data_init", False))


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


def _image_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` from ``(H, W)`` (one channel) or ``(C, H, W)``."""
    shape = tuple(shape)
    return _check_image_shape("shape", (1, *shape) if len(shape) == 2 else shape)


def cnn_ebflow(
    shape: Sequence[int],
    num_blocks: int = 3,
    convs_per_block: int = 2,
    kernel_size: int = 7,
    a: float = 0.3,
) -> EBFlow:
    r"""The convolutional EBFlow of Chao et al. (2023): ``num_blocks`` groups of
    ``convs_per_block`` ``kernel_size x kernel_size`` convolutions (``C`` channels in and out),
    each followed by a residual smooth leaky ReLU (except the very last convolution), with a
    squeeze between groups (``(C, H, W) -> (4C, H/2, W/2)``). The paper's MNIST model is the
    default: 3 groups of two 7x7 convolutions, initialised as in the paper (negated identity
    kernels); :meth:`EBFlow.initialize` then sets them from data, which
    :class:`~pyro_ebm.ebflow.EBFlowTrainer` does on its first batch (without it this model
    trains poorly: see :meth:`EBFlow.initialize`).

    :param shape: ``(H, W)`` or ``(C, H, W)``; ``H`` and ``W`` divisible by
        ``2 ** (num_blocks - 1)``. Data are flattened images of this shape.

    Example::

        >>> model = cnn_ebflow((8, 8))
        >>> x = torch.randn(2, 64)
        >>> model.energy(x).shape
        torch.Size([2])
    """
    shape = _image_shape(shape)
    scale = 2 ** (num_blocks - 1)
    if shape[1] % scale or shape[2] % scale:
        raise ValueError(
            f"height and width must be divisible by 2 ** (num_blocks - 1) = {scale}, got {shape}"
        )
    layers: list[EBFlowLayer] = []
    for block in range(num_blocks):
        for i in range(convs_per_block):
            layers.append(Conv2d(shape, kernel_size))
            if not (block == num_blocks - 1 and i == convs_per_block - 1):
                layers.append(SmoothLeakyReLU(a, residual=True))
        if block < num_blocks - 1:
            squeeze = Squeeze(shape)
            layers.append(squeeze)
            shape = squeeze.out_shape
    return EBFlow(layers, int(math.prod(shape)))


def coupling_ebflow(dim: int = 2, num_blocks: int = 10, hidden: int = 64) -> EBFlow:
    r"""The Glow-like EBFlow of the paper's 2-D experiments: ``num_blocks`` times [Dense,
    affine coupling, ActNorm] (alternating masks), then a final Dense. Only the couplings are
    non-linear, so the energy needs no determinant of the dense layers.

    Example::

        >>> model = coupling_ebflow(2, num_blocks=2)
        >>> model.log_prob(torch.zeros(1, 2)).shape
        torch.Size([1])
    """
    if dim < 2:
        raise ValueError(f"dim must be at least 2 for a coupling flow, got {dim!r}")
    mask = (torch.arange(dim) % 2).to(torch.get_default_dtype())
    layers: list[EBFlowLayer] = []
    for _ in range(num_blocks):
        layers += [Dense(dim), AffineCoupling(mask, hidden), ActNorm(dim)]
        mask = 1 - mask
    layers.append(Dense(dim))
    return EBFlow(layers, dim)
