r"""Fitting flows: maximum likelihood on samples (forward KL) and reverse KL to a potential."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._checks import check_flag
from .._checks import check_int as _check_int
from .._checks import check_positive as _check_positive
from .base import Flow, float_dtype

__all__ = ["fit_forward_kl", "fit_reverse_kl", "forward_kl_step", "reverse_kl_step"]


def _check_samples(flow: nn.Module, x: Tensor, name: str, convert: bool = True) -> Tensor:
    """``x`` if it is a non-empty ``(n, dim)`` tensor, with ``convert`` in the flow's dtype (a
    floating ``x`` of another dtype is converted), else a clear error naming ``name``."""
    dim = getattr(flow, "dim", None)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D tensor (n, dim), got {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have shape (n, {dim}), got {tuple(x.shape)}")
    dtype = float_dtype(flow) if convert else None
    if dtype is not None and x.dtype != dtype and x.is_floating_point():
        x = x.to(dtype)
    return x


def _check_weights(weights: Tensor | None, n: int) -> Tensor | None:
    if weights is None:
        return None
    if not isinstance(weights, Tensor) or weights.shape != (n,):
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a tensor of shape ({n},), got {shape}")
    if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return weights


def _step(
    flow: nn.Module,
    optimizer: torch.optim.Optimizer,
    terms: Tensor,
    weights: Tensor | None,
    max_grad_norm: float | None,
    sync=None,
) -> float:
    """Minimise the (weighted) mean of the finite ``terms``; skip the step if none is finite.
    With ``sync`` (a :class:`~pyro_ebm.train.distributed.DataParallel`), the mean is over the
    finite terms of all the processes."""
    ok = torch.isfinite(terms)
    if weights is not None:
        ok = ok & (weights > 0)
    if sync is not None:
        return _synced_step(optimizer, terms, weights, ok, max_grad_norm, sync)
    if not ok.any():
        optimizer.zero_grad(set_to_none=True)
        return math.nan
    if weights is None:
        loss = terms[ok].mean()
    else:
        w = weights[ok]
        loss = (w * terms[ok]).sum() / w.sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return _clipped_step(optimizer, params, max_grad_norm, loss)


def _synced_step(optimizer, terms: Tensor, weights, ok: Tensor, max_grad_norm, sync) -> float:
    """:func:`_step` over processes: every process calls the same collectives in turn."""
    w = torch.ones_like(terms) if weights is None else weights
    w = torch.where(ok, w, torch.zeros_like(w))
    total = (w[ok] * terms[ok]).sum()
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # one collective: the gradients of the sums, the weights' and the terms' sums
    den, num = sync.sum_grads(params, extra=torch.stack([w.sum(), total]).detach())
    if not den > 0:
        optimizer.zero_grad(set_to_none=True)
        return math.nan
    for p in params:
        p.grad.div_(den)
    return _clipped_step(optimizer, params, max_grad_norm, num / den)


def _clipped_step(optimizer, params: list[Tensor], max_grad_norm, loss: Tensor) -> float:
    """Clip, and step when every gradient is finite; the loss as a float."""
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if all(torch.isfinite(p.grad).all() for p in params):
        optimizer.step()
    return float(loss.detach())


def forward_kl_step(
    flow: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    weights: Tensor | None = None,
    max_grad_norm: float | None = None,
    sync=None,
) -> float:
    r"""One optimizer step of maximum likelihood, :math:`-\sum_i w_i \log q(x_i) / \sum_i w_i`.

    Samples whose log density is not finite are left out of the step.

    :param flow: a flow with ``log_prob`` (and ``dim``).
    :param optimizer: optimizer over the flow's parameters.
    :param x: samples of shape ``(n, dim)``.
    :param weights: optional non-negative importance weights of shape ``(n,)``.
    :param max_grad_norm: clip the gradient norm to this value if given.
    :param sync: a :class:`~pyro_ebm.train.distributed.DataParallel`: the step is over the
        samples of all its processes (each passes its own; call it on all of them).
    :return: the loss before the step (NaN if no sample had a finite density).

    Example:

    >>> from pyro_ebm.flows import RealNVP
    >>> flow = RealNVP(2, num_layers=2, hidden=(8,))
    >>> opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    >>> loss = forward_kl_step(flow, opt, torch.randn(64, 2, dtype=flow.base_loc.dtype))
    >>> isinstance(loss, float)
    True
    """
    x = _check_samples(flow, x, "x")
    weights = _check_weights(weights, x.shape[0])
    if max_grad_norm is not None:
        _check_positive("max_grad_norm", max_grad_norm)
    return _forward_kl(flow, optimizer, x, weights, max_grad_norm, sync)


def _forward_kl(
    flow, optimizer, x: Tensor, weights: Tensor | None, max_grad_norm, sync=None
) -> float:
    """:func:`_step` on ``-log q(x)``, rows of ``x`` that are not finite left out before
    ``log_prob`` (through it, their nan gradient would cancel the whole step)."""
    keep = torch.isfinite(x).all(-1)
    if not keep.all():
        x, weights = x[keep], None if weights is None else weights[keep]
    return _step(flow, optimizer, -flow.log_prob(x), weights, max_grad_norm, sync)


def _range(num_steps: int, progress: bool, desc: str):
    if check_flag("progress", progress):
        from tqdm.auto import trange

        return trange(num_steps, desc=desc)
    return range(num_steps)


def fit_forward_kl(
    flow: nn.Module,
    samples: Tensor,
    num_steps: int = 1000,
    batch_size: int = 256,
    lr: float = 1e-3,
    weights: Tensor | None = None,
    max_grad_norm: float | None = None,
    progress: bool = False,
) -> list[float]:
    r"""Fit a flow to samples by maximum likelihood (forward KL) with Adam on minibatches.

    :param flow: a flow with ``log_prob``.
    :param samples: data of shape ``(n, dim)``; minibatches are drawn by reshuffling epochs.
    :param num_steps: number of optimizer steps.
    :param batch_size: minibatch size (capped at ``n``).
    :param lr: Adam learning rate.
    :param weights: optional importance weights ``(n,)``.
    :param max_grad_norm: optional gradient-norm clip.
    :param progress: show a tqdm progress bar.
    :return: the minibatch losses (mean negative log-likelihood), one per step.

    Example:

    >>> from pyro_ebm.flows import RealNVP
    >>> flow = RealNVP(2, num_layers=2, hidden=(16,))
    >>> data = 2.0 + 0.5 * torch.randn(512, 2, dtype=flow.base_loc.dtype)
    >>> losses = fit_forward_kl(flow, data, num_steps=30, lr=1e-2)
    >>> len(losses), losses[-1] < losses[0]
    (30, True)
    """
    samples = _check_samples(flow, samples, "samples")
    n = samples.shape[0]
    weights = _check_weights(weights, n)
    _check_int("num_steps", num_steps, 1)
    batch_size = min(_check_int("batch_size", batch_size, 1), n)
    optimizer = torch.optim.Adam(flow.parameters(), lr=_check_positive("lr", lr))
    if max_grad_norm is not None:
        _check_positive("max_grad_norm", max_grad_norm)
    losses: list[float] = []
    order, pos = torch.randperm(n, device=samples.device), 0
    for _ in _range(num_steps, progress, "fit_forward_kl"):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, device=samples.device), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        w = None if weights is None else weights[idx]
        losses.append(_forward_kl(flow, optimizer, samples[idx], w, max_grad_norm))
    return losses


def fit_reverse_kl(
    flow: Flow,
    potential_fn: Callable[[Tensor], Tensor],
    num_steps: int = 1000,
    num_samples: int = 256,
    lr: float = 1e-3,
    max_grad_norm: float | None = 10.0,
    progress: bool = False,
) -> list[float]:
    r"""Fit a flow to :math:`p \propto e^{-U}` by minimising :math:`E_q[\log q(x) + U(x)]`.

    The loss equals :math:`\mathrm{KL}(q\,\|\,p) - \log Z`; it is estimated with ``num_samples``
    reparameterised draws per step, leaving out draws with a non-finite value. The target needs
    full support: where :math:`U = +\infty` the KL of any ``q`` with mass there is infinite, and
    leaving those draws out lets the flow drift out of the support while the loss still falls
    (a warning says how many were left out); map a constrained target to an unconstrained space
    first (e.g. :class:`~pyro_ebm.energy.ModelEnergy` for a Pyro model).

    :param flow: a :class:`Flow` (needs ``rsample_and_log_prob``).
    :param potential_fn: batched potential, ``(n, dim) -> (n,)``.
    :param num_steps: number of optimizer steps.
    :param num_samples: draws per step.
    :param lr: Adam learning rate.
    :param max_grad_norm: gradient-norm clip (``None``: no clipping).
    :param progress: show a tqdm progress bar.
    :return: the loss estimates, one per step.

    Example:

    >>> from pyro_ebm.flows import RealNVP
    >>> flow = RealNVP(1, num_layers=1)
    >>> losses = fit_reverse_kl(flow, lambda x: 0.5 * ((x - 3.0) ** 2).sum(-1), num_steps=300,
    ...                         lr=2e-2)
    >>> round(float(flow.sample(4000).mean()))
    3
    """
    if not callable(potential_fn):
        raise TypeError("potential_fn must be callable")
    _check_int("num_steps", num_steps, 1)
    _check_int("num_samples", num_samples, 1)
    optimizer = torch.optim.Adam(flow.parameters(), lr=_check_positive("lr", lr))
    if max_grad_norm is not None:
        _check_positive("max_grad_norm", max_grad_norm)
    losses, dropped = [], 0
    for _ in _range(num_steps, progress, "fit_reverse_kl"):
        terms = _reverse_kl_terms(flow, potential_fn, num_samples)
        dropped += int((~torch.isfinite(terms)).sum())
        losses.append(_step(flow, optimizer, terms, None, max_grad_norm))
    if dropped:
        warnings.warn(
            f"fit_reverse_kl: {dropped} of {num_steps * num_samples} draws "
            f"({dropped / (num_steps * num_samples):.1%}) had a non-finite potential or density "
            "and were left out, so the loss is not the reverse KL there (which is infinite for "
            "a flow with mass outside the target's support); map the target to an unconstrained "
            "space first",
            stacklevel=2,
        )
    return losses


def reverse_kl_step(
    flow: Flow,
    optimizer: torch.optim.Optimizer,
    potential_fn: Callable[[Tensor], Tensor],
    num_samples: int = 256,
    max_grad_norm: float | None = 10.0,
) -> float:
    r"""One optimizer step of :math:`E_q[\log q(x) + U(x)]` (reverse KL up to
    :math:`\log Z`) on ``num_samples`` reparameterised draws; draws with a non-finite value are
    left out (see :func:`fit_reverse_kl`).

    :return: the loss estimate before the step (NaN if no draw was finite).

    Example:

    >>> from pyro_ebm.flows import RealNVP
    >>> flow = RealNVP(2, num_layers=2, hidden=(8,))
    >>> opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    >>> loss = reverse_kl_step(flow, opt, lambda x: 0.5 * (x**2).sum(-1), num_samples=64)
    >>> isinstance(loss, float)
    True
    """
    return _step(
        flow, optimizer, _reverse_kl_terms(flow, potential_fn, num_samples), None, max_grad_norm
    )


def _reverse_kl_terms(flow: Flow, potential_fn: Callable, num_samples: int) -> Tensor:
    r""":math:`\log q(x) + U(x)` on ``num_samples`` reparameterised draws."""
    x, log_q = flow.rsample_and_log_prob(num_samples)
    u = potential_fn(x)
    if not isinstance(u, Tensor) or u.shape != (num_samples,):
        shape = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
        raise ValueError(f"potential_fn must return shape ({num_samples},), got {shape}")
    return log_q + u
