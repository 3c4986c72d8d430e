r"""Global-local composition: one global (flow) move followed by ``k`` local moves.

References:

- Gabrié, Rotskoff, Vanden-Eijnden (2022), "Adaptive Monte Carlo augmented with normalizing
  flows", PNAS, https://arxiv.org/abs/2105.12603
- Wong, Gabrié, Foreman-Mackey (2023), "flowMC", https://arxiv.org/abs/2211.06397
- Samsonov et al. (2022), "Local-Global MCMC kernels", https://arxiv.org/abs/2111.02702
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from .._checks import check_int
from .state import MoveInfo, WalkerState

__all__ = ["GlobalLocalInfo", "cycle_info", "global_local_move", "global_local_step", "stack_infos"]

Move = Callable[[WalkerState], tuple[WalkerState, MoveInfo]]


class GlobalLocalInfo(NamedTuple):
    r"""Info of one global-local step: the global move's info and the local moves' infos stacked
    along a leading dimension of size ``num_local_steps`` (fields ``(k, C)``)."""

    global_info: MoveInfo
    local_info: MoveInfo


def stack_infos(infos: list[MoveInfo], like: MoveInfo | None = None) -> MoveInfo:
    """Stack a list of :class:`MoveInfo` field by field along a new leading dimension; an empty
    list gives fields of shape ``(0, C)`` shaped after ``like``."""
    if not infos:
        return MoveInfo(*(f.new_zeros((0, *f.shape)) for f in like))
    return MoveInfo(*(torch.stack(fields) for fields in zip(*infos, strict=True)))


def global_local_move(
    state: WalkerState,
    index: int,
    global_move: Move,
    local_move: Move,
    num_local_steps: int,
    local_only: bool = False,
) -> tuple[WalkerState, MoveInfo, bool]:
    r"""Move number ``index`` of the repeating cycle [one global move, ``num_local_steps`` local
    moves]: the global move at ``index % (num_local_steps + 1) == 0`` (a local one instead when
    ``local_only``), else a local move. The one definition of the cycle, for a driver that moves
    one step at a time (a Pyro kernel) as for :func:`global_local_step`.

    :returns: ``(state, info, is_global)``.
    """
    if index % (num_local_steps + 1) == 0 and not local_only:
        state, info = global_move(state)
        return state, info, True
    state, info = local_move(state)
    return state, info, False


def cycle_info(infos: list[MoveInfo], is_global: list[bool]) -> GlobalLocalInfo:
    """The :class:`GlobalLocalInfo` of one cycle's moves; when its first move was local (a
    local-only cycle) the global info has ``accept_prob`` nan and nothing accepted."""
    first = infos[0]
    if not is_global[0]:
        no = torch.zeros_like(first.accepted)  # no global move was made
        nan = torch.full_like(first.accept_prob, math.nan)
        first = first._replace(accept_prob=nan, accepted=no, nonfinite=no)
    return GlobalLocalInfo(first, stack_infos(infos[1:], like=infos[0]))


def global_local_step(
    state: WalkerState,
    global_move: Move,
    local_move: Move,
    num_local_steps: int,
    local_only: bool = False,
) -> tuple[WalkerState, GlobalLocalInfo]:
    r"""One cycle of :func:`global_local_move`: ``global_move`` once, then ``local_move``
    ``num_local_steps`` times (``local_only``: local moves only).

    Each move leaves the target invariant, so the composition does too. The moves are closures
    over their settings, e.g. ``lambda s: isir_step(s, props.draw(), flow, potential_fn)`` and
    ``lambda s: mala_step(s, potential_fn, step_size)``; the global move must return a state with
    ``grad`` filled when the local move needs it.

    Example:

    >>> from pyro_ebm.samplers import init_state, mala_step
    >>> U = lambda x: 0.5 * (x**2).sum(-1)
    >>> state = init_state(U, torch.zeros(4, 2))
    >>> state, info = global_local_step(state, lambda s: mala_step(s, U, 0.5),
    ...                                 lambda s: mala_step(s, U, 0.1), num_local_steps=3)
    >>> info.global_info.accept_prob.shape, info.local_info.accept_prob.shape
    (torch.Size([4]), torch.Size([3, 4]))
    """
    check_int("num_local_steps", num_local_steps, 0)
    infos, kinds = [], []
    for i in range(num_local_steps + 1):
        state, info, is_global = global_local_move(
            state, i, global_move, local_move, num_local_steps, local_only
        )
        infos.append(info)
        kinds.append(is_global)
    return state, cycle_info(infos, kinds)
