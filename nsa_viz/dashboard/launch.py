"""``nsa-viz dashboard``: serve ``notebooks/dashboard.ipynb`` with Voila on 127.0.0.1 and print its URL.

The settings given on the command line reach the notebook's kernel as ``NSA_VIZ_DASHBOARD_*``
environment variables (read by :meth:`nsa_viz.dashboard.app.Dashboard.from_env`). Everything is
served from this machine: Voila's own assets, the widgets and plotly's renderer; no network is used.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from .app import ENV_PREFIX, repository_root
from .sources import DATASETS, FILE

NOTEBOOK_CELL = """\
# The nsa-viz dashboard. Served by Voila with `nsa-viz dashboard`; in Jupyter, run this cell.
# Its logic lives in nsa_viz.dashboard (settings: see `nsa-viz dashboard --help`).
from nsa_viz.dashboard import Dashboard

app = Dashboard.from_env().show()
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=8866, help="port on 127.0.0.1 (0: any free port; default 8866)")
    p.add_argument("--no-browser", action="store_true", help="do not open a web browser, only print the URL")
    p.add_argument("--model", default=None, help="local model folder or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--dataset", default="docs", choices=DATASETS + (FILE,), help="text to record (default: docs)")
    p.add_argument("--file", default="", help="a UTF-8 text file, a folder of them or a JSONL (with --dataset file)")
    p.add_argument("--tokens", type=int, default=512, help="text length in tokens (default 512: seconds on a CPU)")
    p.add_argument("--layers", default="", help="layers to record, e.g. '0, 9, 19, 29' (default: 4 spread)")
    p.add_argument("--block", type=int, default=32, choices=(16, 32, 64), help="block size of the maps (default 32)")
    p.add_argument("--results", default="", help="folder with benchmarks/results and data/results (default: the checkout)")
    p.add_argument("--notebook", default="", help="notebook to serve (default: notebooks/dashboard.ipynb)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server to answer")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int) -> int:
    """``port`` if it can be bound on 127.0.0.1 (0 picks a free one); a ValueError saying what to do otherwise."""
    if port == 0:
        return free_port()
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be in 1..65535 (or 0 for any free port), got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ValueError(f"port {port} on 127.0.0.1 is in use: choose another with --port, or --port 0") from None
    return port


def notebook_path(given: str = "") -> Path:
    """The dashboard notebook: ``given``, the checkout's ``notebooks/dashboard.ipynb``, or one written to a
    temporary folder (an installation without the repository's notebooks)."""
    if given:
        p = Path(given)
        if not p.is_file():
            raise ValueError(f"--notebook {given!r} is not a file")
        return p.resolve()
    p = repository_root() / "notebooks" / "dashboard.ipynb"
    if p.is_file():
        return p
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(NOTEBOOK_CELL)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    out = Path(tempfile.mkdtemp(prefix="nsa-viz-dashboard-")) / "dashboard.ipynb"
    nbformat.write(nb, str(out))
    return out


TEMPLATE = "nsa-viz"
# Voila looks for templates under <data dir>/voila/templates; ours (Voila's lab template without its CDN
# stylesheets) lives in this package, whose folder goes on JUPYTER_PATH
TEMPLATE_DATA_DIR = Path(__file__).resolve().parent / "share"


def has_template() -> bool:
    return (TEMPLATE_DATA_DIR / "voila" / "templates" / TEMPLATE / "index.html.j2").is_file()


def environment(args) -> dict:
    """The server's environment: ours plus the dashboard settings for the kernel, offline switches on."""
    env = dict(os.environ)
    settings = {"MODEL": args.model or "", "DATASET": args.dataset, "PATH": args.file, "TOKENS": str(args.tokens),
                "LAYERS": args.layers, "BLOCK": str(args.block),
                "RESULTS_ROOT": str(Path(args.results).resolve()) if args.results else str(repository_root())}
    for k, v in settings.items():
        env[ENV_PREFIX + k] = v
    env.setdefault("HF_HUB_OFFLINE", "1")  # nothing may try the network
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TQDM_DISABLE", "1")
    if has_template():
        env["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(TEMPLATE_DATA_DIR), env.get("JUPYTER_PATH", "")) if p)
    return env


def server_command(notebook: Path, port: int) -> list:
    cmd = [sys.executable, "-m", "voila", str(notebook), "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
           "--theme=light", "--VoilaConfiguration.show_tracebacks=False"]
    if has_template():
        cmd.append(f"--template={TEMPLATE}")
    return cmd


def wait_until_up(url: str, proc: Optional[subprocess.Popen], timeout: float) -> bool:
    """True once the server answers HTTP. It asks for a static file, never the page itself: each request for
    the page starts a kernel that runs the notebook (and would load the model once more)."""
    end = time.monotonic() + timeout
    probe = url.rstrip("/") + "/voila/static/voila.js"
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(probe, timeout=5):
                return True
        except urllib.error.HTTPError:  # any HTTP answer means the server is up
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.5)
    return False


def start_server(args, *, log=None):
    """Start Voila for ``args``: (process, URL). ``log``: a file for the server's output (default: ours).
    The caller stops the process."""
    port = check_port(args.port)
    nb = notebook_path(getattr(args, "notebook", ""))
    url = f"http://127.0.0.1:{port}/"
    proc = subprocess.Popen(server_command(nb, port), env=environment(args), cwd=str(nb.parent), stdout=log,
                            stderr=subprocess.STDOUT if log is not None else None)
    return proc, url


def can_open_browser() -> bool:
    """A graphical session to open a browser in: on a headless machine Python's ``webbrowser`` would start a
    text-mode browser in this terminal, or a graphical one that fails; the URL printed is enough there."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def run(args) -> int:
    import signal

    # a SIGTERM (service managers, `timeout`) ends us through `finally`, which stops the server too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.dataset == FILE and not args.file:
        print("--dataset file needs --file PATH", file=sys.stderr)
        return 2
    try:
        proc, url = start_server(args)
    except ValueError as exc:
        print(f"nsa-viz dashboard: {exc}", file=sys.stderr)
        return 2
    try:
        if not wait_until_up(url, proc, args.timeout):
            print(f"nsa-viz dashboard: Voila did not answer at {url} within {args.timeout:.0f} s", file=sys.stderr)
            proc.terminate()
            return 1
        print(f"\nnsa-viz dashboard: {url}  (Ctrl+C stops it)\n", flush=True)
        if not args.no_browser and can_open_browser():
            import webbrowser

            webbrowser.open(url)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nsa-viz dashboard", description="start the Voila dashboard on 127.0.0.1")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
