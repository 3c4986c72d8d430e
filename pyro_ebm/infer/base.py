r"""The shared shell of the ``pyro_ebm`` kernels: Pyro's ``MCMCKernel`` over one walker.

:class:`WalkerKernel` handles what every kernel needs to plug into
:class:`pyro.infer.mcmc.MCMC` (DESIGN.md §3): ``model`` xor ``potential_fn``, Pyro's transforms for
constrained sites, initial parameters (user-given per chain, else from the model's init strategy,
else from the subclass), per-chain reset in :meth:`setup` (``MCMC`` reuses the kernel object for
sequential chains), counting warmup steps (``end_warmup`` is never called), ``logging()`` for the
progress bar and ``diagnostics()`` with ``divergences`` and per-draw sample statistics. Subclasses
implement one move on a ``(1, dim)`` walker state with the functions of :mod:`pyro_ebm.samplers`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from torch import Tensor

from ..samplers import MoveInfo, WalkerState
from .target import FlatTarget, make_target

__all__ = ["SAMPLE_STATS", "TargetKernel", "WalkerKernel", "check_flow"]

#: per-draw statistics every kernel records (see :func:`pyro_ebm.infer.to_arviz`)
SAMPLE_STATS = ("accept_prob", "accepted", "potential_energy", "is_global", "diverging")


class TargetKernel(MCMCKernel):
    r"""What every ``pyro_ebm`` kernel shares: ``model`` xor ``potential_fn``, Pyro's transforms,
    per-chain initial parameters, and the :class:`~pyro_ebm.infer.target.FlatTarget`.

    :param model: a Pyro model (continuous latents), or ``None``.
    :param potential_fn: a Pyro ``potential_fn`` (``dict -> scalar``), e.g.
        :func:`pyro_ebm.potential_fn`, or ``None``. Exactly one of ``model`` and
        ``potential_fn`` must be given.
    :param init_strategy: Pyro init strategy for models (default ``init_to_uniform``; kernels
        with a user-given flow start from a draw of the flow instead, see
        :attr:`_starts_from_flow`).
    """

    #: without ``initial_params`` or ``init_strategy``, start a model's chain from a draw of the
    #: kernel's flow rather than from Pyro's ``init_to_uniform``: a uniform start in ``[-2, 2]``
    #: of the unconstrained space is far out in the flow's tails, where the importance weight of
    #: an independent proposal's current point can be so large that the chain never leaves it
    _starts_from_flow = False

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        init_strategy: Callable | None = None,
    ) -> None:
        if (model is None) == (potential_fn is None):
            raise ValueError("exactly one of `model` and `potential_fn` must be given")
        self.model = model
        self.potential_fn = potential_fn
        self.init_strategy = init_strategy
        # MCMC reads kernel.transforms: {} for a bare potential, the model's after setup
        self.transforms = {} if model is None else None
        self._user_initial: dict[str, Tensor] | None = None
        self._initial_params: dict[str, Tensor] | None = None
        self.target: FlatTarget | None = None
        super().__init__()

    @property
    def initial_params(self) -> dict[str, Tensor] | None:
        return self._initial_params

    @initial_params.setter
    def initial_params(self, params: dict[str, Tensor]) -> None:
        # MCMC sets this before setup() for each chain: keep it for the next setup only
        self._user_initial = params
        self._initial_params = params

    def _build_target(self, args: tuple, kwargs: dict) -> FlatTarget:
        """Build this chain's target; consumes the user's initial params (the next chain draws
        its own unless ``MCMC`` sets them again)."""
        self.target = make_target(
            self.model,
            self.potential_fn,
            self._user_initial,
            args,
            kwargs,
            self.init_strategy,
            dim=getattr(getattr(self, "flow", None), "dim", None),
            model_init=not self._starts_from_flow,
        )
        if self.model is not None:
            self.transforms = self.target.transforms
        self._user_initial = None
        return self.target


class WalkerKernel(TargetKernel):
    r"""Base class: a Pyro kernel whose chain is one walker of the vectorized core.

    Takes the arguments of :class:`TargetKernel`.
    """

    def setup(self, warmup_steps: int, *args, **kwargs) -> None:
        self._warmup_steps = warmup_steps
        x0 = self._build_target(args, kwargs).initial
        self._t = 0
        self._stats = {k: [] for k in SAMPLE_STATS}
        self._divergences: list[int] = []
        self._accept_sums = {"global": [0.0, 0], "local": [0.0, 0]}  # running, for the progress bar
        self._state = self._setup_chain(None if x0 is None else x0[None])
        self._last = self.target.layout.unflatten(self._state.x[0])
        self._initial_params = self._last

    def sample(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        if params is not self._last:  # moved by someone else: restart from there
            self._state = self._restart(self.target.layout.flatten(params).detach()[None])
        warmup = self._t < self._warmup_steps
        self._state, info, is_global = self._move(self._state, warmup)
        self._record(info, is_global, warmup)
        self._t += 1
        self._last = self.target.layout.unflatten(self._state.x[0])
        return self._last

    def logging(self) -> OrderedDict:
        out = OrderedDict()
        for kind, (total, count) in self._accept_sums.items():
            if count:
                out[f"acc. {kind}"] = f"{total / count:.3f}"
        out.update(self._extra_logging())
        return out

    def diagnostics(self) -> dict:
        r"""Per chain: ``divergences`` (post-warmup draw indices whose proposal had a non-finite
        potential), the post-warmup acceptance rate of global and local moves (``nan`` when there
        were none), and ``sample_stats``: per-draw lists of :data:`SAMPLE_STATS`."""
        acc = {}
        for kind, flag in (("global", True), ("local", False)):
            pairs = zip(self._stats["accept_prob"], self._stats["is_global"], strict=True)
            probs = [a for a, g in pairs if g == flag]
            acc[f"{kind} acceptance rate"] = sum(probs) / len(probs) if probs else float("nan")
        return {"divergences": list(self._divergences), **acc, "sample_stats": self._stats}

    # -- subclass hooks ----------------------------------------------------------------------
    def _setup_chain(self, x0: Tensor | None) -> WalkerState:
        """Reset per-chain state and return the initial state; ``x0`` is ``(1, dim)`` or
        ``None`` when neither the user nor the model gave a start."""
        raise NotImplementedError

    def _restart(self, x: Tensor) -> WalkerState:
        """A fresh state at ``x`` ``(1, dim)`` (the chain was moved from outside)."""
        raise NotImplementedError

    def _move(self, state: WalkerState, warmup: bool) -> tuple[WalkerState, MoveInfo, bool]:
        """One move; returns ``(state, info, is_global)``."""
        raise NotImplementedError

    def _extra_logging(self) -> dict:
        return {}

    # -- bookkeeping -------------------------------------------------------------------------
    def _record(self, info: MoveInfo, is_global: bool, warmup: bool) -> None:
        kind = "global" if is_global else "local"
        acc = float(info.accept_prob[0])
        self._accept_sums[kind][0] += acc
        self._accept_sums[kind][1] += 1
        if warmup:
            return
        draw = self._t - self._warmup_steps
        diverging = bool(info.nonfinite[0])
        if diverging:
            self._divergences.append(draw)
        self._stats["accept_prob"].append(acc)
        self._stats["accepted"].append(bool(info.accepted[0]))
        self._stats["potential_energy"].append(float(info.potential_energy[0]))
        self._stats["is_global"].append(is_global)
        self._stats["diverging"].append(diverging)


def check_flow(flow, dim: int) -> None:
    """Raise if ``flow`` cannot serve as a proposal over the ``dim``-dimensional flat space."""
    if not (hasattr(flow, "sample_and_log_prob") and hasattr(flow, "log_prob")):
        raise TypeError("flow must offer sample_and_log_prob(n) and log_prob(x), e.g. RealNVP")
    flow_dim = getattr(flow, "dim", dim)
    if flow_dim != dim:
        raise ValueError(f"flow has dim {flow_dim} but the target has {dim} unconstrained dims")


def check_finite_start(potential_energy: Tensor) -> None:
    """Raise if the potential at a local chain's start is not finite: MALA, HMC and NUTS cannot
    move from there (Pyro's HMC would hang, its NUTS fail obscurely)."""
    if not bool(torch.isfinite(torch.as_tensor(potential_energy)).all()):
        raise ValueError(
            "the potential is not finite at the initial point: pass initial_params (or an "
            "init_strategy) where the potential is finite"
        )
