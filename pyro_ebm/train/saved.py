r"""Loading a trained model back from a file: :func:`load`."""

from __future__ import annotations

import os
from typing import Any

import torch

from pyro_ebm.coordinates import AffineCoordinates
from pyro_ebm.energy import EnergyModel, StandardizedEnergy, TiltedEnergy
from pyro_ebm.flows import Standardized

from .checkpoint import load_checkpoint
from .trainer import _Base

__all__ = ["load"]


def _restore(architecture: torch.nn.Module, weights: dict, device: Any) -> torch.nn.Module:
    module = architecture.to_empty(device=device)
    module.load_state_dict(weights)
    if hasattr(module, "_cached_log_z"):  # (an EBFlow's cache of log Z, from another process)
        module._cached_log_z = None
    return module.eval()


def load(path: str | os.PathLike, map_location: Any = "cpu") -> EnergyModel:
    r"""The trained model of a run: a ``model.pt`` written by ``pyro-ebm train`` (or a
    trainer's :meth:`~pyro_ebm.train.loop.Trainer.export`), or a trainer's checkpoint (the
    weights at that step), as an :class:`~pyro_ebm.energy.EnergyModel` in the data's own
    coordinates, ready for :func:`pyro_ebm.potential_fn` and the kernels of
    :mod:`pyro_ebm.infer`. No trainer needs to be built: the file holds the architecture.

    - :class:`~pyro_ebm.train.EBMTrainer`: :attr:`~pyro_ebm.train.EBMTrainer.model` (the
      tilted energy, over the standardization when there was one), with the flow in the
      data's coordinates as its attribute ``flow`` (an i-SIR or importance proposal for it).
    - :class:`~pyro_ebm.ebflow.EBFlowTrainer`: the EMA weights (the training weights without
      EMA); for float vectors its :attr:`~pyro_ebm.ebflow.EBFlowTrainer.data_model` (exact
      ``log_prob``, through the whitening when there was one); for images the EBFlow over the
      pre-processed pixels (its density is over dequantised pixels: use the trainer's
      ``nll`` and ``sample`` for figures on the 256 scale).

    Only load files you trust (they are unpickled).

    Example::

        >>> import tempfile, pathlib
        >>> from pyro_ebm import MLPEnergy
        >>> from pyro_ebm.train import EBMTrainer
        >>> trainer = EBMTrainer(MLPEnergy(2, hidden=(8,)), num_walkers=16, seed=0)
        >>> _ = trainer.fit(torch.randn(100, 2), num_steps=2, batch_size=16, progress=False)
        >>> path = trainer.export(pathlib.Path(tempfile.mkdtemp()) / "model.pt")
        >>> model = load(path)
        >>> x = torch.randn(5, 2)
        >>> torch.allclose(model.energy(x), trainer.model.energy(x))
        True
    """
    state = load_checkpoint(path, map_location=map_location)
    if not isinstance(state, dict) or "modules" not in state or "trainer" not in state:
        raise ValueError(
            f"{path} holds no trained model of pyro_ebm (a model.pt or a trainer's checkpoint "
            "of this version)"
        )
    weights = state["weights"]
    if state["trainer"] == "EBMTrainer":
        energy = _restore(state["modules"]["energy"], weights["energy"], map_location)
        flow = _restore(state["modules"]["flow"], weights["flow"], map_location)
        model: EnergyModel = TiltedEnergy(energy, _Base(flow))
        if state["standardization"] is not None:
            coords = AffineCoordinates(*state["standardization"])
            model = StandardizedEnergy(model, coordinates=coords)
            flow = Standardized(flow, coordinates=coords)
        model.flow = flow
        return model.eval()
    if state["trainer"] == "EBFlowTrainer":
        trained = weights["model"]
        if state["averager"] is not None:  # the EMA weights
            trained = {
                k[len("module.") :]: v
                for k, v in state["averager"].items()
                if k.startswith("module.")
            }
        model = _restore(state["modules"]["model"], trained, map_location)
        if not state["images"] and state["whitening"] is not None:
            mean, m, log_det_m = state["whitening"]
            coords = AffineCoordinates(mean, whitening=m, log_det=-log_det_m)
            model = StandardizedEnergy(model, coordinates=coords).eval()
        return model
    raise ValueError(f"{path}: unknown trainer {state['trainer']!r}")
