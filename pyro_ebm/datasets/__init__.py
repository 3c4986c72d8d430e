r"""Targets with known answers: synthetic distributions with exact densities and mode weights
(:mod:`~pyro_ebm.datasets.toy`, the data sets of Grenioux, Moulines and Gabrié 2023) and
reference Pyro models whose posteriors have gold-standard draws in posteriordb
(:mod:`~pyro_ebm.datasets.posteriors`).
"""

from .posteriors import (
    EIGHT_SCHOOLS_DATA,
    SortedNormal,
    eight_schools_noncentered,
    label_switching_data,
    label_switching_mixture,
    low_dim_gauss_mix,
)
from .toy import (
    DATASETS,
    Dataset,
    GaussianMixture,
    Rings,
    available,
    eight_gaussians,
    imbalanced_pair,
    line4,
    load,
    mixture_hd,
    nearest_mean_index,
    rings,
    two_to_one,
)

__all__ = [
    "DATASETS",
    "EIGHT_SCHOOLS_DATA",
    "Dataset",
    "GaussianMixture",
    "Rings",
    "SortedNormal",
    "available",
    "eight_gaussians",
    "eight_schools_noncentered",
    "imbalanced_pair",
    "label_switching_data",
    "label_switching_mixture",
    "line4",
    "load",
    "low_dim_gauss_mix",
    "mixture_hd",
    "nearest_mean_index",
    "rings",
    "two_to_one",
]
