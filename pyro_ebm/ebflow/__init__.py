r"""Energy-based normalizing flows trained by score matching (Chao et al. 2023).

Work in progress (issue 5): the dense / activation / ActNorm / logit layers, the FC model, the
objectives ml, ssm, dsm, fdssm, the trainer (MaP, EMA, NLL) and the data loaders exist; the
convolutional model, coupling layers, ``sml``, imputation and the NLL benchmarks do not yet.
"""

from .layers import ActNorm, Dense, EBFlowLayer, Logit, SmoothLeakyReLU
from .model import EBFlow, fc_ebflow
from .trainer import EBFlowTrainer

__all__ = [
    "ActNorm",
    "Dense",
    "EBFlow",
    "EBFlowLayer",
    "EBFlowTrainer",
    "Logit",
    "SmoothLeakyReLU",
    "fc_ebflow",
]
