r"""Image models for :class:`pyro_ebm.train.EBMTrainer`: a convolutional energy, a convolutional
RealNVP flow, a CIFAR-10 loader for the files a user has, and the CIFAR-10 configuration.

Images travel through the samplers and the trainer as flat vectors of size ``C * H * W`` (the
samplers work on ``(num_walkers, dim)`` tensors); the models reshape them internally. Pixel
values are expected in ``[-1, 1]`` (the loader's output).

This configuration is meant for a GPU (``device="cuda"``); on a CPU it runs, slowly, at a small
scale (the tests train it for a few steps on 8x8 random images).

References:

- Dinh, Sohl-Dickstein, Bengio (2017), "Density estimation using Real NVP",
  https://arxiv.org/abs/1605.08803 (checkerboard affine couplings).
- Grenioux, Moulines, Gabrié (2023), https://arxiv.org/abs/2306.00684 (Sec. 5, CIFAR-10).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..flows import Flow
from .base import EnergyModel

__all__ = ["ConvEnergy", "ImageRealNVP", "cifar10_trainer", "load_cifar10"]


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if isinstance(shape, str) or not isinstance(shape, Sequence):
        raise TypeError(f"shape must be (channels, height, width), got {shape!r}")
    if len(shape) != 3:
        raise ValueError(f"shape must be (channels, height, width), got {shape!r}")
    return tuple(check_int(f"shape[{i}]", s, 1) for i, s in enumerate(shape))


class ConvEnergy(EnergyModel):
    r"""Convolutional energy on flat images: stride-2 ``3x3`` convolutions with SiLU, then a linear
    layer to a scalar (its weights scaled by ``last_layer_scale``, so that ``E ≈ 0`` at the start,
    as the tilted model needs).

    :param shape: ``(channels, height, width)``.
    :param channels: output channels of the convolutions (each halves the resolution).

    Example::

        >>> E = ConvEnergy((3, 8, 8), channels=(8, 16))
        >>> E(torch.randn(5, 3 * 8 * 8)).shape
        torch.Size([5])
    """

    def __init__(
        self,
        shape: Sequence[int] = (3, 32, 32),
        channels: Sequence[int] = (64, 128, 256),
        last_layer_scale: float = 1e-3,
    ) -> None:
        self.shape = _check_shape(shape)
        c, h, w = self.shape
        super().__init__(c * h * w)
        layers: list[nn.Module] = []
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.SiLU()]
            c = out
            h, w = (h + 1) // 2, (w + 1) // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c * h * w, 1)
        with torch.no_grad():
            self.head.weight.mul_(last_layer_scale)
            self.head.bias.zero_()

    def energy(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        f = self.features(x.reshape(-1, *self.shape))
        return self.head(f.flatten(1)).squeeze(-1)


class _CheckerboardCoupling(nn.Module):
    """Affine coupling with a checkerboard mask; the conditioner is a small conv net whose last
    convolution is zero (identity at initialisation)."""

    def __init__(self, shape: tuple[int, int, int], hidden: int, parity: int) -> None:
        super().__init__()
        self.shape = shape
        c, h, w = shape
        mask = ((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 == parity).float()
        self.register_buffer("mask", mask.expand(c, h, w).clone())
        last = nn.Conv2d(hidden, 2 * c, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(
            nn.Conv2d(c, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.SiLU(),
            last,
        )

    def forward(self, z: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor]:
        batch = z.shape[:-1]
        v = z.reshape(-1, *self.shape)
        mask = self.mask.to(v.dtype)
        s, t = self.net(v * mask).chunk(2, dim=1)
        s = 3.0 * torch.tanh(s / 3.0) * (1 - mask)
        t = t * (1 - mask)
        out = (v - t) * torch.exp(-s) if inverse else v * torch.exp(s) + t
        ladj = s.flatten(1).sum(-1)
        return out.reshape(*batch, -1), (-ladj if inverse else ladj).reshape(batch)


class ImageRealNVP(Flow):
    r"""RealNVP for images: ``num_layers`` checkerboard affine couplings (alternating parity) with
    convolutional conditioners, on flat vectors of size ``C * H * W``; the identity at
    initialisation.

    :param shape: ``(channels, height, width)``.
    :param num_layers: coupling layers.
    :param hidden: channels of the conditioners.
    :param base_scale: standard deviation of the Gaussian base.

    Example::

        >>> flow = ImageRealNVP((1, 4, 4), num_layers=2, hidden=8)
        >>> x = torch.randn(3, 16)
        >>> z, ladj = flow.inverse(x)
        >>> torch.allclose(flow.forward(z)[0], x), ladj.shape
        (True, torch.Size([3]))
    """

    def __init__(
        self,
        shape: Sequence[int] = (3, 32, 32),
        num_layers: int = 8,
        hidden: int = 64,
        base_scale: float = 1.0,
    ) -> None:
        shape = _check_shape(shape)
        c, h, w = shape
        super().__init__(c * h * w, base_scale)
        self.shape = shape
        for i in range(num_layers):
            self.layers.append(_CheckerboardCoupling(shape, hidden, parity=i % 2))


def load_cifar10(folder: str | os.PathLike, train: bool = True) -> Tensor:
    r"""Read the CIFAR-10 "python version" batches from ``folder`` (the extracted
    ``cifar-10-batches-py``: ``data_batch_1`` ... ``data_batch_5``, ``test_batch``) into a
    ``(n, 3 * 32 * 32)`` float tensor in ``[-1, 1]``, dequantised with uniform noise. Nothing
    is downloaded: the files must be there.

    :param folder: the folder holding the batch files.
    :param train: the 5 training batches (50k images) or the test batch (10k).
    """
    folder = Path(folder)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 batches not found in {folder}: {missing} (download and extract "
            "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html)"
        )
    arrays = []
    for n in names:
        with open(folder / n, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        arrays.append(torch.as_tensor(batch[b"data"]))
    x = torch.cat(arrays).to(torch.get_default_dtype())
    x = (x + torch.rand_like(x)) / 256.0  # dequantise to (0, 1)
    return 2.0 * x - 1.0


def cifar10_trainer(
    device: str | torch.device = "cuda", shape: Sequence[int] = (3, 32, 32), **kwargs
):
    r"""The CIFAR-10 configuration: a :class:`ConvEnergy`, an :class:`ImageRealNVP` and an
    :class:`~pyro_ebm.train.EBMTrainer` with adaptive flow sampling (i-SIR with 32 particles,
    5 MALA steps, lr 1e-4). Keyword arguments override the trainer's settings. On an NVIDIA
    H200 a step takes about 0.65 s and 32 GiB of GPU memory at batch 128; fewer walkers cost less.

    Example (on a GPU, with the data extracted in ``cifar-10-batches-py/``)::

        trainer = cifar10_trainer("cuda")
        data = load_cifar10("cifar-10-batches-py")
        trainer.fit(data, num_steps=50_000, batch_size=128, checkpoint="cifar.pt", resume=True)
    """
    from ..train import EBMTrainer

    settings = dict(
        sampler="adaptive-flow",
        num_walkers=1024,
        lr=1e-4,
        sampler_kwargs={"num_particles": 32, "num_mala_steps": 5, "step_size": 1e-4},
        device=device,
    )
    settings.update(kwargs)
    return EBMTrainer(ConvEnergy(shape), ImageRealNVP(shape, base_scale=0.5), **settings)
