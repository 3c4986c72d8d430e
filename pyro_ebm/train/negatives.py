r"""Negative samplers for maximum-likelihood training of energy-based models.

Each sampler produces the negatives :math:`x^-` of one training step for a model with potential
:math:`U(x) = E_\theta(x) - \log \rho(x)`, by calling the MCMC core in :mod:`pyro_ebm.samplers`
(no MCMC math lives here). All samplers share one interface:

- ``sampler.init(potential_fn, flow, num_walkers)`` before the first step;
- ``negatives, stats = sampler.sample(potential_fn, flow, data_batch)`` once per training step
  (``potential_fn`` is the current model's, ``flow`` the current flow);
- ``sampler.walkers`` (the persistent chains, if any), ``state_dict()`` /
  ``load_state_dict()`` for checkpoints.

Samplers (the names accepted by :class:`pyro_ebm.train.EBMTrainer`):

=================  =====================================================================
``adaptive-flow``  :class:`AdaptiveFlowNegatives`: persistent walkers, blocks of one i-SIR
                   move with flow proposals and ``K`` MALA moves (Grenioux et al. 2023).
``ula``            :class:`ULANegatives`: persistent unadjusted Langevin (ULA-EBM; Du &
                   Mordatch 2019, Nijkamp et al. 2020).
``neutra-mala``    :class:`NeutraMALANegatives`: persistent MALA in the flow's latent space
                   (NT-EBM; Nijkamp et al. 2022).
``cd``             :class:`CDNegatives`: contrastive divergence, ``K`` Langevin steps from the
                   data batch (Hinton 2002).
``short-run``      :class:`ShortRunNegatives`: ``K`` Langevin steps from the base density,
                   restarted every step (Nijkamp et al. 2019).
``coopflow``       :class:`CoopFlowNegatives`: ``K`` Langevin steps from fresh flow samples,
                   the flow trained on the revised samples (CoopFlow; Xie et al. 2022).
=================  =====================================================================

References:

- Grenioux, Moulines, Gabrié (2023), "Balanced Training of Energy-Based Models with Adaptive
  Flow Sampling", https://arxiv.org/abs/2306.00684
- Nijkamp, Hill, Zhu, Wu (2019), "Learning non-convergent non-persistent short-run MCMC toward
  energy-based model", https://arxiv.org/abs/1904.09770
- Nijkamp, Gao, Hill, Han, Zhu, Wu (2022), "MCMC should mix: learning energy-based model with
  neural transport latent space MCMC", https://arxiv.org/abs/2006.06897
- Xie, Zhu, Li, Nijkamp, Wu, Zhu (2022), "A Tale of Two Flows: Cooperative Learning of Langevin
  Flow and Normalizing Flow Toward Energy-Based Model", https://arxiv.org/abs/2205.06924
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pyro_ebm._checks import check_int as _check_int
from pyro_ebm._checks import check_positive as _check_positive
from pyro_ebm.samplers import (
    FlowProposals,
    MoveInfo,
    PullbackPotential,
    TrackingStepSize,
    WalkerState,
    global_local_step,
    init_state,
    isir_step,
    mala_step,
    ula_step,
)

__all__ = [
    "SAMPLERS",
    "AdaptiveFlowNegatives",
    "CDNegatives",
    "CoopFlowNegatives",
    "NegativeSampler",
    "NeutraMALANegatives",
    "ShortRunNegatives",
    "ULANegatives",
    "make_sampler",
]

PotentialFn = Callable[[Tensor], Tensor]


class NegativeSampler:
    """Base class: subclasses implement :meth:`sample` (and :meth:`init` if persistent)."""

    #: whether the sampler uses the flow (the trainer trains the flow only if so)
    uses_flow: bool = False
    #: whether the walkers persist from one training step to the next
    persistent: bool = True

    def __init__(self) -> None:
        self.walkers: Tensor | None = None

    def init(self, potential_fn: PotentialFn, flow, num_walkers: int) -> None:
        """Start ``num_walkers`` walkers from the flow (which equals the base density at the
        start of training)."""
        self.num_walkers = _check_int("num_walkers", num_walkers, 1)
        with torch.no_grad():
            self.walkers = flow.sample(num_walkers)

    def sample(self, potential_fn: PotentialFn, flow, data: Tensor) -> tuple[Tensor, dict]:
        """Negatives ``(num_walkers, dim)`` of the current model and a dict of statistics."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Everything needed to continue exactly (walkers, adapted step size)."""
        state = {"walkers": self.walkers}
        if isinstance(getattr(self, "step", None), TrackingStepSize):
            state["log_step"] = self.step.log_step
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.walkers = state["walkers"]
        if "log_step" in state:
            self.step.log_step = state["log_step"]


