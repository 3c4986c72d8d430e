r"""The one vectorized MCMC core of ``pyro_ebm``.

Pure functions on a ``(num_walkers, dim)`` tensor, each returning ``(new_state, info)``: local
moves (:func:`ula_step`, :func:`mala_step`, :func:`hmc_step`, the No-U-Turn sampler
:func:`nuts_step`; the many-chain ChEES-HMC step
:func:`chees_hmc_step` also returns the statistics its :class:`ChEESAdapter` learns from), global
flow moves (:func:`imh_step`, :func:`isir_step` with :class:`FlowProposals` drawing proposals in
blocks), their composition (:func:`global_local_step`), step-size and mass-matrix adaptation
(:class:`StepSizeAdapter`, :func:`find_reasonable_step_size`, :class:`MassMatrixAdapter`) and
the adaptive flowMC driver (:class:`AdaptiveFlowSampler`). The Pyro kernels in
:mod:`pyro_ebm.infer` and the trainer in :mod:`pyro_ebm.train` call these functions; the MCMC
math lives here only.
"""

from .adaptation import (
    MassMatrixAdapter,
    StanWarmup,
    StepSizeAdapter,
    StepSizeController,
    TrackingStepSize,
    diagonal_curvature,
    find_reasonable_step_size,
    stationary_start,
    warmup_windows,
)
from .adaptive import AdaptiveFlowSampler, AdaptiveRun, default_flow
from .chees import ChEESAdapter, ChEESProposal, chees_hmc_step
from .composite import (
    GlobalLocalInfo,
    cycle_info,
    global_local_move,
    global_local_step,
    stack_infos,
)
from .flow_fit import GOOD_KHAT, FlowFit, fit_flow
from .flow_moves import (
    DefensiveProposal,
    FlowDraw,
    FlowProposals,
    imh_step,
    isir_particles,
    isir_step,
    leave_probability,
    log_weights,
    move_probability,
    sir_draws,
)
from .guard import (
    REJECTED_ERRORS,
    GuardedPotential,
    NanGradientRows,
    PotentialDefinitionError,
    PotentialErrors,
    guarded,
    uncounted,
    valid_starts,
)
from .latent import PullbackPotential
from .local import hmc_step, mala_step, ula_step
from .mode import find_mode
from .nuts import nuts_step
from .state import MoveInfo, WalkerState, accept_reject, init_state, potential_and_grad

__all__ = [
    "AdaptiveFlowSampler",
    "AdaptiveRun",
    "ChEESAdapter",
    "ChEESProposal",
    "DefensiveProposal",
    "FlowFit",
    "GOOD_KHAT",
    "FlowDraw",
    "FlowProposals",
    "GlobalLocalInfo",
    "GuardedPotential",
    "MassMatrixAdapter",
    "MoveInfo",
    "NanGradientRows",
    "PotentialDefinitionError",
    "PotentialErrors",
    "PullbackPotential",
    "REJECTED_ERRORS",
    "StanWarmup",
    "StepSizeAdapter",
    "StepSizeController",
    "TrackingStepSize",
    "WalkerState",
    "accept_reject",
    "chees_hmc_step",
    "default_flow",
    "diagonal_curvature",
    "find_reasonable_step_size",
    "find_mode",
    "fit_flow",
    "cycle_info",
    "global_local_move",
    "global_local_step",
    "guarded",
    "hmc_step",
    "imh_step",
    "init_state",
    "isir_particles",
    "isir_step",
    "leave_probability",
    "log_weights",
    "move_probability",
    "mala_step",
    "nuts_step",
    "potential_and_grad",
    "sir_draws",
    "stack_infos",
    "stationary_start",
    "ula_step",
    "uncounted",
    "valid_starts",
    "warmup_windows",
]
