r"""Per-draw statistics of the kernels' chains (:class:`DrawStats`, :data:`SAMPLE_STATS`), the
test for a chain that stopped moving (:func:`longest_rejection_run`, :func:`stuck_threshold`),
and the flow checks of a run's chains taken together (:func:`worst_flow_checks`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..samplers import MoveInfo

__all__ = [
    "SAMPLE_STATS",
    "STUCK_LEVEL",
    "STUCK_SHARE",
    "DrawStats",
    "longest_rejection_run",
    "deepest",
    "stuck_threshold",
    "worst_flow_checks",
]

#: a chain is reported stuck when a run of rejections as long as its longest would have
#: probability below this under independent acceptance at its own rate (see
#: :func:`stuck_threshold`) ...
STUCK_LEVEL = 1e-6

#: ... and when that run also holds at least this share of the chain's draws
STUCK_SHARE = 0.05

#: per-draw statistics every kernel records (see :func:`pyro_ebm.infer.to_arviz`)
SAMPLE_STATS = ("accept_prob", "accepted", "potential_energy", "is_global", "diverging")

_STAT_DTYPES = {
    "accept_prob": torch.float64,
    "accepted": torch.bool,
    "potential_energy": torch.float64,
    "is_global": torch.bool,
    "diverging": torch.bool,
}


class DrawStats:
    r"""The per-draw statistics of :data:`SAMPLE_STATS` for ``num_chains`` chains, in
    preallocated ``(num_chains, capacity)`` tensors (doubled when a run outgrows them).

    :param num_chains: number of chains.
    :param capacity: draws to allocate for (the number of samples when known).
    """

    def __init__(self, num_chains: int, capacity: int = 1024) -> None:
        self.num_chains = num_chains
        self.num_draws = 0
        self._capacity = max(capacity, 1)
        self._data = {k: torch.zeros(num_chains, 0, dtype=d) for k, d in _STAT_DTYPES.items()}

    def record(self, info: MoveInfo, is_global: bool) -> None:
        """Store one move's statistics for every chain (on the device of the chains: no
        synchronisation per step)."""
        n = self.num_draws
        if n == 0:  # allocated at the first draw, where the chains are
            device = info.accept_prob.device
            self._data = {
                k: torch.zeros(self.num_chains, self._capacity, dtype=d, device=device)
                for k, d in _STAT_DTYPES.items()
            }
        elif n == next(iter(self._data.values())).shape[1]:
            self._data = {k: torch.cat([v, torch.zeros_like(v)], 1) for k, v in self._data.items()}
        values = {
            "accept_prob": info.accept_prob,
            "accepted": info.accepted,
            "potential_energy": info.potential_energy,
            "diverging": info.nonfinite,
        }
        for name, value in values.items():
            self._data[name][:, n] = value.detach().to(_STAT_DTYPES[name])
        self._data["is_global"][:, n] = is_global
        self.num_draws = n + 1

    def chain(self, index: int) -> dict[str, Tensor]:
        """``{stat: (num_draws,) tensor}`` of one chain (views, not copies)."""
        return {k: v[index, : self.num_draws] for k, v in self._data.items()}

    def diagnostics(self, index: int) -> dict:
        r"""What ``MCMC`` reports for chain ``index``: ``divergences`` (indices of draws whose
        proposal had a non-finite potential), ``acceptance rate`` (the fraction of draws that
        moved, as Pyro's HMC reports it), the mean acceptance probabilities of global and of
        local moves (each kind only when some chain made such moves: MALA has no ``global
        acceptance rate``, FlowIMH no ``local`` one; ``nan`` for a chain that made none),
        ``longest rejection run`` (the most consecutive draws that did not move,
        :func:`longest_rejection_run`), ``stuck`` (whether that run is far longer than the
        chain's acceptance rate implies, :func:`stuck_threshold`) and ``sample_stats``
        (:meth:`chain`)."""
        stats = self.chain(index)
        out: dict = {"divergences": torch.nonzero(stats["diverging"]).flatten().tolist()}
        accepted = stats["accepted"]
        out["acceptance rate"] = float(accepted.double().mean()) if self.num_draws else math.nan
        made = self._data["is_global"][:, : self.num_draws]
        for kind, flag in (("global", True), ("local", False)):
            if not bool((made == flag).any()):
                continue
            probs = stats["accept_prob"][stats["is_global"] == flag]
            rate = float(probs.mean()) if probs.numel() else float("nan")
            out[f"{kind} acceptance rate"] = rate
        run = longest_rejection_run(accepted)
        out["longest rejection run"] = run
        out["stuck"] = self.num_draws > 0 and run > stuck_threshold(
            self.num_draws, int(accepted.sum()), run
        )
        out["sample_stats"] = stats
        return out


def longest_rejection_run(accepted: Tensor) -> int:
    r"""The most consecutive ``False`` entries of a chain's per-draw ``accepted`` flags: the
    longest stretch of draws in which the chain did not move.

    :param accepted: ``(num_draws,)`` booleans.

    Example::

        >>> longest_rejection_run(torch.tensor([True, False, False, True, False]))
        2
    """
    accepted = torch.as_tensor(accepted, dtype=torch.bool).flatten()
    n = accepted.numel()
    where = torch.nonzero(accepted).flatten().cpu()
    bounds = torch.cat([torch.tensor([-1]), where, torch.tensor([n])])
    return int((bounds.diff() - 1).max())


def stuck_threshold(
    num_draws: int,
    num_accepted: int,
    run: int,
    level: float = STUCK_LEVEL,
    share: float = STUCK_SHARE,
) -> float:
    r"""The longest run of rejections a chain of ``num_draws`` draws may have before it is
    called stuck.

    If each draw were accepted independently with probability :math:`a`, a run of at least
    :math:`L` rejections starts at a given draw with probability at most :math:`(1 - a)^L`, so
    by the union bound over the :math:`n` draws the longest run reaches :math:`L` with
    probability at most :math:`n (1 - a)^L`. The run is improbable when that bound is below
    ``level``, i.e. when

    .. math:: L > L_{\text{iid}} = \frac{\log(\text{level} / n)}{\log(1 - a)}.

    The rate :math:`a` is estimated from the draws outside the run, with half a pseudo-count
    (:math:`a = (\text{accepted} + 1/2) / (n - L + 1)`), so that the stuck stretch does not
    lower the rate it is judged by, and a chain that never moved has :math:`a = 1/2`.

    Rejections of a healthy chain cluster (an independent proposal's acceptance depends on the
    current point's weight, a local move's on where the chain is), so runs of 10-20 draws at an
    acceptance of 0.9 are common with a good flow although :math:`L_{\text{iid}}` is 8 for
    1000 draws. The run must therefore also hold a material ``share`` of the draws, during
    which the chain's draws are one point: the threshold is
    :math:`\max(L_{\text{iid}}, \text{share} \cdot n)`.

    :param num_draws: :math:`n`, the chain's draws.
    :param num_accepted: draws that moved.
    :param run: :math:`L`, the longest run of rejections (:func:`longest_rejection_run`).
    :param level: the probability bound below which the run is improbable.
    :param share: the least share of the draws a stuck run holds.
    :returns: the longest run that is not called stuck (``inf`` when ``n = 0``).

    Example::

        >>> round(stuck_threshold(1000, 300, 20), 1)  # acceptance 0.3: runs up to ~57 are fine
        56.7
        >>> stuck_threshold(1000, 900, 10)  # acceptance 0.9: up to 5% of the draws
        50.0
    """
    if num_draws <= 0:
        return math.inf
    rate = min((num_accepted + 0.5) / (num_draws - run + 1), 1.0 - 1e-12)
    return max(math.log(level / num_draws) / math.log1p(-rate), share * num_draws)


def worst_flow_checks(diagnostics: list) -> dict[str, float]:
    r"""The flow checks of a run's chains taken together: ``"flow k-hat"`` and
    ``"flow score k-hat"`` the largest over chains (``nan`` if any is), ``"flow IS ESS"`` the
    smallest, with its chain's ``"flow IS draws"``; each key only when every chain's
    diagnostics have it (Pyro's driver may train one flow per chain; vectorized chains share
    one check).

    :param diagnostics: each chain's ``kernel.diagnostics(chain)`` dict.

    Example::

        >>> worst_flow_checks([{"flow k-hat": 0.3, "flow IS ESS": 900.0},
        ...                    {"flow k-hat": 0.8, "flow IS ESS": 50.0}])
        {'flow k-hat': 0.8, 'flow IS ESS': 50.0}
    """
    if not diagnostics or not all(isinstance(d, dict) for d in diagnostics):
        return {}
    out = {}
    for key, worst in (("flow k-hat", max), ("flow IS ESS", min), ("flow score k-hat", max)):
        if all(key in d for d in diagnostics):
            values = [float(d[key]) for d in diagnostics]
            nan = key != "flow IS ESS" and any(math.isnan(v) for v in values)
            out[key] = math.nan if nan else worst(values)
    if "flow IS ESS" in out and all("flow IS draws" in d for d in diagnostics):
        smallest = min(diagnostics, key=lambda d: float(d["flow IS ESS"]))
        out["flow IS draws"] = int(smallest["flow IS draws"])
    return out


def deepest(diagnostics: list) -> float:
    r"""The largest ``"density depth"`` of a run's chains (``nan`` when none reports one; see
    :meth:`~pyro_ebm.infer.base.WalkerKernel.check_depth`).

    :param diagnostics: each chain's ``kernel.diagnostics(chain)`` dict.

    Example::

        >>> deepest([{"density depth": 0.2}, {"density depth": 5.1}, {}])
        5.1
    """
    depths = [
        float(d["density depth"])
        for d in diagnostics or []
        if isinstance(d, dict) and "density depth" in d
    ]
    depths = [v for v in depths if not math.isnan(v)]
    return max(depths) if depths else math.nan