class AdaptiveFlowNegatives(NegativeSampler):
    r"""Persistent walkers moved by ``num_blocks`` blocks of [one i-SIR step with
    ``num_particles`` flow particles, then ``num_mala_steps`` MALA steps] per training step
    (Grenioux et al. 2023, Alg. 1).

    The negatives are the walkers' positions at the end of every block (``num_blocks *
    num_walkers`` points, taken along the chain). The i-SIR proposals of all blocks of a training
    step come from one flow call (the model and the flow are fixed within a step). The MALA step
    size is adapted toward ``target_accept`` throughout training. The i-SIR step resamples
    among all ``N`` particles, as in the paper (``isir_step(metropolis=False)``): the
    reproductions of its tables were measured so; the multiple-try Metropolis rule the MCMC
    kernels use moves at least as often.

    :param num_particles: i-SIR particles ``N`` (the current point and ``N - 1`` proposals).
    :param num_mala_steps: MALA steps ``K`` per block.
    :param num_blocks: blocks ``B`` per training step.
    :param step_size: initial MALA step size.
    :param target_accept: MALA acceptance rate to aim for (``None``: fixed step size).
    """

    uses_flow = True

    def __init__(
        self,
        num_particles: int = 32,
        num_mala_steps: int = 5,
        num_blocks: int = 1,
        step_size: float = 1e-2,
        target_accept: float | None = 0.574,
    ) -> None:
        super().__init__()
        self.num_particles = _check_int("num_particles", num_particles, 2)
        self.num_mala_steps = _check_int("num_mala_steps", num_mala_steps, 0)
        self.num_blocks = _check_int("num_blocks", num_blocks, 1)
        self.step = TrackingStepSize(_check_positive("step_size", step_size), target_accept)

    def sample(self, potential_fn: PotentialFn, flow, data: Tensor) -> tuple[Tensor, dict]:
        """Negatives ``(num_walkers, dim)`` of the current model and a dict of statistics."""
        proposals = FlowProposals(
            flow, potential_fn, self.num_walkers, self.num_particles - 1, self.num_blocks
        )
        state = init_state(potential_fn, self.walkers)
        negatives, global_acc, local_acc = [], [], []

        def local(s: WalkerState) -> tuple[WalkerState, MoveInfo]:
            s, info = mala_step(s, potential_fn, self.step.step_size)
            self.step.update(info.accept_prob)
            local_acc.append(info.accept_prob.mean())
            return s, info

        for _ in range(self.num_blocks):
            state, info = global_local_step(
                state,
                lambda s: isir_step(s, proposals.draw(), flow, potential_fn, metropolis=False),
                local,
                self.num_mala_steps,
            )
            global_acc.append(info.global_info.accept_prob.mean())
            negatives.append(state.x)
        self.walkers = state.x
        stats = {"global_accept": float(torch.stack(global_acc).mean())}
        if local_acc:
            stats["local_accept"] = float(torch.stack(local_acc).mean())
            stats["step_size"] = self.step.step_size
        return torch.cat(negatives), stats


class ULANegatives(NegativeSampler):
    r"""Persistent unadjusted Langevin walkers (ULA-EBM): ``num_steps`` steps
    :math:`x \leftarrow x - \epsilon \nabla U(x) + \sqrt{2\epsilon}\,\xi` per training step; the
    negatives are the final positions. Without a Metropolis correction, and with walkers that
    rarely cross between modes, the relative weights of modes are learnt wrongly — the failure
    the adaptive flow sampler fixes.

    :param num_steps: Langevin steps per training step.
    :param step_size: :math:`\epsilon`.
    """

    def __init__(self, num_steps: int = 5, step_size: float = 1e-2) -> None:
        super().__init__()
        self.num_steps = _check_int("num_steps", num_steps, 1)
        self.step_size = _check_positive("step_size", step_size)

    def _langevin(self, potential_fn: PotentialFn, x: Tensor) -> tuple[Tensor, dict]:
        state = init_state(potential_fn, x)
        for _ in range(self.num_steps):
            state, _ = ula_step(state, potential_fn, self.step_size)
        return state.x, {}

    def sample(self, potential_fn: PotentialFn, flow, data: Tensor) -> tuple[Tensor, dict]:
        """Negatives ``(num_walkers, dim)`` of the current model and a dict of statistics."""
        self.walkers, stats = self._langevin(potential_fn, self.walkers)
        return self.walkers, stats


