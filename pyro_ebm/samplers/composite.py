r"""Global-local composition: one global (flow) move followed by ``k`` local moves.

References:

- Gabrié, Rotskoff, Vanden-Eijnden (2022), "Adaptive Monte Carlo augmented with normalizing
  flows", PNAS, https://arxiv.org/abs/2105.12603
- Wong, Gabrié, Foreman-Mackey (2023), "flowMC", https://arxiv.org/abs/2211.06397
- Samsonov et al. (2022), "Local-Global MCMC kernels", https://arxiv.org/abs/2111.02702
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .state import MoveInfo, WalkerState

__all__ = ["GlobalLocalInfo", "global_local_step", "stack_infos"]

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


def global_local_step(
    state: WalkerState, global_move: Move, local_move: Move, num_local_steps: int
) -> tuple[WalkerState, GlobalLocalInfo]:
    r"""Apply ``global_move`` once, then ``local_move`` ``num_local_steps`` times.

    Each move leaves the target invariant, so the composition does too. The moves are closures
    over their settings, e.g. ``lambda s: isir_step(s, props.draw(), flow, potential_fn)`` and
    ``lambda s: mala_step(s, potential_fn, step_size)``; the global move must return a state with
    ``grad`` filled when the local move needs it.
    """
    if num_local_steps < 0:
        raise ValueError(f"num_local_steps must be >= 0, got {num_local_steps}")
    state, g_info = global_move(state)
    local_infos = []
    for _ in range(num_local_steps):
        state, info = local_move(state)
        local_infos.append(info)
    return state, GlobalLocalInfo(g_info, stack_infos(local_infos, like=g_info))
