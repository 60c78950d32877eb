"""``nsa-viz`` command line: each subcommand lives in its own module (``add_arguments`` + ``run``)."""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "audit": ("nsa_viz.audit", "locality audit of a dataset and a pattern recommendation"),
    "bench": ("nsa_viz.tradeoffs", "speed, memory and accuracy of patterns against dense"),
    "dashboard": ("nsa_viz.dashboard.launch", "start the Voila dashboard on 127.0.0.1"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nsa-viz", description="See and measure native sparse attention.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # a subcommand whose module is missing reports itself, not the others
            p.set_defaults(_missing=f"{name} is unavailable: {exc}")
            continue
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    if getattr(args, "_missing", None):
        print(args._missing, file=sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
