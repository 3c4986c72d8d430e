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
noise moves the mode weights by about 0.1 from step to step at a rate of 1e-3 (see
``benchmarks/line4_weights.png``), and the decay damps these swings over the last quarter of
training (``line4``: mode-weight MSE about 1e-5 after 4000 steps).

Reference: Grenioux, Moulines, Gabrié (2023), "Balanced Training of Energy-Based Models with
Adaptive Flow Sampling", https://arxiv.org/abs/2306.00684
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pyro_ebm._checks import check_int, check_positive
from pyro_ebm.energy import EnergyModel, StandardizedEnergy, TiltedEnergy
from pyro_ebm.flows import Flow, RealNVP, Standardized, fit_reverse_kl, forward_kl_step
from pyro_ebm.metrics import bounds_around, mode_weights, model_mode_weights
from pyro_ebm.metrics.density import Bounds

from .checkpoint import (
    atomic_save,
    deferred_interrupt,
    load_checkpoint,
    rng_states,
    set_rng_states,
)
from .history import History
from .negatives import SAMPLERS, CDNegatives, NegativeSampler, make_sampler

__all__ = ["EBMTrainer", "contrastive_loss", "needs_standardization"]

_SCHEDULES = ("cosine", "constant")


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


def needs_standardization(data: Tensor) -> bool:
    r"""Whether :class:`EBMTrainer` (``standardize=None``) trains on standardized data: when a
    coordinate's mean lies more than 2 RMS standard deviations from 0, the RMS sd is outside
    ``[0.1, 10]``, or the coordinates' sds differ by more than a factor 100. Off for the toy
    data sets of :mod:`pyro_ebm.datasets` (means within 0.7 RMS sd, RMS sds 0.7-3.4).

    Why: the tilt :math:`\rho` is centred at 0 with the RMS sd, and the energy's and flow's
    networks see the raw coordinates. On ``two_to_one`` moved to (50, -25) and halved, 150
    steps left the walkers 54-58 data sds away from the data on the raw coordinates and within
    0.2 sd standardized (seeds 0-2); centring the tilt alone did not
    help (a one-off run of 600 steps on two moons moved there: the flow's global acceptance
    fell to 0 and the walkers ended 2 sds off).
    """
    sd, rms = data.std(0), base_scale(data)
    if not 0.1 <= rms <= 10.0:
        return True
    if float(data.mean(0).abs().max()) > 2.0 * rms:
        return True
    return float(sd.max()) > 100.0 * float(sd.min())


