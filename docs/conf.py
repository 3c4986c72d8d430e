"""Sphinx configuration of the documentation: ``sphinx-build -W -b html docs docs/_build``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyro_ebm

project = "pyro_ebm"
author = "the pyro_ebm developers"
release = version = pyro_ebm.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_nb",
]
autosummary_generate = True
autodoc_default_options = {"members": True, "show-inheritance": True, "ignore-module-all": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_mock_imports = ["zuko"]
napoleon_google_docstring = False
myst_enable_extensions = ["dollarmath"]
nb_execution_mode = "off"  # the tutorials are executed notebooks; the test suite runs them
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
html_theme = "furo"
html_title = f"pyro_ebm {release}"
suppress_warnings = ["mystnb.unknown_mime_type"]

# The tutorials live in tutorials/ at the repository root; the site renders copies of them.
_root = Path(__file__).resolve().parent.parent
_dest = Path(__file__).resolve().parent / "tutorials"
_dest.mkdir(exist_ok=True)
for nb in sorted((_root / "tutorials").glob("*.ipynb")):
    shutil.copyfile(nb, _dest / nb.name)
