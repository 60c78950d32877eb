"""The Voila dashboard: ``Dashboard().show()`` in a notebook, ``nsa-viz dashboard`` for the served page.

Modules: ``app`` (the ipywidgets page), ``compute`` (the reductions it shows, callable from notebooks),
``sources`` (the texts), ``worker`` (the background thread), ``launch`` (the command).
"""
from __future__ import annotations


def __getattr__(name):  # ipywidgets is imported only when the page itself is wanted
    if name == "Dashboard":
        from .app import Dashboard

        return Dashboard
    raise AttributeError(name)


__all__ = ["Dashboard"]
