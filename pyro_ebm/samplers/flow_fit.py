r"""Fit a flow to a target :math:`p \propto e^{-U}` without a user's recipe: what the flow
kernels (:class:`~pyro_ebm.infer.FlowIMH`, :class:`~pyro_ebm.infer.FlowISIR`,
:class:`~pyro_ebm.infer.FlowHMC`, :class:`~pyro_ebm.infer.FlowNUTS`,
:class:`~pyro_ebm.infer.ChEESHMC`) do with ``flow=None``.

The fit goes in stages, each only as long as it still improves:

1. **Laplace.** L-BFGS from the best of the given starts to a mode, and the Gaussian with the
   inverse Hessian there as covariance (dense up to :data:`DENSE_MAX_DIM` dimensions). The
   Laplace Gaussian competes with a unit Gaussian at the best start on the evidence lower
   bound; the better one starts stage 2 (a funnel's "mode" is at its neck, where the Laplace
   Gaussian is degenerate and loses).
2. **Dense affine map**, :math:`x = \mu + Lz`, fitted by reverse KL (the ELBO) with Adam until
   the loss stops falling: windows of :data:`WINDOW` steps; a window whose mean loss is not
   below the best one by two standard errors cuts the learning rate by 4, and the third cut
   stops the fit (or :data:`MAX_STEPS` steps).
3. **Check**: the Pareto :math:`\hat k` of the flow as an importance sampler of the target
   (:func:`~pyro_ebm.metrics.flow_importance_diagnostic`). At most :data:`GOOD_KHAT` the affine
   map is kept: it is the cheapest flow per gradient, and for a near-Gaussian posterior it
   whitens location, scales and correlations as a dense mass matrix would.
4. **Coupling layers** otherwise: RealNVP couplings and an elementwise sinh-arcsinh map in front
   of the fitted affine map (:class:`~pyro_ebm.flows.AffineFlow`, started from stage 2's map),
   fitted the same way; kept only if they lower :math:`\hat k`.

Reverse KL is mode-seeking: a flow fitted this way covers one mode of a multimodal target.
For those use :class:`~pyro_ebm.infer.AdaptiveFlowMCMC`, whose flow learns from its walkers.

References:

- Hoffman, Sountsov, Dillon, Langmore, Tran, Vasudevan (2019), "NeuTra-lizing Bad Geometry in
  Hamiltonian Monte Carlo Using Neural Transport", https://arxiv.org/abs/1903.03704
- Yao, Vehtari, Simpson, Gelman (2018), "Yes, but did it work?: Evaluating variational
  inference", ICML, https://arxiv.org/abs/1802.02538
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from .._checks import check_int
from ..flows import AffineFlow, reverse_kl_step
from .adaptation import diagonal_curvature
from .guard import guarded
from .mode import find_mode

if TYPE_CHECKING:  # imported where used, as below
    from ..metrics.psis import FlowCheck

__all__ = ["DENSE_MAX_DIM", "GOOD_KHAT", "MAX_STEPS", "WINDOW", "FlowFit", "fit_flow"]

#: a dense Hessian (Laplace) and a dense affine map up to this many dimensions, diagonal above
#: (also where AdaptiveFlowSampler's ``standardize=True`` stops being dense)
DENSE_MAX_DIM = 256
#: at most this Pareto k-hat the affine map is good enough (PSIS's "good" range)
GOOD_KHAT = 0.5
#: optimizer steps per convergence window
WINDOW = 50
#: the most reverse-KL steps of one stage
MAX_STEPS = 3000


class FlowFit(NamedTuple):
    r"""What :func:`fit_flow` returns.

    :param flow: the fitted :class:`~pyro_ebm.flows.AffineFlow` (with coupling layers when
        ``"coupling"`` is in ``stages``).
    :param check: its check as an importance sampler of the target
        (:class:`~pyro_ebm.metrics.FlowCheck`; also as :attr:`khat`, :attr:`ess` and
        :attr:`num_draws`).
    :param steps: reverse-KL optimizer steps, all stages.
    :param stages: the stages that made the flow, e.g. ``("laplace", "affine")``.
    :param seconds: wall time of the fit.
    """

    flow: AffineFlow
    check: FlowCheck
    steps: int
    stages: tuple[str, ...]
    seconds: float

    @property
    def khat(self) -> float:
        r"""The flow's Pareto :math:`\hat k` as an importance sampler of the target."""
        return self.check.khat

    @property
    def ess(self) -> float:
        """Its importance-sampling ESS, out of :attr:`num_draws`."""
        return self.check.ess

    @property
    def num_draws(self) -> int:
        """Draws of the check."""
        return self.check.num_draws


