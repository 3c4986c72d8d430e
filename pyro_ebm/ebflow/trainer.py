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
from pyro_ebm.energy import EnergyModel
from pyro_ebm.train.checkpoint import (
    atomic_save,
    deferred_interrupt,
    load_checkpoint,
    rng_states,
    set_rng_states,
)
from pyro_ebm.train.trainer import needs_standardization

from .layers import Logit, zca_whitening
from .model import EBFlow
from .objectives import OBJECTIVES

__all__ = ["EBFlowTrainer", "WhitenedEnergy", "make_adam"]


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


class WhitenedEnergy(EnergyModel):
    r"""An EBFlow fitted on whitened vectors :math:`y = M (x - \mu)`, read as a density of
    :math:`x`: :math:`E_x(x) = E(M (x - \mu))` and :math:`\log Z_x = \log Z - \log|\det M|`,
    so that :meth:`log_prob` is the exact log-density of the data (what
    :attr:`EBFlowTrainer.data_model` returns when the trainer whitened).

    :param model: the EBFlow on ``y``. :param mean, matrix, log_det: :math:`\mu`, :math:`M`,
        :math:`\log|\det M|`.
    """

    def __init__(self, model: EBFlow, mean: Tensor, matrix: Tensor, log_det: float) -> None:
        super().__init__(model.dim)
        self.inner = model
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("matrix", matrix.detach().clone())
        self.log_det = float(log_det)

    def energy(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        return self.inner.energy((x - self.mean) @ self.matrix.T)

    def log_normalizer(self) -> Tensor:
        return self.inner.log_normalizer() - self.log_det

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density of ``x`` ``(batch,)``."""
        return -self.energy(x) - self.log_normalizer()


class EBFlowTrainer:
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
        (:func:`~pyro_ebm.train.trainer.needs_standardization`, the rule of
        :class:`~pyro_ebm.train.EBMTrainer`), are whitened; images and other vectors are not.
        On tabular data (scikit-learn's breast cancer and wine) score matching without it
        ended tens to thousands of nats from maximum likelihood; on the 2-D toys (condition
        numbers 1.4-3) it made SSM worse (sine: 6.7 against 4.8 nats), hence the threshold.
        Data at mean 1000 and sd 0.01 (3-D, well conditioned)
        ended thousands of nats off with every objective until the second rule was added:
        Adam's steps cannot carry the biases that far.
    :param ema: EMA decay of the weights (``None``: no EMA).
    :param lr: Adam learning rate.
    :param lr_schedule: ``"cosine"`` (default: the rate decays to 0 over the steps of each
        :meth:`fit` call) or ``"constant"``. On MNIST (FC model, lr 1e-3, 6000 steps) the decay
        gave plain SSM a test NLL of 1509 against 1776 with the constant rate; DSM at
        ``sigma=0.5`` was poor with both (1971 / 1893).
    :param sigma: DSM noise level. Default: 1.0 for images under MaP (in the logit space, where
        the pixels spread over about [-14, 14]; on MNIST, FC model, 6000 steps, sigma 1.0 gave a
        test NLL of 1186 nats against 1378 for 2.0 and 1971 for 0.5), 0.1 otherwise.
    :param xi: FDSSM step. :param num_slices: SSM projections.
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
        >>> _ = trainer.fit(data, num_steps=50, batch_size=64, progress=False)
        >>> trainer.nll(data) < trainer.nll(data * 3)
        True
    """

    #: vectors are whitened by default when their covariance's condition number exceeds this
    WHITEN_CONDITION = 10.0
    #: :meth:`fit` stops when this many steps in a row had a non-finite loss
    MAX_NONFINITE = 100

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
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
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
        self._whitening: tuple[Tensor, Tensor, float] | None = None
        self.max_grad_norm = max_grad_norm
        if energy_reg < 0:
            raise ValueError(f"energy_reg must be non-negative, got {energy_reg!r}")
        self.energy_reg = float(energy_reg)
        self.sigma = None if sigma is None else check_positive("sigma", sigma)
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
        self.ema_model = copy.deepcopy(model) if ema is not None else model
        self.step = 0
        #: the step at which the current (or last) :meth:`fit` call started
        self._run_start = 0
        #: ``(nll, EMA weights)`` of the best validation so far in the current :meth:`fit` call
        self._best: tuple[float, dict] | None = None
        self.losses: list[float] = []
        #: ``(step, nll)`` of each evaluation on :meth:`fit`'s ``validation`` data
        self.validation_nll: list[tuple[int, float]] = []

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

    def _whiten(self, x: Tensor) -> Tensor:
        if self._whitening is None:
            return x
        mean, m, _ = self._whitening
        return (x - mean) @ m.T

    def _unwhiten(self, y: Tensor) -> Tensor:
        if self._whitening is None:
            return y
        mean, m, _ = self._whitening
        return torch.linalg.solve(m, y.T).T + mean

    def _fit_whitening(self, data: Tensor, n: int = 10_000) -> None:
        """The whitening map of up to ``n`` random training examples (after :meth:`_elementwise`),
        at the first fit of a fresh trainer under MaP when ``whiten`` says so (by default:
        vectors whose covariance has a condition number above :attr:`WHITEN_CONDITION`, or far
        from centred and unit-scaled by :func:`~pyro_ebm.train.trainer.needs_standardization`)."""
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
        progress: bool = True,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 1000,
        validation: Tensor | None = None,
        eval_every: int = 500,
        resume: bool = False,
    ) -> list[float]:
        """Train for ``num_steps`` more steps on minibatches drawn with replacement (the cosine
        schedule spans these steps); returns the losses of all steps so far.

        A step whose loss is not finite is skipped (the weights do not move) with a warning;
        after :attr:`MAX_NONFINITE` such steps in a row training stops with a ``RuntimeError``.

        :param checkpoint: file the whole trainer (:meth:`save`) is written to, atomically, every
            ``checkpoint_every`` steps, at the end, and when the run stops on an exception
            (``KeyboardInterrupt`` included, re-raised after the write); :meth:`load` restores
            it.
        :param resume: with ``checkpoint``, load that file first if it exists and finish the
            ``fit`` call that wrote it: ``num_steps`` then counts from that call's first step,
            so re-running the same line after an interruption continues the run exactly (the
            same schedule, random draws and, with ``validation``, best weights so far).
        :param validation: held-out data of the same kind as ``data``. Every ``eval_every``
            steps and at the end, :meth:`nll` of the EMA weights on it (with a fixed
            dequantisation draw, outside the training's random stream) is appended to
            :attr:`validation_nll` as ``(step, nll)``; at the end of the call the EMA weights
            with the lowest are restored (model selection by held-out likelihood, as in the
            paper's code, which reports the test NLL of its best-validation checkpoint). The
            training weights and the optimizer are left as they are (without EMA they are the
            same weights and are restored too). Score matching does not minimise the NLL, which
            can rise again late in training; on MNIST this selection matters.
        """
        check_int("num_steps", num_steps, 1)
        check_int("batch_size", batch_size, 1)
        check_int("checkpoint_every", checkpoint_every, 1)
        check_int("eval_every", eval_every, 1)
        if resume and checkpoint is None:
            raise ValueError("resume=True needs a checkpoint path")
        data = self._check_data("data", data, warn_quantised=True)
        if len(data) < 2:
            raise ValueError(f"data must have at least 2 examples, got {len(data)}")
        if validation is not None:
            validation = self._check_data("validation", validation)
            if (validation.dtype == torch.uint8) != (data.dtype == torch.uint8):
                raise ValueError(
                    "validation must be of the same kind as data (uint8 images or floats)"
                )
        if resume and os.path.isfile(checkpoint):
            self.load(checkpoint)  # also restores where the interrupted call started
        else:
            self._run_start, self._best = self.step, None
        self._setup_for(data.dtype == torch.uint8)
        self._fit_whitening(data)
        if self.data_init and self.step == 0 and not bool(self.model.initialized):
            self._initialize(data)
        self.model.train()  # (log Z must not come from an eval-mode cache)
        done = self.step - self._run_start
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_steps, initial=done, desc=f"EBFlow ({self.objective})")
        completed, nonfinite, skipped, snapshot = False, 0, 0, None

        def validate_at(k: int) -> None:  # after the call's k-th step, when it is due
            if validation is None or not (k % eval_every == 0 or k == num_steps):
                return
            nll = self._validate(validation)
            if self._best is None or nll < self._best[0]:  # (non-finite: +inf)
                self._best = (nll, copy.deepcopy(self.ema_model.state_dict()))
            if bar is not None:
                bar.set_postfix(val_nll=f"{nll:.4g}", best=f"{self._best[0]:.4g}")

        try:
            recorded = self.validation_nll[-1][0] if self.validation_nll else None
            if done > 0 and recorded != self.step:  # interrupted while validating: do it now
                validate_at(done)
            for i in range(done, num_steps):
                snapshot = (rng_states(self._device), self.step)  # to roll back a cut step
                if self._train_step(data, batch_size, i, num_steps):
                    nonfinite = 0
                else:
                    nonfinite, skipped = nonfinite + 1, skipped + 1
                    self._check_progress(nonfinite, skipped)
                validate_at(i + 1)
                if checkpoint is not None and (i + 1) % checkpoint_every == 0:
                    self.save(checkpoint)
                if bar is not None:
                    bar.update(1)
            completed = True
        finally:
            if bar is not None:
                bar.close()
            if not completed and snapshot is not None and self.step == snapshot[1]:
                set_rng_states(snapshot[0], self._device)  # cut mid-step: as before the step
            if checkpoint is not None and not completed:
                self.save(checkpoint)  # the state to resume from, best weights alongside
            if self._best is not None:  # the best EMA weights, kept also when interrupted
                self.ema_model.load_state_dict(self._best[1])
                self._best = None
            if checkpoint is not None and completed:
                self.save(checkpoint)
        return self.losses

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _check_progress(self, nonfinite: int, skipped: int) -> None:
        """After a step with a non-finite loss (``nonfinite`` in a row, ``skipped`` in this
        call): warn at the first of the call; stop after :attr:`MAX_NONFINITE` in a row."""
        if skipped == 1:
            warnings.warn(
                f"step {self.step}: the loss is not finite; the step is skipped (the weights "
                "do not move). A lower lr or max_grad_norm may help.",
                RuntimeWarning,
                stacklevel=3,
            )
        if nonfinite >= self.MAX_NONFINITE:
            raise RuntimeError(
                f"the loss was not finite at the last {nonfinite} steps (up to step "
                f"{self.step}): training is not progressing. Check the data and the objective's "
                "settings; a lower lr or max_grad_norm may help."
            )

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

    def _validate(self, data: Tensor) -> float:
        """:meth:`nll` on ``data`` with a fixed dequantisation draw, recorded in
        :attr:`validation_nll`; the training's random stream is left untouched."""
        device = self._device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            nll = self.nll(data)
        self.validation_nll.append((self.step, nll))
        return nll if math.isfinite(nll) else math.inf

    def _train_step(self, data: Tensor, batch_size: int, i: int, num_steps: int) -> bool:
        """One optimiser step (skipped when the loss is not finite); whether it was taken."""
        if self.lr_schedule == "cosine":
            for group in self.opt.param_groups:
                group["lr"] = self.lr * 0.5 * (1.0 + math.cos(math.pi * i / num_steps))
        x = self._prepare(data[torch.randint(len(data), (batch_size,))])
        loss = self.loss_fn(self.model, x)
        if self.energy_reg:
            loss = loss + self.energy_reg * self.model.energy(x).mean()
        with deferred_interrupt():  # the updates below happen together or not at all
            self.opt.zero_grad(set_to_none=True)
            finite = bool(torch.isfinite(loss))
            if finite:
                loss.backward()
                if self.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
                self.opt.step()
            self.step += 1
            self._update_ema()
            self.losses.append(float(loss.detach()))
        return finite

    # ------------------------------------------------------------------ saving
    def state_dict(self) -> dict:
        """Everything needed to continue training: weights, EMA weights, optimizer, step,
        losses, the kind of data seen, the DSM noise level, the whitening, where the current
        :meth:`fit` call started and its best validated weights, and torch's RNG states (the
        CPU's, and the model's GPU's when it is on one)."""
        return {
            "model": self.model.state_dict(),
            "ema_model": None if self.ema_model is self.model else self.ema_model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "losses": list(self.losses),
            "validation_nll": list(self.validation_nll),
            "images": self._images,
            "sigma": self.sigma,
            "whitening": self._whitening,
            "run_start": self._run_start,
            "best": self._best,
            **rng_states(self._device),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` into a trainer built with the same model and options."""
        if state["images"] is not None:
            self._setup_for(state["images"])  # the same layers (logit without MaP)
        self.model.load_state_dict(state["model"])
        if state["ema_model"] is None:
            if self.ema_model is not self.model:  # saved with ema=None: the EMA starts here
                self.ema_model.load_state_dict(state["model"])
        elif self.ema_model is self.model:
            warnings.warn(
                "the checkpoint has EMA weights, but this trainer has ema=None: they are "
                "dropped (nll and sample use the training weights); build the trainer with ema "
                "to keep them",
                stacklevel=2,
            )
        else:
            self.ema_model.load_state_dict(state["ema_model"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.losses = state["step"], list(state["losses"])
        self._run_start = state.get("run_start", self.step)
        self._best = state.get("best")
        self.validation_nll = [tuple(v) for v in state.get("validation_nll", [])]
        device = self._device
        whitening = state.get("whitening")
        if whitening is not None:  # onto this trainer's device (a GPU checkpoint on a CPU)
            whitening = (whitening[0].to(device), whitening[1].to(device), whitening[2])
        self._whitening = whitening
        if self.objective == "dsm" and state["sigma"] is not None:
            self.sigma = state["sigma"]
            self.loss_fn = partial(OBJECTIVES["dsm"], sigma=self.sigma)
        set_rng_states(state, device)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (never a half-written file)."""
        atomic_save(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore a file written by :meth:`save` (only load files you trust)."""
        self.load_state_dict(load_checkpoint(path))

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        d = min(self.ema, (1 + self.step) / (10 + self.step))
        for e, p in zip(self.ema_model.parameters(), self.model.parameters(), strict=True):
            e.lerp_(p.detach(), 1 - d)

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
        :attr:`ema_model` itself, or a :class:`WhitenedEnergy` over it when the trainer whitened
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
        return WhitenedEnergy(self.ema_model, *self._whitening)

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` samples on the data scale (images: pixel values in ``[0, 256)``)."""
        x = self._unwhiten(self.ema_model.sample(n))
        if self._images:
            if self.map:
                x = self._logit.inverse(x)
            return 256.0 * x
        return x
