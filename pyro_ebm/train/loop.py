r"""The training loop that :class:`~pyro_ebm.train.EBMTrainer` and
:class:`~pyro_ebm.ebflow.EBFlowTrainer` run on.

:class:`Trainer` owns everything the two trainers share: the steps and their count, the
learning-rate schedule (``torch.optim.lr_scheduler.LambdaLR``), parameter averaging
(:class:`~pyro_ebm.train.averaging.Averager`, on ``AveragedModel``: an EMA, or the Polyak mean of
the last iterates), gradient clipping, steps skipped on non-finite losses or gradients (with a
warning, and an error when most steps are skipped), Ctrl-C-safe steps, atomic checkpoints with
a fingerprint of the configuration and the data, exact resume (random states included), the
:class:`~pyro_ebm.train.history.History` of evaluations, and the progress bar. A trainer
supplies the loss of a step and its evaluation; ``fit(data, num_steps)`` means the same in both
(train until ``num_steps`` steps in all are done).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pyro_ebm._checks import check_flag, check_int

from .averaging import Averager
from .checkpoint import (
    atomic_save,
    check_file_path,
    data_fingerprint,
    deferred_interrupt,
    load_checkpoint,
    meta_copy,
    nonfinite_entries,
    rng_states,
    set_rng_states,
)
from .distributed import DataParallel
from .history import History

__all__ = ["SCHEDULES", "Trainer", "TrainingError", "cosine_factor"]

#: the learning-rate schedules of ``lr_schedule``
SCHEDULES = ("cosine", "constant")

#: the checkpoint format this version writes (older ones are refused with a message)
CHECKPOINT_FORMAT = 2


@dataclasses.dataclass
class _Skips:
    """A :meth:`Trainer.fit` call's steps, skipped steps, and skipped steps in a row."""

    steps: int = 0
    skipped: int = 0
    in_a_row: int = 0


class TrainingError(RuntimeError):
    """Training stopped because it is not progressing (most steps skipped)."""


def cosine_factor(step: int, num_steps: int) -> float:
    r"""The cosine decay :math:`\frac12 (1 + \cos(\pi t / T))` of the learning rate at step
    ``t`` of ``T`` (1 at the first step, 0 after the last).

    Example::

        >>> cosine_factor(0, 10), cosine_factor(5, 10), cosine_factor(10, 10)
        (1.0, 0.5, 0.0)
    """
    return 0.5 * (1.0 + math.cos(math.pi * step / num_steps))


def _schedule(kind: str, num_steps: int) -> Callable[[int], float]:
    if kind == "constant":
        return lambda step: 1.0
    return lambda step: cosine_factor(step, num_steps)


