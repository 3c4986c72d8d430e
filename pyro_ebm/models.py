"""The reference Pyro models, kept importable here: they live in
:mod:`pyro_ebm.datasets.posteriors` (and :mod:`pyro_ebm.datasets`).

Example:

>>> from pyro_ebm.models import EIGHT_SCHOOLS_DATA
>>> EIGHT_SCHOOLS_DATA["J"]
8
"""

from .datasets.posteriors import (
    EIGHT_SCHOOLS_DATA,
    SortedNormal,
    eight_schools_noncentered,
    label_switching_data,
    label_switching_mixture,
    low_dim_gauss_mix,
)

__all__ = [
    "EIGHT_SCHOOLS_DATA",
    "SortedNormal",
    "eight_schools_noncentered",
    "label_switching_data",
    "label_switching_mixture",
    "low_dim_gauss_mix",
]
