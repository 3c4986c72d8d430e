r"""Training an EBFlow with maximum likelihood or score matching, with MaP and EMA.

Data: ``uint8`` images in ``[0, 255]`` (shape ``(n, D)``) are dequantised,
:math:`x = (u + \text{Uniform}(0, 1)) / 256`; float vectors are used as they are.

- **MaP** ("match after pre-processing", ``map=True``): images go through the logit transform
  :math:`y = \operatorname{logit}(\lambda + (1 - 2\lambda) x)` *outside* the model, which is
  trained on ``y``; without MaP the logit is the model's first (non-linear) layer, so the
  objective matches scores of ``x`` itself, which the paper found unstable.
- **Whitening** (under MaP; by default for ill-conditioned vectors, see ``whiten``): after the
  logit (images) or as is (vectors), the data go through a fixed affine map
  :math:`y = M (x - \mu)`, :math:`M` the ZCA-cor whitening matrix
  (:func:`~pyro_ebm.ebflow.layers.zca_whitening`) of the first :meth:`~EBFlowTrainer.fit`'s
  training data, with
  :math:`\log|\det M|` added back for the NLL. Score matching minimises a Fisher divergence,
  which weighs each direction by its precision: on nearly collinear features it spends
  everything on the thinnest directions. Matching after whitening weighs them evenly.
- **EMA** of the weights (decay ``ema`` with the warm-up :math:`\min(d, (1 + t) / (10 + t))`);
  :meth:`nll` and :meth:`sample` use the EMA weights.

:meth:`nll` returns nats per example on the original scale: for images,
:math:`-\log p(x) + D \log 256` with the pre-processing log-determinant added back under MaP.
:meth:`save` / :meth:`load` write and restore the whole trainer atomically; ``fit(checkpoint=...)``
does so during training and when interrupted.

**What to expect.** Score matching is several times cheaper per step than maximum likelihood
for large ``D``, but not free in likelihood: on 8k MNIST images the FC model trained by SSM or
DSM has a test NLL about 10% above the ML one. The SM objectives, evaluated on held-out images,
prefer those models to the ML one, so more steps do not close the gap; on data drawn from the
model itself the gap is 3-4%. Pass ``validation`` to
:meth:`~EBFlowTrainer.fit` to keep the best weights by held-out likelihood.

Reference: Chao et al. (2023), https://arxiv.org/abs/2305.15267
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from functools import partial

import torch
from torch import Tensor

from pyro_ebm._checks import check_int, check_positive
from pyro_ebm.coordinates import AffineCoordinates, needs_standardization
from pyro_ebm.energy import EnergyModel, StandardizedEnergy
from pyro_ebm.train.averaging import Averager
from pyro_ebm.train.checkpoint import shapes
from pyro_ebm.train.history import History
from pyro_ebm.train.loop import SCHEDULES, Trainer

from .layers import Logit, zca_whitening
from .model import EBFlow
from .objectives import OBJECTIVES

__all__ = ["EBFlowTrainer", "make_adam"]


def make_adam(params, lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel where this torch build has one for the parameters' device
    (5x faster than the default on a 3072 x 3072 layer on CPU), the default otherwise."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def _dequantise(images: Tensor, dtype: torch.dtype) -> Tensor:
    """uint8 pixels ``k`` to ``(k + u) / 256`` in (0, 1) of ``dtype``, ``u ~ U(0, 1)`` drawn on
    their device."""
    noise = torch.rand(images.shape, device=images.device, dtype=dtype)
    return (images.to(dtype) + noise) / 256.0


def _quantisation_warning(data: Tensor, n: int = 10_000) -> str | None:
    """Why non-``uint8`` training data look discrete (integer dtype; floats in [0, 1] with at
    most 256 distinct values; integer-valued floats), judged on up to ``n`` examples with at
    least 1024 values, or ``None``."""
    if not data.is_floating_point():
        return (
            f"data have the integer dtype {data.dtype}: only uint8 images are dequantised; "
            "these values are treated as continuous, so each is a point mass to the density. "
            "Pass uint8 images, or add U(0, 1) noise to counts yourself."
        )
    sample = data[:n]
    if sample.numel() < 1024:
        return None
    if float(sample.min()) >= 0.0 and float(sample.max()) <= 1.0:
        if torch.unique(sample).numel() <= 256:
            return (
                "data are floats in [0, 1] with at most 256 distinct values, like images "
                "scaled from [0, 255]: only uint8 images are dequantised (and logit-transformed "
                "under MaP); as floats, their NLL is not per image on [0, 256) and score "
                "matching sees point masses. Pass (data * 255).round().to(torch.uint8)."
            )
        return None
    if bool((sample == sample.round()).all()):
        return (
            "data are integer-valued floats: a density model sees each value as a point mass "
            "(score matching and the NLL are then meaningless). Pass images in [0, 255] as "
            "uint8 (they are dequantised), or add U(0, 1) noise to counts yourself."
        )
    return None


class EBFlowTrainer(Trainer):
    r"""Fit an :class:`~pyro_ebm.ebflow.model.EBFlow`.

    :param model: the EBFlow (e.g. :func:`~pyro_ebm.ebflow.fc_ebflow`).
    :param objective: ``"ml"``, ``"sml"``, ``"ssm"``, ``"dsm"`` or ``"fdssm"`` (see
        :mod:`pyro_ebm.ebflow.objectives`).
    :param map: match after pre-processing: images go through the logit outside the model
        (and are whitened with ``whiten``); vectors are whitened with ``whiten``. With
        ``map=False`` and images, the logit becomes the model's first layer: it is inserted
        into ``model`` itself at the first :meth:`fit` (its ``state_dict`` then has the extra
        layer); ``"dsm"`` and ``"fdssm"`` are refused there (their perturbations leave the
        logit's domain).
    :param whiten: under MaP, whiten the (pre-processed) data with a fixed affine map fitted
        at the first :meth:`fit` (module docstring); :attr:`model` then models the whitened
        data, and :meth:`nll`, :meth:`sample`, :meth:`impute` and :attr:`data_model` (the
        density as an energy, for :func:`pyro_ebm.potential_fn`) work on the original scale.
        Default (``None``): vectors whose covariance has a condition number above
        :attr:`WHITEN_CONDITION` (10), or that are far from centred and unit-scaled
        (:func:`~pyro_ebm.coordinates.needs_standardization`, the rule of
        :class:`~pyro_ebm.train.EBMTrainer`), are whitened; images and other vectors are not.
        On tabular data (scikit-learn's breast cancer and wine) score matching without it
        ended tens to thousands of nats from maximum likelihood; on the 2-D toys (condition
        numbers 1.4-3) it made SSM worse (sine: 6.7 against 4.8 nats), hence the threshold.
        Data at mean 1000 and sd 0.01 (3-D, well conditioned)
        ended thousands of nats off with every objective until the second rule was added:
        Adam's steps cannot carry the biases that far.
    :param ema: EMA decay of the weights (``None``: no EMA).
    :param lr: Adam learning rate.
    :param lr_schedule: ``"cosine"`` (default: the rate decays to 0 over :meth:`fit`'s
        ``num_steps``) or ``"constant"``. On MNIST (FC model, lr 1e-3, 6000 steps) the decay
        gave plain SSM a test NLL of 1509 against 1776 with the constant rate; DSM at
        ``sigma=0.5`` was poor with both (1971 / 1893).
    :param sigma: DSM noise level. Default: 1.0 for images under MaP (in the logit space, where
        the pixels spread over about [-14, 14]; on MNIST, FC model, 6000 steps, sigma 1.0 gave a
        test NLL of 1186 nats against 1378 for 2.0 and 1971 for 0.5), 0.1 otherwise.
    :param xi: FDSSM step.
    :param num_slices: SSM projections.
    :param variance_reduction: SSM-VR (default; :func:`~pyro_ebm.ebflow.objectives.ssm_loss`),
        the form of SSM the paper's code trains with.
    :param max_grad_norm: gradient-norm clipping (``None``: none).
    :param energy_reg: weight :math:`\lambda` of the optional energy regulariser
        :math:`\lambda \cdot \overline{E(x)}` added to the loss (score matching leaves the level
        of the energy free; this keeps it from drifting). 0 (default) computes nothing.
    :param data_init: at the first step of a fresh trainer, :meth:`EBFlow.initialize
        <pyro_ebm.ebflow.model.EBFlow.initialize>` the model on up to 1000 training examples
        (pre-processed), unless it is :attr:`~pyro_ebm.ebflow.model.EBFlow.initialized`
        already. It sets the convolutions of :func:`~pyro_ebm.ebflow.cnn_ebflow` to unit
        output variance per channel and leaves the FC and coupling models alone. Pass
        ``False`` to continue from trained weights that were not initialised this way.
    :param seed: seeds torch's global generator at construction, and so every draw of the run
        that follows. The ``model`` passed in was built before (the FC and CNN models start
        from a fixed initialisation; a coupling model's networks do not): call
        ``torch.manual_seed`` before building it for a run that repeats exactly.

    Example::

        >>> from pyro_ebm.ebflow import fc_ebflow
        >>> data = torch.randn(256, 2) * torch.tensor([2.0, 0.5])
        >>> trainer = EBFlowTrainer(fc_ebflow((2,)), objective="ssm", lr=1e-2, seed=0)
        >>> history = trainer.fit(data, num_steps=50, batch_size=64, progress=False)
        >>> history.last["step"], trainer.nll(data) < trainer.nll(data * 3)
        (50, True)
    """

    #: vectors are whitened by default when their covariance's condition number exceeds this
    WHITEN_CONDITION = 10.0

    def __init__(
        self,
        model: EBFlow,
        objective: str = "ssm",
        map: bool = True,  # noqa: A002 (the paper's name)
        ema: float | None = 0.999,
        lr: float = 1e-3,
        lr_schedule: str = "cosine",
        sigma: float | None = None,
        xi: float = 1e-2,
        num_slices: int = 1,
        variance_reduction: bool = True,
        max_grad_norm: float | None = None,
        energy_reg: float = 0.0,
        lam: float = 1e-6,
        whiten: bool | None = None,
        data_init: bool = True,
        seed: int | None = None,
    ) -> None:
        if not isinstance(model, EBFlow):
            raise TypeError(f"model must be an EBFlow, got {type(model).__name__}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
        if ema is not None and not 0 < ema < 1:
            raise ValueError(f"ema must lie in (0, 1) or be None, got {ema!r}")
        if lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {lr_schedule!r}")
        if max_grad_norm is not None:
            max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
        if seed is not None:
            torch.manual_seed(seed)
        self.objective = objective
        self.lr = lr
        self.lr_schedule = lr_schedule
        self.map = bool(map)
        self.ema = ema
        self.lam = lam
        self.data_init = bool(data_init)
        self.whiten = None if whiten is None else bool(whiten)
        #: ``(mean, M, log|det M|)`` of the whitening map, set at the first fit
        self._coords: AffineCoordinates | None = None
        self.max_grad_norm = max_grad_norm
        if energy_reg < 0:
            raise ValueError(f"energy_reg must be non-negative, got {energy_reg!r}")
        self.energy_reg = float(energy_reg)
        self.sigma = None if sigma is None else check_positive("sigma", sigma)
        self._sigma_arg = self.sigma
        self._kwargs = {
            "xi": xi,
            "num_slices": num_slices,
            "variance_reduction": variance_reduction,
        }
        kwargs = {
            "ssm": {
                "num_slices": check_int("num_slices", num_slices, 1),
                "variance_reduction": bool(variance_reduction),
            },
            "fdssm": {"xi": check_positive("xi", xi)},
        }.get(objective, {})
        self.loss_fn = partial(OBJECTIVES[objective], **kwargs)
        self.model = model
        self._logit = Logit(lam)
        self._images: bool | None = None
        self.opt = make_adam(model.parameters(), check_positive("lr", lr))
        self.averaged_model = model
        self.averager = None if ema is None else Averager(model, ema=ema)
        self._init_loop()
        #: ``(nll, EMA weights)`` of the best validation so far in the current :meth:`fit` call
        self._best: tuple[float, dict] | None = None
        self._validation: Tensor | None = None

    @property
    def ema_model(self) -> EBFlow:
        """The EMA of the weights (:attr:`model` itself with ``ema=None``): what :meth:`nll`,
        :meth:`sample` and :attr:`data_model` use."""
        return self.model if self.averager is None else self.averager.module

    @property
    def validation_nll(self) -> list[tuple[int, float]]:
        """``(step, nll)`` of each evaluation on :meth:`fit`'s ``validation`` data."""
        return [(r["step"], r["val_nll"]) for r in self.history if "val_nll" in r]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ pre-processing
    def _prepare(self, data: Tensor) -> Tensor:
        """The model's input: :meth:`_elementwise`, then the whitening if there is one."""
        return self._whiten(self._elementwise(data))

    def _elementwise(self, data: Tensor) -> Tensor:
        """Dequantise images and apply the logit under MaP; floats pass through."""
        if data.dtype == torch.uint8:
            x = _dequantise(data, next(self.model.parameters()).dtype)
            return self._logit(x)[0] if self.map else x
        return data

    @property
    def _whitening(self) -> tuple[Tensor, Tensor, float] | None:
        """``(mean, M, log|det M|)`` of the whitening (the form checkpoints hold), or ``None``."""
        c = self._coords
        return None if c is None else (c.loc, c.whitening, -c.whitening_log_det)

    @_whitening.setter
    def _whitening(self, value: tuple[Tensor, Tensor, float] | None) -> None:
        self._coords = None
        if value is not None:
            mean, m, log_det_m = value
            self._coords = AffineCoordinates(mean, whitening=m, log_det=-log_det_m)

    def _whiten(self, x: Tensor) -> Tensor:
        return x if self._coords is None else self._coords.to_u(x)

    def _unwhiten(self, y: Tensor) -> Tensor:
        return y if self._coords is None else self._coords.to_x(y)

    def _fit_whitening(self, data: Tensor, n: int = 10_000) -> None:
        """The whitening map of up to ``n`` random training examples (after :meth:`_elementwise`),
        at the first fit of a fresh trainer under MaP when ``whiten`` says so (by default:
        vectors whose covariance has a condition number above :attr:`WHITEN_CONDITION`, or far
        from centred and unit-scaled by :func:`~pyro_ebm.coordinates.needs_standardization`)."""
        auto = self.whiten is None
        if not self.map or self._whitening is not None or self.step > 0:
            return
        if self.whiten is False or (auto and data.dtype == torch.uint8):
            return
        with torch.no_grad():
            x = self._elementwise(data[torch.randperm(len(data))[:n]])
        if auto and not needs_standardization(x):
            lam = torch.linalg.eigvalsh(torch.cov(x.T.double()).reshape(x.shape[1], -1))
            if lam[-1] <= self.WHITEN_CONDITION * lam[0].clamp_min(0.0):
                return
        mean, m = zca_whitening(x)
        self._whitening = (mean, m, float(torch.linalg.slogdet(m.double())[1]))

    def _setup_for(self, images: bool) -> None:
        """At the first fit, when the kind of data is known: without MaP the logit becomes the
        model's first layer; the default DSM noise level is set. Later fits must bring the same
        kind of data."""
        kinds = {True: "uint8 images", False: "float vectors"}
        if self._images is not None and images != self._images:
            raise ValueError(
                f"data are {kinds[images]}, but this trainer was fitted on {kinds[self._images]}"
            )
        if images and not self.map and self.objective in ("dsm", "fdssm"):
            raise ValueError(
                f"objective={self.objective!r} with map=False perturbs the pixels in [0, 1], "
                "outside the model's logit layer's domain (0, 1), so every loss is nan; use "
                "map=True (the default) or objective='ssm'"
            )
        if self._images is None:
            self._images = images
            if images and not self.map:
                for m in {id(self.model): self.model, id(self.ema_model): self.ema_model}.values():
                    m.layers.insert(0, Logit(self.lam))
            if self.objective == "dsm":
                if self.sigma is None:
                    self.sigma = 1.0 if images and self.map else 0.1
                self.loss_fn = partial(OBJECTIVES["dsm"], sigma=self.sigma)

    def fit(
        self,
        data: Tensor,
        num_steps: int = 1000,
        batch_size: int = 100,
        *,
        eval_every: int | None = None,
        validation: Tensor | None = None,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        resume: bool = False,
        progress: bool = True,
        force: bool = False,
    ) -> History:
        """Train until ``num_steps`` steps in all are done (counting steps already done), on
        minibatches drawn with replacement; the cosine schedule spans the ``num_steps``.

        A step whose loss or gradient is not finite is skipped (the weights do not move) with
        a warning; when more than half of the call's steps (20 or more) or
        :attr:`MAX_SKIPPED_IN_A_ROW` in a row were skipped, training stops with a
        ``RuntimeError``.

        :param eval_every: steps between the records of :attr:`history` (the mean loss, and the
            validation NLL; default ``num_steps // 20``).
        :param checkpoint: file the whole trainer (:meth:`save`) is written to, atomically, every
            ``checkpoint_every`` steps (default: at every record), at the end, and when the run
            stops on an exception (``KeyboardInterrupt`` included, re-raised after the write);
            :meth:`load` restores it.
        :param resume: with ``checkpoint``, load that file first if it exists and continue the
            run exactly (the same schedule, random draws and, with ``validation``, best weights
            so far). The checkpoint records the trainer's settings, the data's shape and hash,
            and ``batch_size``; resuming with any of them changed is refused with a
            ``ValueError`` naming it, unless ``force=True``.
        :param validation: held-out data of the same kind as ``data``. At every record,
            :meth:`nll` of the EMA weights on it (with a fixed dequantisation draw, outside the
            training's random stream) is recorded as ``val_nll`` (also in
            :attr:`validation_nll`); at the end of the call the EMA weights with the lowest are
            restored (model selection by held-out likelihood, as in the paper's code, which
            reports the test NLL of its best-validation checkpoint). The training weights and
            the optimizer are left as they are (without EMA they are the same weights and are
            restored too). Score matching does not minimise the NLL, which can rise again late
            in training; on MNIST this selection matters.
        :returns: the :class:`~pyro_ebm.train.history.History` (also :attr:`history`).
        """
        data = self._check_data("data", data, warn_quantised=True)
        if len(data) < 2:
            raise ValueError(f"data must have at least 2 examples, got {len(data)}")
        if validation is not None:
            validation = self._check_data("validation", validation)
            if (validation.dtype == torch.uint8) != (data.dtype == torch.uint8):
                raise ValueError(
                    "validation must be of the same kind as data (uint8 images or floats)"
                )
        self._validation, self._best = validation, None
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

    # ------------------------------------------------------------------ the loop's hooks
    def _setup(self, data: Tensor) -> None:
        self._setup_for(data.dtype == torch.uint8)
        self._fit_whitening(data)
        if self.data_init and self.step == 0 and not bool(self.model.initialized):
            self._initialize(data)
        self.model.train()  # (log Z must not come from an eval-mode cache)

    def _training_data(self, data: Tensor) -> Tensor:
        return data

    def _sync_setup(self, dp) -> None:
        dp.broadcast_module(self.model)
        if self.averager is not None:
            dp.broadcast_module(self.ema_model)
        self._whitening = dp.broadcast_object(self._whitening)

    def _optimizers(self) -> list[tuple[torch.optim.Optimizer, float]]:
        return [(self.opt, self.lr)]

    def _loss(self, data: Tensor, batch_size: int) -> tuple[Tensor, dict]:
        x = self._prepare(data[torch.randint(len(data), (batch_size,))])
        loss = self.loss_fn(self.model, x)
        if self.energy_reg:
            loss = loss + self.energy_reg * self.model.energy(x).mean()
        return loss, {}

    def _other_updates(self, stats: dict) -> None:
        pass

    def _evaluate(self) -> dict:
        """The validation NLL (a fixed dequantisation draw), and the best weights so far."""
        if self._validation is None:
            return {}
        torch.manual_seed(0)  # (the loop has forked the random stream)
        nll = self.nll(self._validation)
        score = nll if math.isfinite(nll) else math.inf
        if self._best is None or score < self._best[0]:
            self._best = (score, copy.deepcopy(self.ema_model.state_dict()))
        return {"val_nll": nll, "best_val_nll": self._best[0]}

    def _end_of_fit(self) -> bool:
        """The best EMA weights replace the last, also when interrupted (the checkpoint of an
        interrupted fit keeps the last, with the best beside them, to resume from)."""
        if self._best is None:
            return False
        self.ema_model.load_state_dict(self._best[1])
        self._best = None
        return True

    def _description(self) -> str:
        return f"EBFlow ({self.objective})"

    def _postfix(self, record: dict) -> dict:
        out = super()._postfix(record)
        if "val_nll" in record:
            out.update(val_nll=f"{record['val_nll']:.4g}", best=f"{record['best_val_nll']:.4g}")
        return out

    def _config(self) -> dict:
        return {
            "objective": self.objective,
            "map": self.map,
            "ema": self.ema,
            "lr": self.lr,
            "lr_schedule": self.lr_schedule,
            "sigma": self._sigma_arg,
            **self._kwargs,
            "max_grad_norm": self.max_grad_norm,
            "energy_reg": self.energy_reg,
            "lam": self.lam,
            "whiten": self.whiten,
            "model": shapes(self.model),
        }

    def _modules(self) -> dict:
        return {"model": self.model}

    def _model_keys(self) -> tuple[str, ...]:
        return ("whitening", "images", "map", "lam")

    def _extra_state(self) -> dict:
        return {
            "weights": {"model": self.model.state_dict()},
            "images": self._images,
            "map": self.map,
            "lam": self.lam,
            "sigma": self.sigma,
            "whitening": self._whitening,
            "best": self._best,
        }

    def _load_extra_state(self, state: dict) -> None:
        if state["images"] is not None:
            self._setup_for(state["images"])  # the same layers (logit without MaP)
        self.model.load_state_dict(state["weights"]["model"])
        if self.averager is not None and state["averager"] is None:  # the EMA starts here
            self.ema_model.load_state_dict(state["weights"]["model"])
        self._best = state["best"]
        whitening = state["whitening"]
        if whitening is not None:  # onto this trainer's device (a GPU checkpoint on a CPU)
            whitening = (whitening[0].to(self.device), whitening[1].to(self.device), whitening[2])
        self._whitening = whitening
        if self.objective == "dsm" and state["sigma"] is not None:
            self.sigma = state["sigma"]
            self.loss_fn = partial(OBJECTIVES["dsm"], sigma=self.sigma)

    def _initialize(self, data: Tensor, n: int = 1000) -> None:
        """Data-dependent initialisation on ``n`` random training examples (the EMA weights
        start from the initialised ones). Models without such layers are left alone, and the
        random stream untouched."""
        if not self.model.has_data_init:
            return
        with torch.no_grad():
            x = self._prepare(data[torch.randperm(len(data))[:n]])
        self.model.initialize(x)
        if self.ema_model is not self.model:
            self.ema_model.load_state_dict(self.model.state_dict())

    def _check_data(
        self, name: str, data: Tensor, warn_quantised: bool = False, allow_nan: bool = False
    ) -> Tensor:
        """``data`` (a tensor or array) checked and moved to the model's device; ``uint8``
        images are kept, anything else is returned in the model's dtype. ``warn_quantised``
        (training data) warns about data that look discrete and about constant coordinates."""
        if not isinstance(data, Tensor) and hasattr(data, "__array__"):
            data = torch.as_tensor(data)
        if not isinstance(data, Tensor) or data.dim() != 2 or data.shape[1] != self.model.dim:
            shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
            hint = ""
            if isinstance(data, Tensor) and data.dim() > 2 and data[0].numel() == self.model.dim:
                hint = f" (flatten the examples: {name}.reshape(len({name}), -1))"
            raise ValueError(f"{name} must be a (n, {self.model.dim}) tensor, got {shape}{hint}")
        param = next(self.model.parameters())
        if data.dtype == torch.uint8:
            return data.to(param.device)
        if data.is_floating_point() and not allow_nan and not torch.isfinite(data).all():
            raise ValueError(f"{name} must be finite (found nan or inf)")
        if warn_quantised:
            message = _quantisation_warning(data)
            if message is not None:
                warnings.warn(message, stacklevel=3)  # the user's fit() call
            sample = data[:10_000]
            constant = (sample == sample[:1]).all(0).nonzero().flatten().tolist()
            if len(data) > 1 and constant:
                warnings.warn(
                    f"{name} coordinates {constant[:10]} are constant: a density has no finite "
                    "value on them (the NLL comes out arbitrary); drop them.",
                    stacklevel=3,
                )
        return data.to(device=param.device, dtype=param.dtype)

    @torch.no_grad()
    def nll(self, data: Tensor, batch_size: int = 1000) -> float:
        """Mean negative log-likelihood in nats per example on the original scale (EMA
        weights); for images on ``[0, 256)``, with one dequantisation draw."""
        data = self._check_data("data", data)
        model = self.ema_model.eval()
        images = data.dtype == torch.uint8
        total = 0.0
        for chunk in data.split(batch_size):
            if images:
                x = _dequantise(chunk, next(model.parameters()).dtype)
                if self.map:
                    y, ld = self._logit(x)
                    lp = self._log_prob(model, y) + ld
                else:
                    lp = model.log_prob(x)
                total += float((-lp + x.shape[1] * math.log(256.0)).sum())
            else:
                total += float(-self._log_prob(model, chunk).sum())
        model.train()
        return total / len(data)

    def _log_prob(self, model: EBFlow, x: Tensor) -> Tensor:
        """log-density of ``x`` (after :meth:`_elementwise`) through the whitening."""
        ld = 0.0 if self._whitening is None else self._whitening[2]
        return model.log_prob(self._whiten(x)) + ld

    def bits_per_dim(self, data: Tensor, batch_size: int = 1000) -> float:
        """The test NLL in bits per dimension: :meth:`nll` / (D log 2) (for images, on the
        original ``[0, 256)`` scale, the usual figure for image models)."""
        return self.nll(data, batch_size) / (data.shape[1] * math.log(2.0))

    def impute(
        self,
        data: Tensor,
        missing: Tensor,
        num_steps: int = 500,
        step_size: float = 1e-2,
        target_accept: float = 0.574,
    ) -> Tensor:
        r"""Fill in the ``missing`` pixels of ``data`` by MCMC on the model's conditional
        :math:`p(x_{missing} \mid x_{observed})`: MALA from :mod:`pyro_ebm.samplers` (one walker
        per image, all images at once), with the step size adapted toward ``target_accept``
        (dual averaging); the last state is returned. Under MaP the chain runs in the logit
        space (an element-wise bijection, so conditioning there is conditioning on the pixels),
        before the whitening (which mixes coordinates; its Jacobian is constant).

        The chains start from the missing coordinates of exact model samples (by inversion),
        whatever the values at those positions in ``data``.

        :param data: ``(n, D)`` images (``uint8``) or vectors (``nan`` allowed where missing).
        :param missing: ``(D,)`` boolean mask of the missing coordinates (the same for all).
        :returns: ``(n, D)`` on the data scale (images: pixel values in ``[0, 256)``).
        """
        from pyro_ebm.samplers import StepSizeAdapter, init_state, mala_step

        data = self._check_data("data", data, allow_nan=True)
        missing = torch.as_tensor(missing, dtype=torch.bool)
        if missing.shape != (self.model.dim,):
            raise ValueError(f"missing must be a ({self.model.dim},) boolean mask")
        missing = missing.to(data.device)
        if data.is_floating_point() and not torch.isfinite(data[:, ~missing]).all():
            raise ValueError("data must be finite at the observed coordinates (~missing)")
        if data.is_floating_point():
            data = data.masked_fill(missing, 0.0)  # (nan there would poison the whitening)
        model = self.ema_model
        with torch.no_grad():
            full = self._elementwise(data)
        observed = full[:, ~missing]

        def assemble(x_missing: Tensor) -> Tensor:
            x = x_missing.new_empty(len(x_missing), self.model.dim)
            x[:, ~missing] = observed
            x[:, missing] = x_missing
            return x

        def potential(x_missing: Tensor) -> Tensor:
            return model.energy(self._whiten(assemble(x_missing)))

        with torch.no_grad():
            start = self._unwhiten(model.sample(len(full)))[:, missing]
        state = init_state(potential, start)
        adapter = StepSizeAdapter(step_size, target_accept)
        eps = step_size
        for _ in range(check_int("num_steps", num_steps, 1)):
            state, info = mala_step(state, potential, eps)
            eps = adapter.update(info.accept_prob)
        x = assemble(state.x.detach())
        if data.dtype == torch.uint8:
            x = 256.0 * (self._logit.inverse(x) if self.map else x)
            x[:, ~missing] = data[:, ~missing].to(x.dtype)
        return x

    @property
    def whitening(self) -> tuple[Tensor, Tensor, float] | None:
        """``(mean, M, log|det M|)`` of the fixed map :math:`y = M (x - \\mu)` the trainer
        matches after (see ``whiten``), or ``None`` when it works on the data as they are."""
        return self._whitening

    @property
    def data_model(self) -> EnergyModel:
        """The trained density (EMA weights) of float vectors in the data's own coordinates:
        :attr:`ema_model` itself, or a :class:`~pyro_ebm.energy.StandardizedEnergy` over it (in
        the whitening's coordinates) when the trainer whitened
        (:attr:`model` and :attr:`ema_model` then model the whitened vectors). Plugs into
        :func:`pyro_ebm.potential_fn` and the kernels of :mod:`pyro_ebm.infer`; its
        ``log_prob`` is exact. Images have no such model (their density is over dequantised
        pixels): use :meth:`nll`, :meth:`sample` and :meth:`impute`."""
        if self._images is None:
            raise RuntimeError("the data's coordinates are known after the first fit()")
        if self._images:
            raise ValueError("data_model is for float vectors; for images use nll, sample, impute")
        if self._whitening is None:
            return self.ema_model
        return StandardizedEnergy(self.ema_model, coordinates=self._coords)

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` samples on the data scale (images: pixel values in ``[0, 256)``)."""
        x = self._unwhiten(self.ema_model.sample(n))
        if self._images:
            if self.map:
                x = self._logit.inverse(x)
            return 256.0 * x
        return x
