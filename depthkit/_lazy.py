"""Lazy package exports (PEP 562), so `depthkit --help` and the torch-free runtime never import torch or timm."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """`__getattr__` and `__dir__` for a package whose names live in submodules (`exports`: name -> submodule).

    A name is imported from `package.<submodule>` on first access and then cached in the package's namespace.
    """
    namespace = vars(sys.modules[package])

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
