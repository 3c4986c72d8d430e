r"""Energy-based normalizing flows trained by score matching (Chao et al. 2023).

Work in progress (issue 5): the layers, the model and the objectives exist; the convolutional
model, the trainer (MaP, EMA), the data loaders and the benchmarks do not yet.
"""

from .layers import ActNorm, Dense, EBFlowLayer, SmoothLeakyReLU
from .model import EBFlow, fc_ebflow

__all__ = ["ActNorm", "Dense", "EBFlow", "EBFlowLayer", "SmoothLeakyReLU", "fc_ebflow"]
