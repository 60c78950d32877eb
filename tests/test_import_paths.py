"""The checkout's ``kernels/`` folder is the package ``nsa_viz.kernels`` (pyproject maps it). ``kernels`` as a
top-level name is Hugging Face's package, which transformers >= 5.25 depends on and imports when it loads; when
Python starts in the checkout's root, the root is on sys.path and the folder is found under that name. The test
runner keeps the root last (``python -P``, ``--import-mode=append``) and the folder, imported as ``kernels``,
loads Hugging Face's package in its place (``kernels/_hugging_face.py``)."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_the_runner_does_not_find_our_folder_as_kernels_when_the_hugging_face_package_is_installed():
    import importlib.util
    if _installed("kernels"):
        spec = importlib.util.find_spec("kernels")
        assert spec is not None and Path(spec.origin).resolve().parent != ROOT / "kernels"
    import transformers.integrations.hub_kernels  # noqa: F401  (failed to import when ours shadowed it)


def test_python_started_in_the_root_loads_transformers_and_the_right_kernels():
    code = ("import transformers.models.llama.modeling_llama, importlib.metadata as m\n"
            "try:\n    m.version('kernels')\nexcept m.PackageNotFoundError:\n    raise SystemExit(0)\n"
            "import kernels\nprint(kernels.__file__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not run.stdout.strip() or Path(run.stdout.strip()).resolve().parent != ROOT / "kernels"


def test_our_folder_as_kernels_without_the_hugging_face_package_says_what_it_is(monkeypatch):
    from nsa_viz.kernels import _hugging_face

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ImportError, match="nsa_viz.kernels"):
        _hugging_face.stand_aside()


def test_our_kernels_are_nsa_viz_kernels():
    import nsa_viz.kernels
    assert Path(nsa_viz.kernels.__file__).resolve().parent == ROOT / "kernels"
    assert callable(nsa_viz.kernels.block_sparse_attention) and "resolve_backend" in nsa_viz.kernels.__all__