def fit_flow(
    potential_fn: Callable[[Tensor], Tensor],
    init: Tensor,
    num_coupling_layers: int = 4,
    hidden: tuple[int, ...] = (32, 32),
    num_samples: int = 128,
    max_steps: int = MAX_STEPS,
    good_khat: float = GOOD_KHAT,
    max_evals: int | None = None,
) -> FlowFit:
    r"""Fit a flow to :math:`p \propto e^{-U}` (see the module's docstring for the stages).

    :param potential_fn: batched potential :math:`U`, ``(n, D) -> (n,)``; points where it is not
        finite or raises count as outside the target.
    :param init: ``(n, D)`` starting points, at least one with a finite potential (e.g. the
        chains' starts); the dtype and device of the flow.
    :param num_coupling_layers: coupling layers of stage 4 (0: affine only).
    :param hidden: hidden widths of each coupling layer's MLP.
    :param num_samples: draws per reverse-KL step.
    :param max_steps: the most reverse-KL steps of each stage.
    :param good_khat: keep the affine map when its :math:`\hat k` is at most this.
    :param max_evals: a budget of potential evaluations (rows) for the reverse-KL stages, which
        stop at the first window's end past it (at least one window each; the Laplace stage and
        the :math:`\hat k` checks, 4096 rows each, are not counted). ``None``: no budget. The
        kernels pass 256 rows per warmup step and chain, so that a short warmup (or an
        expensive potential, which makes every step of the warmup expensive too) gets a short fit.
    :returns: a :class:`FlowFit`.

    Example::

        >>> import torch
        >>> cov = torch.tensor([[1.0, 0.95], [0.95, 1.0]])
        >>> U = lambda x: 0.5 * (x @ torch.linalg.inv(cov) * x).sum(-1)
        >>> fit = fit_flow(U, torch.zeros(1, 2))
        >>> fit.stages, fit.khat < 0.5  # a Gaussian: the Laplace approximation is exact
        (('laplace',), True)
    """
    from ..metrics.psis import flow_importance_diagnostic

    if not isinstance(init, Tensor) or init.dim() != 2:
        raise ValueError("init must be a (n, D) tensor of starting points")
    check_int("num_coupling_layers", num_coupling_layers, 0)
    check_int("max_steps", max_steps, WINDOW)
    if max_evals is not None:
        check_int("max_evals", max_evals, 1)
    start_time = time.perf_counter()
    potential = guarded(potential_fn)
    dim = init.shape[-1]
    with torch.no_grad():
        u0 = potential(init)
    if not torch.isfinite(u0).any():
        raise ValueError("fit_flow: no point of init has a finite potential")
    x0 = init[int(torch.argmin(torch.where(torch.isfinite(u0), u0, torch.inf)))].detach()
    full = dim <= DENSE_MAX_DIM
    eye = torch.eye(dim, dtype=init.dtype, device=init.device)
    flow = AffineFlow(dim, full=full).to(dtype=init.dtype, device=init.device)
    _set_affine(flow, x0, eye)
    steps, stages = 0, []
    laplace = _laplace(potential, x0, full)
    if laplace is not None:
        candidate = copy.deepcopy(flow)
        _set_affine(candidate, *laplace)
        check = flow_importance_diagnostic(candidate, potential)
        if check.khat <= good_khat:  # a near-Gaussian target: nothing left to fit
            return _done(candidate, check, steps, ("laplace",), start_time, potential)
        if _elbo(candidate, potential) > _elbo(flow, potential):
            flow, stages = candidate, ["laplace"]
    budget = max_steps if max_evals is None else max(WINDOW, max_evals // num_samples)
    steps += _fit(flow, potential, 1e-2, num_samples, min(max_steps, budget))
    stages.append("affine")
    check = flow_importance_diagnostic(flow, potential)
    if check.khat > good_khat and num_coupling_layers > 0:
        richer = AffineFlow(
            dim,
            full=full,
            num_coupling_layers=num_coupling_layers,
            hidden=hidden,
            sinh_arcsinh=True,
        ).to(dtype=init.dtype, device=init.device)
        richer.layers[-1].load_state_dict(flow.layers[-1].state_dict())
        steps += _fit(
            richer, potential, 5e-3, num_samples, min(max_steps, max(WINDOW, budget - steps))
        )
        richer_check = flow_importance_diagnostic(richer, potential)
        if richer_check.khat < check.khat:
            flow, check = richer, richer_check
            stages.append("coupling")
    return _done(flow, check, steps, tuple(stages), start_time, potential)


def _done(
    flow: AffineFlow, check, steps: int, stages: tuple, start_time: float, potential
) -> FlowFit:
    from ..metrics.psis import sharpened

    flow.requires_grad_(False)
    check = sharpened(check, flow, potential)  # the kernels warn on it: more draws near 0.7
    seconds = time.perf_counter() - start_time
    return FlowFit(flow, check, steps, stages, seconds)


def _set_affine(flow: AffineFlow, loc: Tensor, scale_tril: Tensor) -> None:
    """Set the affine map of ``flow`` to :math:`x = \\text{loc} + L z`."""
    layer = flow.layers[-1]
    with torch.no_grad():
        layer.loc.copy_(loc)
        layer.log_diag.copy_(torch.diagonal(scale_tril).log())
        if layer.full:
            layer.off_diag.copy_(scale_tril[layer.rows, layer.cols])


def _laplace(
    potential, x0: Tensor, full: bool, max_iter: int = 200
) -> tuple[Tensor, Tensor] | None:
    r"""``(mode, L)`` with :math:`LL^T` the inverse Hessian of :math:`U` at the mode found by
    L-BFGS from ``x0`` (eigenvalues floored, so a flat or concave direction gets a unit scale),
    or ``None`` when the search or the Hessian fails."""

    def u(v: Tensor) -> Tensor:
        return potential(v[None])[0]

    mode, value = find_mode(potential, x0, max_iter)
    if not math.isfinite(value):
        return None
    try:
        if full:
            hessian = torch.autograd.functional.hessian(u, mode)
            hessian = 0.5 * (hessian + hessian.T)
            evals, evecs = torch.linalg.eigh(hessian)
        else:  # the diagonal only: a dense Hessian costs D gradients
            evals = diagonal_curvature(potential, mode)
            evecs = None
    except (RuntimeError, ValueError, ArithmeticError):
        return None
    if not torch.isfinite(evals).all():
        return None
    floor = 100 * torch.finfo(evals.dtype).eps * evals.abs().max()  # rounding, or not convex
    evals = torch.where(evals > floor, evals, torch.ones_like(evals))
    if evecs is None:
        return mode, torch.diag(evals.rsqrt())
    cov = (evecs / evals) @ evecs.T
    try:
        return mode, torch.linalg.cholesky(0.5 * (cov + cov.T))
    except RuntimeError:
        return None


def _elbo(flow: AffineFlow, potential, num_samples: int = 1024) -> float:
    """A Monte Carlo estimate of :math:`E_q[-U(x) - \\log q(x)]` (``-inf`` when not finite)."""
    with torch.no_grad():
        x, log_q = flow.sample_and_log_prob(num_samples)
        value = float((-potential(x) - log_q).mean())
    return value if math.isfinite(value) else -math.inf


def _fit(flow: AffineFlow, potential, lr: float, num_samples: int, max_steps: int) -> int:
    r"""Reverse KL with Adam until the loss stops falling (see the module's docstring); the
    optimizer steps taken."""
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    best, cuts, steps = math.inf, 0, 0
    while steps < max_steps and cuts < 3:
        losses = torch.tensor(
            [reverse_kl_step(flow, optimizer, potential, num_samples) for _ in range(WINDOW)]
        )
        steps += WINDOW
        losses = losses[torch.isfinite(losses)]
        if losses.numel() < 2:
            cuts += 1
            continue
        mean = float(losses.mean())
        se = float(losses.std()) / math.sqrt(losses.numel())
        if mean < best - 2 * se:
            best = mean
        else:
            cuts += 1
            for group in optimizer.param_groups:
                group["lr"] /= 4
        best = min(best, mean)
    return steps