class CDNegatives(ULANegatives):
    r"""Contrastive divergence CD-k: ``num_steps`` Langevin steps started at the data batch
    (not persistent)."""

    persistent = False

    def init(self, potential_fn: PotentialFn, flow, num_walkers: int) -> None:
        self.num_walkers = _check_int("num_walkers", num_walkers, 1)

    def sample(self, potential_fn: PotentialFn, flow, data: Tensor) -> tuple[Tensor, dict]:
        """Negatives ``(num_walkers, dim)`` of the current model and a dict of statistics."""
        x, stats = self._langevin(potential_fn, data)
        self.walkers = x
        return x, stats


class ShortRunNegatives(ULANegatives):
    r"""Short-run Langevin: ``num_walkers`` chains restarted from the base density every
    training step, ``num_steps`` Langevin steps each (not persistent)."""

    persistent = False

    def _start(self, flow) -> Tensor:
        """Where this step's chains start."""
        return flow.base_rsample(self.num_walkers)

    def sample(self, potential_fn: PotentialFn, flow, data: Tensor) -> tuple[Tensor, dict]:
        """Negatives ``(num_walkers, dim)`` of the current model and a dict of statistics."""
        with torch.no_grad():
            x = self._start(flow)
        self.walkers, stats = self._langevin(potential_fn, x)
        return self.walkers, stats


class CoopFlowNegatives(ShortRunNegatives):
    r"""CoopFlow (Xie et al. 2022): every training step draws ``num_walkers`` fresh samples from
    the flow and revises them by ``num_steps`` Langevin steps on the model; the revised samples
    are the negatives, and the trainer's flow step fits the flow to them (forward KL), so that
    the flow learns to do the Langevin revision's work (not persistent). Unlike the paper's
    untilted EBM, the Langevin steps run on the tilted model :math:`E_\theta - \log\rho` of
    :class:`~pyro_ebm.train.EBMTrainer`; like the paper's, they are unadjusted. Non-persistent
    chains from a flow that lags the model can diverge: the energy runs away where the revised
    samples never reach.
    """

    uses_flow = True

    def _start(self, flow) -> Tensor:
        return flow.sample(self.num_walkers)


class NeutraMALANegatives(NegativeSampler):
    r"""Persistent MALA in the flow's latent space (NT-EBM): each training step maps the walkers
    to :math:`z = T^{-1}(x)` with the current flow, runs ``num_steps`` MALA steps on
    :math:`U(T(z)) - \log|\det J_T(z)|`, and maps back. The flow is trained as for the adaptive
    sampler (forward KL on the negatives).

    :param num_steps: MALA steps per training step.
    :param step_size: initial step size (in the latent space).
    :param target_accept: MALA acceptance rate to aim for (``None``: fixed step size).
    """

    uses_flow = True

    def __init__(
        self, num_steps: int = 5, step_size: float = 1e-1, target_accept: float | None = 0.574
    ) -> None:
        super().__init__()
        self.num_steps = _check_int("num_steps", num_steps, 1)
        self.step = TrackingStepSize(_check_positive("step_size", step_size), target_accept)

    def sample(self, potential_fn: PotentialFn, flow, data: Tensor) -> tuple[Tensor, dict]:
        """Negatives ``(num_walkers, dim)`` of the current model and a dict of statistics."""
        latent = PullbackPotential(potential_fn, flow)
        with torch.no_grad():
            z, _ = flow.inverse(self.walkers)
        state = init_state(latent, z)
        acc = []
        for _ in range(self.num_steps):
            state, info = mala_step(state, latent, self.step.step_size)
            self.step.update(info.accept_prob)
            acc.append(info.accept_prob.mean())
        with torch.no_grad():
            x, _ = flow.forward(state.x)
        # a walker whose round trip through the flow is not finite stays where it was
        ok = torch.isfinite(x).all(-1, keepdim=True)
        self.walkers = torch.where(ok, x, self.walkers)
        stats = {"local_accept": float(torch.stack(acc).mean()), "step_size": self.step.step_size}
        return self.walkers, stats


SAMPLERS: dict[str, type[NegativeSampler]] = {
    "adaptive-flow": AdaptiveFlowNegatives,
    "ula": ULANegatives,
    "neutra-mala": NeutraMALANegatives,
    "cd": CDNegatives,
    "short-run": ShortRunNegatives,
    "coopflow": CoopFlowNegatives,
}
"""Registry of the negative samplers: name -> class."""


def make_sampler(sampler: str | NegativeSampler, **kwargs) -> NegativeSampler:
    """Build a sampler from its name (keyword arguments go to its constructor), or pass an
    instance through."""
    if isinstance(sampler, NegativeSampler):
        if kwargs:
            raise ValueError("sampler_kwargs must be empty when sampler is an instance")
        return sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    return SAMPLERS[sampler](**kwargs)
