r"""Flows from other libraries behind the :class:`~pyro_ebm.flows.Flow` interface."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions.transforms import _sum_rightmost

from .base import Flow

__all__ = ["GuideFlow", "ZukoFlow", "as_flow"]


class ZukoFlow(Flow):
    r"""Adapter giving an unconditional zuko flow the :class:`Flow` interface.

    zuko's ``NormalizingFlow.transform`` maps data to latent; here ``forward`` maps latent to data
    as for the other flows. Coupling variants (e.g. ``zuko.flows.NSF(dim, passes=2)``) are fast
    in both directions; fully autoregressive ones are slow to sample. Requires
    ``pip install pyro-ebm[zuko]``.

    :param flow: a zuko ``LazyDistribution`` without context, e.g. ``zuko.flows.RealNVP(dim)``.

    References:

    - F. Rozet et al. Zuko: normalizing flows in PyTorch. https://github.com/probabilists/zuko

    Example:

    >>> import zuko
    >>> flow = ZukoFlow(zuko.flows.NSF(2, passes=2, transforms=2))
    >>> x, log_q = flow.sample_and_log_prob(4)
    >>> torch.allclose(log_q, flow.log_prob(x))
    True
    """

    def __init__(self, flow: nn.Module) -> None:
        try:
            import zuko  # noqa: F401
        except ImportError as err:  # pragma: no cover
            raise ImportError("ZukoFlow needs zuko: pip install pyro-ebm[zuko]") from err
        if not callable(flow):
            raise TypeError(f"flow must be a zuko LazyDistribution, got {type(flow).__name__}")
        d = flow()
        if len(d.event_shape) != 1:
            raise ValueError(f"flow must have a 1-D event shape, got {tuple(d.event_shape)}")
        super().__init__(int(d.event_shape[0]))
        self.flow = flow

    @property
    def base_dist(self) -> torch.distributions.Distribution:
        return self.flow().base

    def base_log_prob(self, z: Tensor) -> Tensor:
        return self.base_dist.log_prob(z)

    def base_rsample(self, n: int) -> Tensor:
        return self.base_dist.rsample((n,))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.flow().transform.inv.call_and_ladj(z)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.flow().transform.call_and_ladj(x)


class GuideFlow(Flow):
    r"""A trained Pyro autoguide as a :class:`Flow` over the model's unconstrained latent vector.

    Any :class:`~pyro.infer.autoguide.AutoContinuous` guide whose posterior is a base
    distribution pushed through a transform serves (``AutoNormal``-style mean-field guides
    are not ``AutoContinuous``): ``AutoDiagonalNormal``, ``AutoMultivariateNormal``,
    ``AutoIAFNormal``, ``AutoNormalizingFlow`` (e.g. with a pyro_ebm flow's
    :attr:`~Flow.transform`). The flow's coordinates are the guide's packed latent vector, the
    sites in the guide's order, each in the unconstrained space of its support: the coordinates
    in which the ``pyro_ebm.infer`` kernels move. The kernels take a guide as ``flow=``
    directly (they wrap it with :func:`as_flow`) and check that its sites are the model's.

    The guide is read, not copied: train it first (e.g. by SVI), and it must have run once so
    that it knows its sites. An autoregressive guide (``AutoIAFNormal``) samples fast but
    inverts one coordinate at a time, so kernels that invert (NeuTra's
    :class:`~pyro_ebm.infer.FlowHMC`, a model's initial point) are slow with it.

    :param guide: a trained ``AutoContinuous`` guide.

    Example:

    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoMultivariateNormal
    >>> def model():
    ...     pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    >>> guide = AutoMultivariateNormal(model)
    >>> _ = guide()  # runs once: the guide learns its sites
    >>> flow = GuideFlow(guide)
    >>> flow.dim, flow.site_shapes
    (3, {'scale': (), 'x': (2,)})
    >>> x, log_q = flow.sample_and_log_prob(5)
    >>> torch.allclose(log_q, flow.log_prob(x), atol=1e-5)
    True
    """

    def __init__(self, guide: nn.Module) -> None:
        from pyro.infer.autoguide import AutoContinuous

        if not isinstance(guide, AutoContinuous):
            raise TypeError(
                "guide must be a Pyro AutoContinuous guide (e.g. AutoMultivariateNormal, "
                f"AutoNormalizingFlow), got {type(guide).__name__}"
            )
        shapes = getattr(guide, "_unconstrained_shapes", None)
        if not shapes:
            raise ValueError(
                f"guide ({type(guide).__name__}) has not run yet, so its sites are unknown: "
                "train it (e.g. by SVI) or call it once with the model's arguments first"
            )
        nn.Module.__init__(self)
        self.dim = int(guide.latent_dim)
        self.guide = guide
        #: ``{site: unconstrained shape}`` in the order of the flow's coordinates
        self.site_shapes = {k: tuple(v) for k, v in shapes.items()}
        try:
            guide.get_base_dist(), guide.get_transform()
        except NotImplementedError as err:
            raise TypeError(
                f"guide ({type(guide).__name__}) has no base distribution and transform "
                "(get_base_dist/get_transform); use e.g. AutoMultivariateNormal or "
                "AutoNormalizingFlow"
            ) from err

    @property
    def base_dist(self) -> torch.distributions.Distribution:
        return self.guide.get_base_dist()

    def base_log_prob(self, z: Tensor) -> Tensor:
        return self.base_dist.log_prob(z)

    def base_rsample(self, n: int) -> Tensor:
        return self.base_dist.rsample((n,))

    @staticmethod
    def _ladj(t: torch.distributions.Transform, z: Tensor, x: Tensor) -> Tensor:
        return _sum_rightmost(t.log_abs_det_jacobian(z, x), 1 - t.domain.event_dim)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        t = self.guide.get_transform()
        x = t(z)
        return x, self._ladj(t, z, x)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t = self.guide.get_transform()
        z = t.inv(x)
        return z, -self._ladj(t, z, x)


def as_flow(flow: object) -> object:
    """``flow`` as the kernels use it: a Pyro ``AutoContinuous`` guide wrapped in a
    :class:`GuideFlow`; anything else (a :class:`Flow`, ``None``) unchanged.

    :param flow: a flow, a trained guide, or ``None``.

    Example:

    >>> from pyro_ebm.flows import RealNVP
    >>> flow = RealNVP(2)
    >>> as_flow(flow) is flow, as_flow(None)
    (True, None)
    """
    from pyro.infer.autoguide import AutoContinuous

    return GuideFlow(flow) if isinstance(flow, AutoContinuous) else flow
