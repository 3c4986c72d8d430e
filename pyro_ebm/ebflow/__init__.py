r"""Energy-based normalizing flows trained by score matching (Chao et al. 2023).

Layers (:mod:`.layers`): dense, convolution, squeeze, smooth leaky ReLU (plain and residual),
ActNorm, affine coupling, logit. Models (:mod:`.model`): :func:`fc_ebflow` (Gresele et al. 2020),
:func:`cnn_ebflow` (the paper's CNN), :func:`coupling_ebflow` (Glow-like, for 2-D toys).
Objectives ml, sml, ssm, dsm, fdssm (:mod:`.objectives`); :class:`EBFlowTrainer` (MaP, EMA, NLL,
MCMC imputation); data (:mod:`.data`): digits, IDX files, the 2-D toys.
"""

from .layers import (
    ActNorm,
    AffineCoupling,
    Conv2d,
    Dense,
    EBFlowLayer,
    Logit,
    SmoothLeakyReLU,
    Squeeze,
)
from .model import EBFlow, cnn_ebflow, coupling_ebflow, fc_ebflow
from .trainer import EBFlowTrainer

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "Conv2d",
    "Dense",
    "EBFlow",
    "EBFlowLayer",
    "EBFlowTrainer",
    "Logit",
    "SmoothLeakyReLU",
    "Squeeze",
    "cnn_ebflow",
    "coupling_ebflow",
    "fc_ebflow",
]
