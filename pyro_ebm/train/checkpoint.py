r"""Atomic file writes: a checkpoint or a history file is either the old one or the new one,
never half written (write to a temporary file in the same folder, flush, ``fsync``, then
``os.replace``, which is atomic on POSIX and Windows). Also the random states a checkpoint
holds, so that a resumed run continues the same random stream, and :func:`deferred_interrupt`,
which keeps Ctrl-C from cutting a training step's updates in half."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "atomic_save",
    "atomic_write",
    "deferred_interrupt",
    "load_checkpoint",
    "rng_states",
    "set_rng_states",
]


def atomic_write(path: str | os.PathLike, write: Callable[[IO], Any], binary: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it onto ``path``.

    Example::

        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> _ = atomic_write(p, lambda f: f.write("hello"))
        >>> p.read_text()
        'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)  # (read it: mkstemp makes the file private, 0600)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the permissions of a file written with open()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :func:`atomic_save` (``weights_only=False``: checkpoints hold
    optimizer and RNG states; load only files you trust)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=False)


def rng_states(device: torch.device) -> dict:
    """torch's random states, ``{"rng": CPU state}``, plus ``"cuda_rng"`` when ``device`` is a
    GPU (a run on a GPU draws there too: restoring only the CPU's state does not resume it
    exactly)."""
    states = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, device: torch.device) -> None:
    """Restore :func:`rng_states` (a GPU state only onto a GPU ``device``; a GPU checkpoint
    resumed on a CPU restores the CPU's)."""
    torch.set_rng_state(states["rng"].cpu())
    if "cuda_rng" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda_rng"].cpu(), device)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C (``SIGINT``) off for the block: a signal that arrives inside it is handed to
    the previous handler when the block ends (``KeyboardInterrupt`` by default). The trainers
    wrap a step's updates (weights, optimiser states, step count) in it, so an interrupt never
    leaves a checkpoint with some updated and others not. Only in the main thread, where Python
    handles signals; elsewhere the block just runs.

    Example::

        >>> with deferred_interrupt():
        ...     pass
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        if callable(previous):
            previous(signal.SIGINT, None)
        elif previous == signal.SIG_DFL:
            raise KeyboardInterrupt
