"""The documentation a user reads from the installed package: every public name has a
docstring, no docstring or comment points at a file outside the package, and every public
class and function documented with an example runs it (the doctests run with the suite:
``--doctest-modules`` in ``setup.cfg``)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pyro_ebm

PACKAGE = Path(pyro_ebm.__file__).parent

#: what points outside the installed package: the repository's folders and files, the shared
#: data, the docs site
OUTSIDE = re.compile(
    r"(?<![\w.])(tests/|benchmarks/|tutorials/|docs/|\.\./shared|RESULTS\.md|DESIGN\.md|"
    r"test_\w+\.py|:doc:`)"
)


def _modules():
    yield pyro_ebm
    for info in pkgutil.walk_packages(pyro_ebm.__path__, "pyro_ebm."):
        if info.name.endswith("__main__"):
            continue
        yield importlib.import_module(info.name)


def _public_objects():
    """``(qualified name, object)`` of every public module, class, function and method."""
    seen = set()
    for module in _modules():
        yield module.__name__, module
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if id(obj) in seen or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            seen.add(id(obj))
            yield f"{module.__name__}.{name}", obj
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if not attr.startswith("_") and inspect.isfunction(member):
                        yield f"{module.__name__}.{name}.{attr}", member


def test_no_source_file_points_outside_the_package():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if OUTSIDE.search(line):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{i}: {line.strip()}")
    assert not bad, "lines that name files outside the package:\n" + "\n".join(bad)


def test_the_check_finds_what_it_looks_for():
    for line in ("see tests/test_flows.py", "in benchmarks/RESULTS.md", "(DESIGN.md §6)",
                 "../shared/posteriordb", "timings in :doc:`/design`"):  # fmt: skip
        assert OUTSIDE.search(line), line
    for line in ("pyro_ebm.flows.base", "x_tests/y", "the flow's tests"):
        assert not OUTSIDE.search(line), line


def test_every_public_name_has_a_docstring():
    missing = [name for name, obj in _public_objects() if not inspect.getdoc(obj)]
    assert not missing, f"public names without a docstring: {missing}"


def test_public_classes_and_functions_of_the_main_modules_have_examples():
    """The user-facing entry points show a runnable example (run as doctests)."""
    modules = ("pyro_ebm.flows", "pyro_ebm.coordinates", "pyro_ebm.energy")
    lacking = []
    for name, obj in _public_objects():
        if not name.startswith(modules) or inspect.ismodule(obj) or name.count(".") > 3:
            continue
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and name.rsplit(".", 1)[0] in (
            *modules,
            *(f"pyro_ebm.flows.{m}" for m in ("base", "coupling", "affine", "standardized")),
        ):
            if ">>>" not in (inspect.getdoc(obj) or ""):
                lacking.append(name)
    assert not lacking, f"public names without an example: {lacking}"
