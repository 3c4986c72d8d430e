r"""Maximum-likelihood training of energy-based models with an online-adapted flow.

The model is the *tilted* EBM :math:`p_\theta(x) \propto e^{-E_\theta(x)} \rho(x)` with
:math:`\rho` the flow's Gaussian base density: with :math:`E_\theta \approx 0` and the flow equal
to the identity at initialisation, model and flow agree exactly at the start. Each training step

1. draws a minibatch :math:`x^+` of data;
2. moves the negative sampler's walkers on :math:`U = E_\theta - \log\rho` and takes the
   negatives :math:`x^-` (for ``"adaptive-flow"``: blocks of one i-SIR move with flow proposals
   and ``K`` MALA moves; the negatives are the walkers' positions after each block, so with
   ``num_blocks > 1`` they are taken along the chain, not only at its end);
3. takes one Adam step on the loss
   :math:`\overline{E_\theta(x^+)} - \overline{E_\theta(x^-)} + \lambda\,
   (\overline{E_\theta(x^+)^2} + \overline{E_\theta(x^-)^2})`, whose gradient is the
   maximum-likelihood gradient :math:`-\nabla_\theta \log p_\theta(x^+)` estimated with the
   negatives (the paper's Eqs. 2-3 and Alg. 1 print inconsistent signs; this is Appendix B's);
4. takes one Adam step of the flow on the forward KL (maximum likelihood of the flow on the
   negatives), so the flow keeps following the model.

Both learning rates follow a cosine decay to zero over ``num_steps`` by default: the gradient
noise moves the mode weights by about 0.1 from step to step at a rate of 1e-3, and the decay
damps these swings over the last quarter of training (``line4``: mode-weight MSE about 1e-5
after 4000 steps).

Reference: Grenioux, Moulines, Gabrié (2023), "Balanced Training of Energy-Based Models with
Adaptive Flow Sampling", https://arxiv.org/abs/2306.00684
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
from torch import Tensor

from pyro_ebm._checks import check_int, check_positive, check_real
from pyro_ebm.coordinates import AffineCoordinates, needs_standardization
from pyro_ebm.energy import EnergyModel, StandardizedEnergy, TiltedEnergy
from pyro_ebm.flows import Flow, RealNVP, Standardized, fit_reverse_kl, forward_kl_step
from pyro_ebm.metrics import bounds_around, mode_weights, model_mode_weights
from pyro_ebm.metrics.density import Bounds

from .averaging import Averager
from .checkpoint import shapes
from .history import History
from .loop import SCHEDULES, Trainer
from .negatives import SAMPLERS, CDNegatives, NegativeSampler, make_sampler

__all__ = ["EBMTrainer", "contrastive_loss"]


def contrastive_loss(
    energy: EnergyModel,
    x_pos: Tensor,
    x_neg: Tensor,
    weights: Tensor | None = None,
    regularization: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The maximum-likelihood surrogate loss of an EBM and the energies it used.

    .. math:: L = \frac1n \sum_i E(x_i^+) - \sum_j w_j E(x_j^-)
        + \lambda \Big(\frac1n \sum_i E(x_i^+)^2 + \sum_j w_j E(x_j^-)^2\Big)

    With negatives :math:`x^-` distributed as the model (weights :math:`w_j` summing to one,
    uniform by default), :math:`\nabla_\theta L` (for :math:`\lambda = 0`) is an unbiased
    estimate of the gradient of the negative log-likelihood
    :math:`\frac1n \sum_i E(x_i^+) + \log Z_\theta`, since
    :math:`\nabla_\theta \log Z_\theta = -E_{p_\theta}[\nabla_\theta E]`.

    :returns: ``(loss, E(x_pos), E(x_neg))``.

    Example::

        >>> from pyro_ebm import GaussianEnergy
        >>> E = GaussianEnergy(torch.zeros(1))
        >>> loss, _, _ = contrastive_loss(E, torch.full((4, 1), 2.0), torch.zeros(4, 1))
        >>> loss.item()  # mean E(x+) - mean E(x-) = 2 - 0
        2.0
    """
    if weights is None:
        weights = torch.full(
            x_neg.shape[:1], 1.0 / x_neg.shape[0], dtype=x_neg.dtype, device=x_neg.device
        )
    e_pos = energy.energy(x_pos)
    e_neg = energy.energy(x_neg)
    loss = e_pos.mean() - (weights * e_neg).sum()
    if regularization:
        loss = loss + regularization * (e_pos.pow(2).mean() + (weights * e_neg.pow(2)).sum())
    return loss, e_pos, e_neg


