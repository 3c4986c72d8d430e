r"""The shared shell of the ``pyro_ebm`` kernels: Pyro's ``MCMCKernel`` over a batch of chains.

:class:`WalkerKernel` handles what every kernel needs, both inside
:class:`pyro.infer.mcmc.MCMC` (one chain per kernel call) and inside
:class:`pyro_ebm.infer.MCMC` with ``chain_method="vectorized"`` (all chains advance as one
``(num_chains, dim)`` tensor): ``model`` xor ``potential_fn``, Pyro's transforms for constrained
sites, initial parameters (user-given per chain, else from the model's init strategy, else from
the subclass), per-run reset in :meth:`setup` (Pyro's ``MCMC`` reuses the kernel object for
sequential chains), counting warmup steps (``end_warmup`` is never called), ``logging()`` for
the progress bar and ``diagnostics()`` with ``divergences`` and per-draw sample statistics kept
in preallocated tensors. Subclasses implement one move of a ``(num_chains, dim)`` walker state
with the functions of :mod:`pyro_ebm.samplers`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from torch import Tensor

from .._checks import check_int
from ..samplers import MoveInfo, WalkerState, guarded, valid_starts
from .target import FlatTarget, make_target

__all__ = ["SAMPLE_STATS", "DrawStats", "TargetKernel", "WalkerKernel", "check_flow"]

#: per-draw statistics every kernel records (see :func:`pyro_ebm.infer.to_arviz`)
SAMPLE_STATS = ("accept_prob", "accepted", "potential_energy", "is_global", "diverging")

_STAT_DTYPES = {
    "accept_prob": torch.float64,
    "accepted": torch.bool,
    "potential_energy": torch.float64,
    "is_global": torch.bool,
    "diverging": torch.bool,
}


class DrawStats:
    r"""The per-draw statistics of :data:`SAMPLE_STATS` for ``num_chains`` chains, in
    preallocated ``(num_chains, capacity)`` tensors (doubled when a run outgrows them).

    :param num_chains: number of chains.
    :param capacity: draws to allocate for (the number of samples when known).
    """

    def __init__(self, num_chains: int, capacity: int = 1024) -> None:
        self.num_chains = num_chains
        self.num_draws = 0
        self._capacity = max(capacity, 1)
        self._data = {k: torch.zeros(num_chains, 0, dtype=d) for k, d in _STAT_DTYPES.items()}

    def record(self, info: MoveInfo, is_global: bool) -> None:
        """Store one move's statistics for every chain (on the device of the chains: no
        synchronisation per step)."""
        n = self.num_draws
        if n == 0:  # allocated at the first draw, where the chains are
            device = info.accept_prob.device
            self._data = {
                k: torch.zeros(self.num_chains, self._capacity, dtype=d, device=device)
                for k, d in _STAT_DTYPES.items()
            }
        elif n == next(iter(self._data.values())).shape[1]:
            self._data = {k: torch.cat([v, torch.zeros_like(v)], 1) for k, v in self._data.items()}
        values = {
            "accept_prob": info.accept_prob,
            "accepted": info.accepted,
            "potential_energy": info.potential_energy,
            "diverging": info.nonfinite,
        }
        for name, value in values.items():
            self._data[name][:, n] = value.detach().to(_STAT_DTYPES[name])
        self._data["is_global"][:, n] = is_global
        self.num_draws = n + 1

    def chain(self, index: int) -> dict[str, Tensor]:
        """``{stat: (num_draws,) tensor}`` of one chain (views, not copies)."""
        return {k: v[index, : self.num_draws] for k, v in self._data.items()}

    def diagnostics(self, index: int) -> dict:
        r"""What ``MCMC`` reports for chain ``index``: ``divergences`` (indices of draws whose
        proposal had a non-finite potential), the acceptance rate of global and local moves
        (``nan`` when there were none), and ``sample_stats`` (:meth:`chain`)."""
        stats = self.chain(index)
        out: dict = {"divergences": torch.nonzero(stats["diverging"]).flatten().tolist()}
        for kind, flag in (("global", True), ("local", False)):
            probs = stats["accept_prob"][stats["is_global"] == flag]
            rate = float(probs.mean()) if probs.numel() else float("nan")
            out[f"{kind} acceptance rate"] = rate
        out["sample_stats"] = stats
        return out


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

    def _build_target(self, args: tuple, kwargs: dict, num_chains: int | None = None) -> FlatTarget:
        """Build the target; consumes the user's initial params (the next run draws its own
        unless ``MCMC`` sets them again). With ``num_chains``, initial params carry a leading
        chain dimension and ``target.initial`` is ``(num_chains, dim)``; without, ``(dim,)``."""
        self.target = make_target(
            self.model,
            self.potential_fn,
            self._user_initial,
            args,
            kwargs,
            self.init_strategy,
            dim=getattr(getattr(self, "flow", None), "dim", None),
            model_init=not self._starts_from_flow,
            num_chains=num_chains,
        )
        if self.model is not None:
            self.transforms = self.target.transforms
        self._user_initial = None
        return self.target


class WalkerKernel(TargetKernel):
    r"""Base class: a Pyro kernel whose chains are walkers of the vectorized core.

    In Pyro's :class:`~pyro.infer.mcmc.MCMC` each kernel call moves one chain; in
    :class:`pyro_ebm.infer.MCMC` (``chain_method="vectorized"``) :meth:`setup_chains` and
    :meth:`step_chains` move all chains at once. Takes the arguments of :class:`TargetKernel`.
    """

    def setup(self, warmup_steps: int, *args, **kwargs) -> None:
        """Pyro's entry point: one chain (initial params without a chain dimension)."""
        if self._user_initial is not None:
            self._user_initial = {k: v[None] for k, v in self._user_initial.items()}
        self.setup_chains(1, warmup_steps, args, kwargs)
        self._last = self.target.layout.unflatten(self._positions(self._state)[0])
        self._initial_params = self._last

    def setup_chains(
        self,
        num_chains: int,
        warmup_steps: int,
        args: tuple = (),
        kwargs: dict | None = None,
        num_samples: int | None = None,
    ) -> None:
        r"""Start ``num_chains`` chains.

        :param num_chains: number of chains, advanced together.
        :param warmup_steps: moves that adapt before the draws start.
        :param args, kwargs: the model's arguments.
        :param num_samples: draws after warmup, when known (to preallocate the statistics).

        Initial params set before (``kernel.initial_params = ...``) carry a leading chain
        dimension of size ``num_chains``.
        """
        self.num_chains = check_int("num_chains", num_chains, 1)
        self._warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        #: the user gave the starts: they are checked, never redrawn
        self._starts_given = self._user_initial is not None
        x0 = self._build_target(tuple(args), dict(kwargs or {}), num_chains).initial
        #: where chains with no given start begin: the start's device, else the energy's
        self.device = x0.device if x0 is not None else _device_of(self.target.potential)
        self._t = 0
        self.stats = DrawStats(num_chains, 1024 if num_samples is None else num_samples)
        self._accept_sums = {"global": [0.0, 0], "local": [0.0, 0]}  # for the progress bar
        self._state = self._setup_chain(x0)

    def step_chains(self) -> tuple[Tensor, MoveInfo, bool]:
        r"""Move every chain once; returns the flat positions ``(num_chains, dim)``, the move's
        :class:`~pyro_ebm.samplers.MoveInfo` and whether it was a global move. Statistics of
        post-warmup moves are recorded in :attr:`stats`."""
        warmup = self._t < self._warmup_steps
        if self._t == self._warmup_steps:  # the progress bar shows the draws' rates from here
            self._accept_sums = {"global": [0.0, 0], "local": [0.0, 0]}
        self._state, info, is_global = self._move(self._state, warmup)
        kind = self._accept_sums["global" if is_global else "local"]
        kind[0] = kind[0] + info.accept_prob.detach().mean()  # a tensor: no sync per step
        kind[1] += 1
        if not warmup:
            self.stats.record(info, is_global)
        self._t += 1
        return self._positions(self._state), info, is_global

    def sample(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Pyro's entry point: one move of the (single) chain."""
        if params is not self._last:  # moved by someone else: restart from there
            self._state = self._restart(self.target.layout.flatten(params).detach()[None])
        x, _, _ = self.step_chains()
        self._last = self.target.layout.unflatten(x[0])
        return self._last

    def logging(self) -> OrderedDict:
        out = OrderedDict()
        for kind, (total, count) in self._accept_sums.items():
            if count:
                out[f"acc. {kind}"] = f"{float(total) / count:.3f}"
        out.update(self._extra_logging())
        return out

    def diagnostics(self, chain: int = 0) -> dict:
        r"""Of chain ``chain`` (Pyro calls it with one chain): ``divergences`` (post-warmup draw
        indices whose proposal had a non-finite potential), the post-warmup acceptance rate of
        global and local moves (``nan`` when there were none), ``potential errors`` (how often
        the potential raised, warmup included, and the point was rejected; with
        vectorized chains the count of all chains, which are evaluated as one batch) and
        ``sample_stats``: per-draw tensors of :data:`SAMPLE_STATS`."""
        return {
            **self.stats.diagnostics(chain),
            "potential errors": self.target.potential.errors.count,
        }

    # -- subclass hooks ----------------------------------------------------------------------
    def _setup_chain(self, x0: Tensor | None) -> WalkerState:
        """Reset per-run state and return the initial state of :attr:`num_chains` chains;
        ``x0`` is ``(num_chains, dim)`` or ``None`` when neither the user nor the model gave a
        start."""
        raise NotImplementedError

    def _restart(self, x: Tensor) -> WalkerState:
        """A fresh state at ``x`` ``(1, dim)`` (Pyro's driver moved the chain)."""
        raise NotImplementedError

    def _move(self, state: WalkerState, warmup: bool) -> tuple[WalkerState, MoveInfo, bool]:
        """One move; returns ``(state, info, is_global)``."""
        raise NotImplementedError

    def _valid_starts(
        self,
        potential: Callable[[Tensor], Tensor],
        x0: Tensor,
        with_grad: bool = True,
        redraw: Callable[[int], Tensor] | None = None,
    ) -> WalkerState:
        """The chains' initial state at ``x0`` (in the coordinates ``potential`` takes), each
        start whose potential or gradient is not finite, or raised, redrawn by ``redraw``
        (default: uniform in ``[-2, 2]`` per coordinate, as Pyro's ``init_to_uniform`` in the
        unconstrained space) up to 100 times; starts the user gave are checked, not redrawn
        (see :func:`~pyro_ebm.samplers.valid_starts`)."""
        if redraw is None:

            def redraw(n: int) -> Tensor:
                return 4.0 * torch.rand(n, x0.shape[-1], dtype=x0.dtype, device=x0.device) - 2.0

        sites = ", ".join(repr(s) for s in self.target.layout.site_names)
        what = f"the chains' {'given ' if self._starts_given else ''}starts (sites {sites})"
        return valid_starts(
            guarded(potential, self.target.potential.errors),
            x0,
            None if self._starts_given else redraw,
            with_grad,
            what=what,
        )

    def _positions(self, state: WalkerState) -> Tensor:
        """The chains' positions in the flat unconstrained space (``state.x`` unless the kernel
        moves in other coordinates, e.g. a flow's latent space)."""
        return state.x

    def _extra_logging(self) -> dict:
        return {}


def _device_of(potential: Callable) -> torch.device:
    """The device of a potential's tensors (an energy module's, or its ``energy``'s, under a
    :class:`~pyro_ebm.samplers.GuardedPotential`), else the CPU."""
    inner = getattr(potential, "potential", potential)
    for owner in (inner, getattr(inner, "energy", None)):
        if isinstance(owner, torch.nn.Module):
            for tensor in (*owner.parameters(), *owner.buffers()):
                return tensor.device
    return torch.device("cpu")


def check_flow(flow, dim: int) -> None:
    """Raise if ``flow`` cannot serve as a proposal over the ``dim``-dimensional flat space."""
    if not (hasattr(flow, "sample_and_log_prob") and hasattr(flow, "log_prob")):
        raise TypeError("flow must offer sample_and_log_prob(n) and log_prob(x), e.g. RealNVP")
    flow_dim = getattr(flow, "dim", dim)
    if flow_dim != dim:
        raise ValueError(f"flow has dim {flow_dim} but the target has {dim} unconstrained dims")
