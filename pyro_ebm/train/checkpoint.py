r"""Atomic file writes: a checkpoint or a history file is either the old one or the new one,
never half written (write to a temporary file in the same folder, flush, ``fsync``, then
``os.replace``, which is atomic on POSIX and Windows; the temporary file is removed when the
write fails, and those of writes killed before are removed by the next write). Checkpoints
end with a SHA-256 of their bytes, checked when they are loaded (a flipped byte in a tensor is
otherwise read without an error). Also the random states a checkpoint holds, so that a
resumed run continues the same random stream, and :func:`deferred_interrupt`, which keeps
Ctrl-C from cutting a training step's updates in half."""

from __future__ import annotations

import contextlib
import copy
import glob
import hashlib
import io
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

__all__ = [
    "atomic_save",
    "atomic_write",
    "check_file_path",
    "data_fingerprint",
    "deferred_interrupt",
    "load_checkpoint",
    "meta_copy",
    "nonfinite_entries",
    "rng_states",
    "set_rng_states",
    "shapes",
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
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a killed write
        stale.unlink(missing_ok=True)
    return path


#: what precedes the SHA-256 at the end of a file written by :func:`atomic_save`
_CHECKSUM_TAG = b"\npyro_ebm-sha256:"


class _Hashing:
    """A binary file that hashes what is written to it."""

    def __init__(self, file: IO) -> None:
        self.file, self.sha = file, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, atomically, followed by the SHA-256 of the bytes written
    (:func:`load_checkpoint` checks it).

    Example::

        >>> import tempfile, pathlib
        >>> p = atomic_save({"step": 3}, pathlib.Path(tempfile.mkdtemp()) / "c.pt")
        >>> load_checkpoint(p)
        {'step': 3}
    """

    def write(f: IO) -> None:
        hashing = _Hashing(f)
        torch.save(obj, hashing)
        f.write(_CHECKSUM_TAG + hashing.sha.digest())

    return atomic_write(path, write, binary=True)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Load a file written by :func:`atomic_save`, after checking its SHA-256 (a damaged file
    raises a ``ValueError`` naming it; a file without the checksum, e.g. written by
    ``torch.save``, is loaded as it is). ``weights_only=False``: checkpoints hold optimiser and
    random states; load only files you trust."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raw = path.read_bytes()
    size = len(_CHECKSUM_TAG) + hashlib.sha256().digest_size
    if raw[-size : -size + len(_CHECKSUM_TAG)] == _CHECKSUM_TAG:
        payload = memoryview(raw)[:-size]
        if hashlib.sha256(payload).digest() != raw[-size + len(_CHECKSUM_TAG) :]:
            raise ValueError(
                f"{path} is damaged (its bytes do not match the checksum written with it): "
                "resume from another checkpoint or start afresh"
            )
        raw = payload
    try:
        return torch.load(io.BytesIO(raw), map_location=map_location, weights_only=False)
    except Exception as e:  # (not a torch file, or truncated)
        raise ValueError(f"{path} is not a readable checkpoint: {e}") from e


def check_file_path(name: str, path: str | os.PathLike) -> Path:
    """``path`` as a ``Path``, if a file can be written there: not a folder, and no existing
    part of its folder is a file (checked before training starts, not at the first save).

    Example::

        >>> check_file_path("checkpoint", "/")
        Traceback (most recent call last):
        ...
        ValueError: checkpoint must be a file path, got the folder /
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name} must be a file path, got the folder {path}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{name}: {parent} is a file, not a folder ({path})")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{name}: cannot write into {parent} ({path})")
            break
    return path


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


def data_fingerprint(data: Tensor) -> dict:
    """The shape, dtype and SHA-256 of ``data``'s bytes: what a checkpoint records to refuse
    resuming on other data.

    Example::

        >>> a = data_fingerprint(torch.zeros(3, 2))
        >>> a == data_fingerprint(torch.zeros(3, 2)), a == data_fingerprint(torch.ones(3, 2))
        (True, False)
    """
    flat = data.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()
    return {"shape": tuple(data.shape), "dtype": str(data.dtype), "sha256": digest}


def shapes(module: torch.nn.Module) -> list[tuple[int, ...]]:
    """The shapes of a module's parameters and buffers in order: its architecture, for a
    checkpoint's fingerprint (the names are left out: layers without weights shift them).

    Example::

        >>> shapes(torch.nn.Linear(3, 2))
        [(2, 3), (2,)]
    """
    return [tuple(v.shape) for v in module.state_dict().values()]


def meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` on the ``meta`` device: its architecture, pickled without data."""
    return copy.deepcopy(module).to("meta")


def nonfinite_entries(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors with a nan or inf in a (nested) state dict."""
    if isinstance(state, Tensor):
        bad = state.is_floating_point() and not bool(torch.isfinite(state).all())
        return [prefix] if bad else []
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    out = []
    for key, value in items:
        out += nonfinite_entries(value, f"{prefix}.{key}" if prefix else str(key))
    return out
