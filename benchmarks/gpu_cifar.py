"""The CIFAR-10 configuration of issue 4 on a GPU: time per training step, peak GPU memory, and
a checkpoint resumed on the GPU, for :func:`pyro_ebm.energy.images.cifar10_trainer` (conv EBM,
RealNVP image flow, adaptive flow sampling with 1024 walkers) through the same ``EBMTrainer``.

No CIFAR-10 files can reach the lent GPU machine (nothing is downloaded there), so the images
are synthetic and CIFAR-shaped: smooth random colour fields (a 3x4x4 Gaussian field upsampled
bilinearly, plus pixel noise, squashed into (-1, 1)). The run measures that the configuration
runs on a GPU and what a step costs; it says nothing about what it learns on CIFAR-10.

Run from the repository root::

    python benchmarks/gpu_cifar.py --device cuda --steps 30
    python benchmarks/gpu_cifar.py --device cpu --shape 3 8 8 --walkers 16 --steps 4  # smoke
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from pyro_ebm.energy.images import cifar10_trainer


def synthetic_images(n: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """``n`` smooth random images of ``shape`` in (-1, 1), flattened to ``(n, C*H*W)``."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    coarse = torch.randn(n, c, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    x = torch.tanh(x + 0.1 * torch.randn(n, c, h, w, generator=g))
    return x.reshape(n, -1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", type=int, nargs=3, default=[3, 32, 32])
    parser.add_argument("--walkers", type=int, default=None, help="default: the configuration's")
    parser.add_argument("--steps", type=int, default=30, help="steps of each of the two phases")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-data", type=int, default=10_000)
    args = parser.parse_args()

    device = torch.device(args.device)
    shape = tuple(args.shape)
    kwargs = {} if args.walkers is None else {"num_walkers": args.walkers}
    torch.manual_seed(0)
    data = synthetic_images(args.num_data, shape)
    print(f"torch {torch.__version__}, device {device}", end="")
    if device.type == "cuda":
        print(f" ({torch.cuda.get_device_name(device)})", end="")
        torch.cuda.reset_peak_memory_stats(device)
    print(f"; data {tuple(data.shape)}; batch {args.batch_size}")

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "cifar.pt"
        # phase 1: the first steps (includes warm-up), checkpoint at the end
        trainer = cifar10_trainer(device, shape=shape, **kwargs)
        total = 2 * args.steps
        _sync(device)
        start = time.perf_counter()
        trainer.fit(
            data,
            num_steps=args.steps,
            batch_size=args.batch_size,
            eval_every=args.steps,
            checkpoint=checkpoint,
            progress=False,
        )
        _sync(device)
        first = (time.perf_counter() - start) / args.steps
        # phase 2: a fresh trainer resumes the checkpoint on the device and runs as many steps
        resumed = cifar10_trainer(device, shape=shape, **kwargs)
        _sync(device)
        start = time.perf_counter()
        resumed.fit(
            data,
            num_steps=total,
            batch_size=args.batch_size,
            eval_every=args.steps,
            checkpoint=checkpoint,
            resume=True,
            progress=False,
        )
        _sync(device)
        second = (time.perf_counter() - start) / args.steps

    walkers = resumed.walkers
    finite = bool(torch.isfinite(walkers).all())
    params_finite = all(bool(torch.isfinite(p).all()) for p in resumed.model.parameters())
    print("\n| quantity | value |")
    print("|---|---|")
    print(f"| walkers | {walkers.shape[0]} x {walkers.shape[1]} |")
    print(f"| s/step, steps 1-{args.steps} (with warm-up) | {first:.3f} |")
    print(f"| s/step, steps {args.steps + 1}-{total} (resumed) | {second:.3f} |")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"| peak GPU memory allocated | {peak:.2f} GiB |")
    print(f"| steps done after resume | {resumed.step} (of {total}) |")
    print(f"| walkers on | {walkers.device} |")
    print(f"| walkers finite / parameters finite | {finite} / {params_finite} |")
    last = resumed.history.last
    for key in sorted(last):
        value = last[key]
        if isinstance(value, float) and math.isfinite(value):
            print(f"| last record: {key} | {value:.4g} |")
    if not (finite and params_finite and resumed.step == total):
        raise SystemExit("the GPU run did not complete cleanly")


if __name__ == "__main__":
    main()
