r"""Data-parallel training over processes with ``torch.distributed``.

Under ``torchrun --nproc_per_node=N`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``), the trainers of :mod:`pyro_ebm.train` and
:mod:`pyro_ebm.ebflow` train on all the processes: the process group is initialised from the
environment when it is not already (``gloo`` on CPUs, ``nccl`` when the trainer's device is a
GPU), every process draws its minibatches from its own shard of the data and keeps its own
walkers, the gradients are averaged over the processes after each backward pass (so every
process holds the same weights after every step), the metrics are reduced over them, and
process 0 writes the history, checkpoints and plots. Every process's walkers and random states
go into the checkpoint, so a resumed run on the same number of processes continues exactly;
another number of processes is refused. ``num_walkers`` and ``batch_size`` are per process.
On GPUs, build each process's trainer on its own device, ``cuda:LOCAL_RANK``. A checkpoint is
written every ``checkpoint_every`` steps and at the end, but not when the run is interrupted
(the processes stop at different points, and a save needs all of them): a stopped run resumes
from its last periodic checkpoint.

The gradients are averaged by hand, not by wrapping the models in
``torch.nn.parallel.DistributedDataParallel``: the trainers call the models through ``energy``,
``log_prob`` and ``torch.autograd.grad`` (score matching differentiates twice), never through
``forward``, which is what ``DistributedDataParallel``'s gradient hooks are prepared by. The
gradients are flattened into one buffer per step, one ``all_reduce`` each, as its buckets do.

Example (``train.py``, run with ``torchrun --nproc_per_node=2 train.py``)::

    import torch
    from pyro_ebm import MLPEnergy
    from pyro_ebm.datasets import line4
    from pyro_ebm.train import EBMTrainer

    torch.set_num_threads(1)
    data = line4().sample(60_000, torch.Generator().manual_seed(0))  # the same on every process
    trainer = EBMTrainer(MLPEnergy(2), num_walkers=512, seed=0)  # 512 walkers per process
    trainer.fit(data, num_steps=4000, batch_size=512, checkpoint="run.pt", resume=True)
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DataParallel"]


class DataParallel:
    """The processes a trainer trains over (an initialised default process group).

    :attr:`rank` and :attr:`world_size` are the process's rank and the number of processes.
    """

    def __init__(self) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DataParallel needs an initialised torch.distributed process group")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    @classmethod
    def from_environment(cls, device: torch.device) -> DataParallel | None:
        """The process group to train over: the default one if it is initialised with more
        than one process; else one initialised from the environment (``WORLD_SIZE`` > 1, as
        ``torchrun`` sets it), ``nccl`` for a GPU ``device``, ``gloo`` otherwise; else
        ``None`` (one process)."""
        if not dist.is_available():
            return None
        if not dist.is_initialized():
            if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
                return None
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend)
        if dist.get_world_size() <= 1:
            return None
        return cls()

    @property
    def is_main(self) -> bool:
        """Whether this is process 0 (the one that writes files)."""
        return self.rank == 0

    def _move(self, t: Tensor) -> Tensor:
        return t.to(self.device)

    def all_sum(self, t: Tensor) -> Tensor:
        """The sum of ``t`` over the processes (a new tensor, on ``t``'s device)."""
        out = self._move(t.detach().clone())
        dist.all_reduce(out)
        return out.to(t.device)

    def sum_grads(self, params: list[Tensor], extra: Tensor | None = None) -> Tensor | None:
        """Replace each parameter's gradient by its sum over the processes (a missing gradient
        counts as zeros), and return the sums of the numbers ``extra``, all in one
        ``all_reduce`` of a flat buffer (each collective makes the processes wait for the
        slowest: one per update)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        parts = [g.detach().reshape(-1) for g in grads]
        if extra is not None:
            like = parts[0] if parts else extra
            parts.append(extra.detach().reshape(-1).to(like.device, like.dtype))
        flat = self.all_sum(torch.cat(parts))
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n
        return None if extra is None else flat[offset:]

    def mean_floats(self, values: dict[str, float]) -> dict[str, float]:
        """The means of a dict of numbers over the processes (the same keys on each)."""
        if not values:
            return values
        keys = sorted(values)
        means = self.all_sum(torch.tensor([values[k] for k in keys], dtype=torch.float64))
        return {k: float(v) / self.world_size for k, v in zip(keys, means, strict=True)}

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy process 0's parameters and buffers into every process's ``module``."""
        for t in list(module.parameters()) + list(module.buffers()):
            buf = self._move(t.detach().clone())
            dist.broadcast(buf, 0)
            t.copy_(buf.to(t.device))

    def broadcast_object(self, obj: Any) -> Any:
        """Process 0's ``obj`` (picklable), on every process."""
        box = [obj]
        dist.broadcast_object_list(box, 0, device=self.device)
        return box[0]

    def gather_object(self, obj: Any) -> list | None:
        """Every process's ``obj``, in rank order, on process 0 (``None`` elsewhere)."""
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        """Wait until every process gets here."""
        dist.barrier()
