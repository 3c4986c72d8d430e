"""The reference Pyro models, kept importable here: they live in
:mod:`pyro_ebm.datasets.posteriors` (and :mod:`pyro_ebm.datasets`).

Example:

>>> from pyro_ebm.models import EIGHT_SCHOOLS_DATA
>>> EIGHT_SCHOOLS_DATA["J"]
8
"""

from .datasets import posteriors
from .datasets.posteriors import *  # noqa: F403 (the same names, kept importable here)

__all__ = list(posteriors.__all__)
