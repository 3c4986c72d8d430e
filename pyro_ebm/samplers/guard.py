r"""Stan's rule for bad regions: a potential that raises rejects the proposal, and is counted.

A potential can raise where the model is undefined: a Cholesky factor of a covariance that is
not quite positive definite (every Gaussian-process model), a distribution's argument
validation (a scale that underflowed to 0), a domain error. Stan rejects such a proposal and
goes on; :class:`GuardedPotential` does the same for the vectorized core. When a batched call
raises, it is split in halves until the rows that raise are found (about ``2 k log2(n / k)``
calls for ``k`` such rows among ``n``), and only they get the potential ``+inf`` (which every
move rejects); non-finite values (``nan``, ``-inf``) become ``+inf`` too,
so that no sampler sees a point of infinite density. Errors that are programming mistakes
(``TypeError``, ``KeyError``, ``IndexError``, ``AttributeError``, ...) propagate, and so does
:class:`PotentialDefinitionError` (a potential of the wrong shape).

References:

- Stan Development Team, *Stan Reference Manual*, "Reject statements" and "Initialization".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = [
    "REJECTED_ERRORS",
    "GuardedPotential",
    "NanGradientRows",
    "PotentialDefinitionError",
    "PotentialErrors",
    "guarded",
    "uncounted",
    "valid_starts",
]

logger = logging.getLogger(__name__)

#: exceptions of a potential that reject the point instead of ending the run: torch's linear
#: algebra errors are of type ``RuntimeError``, a distribution's argument validation raises
#: ``ValueError``, Python's math ``ArithmeticError``
REJECTED_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, ValueError, ArithmeticError)


class PotentialDefinitionError(ValueError):
    """The potential itself is wrong (e.g. it returns the wrong shape): raised through the
    guard, never taken for a bad region."""


class PotentialErrors:
    """The count of rows whose potential raised, and the first message (shared by the guards of
    one target, so that a kernel reports one count). Evaluations inside :meth:`paused` are not
    counted."""

    def __init__(self) -> None:
        self.count = 0
        self.first: str | None = None
        #: rows with a finite potential and a NaN gradient (rejected as well; a gradient that
        #: overflowed to inf far out is rejected and not counted): a tensor once counted, so
        #: that counting needs no device synchronisation
        self.nan_gradients: Tensor | int = 0
        #: who evaluates the potential (a kernel's name), at the head of the logged message
        self.owner: str | None = None
        self._paused = 0

    @property
    def counting(self) -> bool:
        """Whether evaluations are counted now (not inside :meth:`paused`)."""
        return self._paused == 0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Count nothing inside: the evaluations of a flow's fit or of its checks, which are
        not the chains' moves (nested calls are fine)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def record(self, error: BaseException, rows: int) -> None:
        """Count ``error``, raised on a batch of ``rows`` points (all of them rejected)."""
        if not self.counting:
            return
        self.count += rows
        if self.first is None:
            text = re.split(r"\n\s*Trace Shapes:", str(error))[0]  # not Pyro's shape table
            self.first = f"{type(error).__name__.lstrip('_')}: {text.rstrip().rstrip('.')}"
            logger.warning(
                "%sthe potential raised %s; the point is rejected (as Stan does) and counted in "
                "diagnostics()['potential errors'] (this message is logged once)",
                "" if self.owner is None else f"{self.owner}: ",
                self.first,
            )


class GuardedPotential:
    r"""A batched potential ``(C, D) -> (C,)`` that rejects instead of raising.

    Rows whose evaluation raises one of :data:`REJECTED_ERRORS`, or whose value is not finite,
    get ``+inf``; :meth:`value_and_grad` also gives such rows a ``nan`` gradient. The number of
    rows that raised is :attr:`errors` ``.count``. Finding the rows costs extra calls of the
    potential on parts of the batch, so a potential that raises often is slow with many
    chains or flow proposals: where you can, return ``inf`` instead of raising (e.g.
    :func:`torch.linalg.cholesky_ex` and its ``info``).

    :param potential: the batched potential (one with ``value_and_grad``, e.g. a compiled one, is
        called through it).
    :param errors: a :class:`PotentialErrors` to count into (shared between guards of the same
        target); a new one by default.

    Example::

        >>> def U(x):
        ...     if (x < 0).any():
        ...         raise ValueError("outside the support")
        ...     return x.sum(-1)
        >>> g = GuardedPotential(U)
        >>> g(torch.tensor([[1.0], [-1.0]]))
        tensor([1., inf])
        >>> g.errors.count
        1
    """

    def __init__(
        self, potential: Callable[[Tensor], Tensor], errors: PotentialErrors | None = None
    ):
        self.potential = potential
        self.errors = PotentialErrors() if errors is None else errors

    def __call__(self, x: Tensor) -> Tensor:
        try:
            u = self.potential(x)
        except PotentialDefinitionError:
            raise
        except REJECTED_ERRORS as error:
            if x.shape[0] == 1:
                self.errors.record(error, 1)
                return _infinite(x)
            u = torch.cat([self(half) for half in _halves(x)])
        return _finite_or_inf(u)

    def value_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(U(x), grad U(x))`` detached, shapes ``(C,)`` and ``(C, D)``; rows that raised, or
        whose value is not finite, are ``(+inf, nan)``; rows with a finite value and a NaN
        gradient are counted in ``errors.nan_gradients`` (the samplers reject them, and those
        whose gradient overflowed to inf, too)."""
        from .state import potential_and_grad  # the guarded potential is not passed on

        try:
            u, grad = potential_and_grad(self.potential, x)
        except PotentialDefinitionError:
            raise
        except REJECTED_ERRORS as error:
            if x.shape[0] == 1:
                self.errors.record(error, 1)
                return _infinite(x), torch.full_like(x, torch.nan)
            parts = [self.value_and_grad(half) for half in _halves(x)]  # counted and masked
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        bad = ~torch.isfinite(u)
        if self.errors.counting:  # NaN, not an overflow to inf far out (rejected all the same)
            nan_grad = ~bad & torch.isnan(grad).any(-1)
            self.errors.nan_gradients = self.errors.nan_gradients + nan_grad.sum()
        u = torch.where(bad, torch.full_like(u, torch.inf), u)
        grad = torch.where(bad[:, None], torch.full_like(grad, torch.nan), grad)
        return u, grad

    def __getattr__(self, name: str):
        # dim, energy, layout, ... of the potential it guards (not its private state)
        if name.startswith("__") or name in ("potential", "errors"):
            raise AttributeError(name)
        return getattr(self.potential, name)

    def __getstate__(self) -> dict:
        return self.__dict__

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