class EBMTrainer:
    r"""Train an energy-based model by maximum likelihood with persistent, flow-assisted negatives.

    :param energy: the learnable correction :math:`E_\theta` (e.g.
        :class:`~pyro_ebm.energy.MLPEnergy`, which is about 0 at initialisation).
    :param flow: the flow; its base density is :math:`\rho`. Default: a
        :class:`~pyro_ebm.flows.RealNVP` (6 layers, width ``max(64, 2 * dim)``) built at the
        first :meth:`fit`, with a base scale equal to the data's root-mean-square standard
        deviation, so that :math:`\rho` roughly covers the data.
    :param sampler: ``"adaptive-flow"`` (default), ``"ula"``, ``"neutra-mala"``, ``"cd"``,
        ``"short-run"``, ``"coopflow"``, or a :class:`~pyro_ebm.train.negatives.NegativeSampler`.
    :param num_walkers: persistent walkers (negatives per block).
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
        (default) does so when :func:`needs_standardization` says the data are far from
        centred and unit-scaled, and only with the default flow (a given flow's base is the
        tilt, in the data's coordinates; ``True`` with a flow is an error). The energy, the
        flow and the sampler then work on :math:`z`; :attr:`model`, :attr:`walkers`,
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
        if lr_schedule not in _SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {_SCHEDULES}, got {lr_schedule!r}")
        if isinstance(regularization, bool) or not regularization >= 0:
            raise ValueError(f"regularization must be >= 0, got {regularization!r}")
        self.sampler = make_sampler(sampler, **(sampler_kwargs or {}))
        self.num_walkers = check_int("num_walkers", num_walkers, 1)
        self.lr = check_positive("lr", lr)
        self.flow_lr = self.lr if flow_lr is None else check_positive("flow_lr", flow_lr)
        self.lr_schedule = lr_schedule
        self.regularization = float(regularization)
        self.max_grad_norm = (
            None if max_grad_norm is None else check_positive("max_grad_norm", max_grad_norm)
        )
        if isinstance(average_last, bool) or not 0.0 <= average_last < 1.0:
            raise ValueError(f"average_last must lie in [0, 1), got {average_last!r}")
        self.average_last = float(average_last)
        self._average: list[Tensor] | None = None
        self._average_count = 0
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
        # the standardization z = (x - loc) / scale, or None (set at the first fit)
        self._loc: Tensor | None = None
        self._scale: Tensor | None = None
        self._bounds: Bounds | None = None  # the evaluation's 2-D grid (see _grid_bounds)
        if seed is not None:
            torch.manual_seed(seed)
        if device is None:
            p = next(energy.parameters(), None)
            device = p.device if p is not None else "cpu"
        self.device = torch.device(device)
        self.energy = energy.to(self.device)
        self.flow = flow.to(self.device) if flow is not None else None
        self.step = 0
        self.elapsed = 0.0
        self.history = History()
        self._ready = False
        self._window: dict[str, list] = {}  # per-step statistics since the last record
        self._neg_counts: Tensor | None = None  # mode counts of the negatives since then

    # ------------------------------------------------------------------ model and state
    @property
    def dtype(self) -> torch.dtype:
        p = next(self.energy.parameters(), None)
        return p.dtype if p is not None else torch.get_default_dtype()

    @property
    def standardization(self) -> tuple[Tensor, Tensor] | None:
        """``(loc, scale)`` of the standardized coordinates training works in, or ``None`` when
        it works in the data's own (decided at the first :meth:`fit`)."""
        return None if self._loc is None else (self._loc, self._scale)

    def _to_z(self, x: Tensor) -> Tensor:
        """Data to the training coordinates, in the energy's dtype (standardized in the
        standardization's own dtype, the data's: float64 data at large offsets keep their
        precision)."""
        if self._loc is not None:
            x = (x.to(self._loc.dtype) - self._loc) / self._scale
        return x.to(self.dtype)

    def _to_x(self, z: Tensor) -> Tensor:
        return z if self._loc is None else self._loc + self._scale * z.to(self._loc.dtype)

    @property
    def model(self) -> EnergyModel:
        r"""The trained density as an :class:`EnergyModel`: energy :math:`E_\theta - \log\rho`
        (a :class:`~pyro_ebm.energy.StandardizedEnergy` over the data's coordinates when
        :attr:`standardization` is set)."""
        if self.flow is None:
            raise RuntimeError("the flow is built at the first fit(); call fit() first")
        tilted = TiltedEnergy(self.energy, _Base(self.flow))
        return tilted if self._loc is None else StandardizedEnergy(tilted, self._loc, self._scale)

    @property
    def data_flow(self) -> Flow:
        """The flow in the data's coordinates (:attr:`flow` itself, or a
        :class:`~pyro_ebm.flows.Standardized` view of it when :attr:`standardization` is set):
        an importance or i-SIR proposal for :attr:`model`."""
        if self.flow is None:
            raise RuntimeError("the flow is built at the first fit(); call fit() first")
        if self._loc is None:
            return self.flow
        view = Standardized(self.flow)
        view.loc.copy_(self._loc)
        view.scale.copy_(self._scale)
        return view

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
        constant = (data.std(0) == 0).nonzero().flatten().tolist()
        if constant:
            warnings.warn(
                f"data are constant in coordinates {constant[:10]}"
                f"{' ...' if len(constant) > 10 else ''}: maximum likelihood then drives the "
                "model toward a point mass there; drop those coordinates or add a little noise",
                stacklevel=3,  # the user's fit() call
            )
        use = self.standardize
        if use is None:
            use = self.flow is None and needs_standardization(data)
        if use:  # moments in float64, kept in the data's dtype; the floor only for constants
            wide = data.double()
            loc, scale = wide.mean(0), wide.std(0)
            floor = 4 * torch.finfo(data.dtype).eps * (1 + loc.abs())
            self._loc, self._scale = loc.to(data.dtype), scale.clamp(min=floor).to(data.dtype)
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

    # ------------------------------------------------------------------ training
    def _lr_factor(self, num_steps: int, step: int | None = None) -> float:
        """The learning-rate factor of step ``step`` (default: the next one)."""
        if self.lr_schedule == "constant":
            return 1.0
        step = self.step if step is None else step
        return 0.5 * (1.0 + math.cos(math.pi * step / num_steps))

    def _train_step(self, data: Tensor, batch_size: int, num_steps: int) -> float:
        """One training step; returns the learning-rate factor it used."""
        factor = self._lr_factor(num_steps)
        for opt, lr in ((self.energy_opt, self.lr), (self.flow_opt, self.flow_lr)):
            for group in opt.param_groups:
                group["lr"] = lr * factor
        idx = torch.randint(data.shape[0], (batch_size,), device=self.device)
        x_pos = data[idx]
        negatives, stats = self.sampler.sample(self._potential, self.flow, x_pos)
        negatives = negatives.detach()
        loss, e_pos, e_neg = contrastive_loss(
            self.energy, x_pos, negatives, regularization=self.regularization
        )
        with deferred_interrupt():  # the updates below happen together or not at all
            self.energy_opt.zero_grad(set_to_none=True)
            skipped = not torch.isfinite(loss)
            if not skipped:
                loss.backward()
                params = [p for p in self.energy.parameters() if p.grad is not None]
                if self.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                skipped = not all(torch.isfinite(p.grad).all() for p in params)
                if not skipped:
                    self.energy_opt.step()
            if self.sampler.uses_flow:
                stats["flow_nll"] = forward_kl_step(self.flow, self.flow_opt, negatives)
            stats.update(
                loss=float(loss.detach()),
                e_pos=float(e_pos.detach().mean()),
                e_neg=float(e_neg.detach().mean()),
                skipped=float(skipped),
            )
            for key, value in stats.items():
                self._window.setdefault(key, []).append(value)
            if self.target is not None and hasattr(self.target, "mode_index"):
                idx = self.target.mode_index(self._to_x(negatives)).reshape(-1).cpu()
                counts = torch.bincount(idx, minlength=self.target.weights.shape[0]).double()
                self._neg_counts = counts if self._neg_counts is None else self._neg_counts + counts
            self.step += 1
            self._update_average(num_steps)  # within the step: an interrupt must not split them
        return factor

    @torch.no_grad()
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

    def _record(self, eval_samples: int, lr_factor: float) -> dict:
        """Append the history record of this step. The evaluation draws outside the training's
        random stream, and the window of statistics is cleared only once the record is in:
        an interrupt during the (slow) evaluation leaves the record to :meth:`fit`'s resume."""
        record: dict[str, Any] = {
            "step": self.step,
            "time": round(self.elapsed, 3),
            "lr": self.lr * lr_factor,
        }
        for key, values in sorted(self._window.items()):
            record[key] = float(sum(values) / len(values))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            record.update(self.evaluate(eval_samples))
        counts, self._neg_counts, self._window = self._neg_counts, None, {}
        if counts is not None:
            w_neg = (counts / counts.sum()).tolist()
            record["neg_weights"] = w_neg
            if "model_weights" in record:
                record["neg_vs_model_mse"] = float(
                    (torch.tensor(w_neg) - torch.tensor(record["model_weights"])).pow(2).mean()
                )
        self.history.append(record)
        return record

    def fit(
        self,
        data: Tensor,
        num_steps: int = 1000,
        batch_size: int = 256,
        eval_every: int | None = None,
        eval_samples: int = 20_000,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        resume: bool = False,
        progress: bool = True,
    ) -> History:
        r"""Train for ``num_steps`` steps in all (counting steps already done).

        :param data: ``(num_points, dim)`` float tensor; minibatches are drawn with replacement.
        :param num_steps: total number of training steps (the cosine schedule spans them; to
            continue a run exactly, pass the same ``num_steps``).
        :param batch_size: data points per step.
        :param eval_every: steps between history records (default: ``num_steps // 20``).
        :param eval_samples: importance samples for the model's mode weights when ``dim > 2``.
        :param checkpoint: file to write the full training state to (atomically) every
            ``checkpoint_every`` steps (default: at every evaluation), at the end, and when
            interrupted (``KeyboardInterrupt``); with ``resume=True`` an existing file is
            loaded first and training continues exactly where it stopped.
        :param progress: show a tqdm progress bar with the loss, acceptance and mode weights.
        :returns: the :class:`~pyro_ebm.train.history.History` (also :attr:`history`).
        """
        num_steps = check_int("num_steps", num_steps, 1)
        batch_size = check_int("batch_size", batch_size, 1)
        check_int("eval_samples", eval_samples, 1)
        eval_every = (
            max(1, num_steps // 20)
            if eval_every is None
            else check_int("eval_every", eval_every, 1)
        )
        checkpoint_every = (
            eval_every
            if checkpoint_every is None
            else check_int("checkpoint_every", checkpoint_every, 1)
        )
        if resume and checkpoint is None:
            raise ValueError("resume=True needs a checkpoint path")
        data = self._check_data(data)
        if not self._ready:
            self._setup(data)
        if resume and Path(checkpoint).is_file():
            self.load(checkpoint)
            recorded = self.history.records[-1]["step"] if len(self.history) else 0
            if self.step != recorded and (self.step % eval_every == 0 or self.step == num_steps):
                # interrupted while evaluating: the record of the last step, as it would have been
                self._record(eval_samples, self._lr_factor(num_steps, self.step - 1))
        data = self._to_z(data)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_steps, initial=self.step, desc=f"EBM ({self._sampler_name()})")
        snapshot, done = None, self.step
        try:
            while self.step < num_steps:
                # what an interruption in the middle of this step must roll back to
                snapshot, done = (rng_states(self.device), self.sampler.state_dict()), self.step
                start = time.perf_counter()
                factor = self._train_step(data, batch_size, num_steps)
                self.elapsed += time.perf_counter() - start
                if self.step % eval_every == 0 or self.step == num_steps:
                    record = self._record(eval_samples, factor)
                    if bar is not None:
                        bar.set_postfix(self._postfix(record), refresh=False)
                if checkpoint is not None and (
                    self.step % checkpoint_every == 0 or self.step == num_steps
                ):
                    self.save(checkpoint)
                if bar is not None:
                    bar.update(1)
        except KeyboardInterrupt:
            if snapshot is not None and self.step == done:  # interrupted mid-step: roll back
                set_rng_states(snapshot[0], self.device)
                self.sampler.load_state_dict(snapshot[1])
            if checkpoint is not None:
                self.save(checkpoint)
            raise
        finally:
            if bar is not None:
                bar.close()
        return self.history

    @torch.no_grad()
    def _update_average(self, num_steps: int) -> None:
        if not self.average_last or self.step <= num_steps * (1.0 - self.average_last):
            return
        params = [p.detach() for p in self.energy.parameters()]
        if self._average is None:
            self._average, self._average_count = [p.clone() for p in params], 1
        else:
            self._average_count += 1
            for a, p in zip(self._average, params, strict=True):
                a.add_((p - a) / self._average_count)
        if self.step == num_steps:  # the average becomes the trained energy
            for a, p in zip(self._average, self.energy.parameters(), strict=True):
                p.copy_(a)

    def _sampler_name(self) -> str:
        for name, cls in SAMPLERS.items():
            if type(self.sampler) is cls:
                return name
        return type(self.sampler).__name__

    @staticmethod
    def _postfix(record: dict) -> dict:
        out = {"loss": f"{record.get('loss', float('nan')):.3g}"}
        if "global_accept" in record:
            out["acc"] = f"{record['global_accept']:.2f}"
        if "model_weights" in record:
            out["w"] = " ".join(f"{w:.2f}" for w in record["model_weights"][:8])
        return out

    # ------------------------------------------------------------------ checkpoints
    def _check_compatible(self, state: dict) -> None:
        """Raise, before anything is loaded, if the checkpoint's sampler or walkers do not fit
        this trainer (the load used to fail half-way, or the next step)."""
        name, mine = state.get("sampler_name"), self._sampler_name()
        if name in SAMPLERS and mine in SAMPLERS and name != mine:  # (built-in samplers)
            raise ValueError(
                f"the checkpoint was written with sampler={name!r}, this trainer has "
                f"sampler={mine!r}"
            )
        saved, walkers = state["sampler"].get("walkers"), self.sampler.walkers
        if saved is not None and walkers is not None and saved.shape != walkers.shape:
            raise ValueError(
                f"the checkpoint has {saved.shape[0]} walkers, this trainer num_walkers="
                f"{walkers.shape[0]}"
            )

    def state_dict(self) -> dict:
        """The full training state: models, optimizers, sampler, RNG, step, history."""
        if not self._ready:
            raise RuntimeError("nothing to save before the first fit()")
        return {
            "step": self.step,
            "elapsed": self.elapsed,
            "energy": self.energy.state_dict(),
            "flow": self.flow.state_dict(),
            "energy_opt": self.energy_opt.state_dict(),
            "flow_opt": self.flow_opt.state_dict(),
            "sampler": self.sampler.state_dict(),
            "sampler_name": self._sampler_name(),
            "history": self.history.records,
            "window": (self._window, self._neg_counts),
            "average": (self._average, self._average_count),
            "standardization": self.standardization,
            **rng_states(self.device),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`state_dict` to ``path`` atomically."""
        return atomic_save(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save` into this trainer (built with the same
        architecture and settings); the next :meth:`fit` continues exactly."""
        state = load_checkpoint(path, map_location=self.device)
        if not self._ready:
            raise RuntimeError(
                "call load() after the trainer has been set up by fit(), or use "
                "fit(..., checkpoint=path, resume=True)"
            )
        self._check_compatible(state)
        self.energy.load_state_dict(state["energy"])
        self.flow.load_state_dict(state["flow"])
        self.energy_opt.load_state_dict(state["energy_opt"])
        self.flow_opt.load_state_dict(state["flow_opt"])
        self.sampler.load_state_dict(state["sampler"])
        self.history = History(state["history"])
        self._window, self._neg_counts = state["window"]
        self._average, self._average_count = state["average"]
        self._loc, self._scale = state.get("standardization") or (None, None)
        self.step = state["step"]
        self.elapsed = state["elapsed"]
        set_rng_states(state, self.device)
