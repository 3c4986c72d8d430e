r"""Normalizing flows for flow-assisted MCMC and EBM training.

A :class:`Flow` is a :class:`torch.nn.Module` holding a diagonal Gaussian base
:math:`q_0 = \mathcal{N}(0, \sigma^2 I)` and a bijection :math:`T: z \mapsto x`, so that
:math:`\log q(x) = \log q_0(T^{-1}(x)) + \log|\det J_{T^{-1}}(x)|`. It offers the calls that
samplers and trainers need, all vectorised over a block of samples: ``sample``, ``rsample``,
``log_prob``, the fast ``sample_and_log_prob`` (density from the forward pass, no inversion),
``forward``/``inverse`` with log-determinants, and :attr:`Flow.transform`, the bijection as a
Pyro :class:`~pyro.distributions.TransformModule`, so that a flow serves in Pyro's
``AutoNormalizingFlow``, ``TransformedDistribution`` and ``NeuTraReparam``.

- :mod:`~pyro_ebm.flows.base`: :class:`Flow`, :class:`FlowTransform`;
- :mod:`~pyro_ebm.flows.coupling`: :class:`RealNVP`, :class:`SplineFlow`;
- :mod:`~pyro_ebm.flows.affine`: :class:`AffineFlow`;
- :mod:`~pyro_ebm.flows.standardized`: :class:`Standardized`;
- :mod:`~pyro_ebm.flows.adapters`: :class:`ZukoFlow`, :class:`GuideFlow` (a trained Pyro
  autoguide as a flow), :func:`as_flow`;
- :mod:`~pyro_ebm.flows.fitting`: :func:`fit_forward_kl`, :func:`fit_reverse_kl` and their
  single steps.

The coupling layers are written here rather than taken from ``pyro.distributions.transforms``:
one layer does one permutation gather, one MLP call and one elementwise map in either direction,
without transform caches, so it runs ~1.3-2x faster than Pyro's ``AffineCoupling``/``Permute``
stack (and far faster than Pyro's ``SplineCoupling``), and both families start *exactly* at the
identity (Pyro's spline pads its boundary slopes with ``1 - 1e-3``, so it never is).
"""

from .adapters import GuideFlow, ZukoFlow, as_flow
from .affine import AffineFlow
from .base import Flow, FlowTransform
from .coupling import RealNVP, SplineFlow
from .fitting import fit_forward_kl, fit_reverse_kl, forward_kl_step, reverse_kl_step
from .standardized import Standardized

__all__ = [
    "AffineFlow",
    "Flow",
    "FlowTransform",
    "GuideFlow",
    "RealNVP",
    "SplineFlow",
    "Standardized",
    "ZukoFlow",
    "as_flow",
    "fit_forward_kl",
    "fit_reverse_kl",
    "forward_kl_step",
    "reverse_kl_step",
]
