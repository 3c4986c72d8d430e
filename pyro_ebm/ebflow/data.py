r"""Data for EBFlow: scikit-learn's 8x8 digits (bundled, no download), MNIST-format IDX files
the user has, and the 2-D toys of Chao et al. (2023).

Images are returned as ``uint8`` tensors in ``[0, 255]``, shape ``(n, H * W)``; the trainer
dequantises them (see :mod:`pyro_ebm.ebflow.trainer`).
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["load_digits", "read_idx"]

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
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path} is not an IDX file (too short)")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = _IDX_DTYPES[code]
    data = raw[4 + 4 * ndim :]
    expected = int(torch.tensor(shape).prod()) * torch.empty((), dtype=dtype).element_size()
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} data bytes, expected {expected} for {shape}")
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