class Trainer:
    r"""Base class of the trainers: the training loop (module docstring).

    A subclass sets, in its constructor, :attr:`lr_schedule`, :attr:`max_grad_norm`,
    :attr:`averager` (an :class:`Averager` or ``None``) and :attr:`averaged_model` (the module
    the loss trains) and calls :meth:`_init_loop`; it has a ``device`` and implements

    - ``_setup(data)``: at every :meth:`fit`, before a checkpoint is resumed (build what the
      first fit needs; check later fits' data);
    - ``_training_data(data) -> data``: the data as the steps use them;
    - ``_optimizers() -> [(optimizer, base lr), ...]``, the first one minimising the loss;
    - ``_loss(data, batch_size) -> (loss, stats)``: a step's forward pass;
    - ``_other_updates(stats)``: the rest of a step's updates, adding to ``stats`` (run just
      before the loss's optimiser step, Ctrl-C deferred with it: across processes, their
      collectives and the step's then follow each other, and the processes wait for each
      other about once per step rather than twice);
    - ``_evaluate() -> dict``: metrics for a history record;
    - ``_config() -> dict``: the settings a checkpoint must match to be resumed (a key
      missing on either side is not compared);
    - ``_extra_state()`` / ``_load_extra_state(state)``: the rest of the checkpoint, the
      trained weights under ``"weights"``;
    - ``_modules() -> {name: module}``: the trained modules (their architecture is saved,
      for :func:`~pyro_ebm.train.load`), named as in ``"weights"``;
    - ``_model_keys()``: the entries besides the weights that :meth:`export` keeps;
    - optionally ``_snapshot()`` / ``_restore(snapshot)``: state a step changes before its
      updates (e.g. persistent walkers), rolled back when the step is interrupted;
      ``_end_of_fit() -> changed`` (also after an interrupted fit); ``_postfix(record)``.
    """

    #: stop with an error after this many skipped steps in a row
    MAX_SKIPPED_IN_A_ROW = 100
    #: ... or when more than half of a :meth:`fit` call's steps were skipped, from this many on
    MIN_SKIPPED_TO_STOP = 20

    lr_schedule: str
    max_grad_norm: float | None
    averager: Averager | None
    averaged_model: torch.nn.Module
    device: torch.device

    def _init_loop(self) -> None:
        self.step = 0
        self.elapsed = 0.0
        self.history = History()
        self._window: dict[str, list] = {}  # per-step statistics since the last record
        self._data_fingerprint: dict | None = None
        self._fit_settings: dict | None = None
        self._dp: DataParallel | None | bool = False  # (False: not looked up yet)
        self._rank_seeded = False

    # ------------------------------------------------------------------ hooks (defaults)
    def _snapshot(self) -> Any:
        return None

    def _restore(self, snapshot: Any) -> None:
        pass

    def _end_of_fit(self) -> bool:
        """After a fit (also an interrupted one); whether it changed the trained state."""
        return False

    def _sync_setup(self, dp: DataParallel) -> None:
        """Make what :meth:`_setup` built the same on every process (process 0's)."""

    def _sync_record(self, dp: DataParallel) -> None:
        """Reduce over the processes what a record reads besides the step statistics."""

    def _rank_keys(self) -> tuple[str, ...]:
        """The checkpoint's entries that each process has its own of."""
        return ("rng", "cuda_rng", "window")

    def _postfix(self, record: dict) -> dict:
        return {"loss": f"{record.get('loss', float('nan')):.3g}"}

    def _description(self) -> str:
        return type(self).__name__

    # ------------------------------------------------------------------ the loop
    def _make_schedulers(self, num_steps: int) -> None:
        """One ``LambdaLR`` per optimiser, positioned at the next step (``num_steps`` is the
        run's total: the schedule is a function of the step, so a resumed run continues it)."""
        self._factor = _schedule(self.lr_schedule, num_steps)
        self._schedulers = []
        for opt, lr in self._optimizers():
            for group in opt.param_groups:
                group["initial_lr"] = lr
            with warnings.catch_warnings():  # (a scheduler made after optimiser steps)
                warnings.simplefilter("ignore", UserWarning)
                scheduler = torch.optim.lr_scheduler.LambdaLR(
                    opt, self._factor, last_epoch=self.step - 1
                )
            self._schedulers.append(scheduler)

    @property
    def data_parallel(self) -> DataParallel | None:
        """The processes this trainer trains over (:mod:`~pyro_ebm.train.distributed`;
        initialised from the environment at the first use), or ``None`` for one process."""
        if self._dp is False:
            self._dp = DataParallel.from_environment(self.device)
        return self._dp

    @property
    def is_main_process(self) -> bool:
        """Whether this process writes the files (always, on one process)."""
        dp = self.data_parallel
        return dp is None or dp.is_main

    def _optimizer_step(self, loss: Tensor, params: list[Tensor]) -> str | None:
        """Backward, clip and step the first optimiser; the reason when the step is skipped
        (a non-finite loss or gradient: the weights do not move), else ``None``. Across
        processes the gradients are averaged and the processes skip together."""
        opt, dp = self._optimizers()[0][0], self.data_parallel
        opt.zero_grad(set_to_none=True)
        bad = not bool(torch.isfinite(loss))
        if dp is not None:  # one collective: the gradients' sums and the processes' flags
            if not bad:
                loss.backward()
            if dp.sum_grads(params, extra=torch.tensor([float(bad)]))[0] > 0:
                opt.zero_grad(set_to_none=True)
                return "the loss is not finite" + ("" if bad else " on another process")
            for p in params:
                p.grad.div_(dp.world_size)
        elif bad:
            return "the loss is not finite"
        else:
            loss.backward()
        grads = [p for p in params if p.grad is not None]
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
        if not all(bool(torch.isfinite(p.grad).all()) for p in grads):
            return "a gradient is not finite"
        opt.step()
        return None

    def _train_step(self, data: Tensor, batch_size: int, num_steps: int) -> str | None:
        """One step; the reason it was skipped, or ``None``."""
        loss, stats = self._loss(data, batch_size)
        with deferred_interrupt():  # the updates below happen together or not at all
            self._other_updates(stats)
            reason = self._optimizer_step(loss, list(self.averaged_model.parameters()))
            stats["loss"] = float(loss.detach())
            stats["skipped"] = float(reason is not None)
            for scheduler in self._schedulers:
                with warnings.catch_warnings():  # (skipped steps do not step the optimiser)
                    warnings.simplefilter("ignore", UserWarning)
                    scheduler.step()
            self.step += 1
            if self.averager is not None:
                self.averager.update(self.averaged_model, self.step, num_steps)
            for key, value in stats.items():
                self._window.setdefault(key, []).append(value)
        return reason

    def _record(self) -> dict:
        """Append the history record of this step: the window's means and :meth:`_evaluate`
        (drawn outside the training's random stream). The window is cleared only once the
        record is in: an interrupt during the evaluation leaves the record to the resume."""
        record: dict[str, Any] = {
            "step": self.step,
            "time": round(self.elapsed, 3),
            "lr": self._optimizers()[0][1] * self._factor(self.step - 1),
        }
        means = {key: sum(values) / len(values) for key, values in self._window.items()}
        dp = self.data_parallel
        if dp is not None:
            means = dp.mean_floats(means)
            self._sync_record(dp)
        record.update(sorted(means.items()))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            record.update(self._evaluate())
        if dp is not None:  # (evaluated on every process, written as process 0's)
            record = dp.broadcast_object(record)
        self._window = {}
        self.history.append(record)
        return record

    def _check_skips(self, reason: str | None, skips: _Skips) -> None:
        """Count a step (skipped when ``reason`` is given); warn at the call's first skipped
        step, stop when training is not progressing."""
        skips.steps += 1
        if reason is None:
            skips.in_a_row = 0
            return
        skips.in_a_row += 1
        skips.skipped += 1
        if skips.skipped == 1 and self.is_main_process:
            warnings.warn(
                f"step {self.step}: {reason}; the step is skipped (the weights do not move). "
                "A lower lr or max_grad_norm may help.",
                RuntimeWarning,
                stacklevel=4,  # the user's fit() call
            )
        if skips.in_a_row >= self.MAX_SKIPPED_IN_A_ROW or (
            skips.skipped >= self.MIN_SKIPPED_TO_STOP and 2 * skips.skipped > skips.steps
        ):
            raise TrainingError(
                f"{skips.skipped} of the {skips.steps} steps of this fit() were skipped "
                f"({skips.in_a_row} in a row, up to step {self.step}; the last because "
                f"{reason}): training is not progressing. Check the data and the model's "
                "settings; a lower lr or max_grad_norm may help."
            )

    def _run(
        self,
        data: Tensor,
        num_steps: int,
        batch_size: int,
        eval_every: int | None,
        checkpoint: str | os.PathLike | None,
        checkpoint_every: int | None,
        resume: bool,
        progress: bool,
        force: bool,
    ) -> History:
        """:meth:`fit`'s loop, on checked ``data`` (the subclass's own arguments are set)."""
        num_steps = check_int("num_steps", num_steps, 1)
        batch_size = check_int("batch_size", batch_size, 1)
        resume, progress, force = (
            check_flag(name, value)
            for name, value in (("resume", resume), ("progress", progress), ("force", force))
        )
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
        if checkpoint is not None:
            checkpoint = check_file_path("checkpoint", checkpoint)
        dp = self.data_parallel
        if dp is not None and self.step == 0 and not self._rank_seeded:
            # every process its own random stream (walkers, minibatches), from the seed
            torch.manual_seed(int(torch.randint(2**62, ())) + dp.rank)
            self._rank_seeded = True
        self._setup(data)
        if dp is not None and self.step == 0:  # (later, the weights move together)
            self._sync_setup(dp)
        fingerprint = data_fingerprint(data)
        settings = {"batch_size": batch_size}
        if resume and checkpoint.is_file():
            state = load_checkpoint(checkpoint, map_location=self.device)
            self._load(state, fingerprint, settings, force)
        self._data_fingerprint, self._fit_settings = fingerprint, settings
        if num_steps < self.step:
            warnings.warn(
                f"fit(num_steps={num_steps}) does nothing: this trainer has done {self.step} "
                f"steps already (num_steps is the total; pass num_steps > {self.step} to train "
                "on)",
                stacklevel=3,
            )
        data = self._training_data(data)
        if dp is not None:  # this process's shard
            data = data[dp.rank :: dp.world_size]
        self._make_schedulers(num_steps)
        due = self.step > 0 and (self.step % eval_every == 0 or self.step == num_steps)
        if due and (not len(self.history) or self.history.last["step"] != self.step):
            self._record()  # interrupted while evaluating: the record of the last step
        bar = None
        if progress and self.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_steps, initial=min(self.step, num_steps), desc=self._description())
        snapshot, done, completed, skips = None, self.step, False, _Skips()
        try:
            while self.step < num_steps:
                # what an interruption in the middle of this step must roll back to
                snapshot, done = (rng_states(self.device), self._snapshot()), self.step
                start = time.perf_counter()
                reason = self._train_step(data, batch_size, num_steps)
                self.elapsed += time.perf_counter() - start
                if self.step % eval_every == 0 or self.step == num_steps:
                    record = self._record()
                    if bar is not None:
                        bar.set_postfix(self._postfix(record), refresh=False)
                if checkpoint is not None and (
                    self.step % checkpoint_every == 0 or self.step == num_steps
                ):
                    self.save(checkpoint)
                if bar is not None:
                    bar.update(1)
                self._check_skips(reason, skips)
            if dp is not None:  # every process's collectives done before any leaves fit
                dp.barrier()
            completed = True
        finally:
            if bar is not None:
                bar.close()
            if not completed:
                if snapshot is not None and self.step == done:  # cut mid-step: roll back
                    set_rng_states(snapshot[0], self.device)
                    self._restore(snapshot[1])
                # the state to resume from (across processes, the last periodic checkpoint:
                # the processes stop at different points, and a save needs all of them)
                if checkpoint is not None and dp is None:
                    self.save(checkpoint)
            changed = self._end_of_fit()
        if changed and checkpoint is not None:  # the checkpoint of a finished fit is its outcome
            self.save(checkpoint)
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The full training state: weights, optimisers, averages, step, history, random
        states, and the fingerprints a resume is checked against."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "trainer": type(self).__name__,
            "config": self._config(),
            "data": self._data_fingerprint,
            "fit": self._fit_settings,
            "step": self.step,
            "elapsed": self.elapsed,
            "history": self.history.records,
            "window": self._window,
            "optimizers": [opt.state_dict() for opt, _ in self._optimizers()],
            "averager": None if self.averager is None else self.averager.state_dict(),
            "modules": {name: meta_copy(m) for name, m in self._modules().items()},
            **rng_states(self.device),
        }
        state.update(self._extra_state())
        return state

    def export(self, path: str | os.PathLike) -> Path:
        """Write the trained model alone (weights, averaged weights, architecture and
        coordinates; no optimiser or sampler state), atomically: what
        :func:`pyro_ebm.train.load` reads back, as it reads a checkpoint."""
        state = self.state_dict()
        keep = ("format", "trainer", "config", "modules", "weights", "averager")
        return atomic_save({k: state[k] for k in (*keep, *self._model_keys())}, path)

    def load_state_dict(self, state: dict, force: bool = False) -> None:
        """Restore :meth:`state_dict` into a trainer built with the same settings (checked
        against the checkpoint's fingerprint, which names a setting that differs; ``force``
        loads anyway). Weights with a nan or inf are refused."""
        self._load(state, None, None, force)

    @staticmethod
    def _refuse(message: str) -> None:
        raise ValueError(
            f"cannot resume: {message}. Pass force=True (--force on the command line) to "
            "resume anyway, or start afresh"
        )

    def _load(self, state: dict, data: dict | None, settings: dict | None, force: bool) -> None:
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                "the checkpoint was written by another version of pyro_ebm (format "
                f"{state.get('format', 1) if isinstance(state, dict) else '?'}, this version "
                f"reads {CHECKPOINT_FORMAT}): start afresh"
            )
        dp = self.data_parallel
        world, saved_world = (1 if dp is None else dp.world_size), state.get("world_size", 1)
        if saved_world != world and not force:
            raise ValueError(
                f"the checkpoint was written by {saved_world} processes, this run has {world}: "
                f"resume it on {saved_world} (pyro-ebm train --nproc {saved_world}, or torchrun "
                f"--nproc_per_node={saved_world}); force=True (--force) resumes anyway, every "
                "process from process 0's walkers and random state"
            )
        if "ranks" in state:
            state = {**state, **state["ranks"][dp.rank if saved_world == world else 0]}
        if state["trainer"] != type(self).__name__:
            raise ValueError(
                f"the checkpoint was written by {state['trainer']}, not {type(self).__name__}"
            )
        bad = nonfinite_entries({"weights": state.get("weights"), "average": state["averager"]})
        if bad:
            raise ValueError(
                f"the checkpoint's weights are not finite ({', '.join(bad[:3])}"
                f"{' ...' if len(bad) > 3 else ''}): the run it saved had diverged; resume "
                "from an earlier checkpoint or start afresh"
            )
        if not force:
            mine, saved = self._config(), state["config"]
            differ = [k for k in sorted(set(mine) & set(saved)) if mine[k] != saved[k]]
            if differ:
                self._refuse(
                    "the checkpoint was written with "
                    + ", ".join(f"{k}={saved[k]!r}" for k in differ)
                    + ", this trainer has "
                    + ", ".join(f"{k}={mine[k]!r}" for k in differ)
                )
            if data is not None and state["data"] is not None and state["data"] != data:
                old, new = state["data"], data
                detail = (
                    f"shape {old['shape']} and dtype {old['dtype']}, these {new['shape']} and "
                    f"{new['dtype']}"
                    if (old["shape"], old["dtype"]) != (new["shape"], new["dtype"])
                    else "the same shape but other values"
                )
                self._refuse(f"the checkpoint's data had {detail}")
            for key, new in (settings or {}).items():
                old = (state["fit"] or {}).get(key)
                if old is not None and old != new:
                    self._refuse(
                        f"the checkpoint was written with {key}={old!r}, this fit() has "
                        f"{key}={new!r}",
                    )
        self._load_extra_state(state)
        for (opt, _), saved in zip(self._optimizers(), state["optimizers"], strict=True):
            opt.load_state_dict(saved)
        if self.averager is not None and state["averager"] is not None:
            self.averager.load_state_dict(state["averager"])
        elif state["averager"] is not None:
            warnings.warn(
                "the checkpoint has averaged weights, but this trainer averages none: they are "
                "dropped",
                stacklevel=3,
            )
        self._data_fingerprint, self._fit_settings = state["data"], state["fit"]
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.history = History(state["history"])
        self._window = state["window"]
        set_rng_states(state, self.device)
        if dp is not None and saved_world != world:  # (forced) every process its own stream
            torch.manual_seed(int(torch.randint(2**62, ())) + dp.rank)

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`state_dict` to ``path`` atomically, with a checksum. Across processes
        (call it on all of them), process 0 writes every process's own state with its own."""
        state, dp = self.state_dict(), self.data_parallel
        if dp is not None:
            mine = {k: state.pop(k) for k in self._rank_keys() if k in state}
            ranks = dp.gather_object(mine)
            if not dp.is_main:
                return Path(path)
            state["ranks"], state["world_size"] = ranks, dp.world_size
        return atomic_save(state, path)

    def load(self, path: str | os.PathLike, force: bool = False) -> None:
        """Restore a checkpoint written by :meth:`save` (see :meth:`load_state_dict`); the
        next :meth:`fit` continues exactly. Only load files you trust."""
        self.load_state_dict(load_checkpoint(path, map_location=self.device), force=force)
