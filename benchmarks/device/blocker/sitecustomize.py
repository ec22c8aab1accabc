"""Rehearsal import blocker: this interpreter sees only what the lent GPU machine will have.

``run.sh --rehearse`` puts this folder first on PYTHONPATH and sets ``SAIL_DEVICE_ALLOW`` to the
package lists (``device_packages.txt``, ``wheels.txt``). Every top-level module that belongs to
an installed distribution not on those lists is made invisible: ``import`` fails with the usual
``No module named ...`` and ``importlib.util.find_spec`` returns None, exactly as on a machine
without it, so optional-dependency probes (transformers, timm) behave as they will there.
Modules that belong to no installed distribution (the standard library, this repository's
``sail``, ``tests`` and ``benchmarks``) pass, and so do the installed requirements of listed
distributions that SAIL does not require itself (a newer huggingface-hub here may need a package
the machine's older one does not). Blocked names are listed on stderr at exit when
``SAIL_DEVICE_BLOCK_LOG`` is set.
"""

from __future__ import annotations

import atexit
import importlib.machinery
import importlib.metadata
import os
import re
import sys
from pathlib import Path


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _listed(paths: list[str]) -> set[str]:
    """Distribution names from the list files (``name`` or ``name==version``, ``#`` comments)."""
    names = set()
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.split("#", 1)[0].strip()
                if line:
                    names.add(_norm(re.split(r"[=<>!~ \[]", line, maxsplit=1)[0]))
    return names


def _project_requirements() -> set[str]:
    """Distributions SAIL itself requires (pyproject.toml): the ones this check is about."""
    from packaging.requirements import Requirement

    pyproject = Path(__file__).resolve().parents[3] / "pyproject.toml"
    try:
        import tomllib

        lines = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    except (ImportError, OSError, KeyError):
        lines = importlib.metadata.requires("sail") or []
    return {_norm(Requirement(line).name) for line in lines}


def _with_requirements(names: set[str], keep_out: set[str]) -> set[str]:
    """``names`` plus, transitively, what their installed versions require (extras excluded).

    A newer package here may need something the machine's own version does not (huggingface-hub
    and httpx2, say), so such requirements pass, except those in ``keep_out``: a package SAIL
    requires directly must be on the lists itself (typer here requires pydantic; there, not).
    """
    from packaging.requirements import Requirement

    requires = {
        _norm(d.metadata["Name"]): d.requires or [] for d in importlib.metadata.distributions()
    }
    todo, seen = list(names), set(names)
    while todo:
        for line in requires.get(todo.pop(), []):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = _norm(req.name)
            if name not in seen and name not in keep_out:
                seen.add(name)
                todo.append(name)
    return seen


def _allowed(paths: list[str]) -> set[str]:
    # "sail": the project itself (an editable install here, PYTHONPATH=src there).
    return _with_requirements(_listed(paths), _project_requirements()) | {"sail"}


class DeviceOnlyPathFinder:
    """``PathFinder`` that pretends the blocked top-level modules are not installed."""

    def __init__(self, allowed: set[str]):
        owners = importlib.metadata.packages_distributions()
        self.owners = {top: {_norm(d) for d in dists} for top, dists in owners.items()}
        self.allowed = allowed
        self.blocked: set[str] = set()

    def is_blocked(self, top: str) -> bool:
        if top in sys.stdlib_module_names or top in sys.builtin_module_names:
            return False
        owners = self.owners.get(top)
        return owners is not None and not (owners & self.allowed)

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if self.is_blocked(top):
            self.blocked.add(top)
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, path, target)

    def invalidate_caches(self) -> None:
        importlib.machinery.PathFinder.invalidate_caches()

    def find_distributions(self, *args, **kwargs):
        """Metadata stays visible (version probes of allowed packages need it); imports do not."""
        return importlib.machinery.PathFinder.find_distributions(*args, **kwargs)


def install(paths: list[str]) -> DeviceOnlyPathFinder:
    finder = DeviceOnlyPathFinder(_allowed(paths))
    sys.meta_path[:] = [finder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    if os.environ.get("SAIL_DEVICE_BLOCK_LOG"):
        atexit.register(
            lambda: (
                finder.blocked
                and print(
                    f"[device blocker] refused: {', '.join(sorted(finder.blocked))}",
                    file=sys.stderr,
                )
            )
        )
    return finder


if os.environ.get("SAIL_DEVICE_ALLOW"):
    install(os.environ["SAIL_DEVICE_ALLOW"].split(os.pathsep))
