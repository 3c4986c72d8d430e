r"""Training energy-based models by maximum likelihood with flow-assisted negatives.

- :class:`EBMTrainer`: the trainer (Grenioux, Moulines, Gabrié 2023, Alg. 1, and baselines).
- :mod:`~pyro_ebm.train.negatives`: the negative samplers (``"adaptive-flow"``, ``"ula"``,
  ``"neutra-mala"``, ``"cd"``, ``"short-run"``, ``"coopflow"``).
- :class:`History`: per-evaluation metrics, saved as JSON/CSV; checkpoints are atomic.
- :mod:`~pyro_ebm.train.plots`: density, mode weights over training, negatives.
"""

from .history import History
from .negatives import (
    SAMPLERS,
    AdaptiveFlowNegatives,
    CDNegatives,
    CoopFlowNegatives,
    NegativeSampler,
    NeutraMALANegatives,
    ShortRunNegatives,
    ULANegatives,
)
from .trainer import EBMTrainer, contrastive_loss, needs_standardization

__all__ = [
    "SAMPLERS",
    "AdaptiveFlowNegatives",
    "CDNegatives",
    "CoopFlowNegatives",
    "EBMTrainer",
    "History",
    "NegativeSampler",
    "NeutraMALANegatives",
    "ShortRunNegatives",
    "ULANegatives",
    "contrastive_loss",
    "needs_standardization",
]
