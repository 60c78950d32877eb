#!/usr/bin/env python
"""Remove outputs, execution counts and run-time metadata from notebooks, so that commits hold only sources.

    python scripts/strip_notebooks.py                 # every notebooks/*.ipynb, in place
    python scripts/strip_notebooks.py a.ipynb b.ipynb # those files
    python scripts/strip_notebooks.py --check         # list notebooks that still have outputs; exit 1 if any
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
# notebook-level metadata written by a run (widget state can be megabytes), not by the author
RUN_METADATA = ("widgets", "toc-autonumbering", "varInspector")
CELL_RUN_METADATA = ("execution", "collapsed", "scrolled", "ExecuteTime")


def has_outputs(nb) -> bool:
    return any(c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None) for c in nb.cells)


def strip(nb) -> bool:
    """Strip ``nb`` in place; True when anything changed."""
    changed = False
    for cell in nb.cells:
        for key in CELL_RUN_METADATA:
            if key in cell.metadata:
                del cell.metadata[key]
                changed = True
        if cell.cell_type != "code":
            continue
        if cell.get("outputs"):
            cell.outputs = []
            changed = True
        if cell.get("execution_count") is not None:
            cell.execution_count = None
            changed = True
    for key in RUN_METADATA:
        if key in nb.metadata:
            del nb.metadata[key]
            changed = True
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook has outputs")
    args = parser.parse_args(argv)
    paths = args.paths or sorted((ROOT / "notebooks").glob("*.ipynb"))
    dirty = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if args.check:
            if has_outputs(nb):
                dirty.append(path)
        elif strip(nb):
            nbformat.write(nb, path)
            print(f"stripped {path}")
    for path in dirty:
        print(f"{path} has outputs: run python scripts/strip_notebooks.py", file=sys.stderr)
    return 1 if dirty else 0


if __name__ == "__main__":
    sys.exit(main())
