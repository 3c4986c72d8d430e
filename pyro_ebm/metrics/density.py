r"""Metrics of a trained energy-based model :math:`p(x) \propto e^{-U(x)}` itself (not of its
samples): its mode weights, its log-density error against the truth, :math:`\log Z` and the
held-out negative log-likelihood.

Two ways to integrate :math:`e^{-U}`:

- in 2-D, quadrature on a regular grid (midpoint rule): exact up to discretisation, which for
  the paper's toys (modes of standard deviation >= 0.15 on a 400 x 400 grid over [-5, 5]^2,
  cell 0.025) is far below the errors measured;
- in any dimension, self-normalised importance sampling with a flow ``q`` close to the model:
  :math:`w_i = e^{-U(x_i)} / q(x_i)`, :math:`x_i \sim q`.

``potential_fn`` is a batched potential ``(n, D) -> (n,)``, e.g. ``trainer.model``. The grid is
built with the dtype and on the device of its parameters (a module's, or those of the object a
bound method belongs to, e.g. ``trainer.potential``); for a plain function of a model on a GPU,
pass ``device``.

Reference: Grenioux, Moulines, Gabrié (2023), "Balanced Training of Energy-Based Models with
Adaptive Flow Sampling", https://arxiv.org/abs/2306.00684 (Tables 1 and 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pyro_ebm._checks import check_int

from .modes import _mode_index

__all__ = [
    "bounds_around",
    "grid_log_density",
    "log_density_error",
    "log_normalizer",
    "model_mode_weights",
    "nll",
]

PotentialFn = Callable[[Tensor], Tensor]
Bounds = tuple[float, float] | tuple[tuple[float, float], tuple[float, float]]


def bounds_around(x: Tensor, margin: float = 0.1) -> Bounds:
    """A 2-D grid's bounds for points ``x`` (first two coordinates): ``(-5, 5)``, the paper's
    square, when they lie in it, else each axis's range padded by ``margin`` of its width (the
    plots and the trainer's evaluation use this rule, so a target or data set away from the
    origin is not integrated over the wrong square).

    Example::

        >>> bounds_around(torch.randn(100, 2).clamp(-3, 3))
        (-5.0, 5.0)
        >>> [round(v) for v in bounds_around(torch.tensor([[40.0, 0.0], [60.0, 10.0]]))[0]]
        [38, 62]
    """
    if float(x[:, :2].abs().max()) <= 5.0:
        return (-5.0, 5.0)
    box = []
    lows, highs = x[:, :2].min(0).values.tolist(), x[:, :2].max(0).values.tolist()
    for lo, hi in zip(lows, highs, strict=True):
        pad = margin * (hi - lo) or 1.0
        box.append((lo - pad, hi + pad))
    return tuple(box)  # type: ignore[return-value]


def _dtype_device(potential_fn: Any, device: Any = None) -> tuple[torch.dtype, torch.device]:
    """The dtype and device to evaluate ``potential_fn`` at: those of its parameters, or of the
    object a bound method belongs to (its parameters, or its ``dtype``/``device`` attributes,
    as :class:`~pyro_ebm.train.EBMTrainer` has), else the default dtype on the CPU; an explicit
    ``device`` wins."""
    dtype, found = torch.get_default_dtype(), torch.device("cpu")
    for obj in (potential_fn, getattr(potential_fn, "__self__", None)):
        params = list(obj.parameters()) if hasattr(obj, "parameters") else []
        if params:
            dtype, found = params[0].dtype, params[0].device
            break
        if isinstance(getattr(obj, "device", None), torch.device):
            found = obj.device
            if isinstance(getattr(obj, "dtype", None), torch.dtype):
                dtype = obj.dtype
            break
    return dtype, found if device is None else torch.device(device)


@torch.no_grad()
def _evaluate(potential_fn: PotentialFn, x: Tensor, chunk_size: int) -> Tensor:
    return torch.cat([potential_fn(c) for c in x.split(chunk_size)])


def _grid(bounds: Bounds, resolution: int, dtype, device) -> tuple[Tensor, float]:
    resolution = check_int("resolution", resolution, 2)
    b = torch.as_tensor(bounds, dtype=torch.float64)
    if b.shape == (2,):
        b = torch.stack([b, b])
    if b.shape != (2, 2) or not bool((b[:, 1] > b[:, 0]).all()):
        raise ValueError(f"bounds must be (lo, hi) or ((xlo, xhi), (ylo, yhi)), got {bounds!r}")
    axes = []
    for lo, hi in b.tolist():
        h = (hi - lo) / resolution
        axes.append(torch.linspace(lo + h / 2, hi - h / 2, resolution, dtype=dtype, device=device))
    gx, gy = torch.meshgrid(*axes, indexing="ij")
    cell = float((b[0, 1] - b[0, 0]) * (b[1, 1] - b[1, 0])) / resolution**2
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], -1), cell


def grid_log_density(
    potential_fn: PotentialFn,
    bounds: Bounds = (-5.0, 5.0),
    resolution: int = 400,
    chunk_size: int = 65536,
    device: str | torch.device | None = None,
) -> tuple[Tensor, Tensor, float]:
    r"""Normalised log-density of a 2-D model on a grid (midpoint quadrature).

    :param potential_fn: batched 2-D potential :math:`U`.
    :param bounds: ``(lo, hi)`` for both axes, or ``((xlo, xhi), (ylo, yhi))``.
    :param resolution: cells per axis.
    :param device: where to build the grid (default: the potential's parameters' device).
    :returns: ``(points, log_density, cell_area)``: the ``(resolution**2, 2)`` cell centres,
        :math:`\log p = -U - \log \sum_j e^{-U_j} \Delta`, and :math:`\Delta`.

    Example::

        >>> U = lambda x: 0.5 * (x**2).sum(-1)
        >>> pts, logp, cell = grid_log_density(U, resolution=200)
        >>> round(float(logp.exp().sum() * cell), 6)
        1.0
        >>> round(float(logp.max()), 2)  # -log(2 pi) near the origin
        -1.84
    """
    pts, lw, cell = _grid_log_weights(potential_fn, bounds, resolution, chunk_size, device)
    return pts, lw - torch.logsumexp(lw, 0) - math.log(cell), cell


def _grid_log_weights(
    potential_fn, bounds, resolution, chunk_size, device=None
) -> tuple[Tensor, Tensor, float]:
    """Grid points, ``-U`` on them (``-inf`` where not finite) and the cell area."""
    dtype, device = _dtype_device(potential_fn, device)
    pts, cell = _grid(bounds, resolution, dtype, device)
    u = _evaluate(potential_fn, pts, chunk_size)
    return pts, torch.where(torch.isfinite(u), -u, torch.full_like(u, -torch.inf)), cell


def _snis_log_weights(
    potential_fn: PotentialFn, flow, num_samples: int, chunk_size: int
) -> tuple[Tensor, Tensor]:
    if flow is None:
        raise ValueError("flow must be given for importance sampling (dimension > 2)")
    xs, lws = [], []
    with torch.no_grad():
        for n in [chunk_size] * (num_samples // chunk_size) + [num_samples % chunk_size]:
            if n == 0:
                continue
            x, log_q = flow.sample_and_log_prob(n)
            u = potential_fn(x)
            lw = -u - log_q
            xs.append(x)
            lws.append(torch.where(torch.isfinite(lw), lw, torch.full_like(lw, -torch.inf)))
    return torch.cat(xs), torch.cat(lws)


def model_mode_weights(
    potential_fn: PotentialFn,
    means_or_dataset: Any,
    flow=None,
    method: str = "auto",
    num_samples: int = 100_000,
    bounds: Bounds = (-5.0, 5.0),
    resolution: int = 400,
    chunk_size: int = 65536,
    device: str | torch.device | None = None,
) -> Tensor:
    r"""The weight of each mode under the model, :math:`\int_{A_k} p(x)\,dx` over the
    nearest-mode cells :math:`A_k` (or the data set's own partition).

    :param potential_fn: batched potential of the model.
    :param means_or_dataset: mode locations ``(K, D)`` or a data set.
    :param flow: importance proposal (needed unless ``D = 2`` and ``method`` is ``"grid"`` or
        ``"auto"``).
    :param method: ``"grid"`` (2-D quadrature), ``"snis"`` (self-normalised importance sampling
        with ``flow``) or ``"auto"`` (grid in 2-D, else SNIS).
    :param num_samples: flow draws for SNIS.
    :param bounds, resolution: the grid for quadrature.
    :param device: where to build the grid (default: the potential's parameters' device).
    :returns: ``(K,)`` weights summing to one, on the CPU.

    Example::

        >>> from pyro_ebm.datasets import line4
        >>> ds = line4()
        >>> [round(w, 4) for w in model_mode_weights(ds.potential, ds).tolist()]
        [0.1, 0.2, 0.3, 0.4]
    """
    if method not in ("auto", "grid", "snis"):
        raise ValueError(f"method must be 'auto', 'grid' or 'snis', got {method!r}")
    check_int("num_samples", num_samples, 1)
    dim = means_or_dataset.dim if hasattr(means_or_dataset, "dim") else None
    if dim is None:
        dim = torch.as_tensor(means_or_dataset).shape[-1]
    if method == "auto":
        method = "grid" if dim == 2 else "snis"
    if method == "grid":
        if dim != 2:
            raise ValueError(f"method='grid' needs 2-D modes, got dimension {dim}")
        x, logp, cell = grid_log_density(potential_fn, bounds, resolution, chunk_size, device)
        w = (logp + math.log(cell)).exp()
    else:
        x, lw = _snis_log_weights(potential_fn, flow, num_samples, chunk_size)
        w = torch.softmax(lw, 0)
    idx, k = _mode_index(x, means_or_dataset, None)
    out = torch.zeros(k, dtype=w.dtype, device=w.device).index_add_(0, idx, w)
    return (out / out.sum()).cpu()


def log_density_error(
    potential_fn: PotentialFn,
    dataset: Any,
    num_points: int = 10_000,
    bounds: Bounds = (-5.0, 5.0),
    resolution: int = 400,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> float:
    r"""Median squared error of the normalised log-density of a 2-D model against the truth,
    :math:`\operatorname{median}_i (\log p(x_i) - \log p^*(x_i))^2` (Grenioux et al. 2023,
    Table 1).

    The paper does not say where the error is evaluated. We take ``num_points`` draws
    :math:`x_i \sim p^*` from the true distribution (a fixed ``seed``: the same points for every
    model), so the metric weighs the regions that carry mass; far from the data both densities
    are tiny and their log-ratio is meaningless. Both log-densities are normalised by
    quadrature on the same grid (``bounds``, ``resolution``).

    :param potential_fn: batched potential of the model.
    :param dataset: a 2-D data set of :mod:`pyro_ebm.datasets` (``sample``, ``log_prob``).
    :param device: where to evaluate the model (default: its parameters' device).
    :returns: a Python float.

    Example::

        >>> from pyro_ebm.datasets import eight_gaussians
        >>> ds = eight_gaussians()
        >>> log_density_error(ds.potential, ds) < 1e-6
        True
    """
    pts, lw, cell = _grid_log_weights(potential_fn, bounds, resolution, 65536, device)
    log_z_model = torch.logsumexp(lw, 0) + math.log(cell)
    true_lp = dataset.log_prob(pts.cpu().double())  # the data set's tensors live on the CPU
    log_z_true = torch.logsumexp(true_lp, 0) + math.log(cell)
    x = dataset.sample(num_points, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model_lp = (-potential_fn(x.to(pts)) - log_z_model).cpu()
    err = (model_lp.double() - (dataset.log_prob(x.double()) - log_z_true)) ** 2
    return float(err.median())


def log_normalizer(
    potential_fn: PotentialFn, flow, num_samples: int = 100_000, chunk_size: int = 65536
) -> tuple[float, float]:
    r"""Importance-sampling estimate of :math:`\log Z = \log \int e^{-U}` with a flow proposal.

    :math:`\hat Z = \frac1n \sum_i w_i`, :math:`w_i = e^{-U(x_i)}/q(x_i)`; the standard error of
    :math:`\log \hat Z` is the delta-method :math:`\mathrm{sd}(w) / (\bar w \sqrt n)`. It is
    reliable only when the flow covers the model (a large standard error is the warning sign).

    :returns: ``(log_z, standard_error)``.

    Example::

        >>> from pyro_ebm.flows import Flow
        >>> U = lambda x: 0.5 * (x**2).sum(-1)  # log Z = log(2 pi) = 1.838
        >>> log_z, se = log_normalizer(U, Flow(2, base_scale=1.2), num_samples=20_000)
        >>> abs(log_z - math.log(2 * math.pi)) < 4 * se + 1e-9
        True
    """
    _, lw = _snis_log_weights(potential_fn, flow, num_samples, chunk_size)
    n = lw.shape[0]
    log_z = torch.logsumexp(lw, 0) - math.log(n)
    w = (lw - log_z).exp()  # weights relative to their mean
    se = float(w.std() / math.sqrt(n))
    return float(log_z), se


def nll(
    potential_fn: PotentialFn,
    data: Tensor,
    flow,
    num_samples: int = 100_000,
    chunk_size: int = 65536,
) -> tuple[float, float]:
    r"""Held-out negative log-likelihood :math:`\frac1m \sum_j U(x_j) + \log Z`, with
    :math:`\log Z` from :func:`log_normalizer`.

    :returns: ``(nll, standard_error)``, the error combining the spread of ``U`` over the data
        and the error of :math:`\log \hat Z`.
    """
    data = torch.as_tensor(data)
    if data.dim() != 2:
        raise ValueError(f"data must be (num_points, dim), got shape {tuple(data.shape)}")
    log_z, se_z = log_normalizer(potential_fn, flow, num_samples, chunk_size)
    u = _evaluate(potential_fn, data, chunk_size).double()
    se_u = float(u.std() / math.sqrt(len(u))) if len(u) > 1 else 0.0
    return float(u.mean()) + log_z, math.sqrt(se_u**2 + se_z**2)
