"""Dependency rules from the house style, checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

NO_LIGHTNING = [
    "depthkit.models",
    "depthkit.losses",
    "depthkit.data",
    "depthkit.eval",
    "depthkit.export",
    "depthkit.pseudo_label",
    "depthkit_kernels",
]


@pytest.mark.parametrize("package", NO_LIGHTNING)
def test_package_does_not_import_lightning(package):
    code = (
        "import importlib, pkgutil, sys\n"
        f"pkg = importlib.import_module({package!r})\n"
        "for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "assert not bad, bad[:5]\n"
        "bad = sorted(n for n in sys.modules if n.startswith('depthkit.train'))\n"
        "assert not bad, bad[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_kernels_do_not_import_depthkit():
    code = (
        "import importlib, pkgutil, sys\n"
        "import depthkit_kernels as pkg\n"
        "for m in pkgutil.walk_packages(pkg.__path__, 'depthkit_kernels.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n == 'depthkit' or n.startswith('depthkit.'))\n"
        "assert not bad, bad[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_every_package_is_listed_in_pyproject():
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "depthkit").rglob("__init__.py")}
    found |= {
        "depthkit_kernels" + "".join("." + q for q in p.parent.relative_to(root / "kernels").parts)
        for p in (root / "kernels").rglob("__init__.py")
    }
    assert found == listed, f"pyproject packages differ from the tree: missing {found - listed}, extra {listed - found}"
