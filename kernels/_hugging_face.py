"""Why this folder may be imported as ``kernels``, and what happens then.

The folder is the package ``nsa_viz.kernels`` (pyproject maps it). Python started in the checkout's root
(``python -m pytest``, ``python -c``, a notebook server) has the root on sys.path, so ``import kernels`` finds
the folder first, and that name belongs to Hugging Face's ``kernels`` package, which transformers >= 5.25
depends on and imports when it loads: transformers would get our package and fail. ``stand_aside`` loads
Hugging Face's package in our place (the import statement returns what ``sys.modules`` holds once
``__init__`` has run).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import sys


def stand_aside() -> None:
    try:
        files = importlib.metadata.distribution("kernels").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    init = next((f for f in files if f.as_posix() == "kernels/__init__.py"), None)
    if init is None:
        raise ImportError("this kernels/ folder is the package nsa_viz.kernels (import it under that name); the "
                          "top-level name `kernels` belongs to Hugging Face's package, which is not installed")
    path = init.locate()
    spec = importlib.util.spec_from_file_location("kernels", path, submodule_search_locations=[str(path.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)
