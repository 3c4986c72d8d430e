r"""Data for EBFlow: scikit-learn's 8x8 digits (bundled, no download), MNIST-format IDX files
the user has, and the 2-D toys of Chao et al. (2023) (:func:`make_toy`).

Images are returned as ``uint8`` tensors in ``[0, 255]``, shape ``(n, H * W)``; the trainer
dequantises them (see :mod:`pyro_ebm.ebflow.trainer`).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["TOYS", "load_digits", "make_toy", "read_idx"]

_IDX_DTYPES = {
    0x08: torch.uint8,
    0x09: torch.int8,
    0x0B: torch.int16,
    0x0C: torch.int32,
    0x0D: torch.float32,
    0x0E: torch.float64,
}


def read_idx(path: str | os.PathLike) -> Tensor:
    r"""Read an IDX file (the MNIST format; ``.gz`` compressed or not) into a tensor of its
    stored shape, e.g. ``(10000, 28, 28)`` ``uint8`` for ``t10k-images-idx3-ubyte``.

    Example::

        >>> import tempfile, pathlib, struct
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "tiny-idx3-ubyte"
        >>> _ = p.write_bytes(struct.pack(">HBB3I", 0, 0x08, 3, 2, 2, 2) + bytes(range(8)))
        >>> read_idx(p).shape
        torch.Size([2, 2, 2])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip's magic bytes, whatever the file's suffix
        raw = gzip.decompress(raw)
    if len(raw) < 4:
        raise ValueError(f"{path} is not an IDX file (too short)")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated header ({ndim} dimensions announced)")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = _IDX_DTYPES[code]
    data = raw[4 + 4 * ndim :]
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} data bytes, expected {expected} for {shape}")
    if not data:  # a valid file with no items
        return torch.empty(shape, dtype=dtype)
    t = torch.frombuffer(bytearray(data), dtype=dtype)
    if dtype.itemsize > 1:  # IDX is big-endian
        t = t.view(torch.uint8).reshape(-1, dtype.itemsize).flip(-1).reshape(-1).view(dtype)
    return t.reshape(shape)


def load_digits() -> Tensor:
    r"""scikit-learn's 1797 digits (8x8, values 0-16) rescaled to ``uint8`` in ``[0, 255]``,
    shape ``(1797, 64)`` (needs scikit-learn; no download)."""
    from sklearn.datasets import load_digits as _load

    x = torch.as_tensor(_load().data, dtype=torch.float64)
    return (x * 255.0 / 16.0).round().to(torch.uint8)


def _sine(n: int, g: torch.Generator) -> Tensor:
    x = torch.rand(n, generator=g) * 4 - 2
    y = torch.sin(3 * x) + 0.25 * torch.randn(n, generator=g)
    return 4.0 * torch.stack([x, y], -1)


def _swirl(n: int, g: torch.Generator) -> Tensor:
    t = torch.rand(n, generator=g).sqrt() * 3 * math.pi  # 540 degrees
    x = -torch.cos(t) * t + 0.5 * torch.rand(n, generator=g) - 1.0
    y = torch.sin(t) * t + 0.5 * torch.rand(n, generator=g) - 2.0
    return -(2.5 / 3) * torch.stack([x, y], -1)


def _checkerboard(n: int, g: torch.Generator) -> Tensor:
    x1 = torch.rand(n, generator=g) * 4 - 2
    x2 = torch.rand(n, generator=g) - 2.0 * torch.randint(0, 2, (n,), generator=g)
    x2 = x2 + torch.floor(x1) % 2
    return 3.0 * torch.stack([x1, x2], -1)


TOYS = {"sine": _sine, "swirl": _swirl, "checkerboard": _checkerboard}
"""The 2-D toys of Chao et al. (2023), Section 5.1 (their generators, rewritten in torch)."""


def make_toy(name: str, n: int, noise: float = 0.375, seed: int | None = None) -> Tensor:
    r"""``n`` draws ``(n, 2)`` from one of the paper's 2-D toys, ``"sine"`` (a sine curve with
    Gaussian spread, on about ``[-8, 8] x [-6, 6]``), ``"swirl"`` (a spiral) or
    ``"checkerboard"`` (8 squares of side 3 on ``[-6, 6]^2``), smoothed by adding Gaussian noise
    of std ``noise`` (0.375 by default; ``noise=0`` gives the raw generators, whose hard edges
    have no finite score). Generated, no download.

    Example::

        >>> x = make_toy("checkerboard", 1000, seed=0)
        >>> x.shape, bool(x.abs().max() < 8)
        (torch.Size([1000, 2]), True)
    """
    if name not in TOYS:
        raise ValueError(f"name must be one of {sorted(TOYS)}, got {name!r}")
    if n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if noise < 0:
        raise ValueError(f"noise must be non-negative, got {noise!r}")
    g = torch.Generator()
    g.manual_seed(int(torch.randint(2**62, ())) if seed is None else seed)
    x = TOYS[name](n, g).to(torch.get_default_dtype())
    return x + noise * torch.randn(x.shape, generator=g, dtype=x.dtype)
