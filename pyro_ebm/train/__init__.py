r"""Training energy-based models by maximum likelihood with flow-assisted negatives.

- :class:`EBMTrainer`: the trainer (Grenioux, Moulines, Gabrié 2023, Alg. 1, and baselines),
  on the training loop of :mod:`~pyro_ebm.train.loop` (shared with
  :class:`~pyro_ebm.ebflow.EBFlowTrainer`), data-parallel over processes under ``torchrun``
  (:mod:`~pyro_ebm.train.distributed`).
- :func:`load`: a trained model back from a ``model.pt`` or a checkpoint.
- :mod:`~pyro_ebm.train.negatives`: the negative samplers (``"adaptive-flow"``, ``"ula"``,
  ``"neutra-mala"``, ``"cd"``, ``"short-run"``, ``"coopflow"``).
- :class:`History`: per-evaluation metrics, saved as JSON/CSV; checkpoints are atomic.
- :mod:`~pyro_ebm.train.plots`: density, mode weights over training, negatives.
"""

from ..coordinates import needs_standardization
from .history import History
from .loop import Trainer
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
from .saved import load
from .trainer import EBMTrainer, contrastive_loss

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
    "Trainer",
    "ULANegatives",
    "contrastive_loss",
    "load",
    "needs_standardization",
]