class NanGradientRows:
    r"""A batched potential that marks the rows where its value was finite and its gradient NaN.

    Such a point (e.g. ``torch.where`` whose unused branch is ``sqrt`` of a negative number) is
    rejected by every sampler, whatever its step size. Wrapped around the potential of one HMC
    move, :attr:`rows` ``(C,)`` says which chains' trajectories met one, so that the step-size
    adaptation can leave them out (``StanWarmup.update``'s ``neutral``).

    :param potential: the batched potential (called through its ``value_and_grad`` if it has
        one, e.g. a :class:`GuardedPotential`).

    Example::

        >>> from pyro_ebm.samplers.state import potential_and_grad
        >>> U = NanGradientRows(lambda x: torch.where(x[:, 0] > 0, x[:, 0].sqrt(), 0.0))
        >>> _ = potential_and_grad(U, torch.tensor([[4.0], [-1.0]]))
        >>> U.rows
        tensor([False,  True])
    """

    def __init__(self, potential: Callable[[Tensor], Tensor]) -> None:
        self.potential = potential
        #: the rows whose value was finite and gradient NaN in any call so far (``None`` before
        #: the first call)
        self.rows: Tensor | None = None

    def value_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(U(x), grad U(x))`` of the potential, marking in :attr:`rows` the rows of ``x``
        whose value is finite and gradient NaN."""
        from .state import potential_and_grad

        u, grad = potential_and_grad(self.potential, x)
        nan = torch.isfinite(u) & torch.isnan(grad).any(-1)
        self.rows = nan if self.rows is None else self.rows | nan
        return u, grad

    def __call__(self, x: Tensor) -> Tensor:
        return self.potential(x)


def guarded(
    potential: Callable[[Tensor], Tensor], errors: PotentialErrors | None = None
) -> GuardedPotential:
    """``potential`` wrapped in a :class:`GuardedPotential` (returned as is when it already is
    one and ``errors`` is not another counter)."""
    if isinstance(potential, GuardedPotential) and errors in (None, potential.errors):
        return potential
    return GuardedPotential(potential, errors)


@contextmanager
def uncounted(potential: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Inside, the errors and NaN gradients of ``potential`` (a :class:`GuardedPotential`; any
    other potential counts nothing anyway) are not counted: for evaluations that are not the
    chains' moves, such as a flow's fit and its checks, so that ``diagnostics()`` reports what
    the chains met.

    Example::

        >>> g = GuardedPotential(lambda x: torch.linalg.cholesky(x.reshape(-1, 1, 1)).sum((1, 2)))
        >>> with uncounted(g):
        ...     g(torch.tensor([[-1.0]]))
        tensor([inf])
        >>> g.errors.count
        0
    """
    errors = getattr(potential, "errors", None)
    if not isinstance(errors, PotentialErrors):
        yield
        return
    with errors.paused():
        yield