class _Base(torch.nn.Module):
    """The flow's base density as a module with ``log_prob`` (moves with the flow's device)."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def log_prob(self, x: Tensor) -> Tensor:
        return self.flow.base_log_prob(x)


def base_scale(data: Tensor) -> float:
    """The sd of the default flow's Gaussian base, hence of the tilt rho: the data's RMS
    per-coordinate standard deviation."""
    return float(data.std(0).pow(2).mean().sqrt())


class EBMTrainer(Trainer):
    r"""Train an energy-based model by maximum likelihood with persistent, flow-assisted negatives.

    :param energy: the learnable correction :math:`E_\theta` (e.g.
        :class:`~pyro_ebm.energy.MLPEnergy`, which is about 0 at initialisation).
    :param flow: the flow; its base density is :math:`\rho`. Default: a
        :class:`~pyro_ebm.flows.RealNVP` (6 layers, width ``max(64, 2 * dim)``) built at the
        first :meth:`fit`, with a base scale equal to the data's root-mean-square standard
        deviation, so that :math:`\rho` roughly covers the data.
    :param sampler: ``"adaptive-flow"`` (default), ``"ula"``, ``"neutra-mala"``, ``"cd"``,
        ``"short-run"``, ``"coopflow"``, or a :class:`~pyro_ebm.train.negatives.NegativeSampler`.
    :param num_walkers: persistent walkers (negatives per block; in a distributed run, per
        process).
    :param lr: Adam learning rate of the energy.
    :param flow_lr: Adam learning rate of the flow (default ``lr``, as in the paper).
    :param lr_schedule: ``"cosine"`` (decay to 0 over ``num_steps``, default) or ``"constant"``.
    :param regularization: :math:`\lambda` of the energy-magnitude penalty.
    :param max_grad_norm: clip the energy's gradient norm (``None``: no clipping).
    :param target: a data set of :mod:`pyro_ebm.datasets` with the true modes, for the mode
        metrics recorded in the history (optional).
    :param sampler_kwargs: arguments of the sampler (e.g. ``num_particles``, ``num_mala_steps``,
        ``step_size``); see :mod:`pyro_ebm.train.negatives`.
    :param average_last: fraction of the training steps, at the end, over which the energy's
        parameters are averaged (Polyak-Ruppert averaging); the average replaces the energy's
        parameters after the last step. 0 (default) keeps the last iterate. Averaging smooths
        out the gradient noise that moves the mode weights from step to step.
    :param flow_pretrain_steps: reverse-KL steps fitting the flow to the initial model before
        training (0 by default: at initialisation they already agree).
    :param standardize: train on the data standardized coordinate-wise,
        :math:`z = (x - m) / s` (the data's mean and sd at the first :meth:`fit`); ``None``
        (default) does so when :func:`~pyro_ebm.coordinates.needs_standardization` says the
        data are far from centred and unit-scaled, and only with the default flow (a given
        flow's base is the tilt, in the data's coordinates; ``True`` with a flow is an error).
        The energy, the flow and the sampler then work on :math:`z`; :attr:`model`, :attr:`walkers`,
        :meth:`potential`, :attr:`data_flow` and the metrics are in the data's coordinates.
    :param seed: seeds torch's global generator at construction, and so every draw of the run
        that follows (the flow's initialisation, the walkers, the minibatches). The ``energy``
        passed in was initialised before: for a run that repeats exactly, call
        ``torch.manual_seed`` before building it too.
    :param device: ``"cpu"``, ``"cuda"``, ... (default: where ``energy`` is).

    After :meth:`fit`, :attr:`model` is the trained density as an
    :class:`~pyro_ebm.energy.EnergyModel` (energy :math:`E_\theta - \log\rho`), ready for
    :func:`pyro_ebm.potential_fn` and the kernels of :mod:`pyro_ebm.infer`; :attr:`walkers` are
    the persistent negatives.

    Example::

        >>> import torch
        >>> from pyro_ebm import MLPEnergy
        >>> from pyro_ebm.datasets import two_to_one
        >>> data = two_to_one().sample(2000, torch.Generator().manual_seed(0)).float()
        >>> trainer = EBMTrainer(MLPEnergy(2, hidden=(32, 32)), num_walkers=128, seed=0,
        ...                      target=two_to_one())
        >>> history = trainer.fit(data, num_steps=20, batch_size=128, progress=False)
        >>> history.last["step"], len(history.last["model_weights"])
        (20, 2)
        >>> trainer.model(data[:5]).shape
        torch.Size([5])
    """

    def __init__(
        self,
        energy: EnergyModel,
        flow: Flow | None = None,
        sampler: str | NegativeSampler = "adaptive-flow",
        num_walkers: int = 1024,
        lr: float = 1e-3,
        flow_lr: float | None = None,
        lr_schedule: str = "cosine",
        regularization: float = 0.0,
        max_grad_norm: float | None = None,
        target: Any = None,
        sampler_kwargs: dict | None = None,
        average_last: float = 0.0,
        flow_pretrain_steps: int = 0,
        standardize: bool | None = None,
        seed: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if not isinstance(energy, EnergyModel):
            raise TypeError(f"energy must be an EnergyModel, got {type(energy).__name__}")
        if flow is not None and not isinstance(flow, Flow):
            raise TypeError(f"flow must be a pyro_ebm.flows.Flow, got {type(flow).__name__}")
        if flow is not None and flow.dim != energy.dim:
            raise ValueError(f"flow.dim ({flow.dim}) must equal energy.dim ({energy.dim})")
        if standardize not in (None, True, False):
            raise ValueError(f"standardize must be None, True or False, got {standardize!r}")
        if standardize and flow is not None:
            raise ValueError(
                "standardize=True needs the default flow: a given flow's base is the tilt, in "
                "the data's coordinates"
            )
        if lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {lr_schedule!r}")
        regularization = check_real("regularization", regularization, 0.0)
        self.sampler = make_sampler(sampler, **(sampler_kwargs or {}))
        self.num_walkers = check_int("num_walkers", num_walkers, 1)
        self.lr = check_positive("lr", lr)
        self.flow_lr = self.lr if flow_lr is None else check_positive("flow_lr", flow_lr)
        self.lr_schedule = lr_schedule
        self.regularization = float(regularization)
        self.max_grad_norm = (
            None if max_grad_norm is None else check_positive("max_grad_norm", max_grad_norm)
        )
        self.average_last = check_real("average_last", average_last, 0.0, 1.0, high_open=True)
        self.flow_pretrain_steps = check_int("flow_pretrain_steps", flow_pretrain_steps, 0)
        if target is not None and not (hasattr(target, "weights") and hasattr(target, "dim")):
            raise TypeError(
                "target must be a data set of pyro_ebm.datasets (with weights and mode_index), "
                f"got {type(target).__name__}"
            )
        if target is not None and target.dim != energy.dim:
            raise ValueError(f"target has dim {target.dim} but the energy has dim {energy.dim}")
        self.target = target
        self.standardize = standardize
        # the standardized coordinates training works in, or None (set at the first fit)
        self._coords: AffineCoordinates | None = None
        self._bounds: Bounds | None = None  # the evaluation's 2-D grid (see _grid_bounds)
        if seed is not None:
            torch.manual_seed(seed)
        if device is None:
            p = next(energy.parameters(), None)
            device = p.device if p is not None else "cpu"
        self.device = torch.device(device)
        self.energy = energy.to(self.device)
        self.flow = flow.to(self.device) if flow is not None else None
        self.averaged_model = self.energy
        self.averager = (
            Averager(self.energy, ema=None, last=self.average_last) if self.average_last else None
        )
        self._init_loop()
        self._ready = False
        self._neg_counts: Tensor | None = None  # mode counts of the negatives since the record
        self._eval_samples = 20_000

    # ------------------------------------------------------------------ model and state
    @property
    def dtype(self) -> torch.dtype:
        p = next(self.energy.parameters(), None)
        return p.dtype if p is not None else torch.get_default_dtype()

    @property
    def standardization(self) -> tuple[Tensor, Tensor] | None:
        """``(loc, scale)`` of the standardized coordinates training works in, or ``None`` when
        it works in the data's own (decided at the first :meth:`fit`)."""
        return None if self._coords is None else (self._coords.loc, self._coords.scale)

    def _to_z(self, x: Tensor) -> Tensor:
        """Data to the training coordinates, in the energy's dtype (standardized in the
        standardization's own dtype, the data's: float64 data at large offsets keep their
        precision)."""
        if self._coords is not None:
            x = self._coords.to_u(x.to(self._coords.loc.dtype))
        return x.to(self.dtype)

    def _to_x(self, z: Tensor) -> Tensor:
        c = self._coords
        return z if c is None else c.to_x(z.to(c.loc.dtype))

    @property
    def model(self) -> EnergyModel:
        r"""The trained density as an :class:`EnergyModel`: energy :math:`E_\theta - \log\rho`
        (a :class:`~pyro_ebm.energy.StandardizedEnergy` over the data's coordinates when
        :attr:`standardization` is set)."""
        if self.flow is None:
            raise RuntimeError("the flow is built at the first fit(); call fit() first")
        tilted = TiltedEnergy(self.energy, _Base(self.flow))
        if self._coords is None:
            return tilted
        return StandardizedEnergy(tilted, coordinates=self._coords)

    @property
    def data_flow(self) -> Flow:
        """The flow in the data's coordinates (:attr:`flow` itself, or a
        :class:`~pyro_ebm.flows.Standardized` view of it when :attr:`standardization` is set):
        an importance or i-SIR proposal for :attr:`model`."""
        if self.flow is None:
            raise RuntimeError("the flow is built at the first fit(); call fit() first")
        if self._coords is None:
            return self.flow
        return Standardized(self.flow, coordinates=self._coords)

    @property
    def walkers(self) -> Tensor | None:
        """The current negatives (persistent walkers), ``(num_walkers, dim)``."""
        w = self.sampler.walkers
        return None if w is None else self._to_x(w)

    def potential(self, x: Tensor) -> Tensor:
        r"""The model's potential :math:`U(x) = E_\theta(x) - \log\rho(x)` in the data's
        coordinates, batched (``model.energy``)."""
        return self.model.energy(x)

    def _potential(self, z: Tensor) -> Tensor:
        """The potential in the coordinates training works in (the sampler's)."""
        return self.energy.energy(z) - self.flow.base_log_prob(z)

    def _check_data(self, data: Tensor) -> Tensor:
        """``data`` (a tensor or array) checked and moved to the device; floating-point data
        keep their dtype until :meth:`_to_z` (others take the energy's)."""
        if not isinstance(data, Tensor) and hasattr(data, "__array__"):
            data = torch.as_tensor(data)
        if not isinstance(data, Tensor) or data.dim() != 2 or data.shape[1] != self.energy.dim:
            shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
            raise ValueError(f"data must be a (num_points, {self.energy.dim}) tensor, got {shape}")
        if data.shape[0] < 2:
            raise ValueError("data must hold at least 2 points")
        dtype = data.dtype if data.is_floating_point() else self.dtype
        data = data.to(device=self.device, dtype=dtype)
        if not torch.isfinite(data).all():
            raise ValueError("data must be finite (found nan or inf)")
        return data

    def _setup(self, data: Tensor) -> None:
        """Build what the first fit needs, from the data (in the data's coordinates)."""
        if self._ready:
            return
        constant = (data.std(0) == 0).nonzero().flatten().tolist()
        if constant:
            warnings.warn(
                f"data are constant in coordinates {constant[:10]}"
                f"{' ...' if len(constant) > 10 else ''}: maximum likelihood then drives the "
                "model toward a point mass there; drop those coordinates or add a little noise",
                stacklevel=4,  # the user's fit() call
            )
        use = self.standardize
        if use is None:
            use = self.flow is None and needs_standardization(data)
        if use:
            self._coords = AffineCoordinates.standardizing(data)
        data = self._to_z(data)
        if self.flow is None:
            width = max(64, 2 * self.energy.dim)
            self.flow = RealNVP(
                self.energy.dim, num_layers=6, hidden=(width, width), base_scale=base_scale(data)
            ).to(device=self.device, dtype=self.dtype)
        self.energy_opt = torch.optim.Adam(self.energy.parameters(), lr=self.lr)
        self.flow_opt = torch.optim.Adam(self.flow.parameters(), lr=self.flow_lr)
        if self.flow_pretrain_steps:
            fit_reverse_kl(
                self.flow, self._potential, num_steps=self.flow_pretrain_steps, lr=self.flow_lr
            )
        self.sampler.init(self._potential, self.flow, self.num_walkers)
        self._ready = True

    # ------------------------------------------------------------------ the loop's hooks
    def _training_data(self, data: Tensor) -> Tensor:
        return self._to_z(data)

    def _optimizers(self) -> list[tuple[torch.optim.Optimizer, float]]:
        return [(self.energy_opt, self.lr), (self.flow_opt, self.flow_lr)]

    def _loss(self, data: Tensor, batch_size: int) -> tuple[Tensor, dict]:
        """Draw a minibatch, move the walkers, and the contrastive loss. Negatives at a
        non-finite point or energy are left out of the loss and their walkers restart from
        points of the minibatch (counted as ``nonfinite_negatives`` in the history: unadjusted
        samplers such as ULA walk into regions where the energy is infinite)."""
        idx = torch.randint(data.shape[0], (batch_size,), device=self.device)
        x_pos = data[idx]
        negatives, stats = self.sampler.sample(self._potential, self.flow, x_pos)
        negatives = negatives.detach()
        loss, e_pos, e_neg = contrastive_loss(
            self.energy, x_pos, negatives, regularization=self.regularization
        )
        bad = ~(torch.isfinite(negatives).all(-1) & torch.isfinite(e_neg.detach()))
        stats["nonfinite_negatives"] = float(bad.sum())
        if bool(bad.any()):
            self._restart(bad, x_pos)
            negatives = negatives[~bad]
            if len(negatives):
                loss, e_pos, e_neg = contrastive_loss(
                    self.energy, x_pos, negatives, regularization=self.regularization
                )
            else:  # nothing to contrast with: the step is skipped
                loss = e_neg = torch.full((), float("nan"), device=self.device)
        self._negatives = negatives
        stats.update(e_pos=float(e_pos.detach().mean()), e_neg=float(e_neg.detach().mean()))
        return loss, stats

    def _restart(self, bad: Tensor, x_pos: Tensor) -> None:
        """Restart the persistent walkers among the negatives flagged ``bad`` (the walkers are
        the last ``num_walkers`` negatives) at random points of the minibatch ``x_pos``."""
        walkers = self.sampler.walkers
        if not self.sampler.persistent or walkers is None:
            return
        last = bad[-len(walkers) :]
        starts = x_pos[torch.randint(len(x_pos), (len(walkers),), device=x_pos.device)]
        self.sampler.walkers = torch.where(last[:, None], starts.to(walkers.dtype), walkers)

    def _other_updates(self, stats: dict) -> None:
        """The flow's step on the negatives, and their mode counts."""
        negatives, self._negatives = self._negatives, None
        dp = self.data_parallel
        if self.sampler.uses_flow and (len(negatives) or dp is not None):
            if not len(negatives):  # (a row the step leaves out: every process takes part)
                negatives = torch.full((1, self.energy.dim), math.nan, device=self.device)
            stats["flow_nll"] = forward_kl_step(self.flow, self.flow_opt, negatives, sync=dp)
        if self.target is not None and hasattr(self.target, "mode_index"):
            idx = self.target.mode_index(self._to_x(negatives)).reshape(-1).cpu()
            counts = torch.bincount(idx, minlength=self.target.weights.shape[0]).double()
            self._neg_counts = counts if self._neg_counts is None else self._neg_counts + counts

    def _sync_setup(self, dp) -> None:
        dp.broadcast_module(self.energy)
        dp.broadcast_module(self.flow)

    def _sync_record(self, dp) -> None:
        if self._neg_counts is not None:
            self._neg_counts = dp.all_sum(self._neg_counts)

    def _rank_keys(self) -> tuple[str, ...]:
        return (*super()._rank_keys(), "sampler", "neg_counts")

    def _snapshot(self) -> dict:
        return self.sampler.state_dict()

    def _restore(self, snapshot: dict) -> None:
        self.sampler.load_state_dict(snapshot)

    def _evaluate(self) -> dict:
        """:meth:`evaluate`, and the mode weights of the negatives since the last record
        (their counts are cleared last: an interrupt before leaves them to the resume)."""
        record = self.evaluate(self._eval_samples)
        counts, self._neg_counts = self._neg_counts, None
        if counts is not None:
            w_neg = (counts / counts.sum()).tolist()
            record["neg_weights"] = w_neg
            if "model_weights" in record:
                record["neg_vs_model_mse"] = float(
                    (torch.tensor(w_neg) - torch.tensor(record["model_weights"])).pow(2).mean()
                )
        return record

    def _description(self) -> str:
        return f"EBM ({self._sampler_name()})"

    def _postfix(self, record: dict) -> dict:
        out = super()._postfix(record)
        if "global_accept" in record:
            out["acc"] = f"{record['global_accept']:.2f}"
        if "model_weights" in record:
            out["w"] = " ".join(f"{w:.2f}" for w in record["model_weights"][:8])
        return out

    def _sampler_name(self) -> str:
        """The name of the built-in sampler this one is (or derives from), else its class."""
        names = {cls: name for name, cls in SAMPLERS.items()}
        for cls in type(self.sampler).__mro__:
            if cls in names:
                return names[cls]
        return type(self.sampler).__name__

    def _config(self) -> dict:
        """The settings a resume must match (a custom sampler's are not compared)."""
        name = self._sampler_name()
        sampler = {}
        if name in SAMPLERS:
            settings = vars(self.sampler).items()
            sampler["sampler"] = name
            sampler.update(
                (f"sampler.{k}", v)
                for k, v in sorted(settings)
                if isinstance(v, (bool, int, float, str))
                and not k.startswith("_")
                and k != "num_walkers"  # (the trainer's)
            )
        return {
            **sampler,
            "num_walkers": self.num_walkers,
            "lr": self.lr,
            "flow_lr": self.flow_lr,
            "lr_schedule": self.lr_schedule,
            "regularization": self.regularization,
            "max_grad_norm": self.max_grad_norm,
            "average_last": self.average_last,
            "standardize": self.standardize,
            "energy": shapes(self.energy),
            "flow": None if self.flow is None else shapes(self.flow),
        }

    def _modules(self) -> dict:
        return {"energy": self.energy, "flow": self.flow}

    def _model_keys(self) -> tuple[str, ...]:
        return ("standardization",)

    def _extra_state(self) -> dict:
        if not self._ready:
            raise RuntimeError("nothing to save before the first fit()")
        return {
            "weights": {"energy": self.energy.state_dict(), "flow": self.flow.state_dict()},
            "sampler": self.sampler.state_dict(),
            "neg_counts": self._neg_counts,
            "standardization": self.standardization,
        }

    def _load_extra_state(self, state: dict) -> None:
        if not self._ready:
            raise RuntimeError(
                "call load() after the trainer has been set up by fit(), or use "
                "fit(..., checkpoint=path, resume=True)"
            )
        self.energy.load_state_dict(state["weights"]["energy"])
        self.flow.load_state_dict(state["weights"]["flow"])
        self.sampler.load_state_dict(state["sampler"])
        self._neg_counts = state["neg_counts"]
        st = state["standardization"]
        self._coords = None if st is None else AffineCoordinates(*st)

    # ------------------------------------------------------------------ evaluation and fit
    def evaluate(self, eval_samples: int = 20_000) -> dict:
        r"""Metrics of the current model: with a ``target``, the model's mode weights (2-D grid
        quadrature, else self-normalised importance sampling with the flow), their MSE against
        the true weights, and the walkers' mode weights. (The history's ``neg_weights`` and
        ``neg_vs_model_mse`` count every negative since the previous record.)"""
        record: dict[str, Any] = {}
        if self.target is None or not hasattr(self.target, "weights"):
            return record
        truth = self.target.weights.double()
        w_model = model_mode_weights(
            self.potential,
            self.target,
            flow=self.data_flow,
            num_samples=check_int("eval_samples", eval_samples, 1),
            bounds=self._grid_bounds(),
        ).double()
        record["model_weights"] = w_model.tolist()
        record["model_mse"] = float((w_model - truth).pow(2).mean())
        if self.walkers is not None:
            w_walk = mode_weights(self.walkers, self.target).double()
            record["walker_weights"] = w_walk.tolist()
        return record

    def _grid_bounds(self) -> Bounds:
        """The 2-D quadrature's square: :func:`~pyro_ebm.metrics.bounds_around` 2000 draws of
        the target (a fixed generator), ``(-5, 5)`` when it cannot be sampled."""
        if self._bounds is None:
            self._bounds = (-5.0, 5.0)
            if self.energy.dim == 2 and hasattr(self.target, "sample"):
                draws = self.target.sample(2000, torch.Generator().manual_seed(0))
                self._bounds = bounds_around(draws)
        return self._bounds

    def run_sampler(self, num_steps: int, data: Tensor | None = None) -> Tensor:
        r"""Run the negative sampler on the current (frozen) model and flow, and return the
        walkers after each step, ``(num_steps, num_walkers, dim)``: chains of negatives for the
        negatives-versus-model metrics (mode weights counted over many chain states, R-hat of
        the chains). The walkers keep their final positions.

        :param data: data batch for samplers that start from data (``"cd"``).
        """
        num_steps = check_int("num_steps", num_steps, 1)
        if not self._ready:
            raise RuntimeError("run_sampler() needs a trained model: call fit() first")
        if data is None and isinstance(self.sampler, CDNegatives):
            raise ValueError("data must be given for the 'cd' sampler")
        if data is not None:
            data = self._to_z(self._check_data(data))
        chain = []
        for _ in range(num_steps):
            self.sampler.sample(self._potential, self.flow, data)
            chain.append(self.walkers.detach())
        return torch.stack(chain)

    def fit(
        self,
        data: Tensor,
        num_steps: int = 1000,
        batch_size: int = 256,
        *,
        eval_every: int | None = None,
        eval_samples: int = 20_000,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        resume: bool = False,
        progress: bool = True,
        force: bool = False,
    ) -> History:
        r"""Train until ``num_steps`` steps in all are done (counting steps already done).

        :param data: ``(num_points, dim)`` float tensor; minibatches are drawn with replacement.
        :param num_steps: total number of training steps (the cosine schedule spans them; to
            continue a run exactly, pass the same ``num_steps``).
        :param batch_size: data points per step.
        :param eval_every: steps between history records (default: ``num_steps // 20``).
        :param eval_samples: importance samples for the model's mode weights when ``dim > 2``.
        :param checkpoint: file to write the full training state to (atomically) every
            ``checkpoint_every`` steps (default: at every evaluation), at the end, and when the
            run stops on an exception (``KeyboardInterrupt`` included); with ``resume=True`` an
            existing file is loaded first and training continues exactly where it stopped.
        :param resume: see ``checkpoint``. The checkpoint records the trainer's settings, the
            data's shape and hash, and ``batch_size``; resuming with any of them changed is
            refused with a ``ValueError`` naming it, unless ``force=True``.
        :param progress: show a tqdm progress bar with the loss, acceptance and mode weights.
        :returns: the :class:`~pyro_ebm.train.history.History` (also :attr:`history`).

        A step whose loss or gradient is not finite is skipped (the energy does not move),
        with a warning at the first; when more than half of the call's steps (20 or more) or
        :attr:`MAX_SKIPPED_IN_A_ROW` in a row were skipped, training stops with a
        ``RuntimeError`` (the checkpoint, if any, is written first).
        """
        self._eval_samples = check_int("eval_samples", eval_samples, 1)
        data = self._check_data(data)
        return self._run(
            data,
            num_steps,
            batch_size,
            eval_every,
            checkpoint,
            checkpoint_every,
            resume,
            progress,
            force,
        )
