"""The tutorial notebooks run top to bottom, and none is committed with outputs.

Every numbered tutorial ``notebooks/0*.ipynb`` is executed in a fresh Jupyter kernel with
``NSA_VIZ_SMALL=1``, which each notebook reads in its first cell to pick sizes that run in
seconds on a 2-core CPU. ``dashboard.ipynb`` is not run here: Voila serves it and the browser
test drives it. Figures are rendered as plotly JSON only (``PLOTLY_RENDERER``), so executing a
notebook does not embed plotly.js.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
TUTORIALS = sorted(NOTEBOOKS.glob("0*.ipynb"))
ALL_NOTEBOOKS = sorted(NOTEBOOKS.glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def test_tutorials_are_there():
    names = [p.name for p in TUTORIALS]
    for prefix in ("01_", "02_", "03_", "04_", "05_"):
        assert any(n.startswith(prefix) for n in names), f"no notebooks/{prefix}*.ipynb among {names}"


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} hold outputs or execution counts; "
                       f"run `python scripts/strip_notebooks.py` before committing")


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("NSA_VIZ_SMALL", "1")  # the kernel inherits this environment
    monkeypatch.setenv("PLOTLY_RENDERER", "plotly_mimetype")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as exc:
        pytest.fail(f"{path.name} failed:\n{exc}", pytrace=False)
    print(f"{path.name}: {time.perf_counter() - t0:.0f} s")
    # a failure while *displaying* a result (e.g. a formatter's missing dependency) leaves an error output
    # without failing the cell: look for those too
    shown = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(nb.cells) if c.cell_type == "code"
             for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not shown, f"{path.name}: error outputs in cells {shown}"