def _halves(x: Tensor) -> tuple[Tensor, Tensor]:
    middle = x.shape[0] // 2
    return x[:middle], x[middle:]


def _infinite(x: Tensor) -> Tensor:
    return torch.full(x.shape[:1], torch.inf, dtype=x.dtype, device=x.device)


def _finite_or_inf(u: Tensor) -> Tensor:
    if not isinstance(u, Tensor):
        return u  # a wrong return type is reported by the caller's shape check
    return torch.where(torch.isfinite(u), u, torch.full_like(u, torch.inf))


def valid_starts(
    potential: Callable[[Tensor], Tensor],
    x: Tensor,
    redraw: Callable[[int], Tensor] | None,
    with_grad: bool = True,
    max_tries: int = 100,
    what: str = "the chains' starts",
):
    r"""The initial :class:`~pyro_ebm.samplers.WalkerState` of walkers at ``x``, with every start
    whose potential (or, ``with_grad``, gradient) is not finite, or raised, redrawn by
    ``redraw(n) -> (n, D)`` up to ``max_tries`` times per walker, as Pyro's and Stan's
    initialization does.

    :param potential: batched potential, guarded (see :func:`guarded`) so that a start where it
        raises counts as non-finite.
    :param x: the starts ``(C, D)``.
    :param redraw: draws ``n`` new starts; ``None`` when the starts were given and must not be
        replaced (they are then only checked).
    :param what: how the error message names the starts.
    :raises ValueError: when some walker has no valid start after the tries, with the first
        error the potential raised, if any.
    """
    from .state import init_state

    potential = guarded(potential)
    state = init_state(potential, x, with_grad)
    for _ in range(max_tries if redraw is not None else 0):
        bad = _invalid(state)
        if not bad.any():
            return state
        fresh = init_state(potential, redraw(int(bad.sum())).to(x), with_grad)
        fields = []
        for old, new in zip(state, fresh, strict=True):
            if old is None or new is None:
                fields.append(None)
            else:
                old = old.clone()
                old[bad] = new
                fields.append(old)
        state = type(state)(*fields)
    bad = _invalid(state)
    if bad.any():
        tries = f" after {max_tries} tries per chain" if redraw is not None else ""
        first = potential.errors.first
        raised = f"; the potential raised {first}" if first else ""
        grad = " or its gradient" if with_grad else ""
        raise ValueError(
            f"the potential{grad} is not finite at {int(bad.sum())} of {len(bad)} of {what}"
            f"{tries}{raised}. Pass initial_params (or an init_strategy) where the model's "
            "density is positive and finite"
        )
    return state


def _invalid(state) -> Tensor:
    bad = ~torch.isfinite(state.potential_energy)
    if state.grad is not None:
        bad = bad | ~torch.isfinite(state.grad).all(-1)
    return bad
