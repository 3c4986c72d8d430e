r"""Metrics of Grenioux, Moulines, Gabrié (2023) for samplers and trained energy-based models.

- :mod:`~pyro_ebm.metrics.modes`: mode weights of samples, their Monte Carlo errors.
- :mod:`~pyro_ebm.metrics.density`: the model's own mode weights (2-D grid quadrature or
  self-normalised importance sampling with a flow), the log-density error against the truth,
  :math:`\log Z` and held-out NLL by importance sampling.
- :mod:`~pyro_ebm.metrics.convergence`: rank-normalised split R-hat and effective sample sizes
  (bulk, tail, mean) of many chains, linear in memory and time in the number of draws.
- :mod:`~pyro_ebm.metrics.psis`: the Pareto :math:`\hat k` and importance-sampling ESS of a flow
  as a proposal for its target (PSIS), the flow-quality check of the flow kernels.
- :mod:`~pyro_ebm.metrics.score`: the same flow checked from the target's side, by its score at
  the target's draws (what a flow's own draws do not reach, such as a funnel's neck).
- :mod:`~pyro_ebm.metrics.depth`: how far below a run's draws the potential goes (a funnel's
  neck or a spike no draw reached, which no check made at the draws can see).
- :mod:`~pyro_ebm.metrics.summary`: per-site posterior summary (mean, std, median, interval,
  ``n_eff``, ``r_hat``) and its table, as Pyro's ``print_summary``.
"""

from .convergence import effective_sample_size, max_rhat, rhat
from .density import (
    bounds_around,
    grid_log_density,
    log_density_error,
    log_normalizer,
    model_mode_weights,
    nll,
)
from .depth import DEPTH_THRESHOLD, DepthCheck, density_depth
from .modes import mode_indicator_ess, mode_weight_mse, mode_weights, mode_weights_mcse
from .psis import (
    KHAT_THRESHOLD,
    MAX_CHECK_DRAWS,
    FlowCheck,
    flow_importance_diagnostic,
    near_threshold,
    pareto_khat,
    sharpened,
)
from .score import ScoreCheck, flow_score_diagnostic
from .summary import format_summary, summarize

__all__ = [
    "DEPTH_THRESHOLD",
    "KHAT_THRESHOLD",
    "MAX_CHECK_DRAWS",
    "DepthCheck",
    "FlowCheck",
    "ScoreCheck",
    "bounds_around",
    "density_depth",
    "effective_sample_size",
    "flow_importance_diagnostic",
    "flow_score_diagnostic",
    "format_summary",
    "grid_log_density",
    "log_density_error",
    "log_normalizer",
    "max_rhat",
    "mode_indicator_ess",
    "mode_weight_mse",
    "mode_weights",
    "mode_weights_mcse",
    "model_mode_weights",
    "nll",
    "near_threshold",
    "pareto_khat",
    "sharpened",
    "rhat",
    "summarize",
]
