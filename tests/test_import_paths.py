"""The checkout's ``kernels/`` folder is the package ``nsa_viz.kernels`` (pyproject maps it); it must never be
found as a top-level ``kernels``, which is Hugging Face's package of that name (transformers >= 5.25 depends on
it and imports it when it loads). The test runner keeps the root last on sys.path (``python -P``,
``--import-mode=append``) and the benchmarks append it; this checks the runner."""
from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

OUR_KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_top_level_kernels_is_not_our_folder_when_the_hugging_face_package_is_installed():
    if _installed("kernels"):
        spec = importlib.util.find_spec("kernels")
        assert spec is not None and Path(spec.origin).resolve().parent != OUR_KERNELS
    import transformers.integrations.hub_kernels  # noqa: F401  (failed to import when ours shadowed it)


def test_our_kernels_are_nsa_viz_kernels():
    import nsa_viz.kernels
    assert Path(nsa_viz.kernels.__file__).resolve().parent == OUR_KERNELS
